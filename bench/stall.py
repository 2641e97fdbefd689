"""Data-stall fraction of a training step with a fixed synthetic compute, fed from ring/disk/mixed.

    python -m bench.stall [--quick] [--json] [--compute-ms MS]

Each step takes a batch through mmfeed's path (DiskLoader / RingLoader -> LiveDiskMixer ->
DevicePrefetcher) and then runs a fixed compute: a matmul loop calibrated once to about
`--compute-ms` (one thread, so the loader thread and the producer process keep a core).
Stall fraction = time the step waited for its batch / step time. The limit is the same
compute with no data at all, measured in the same run: the figure is steps/s with data (the
worst of ring only, disk only, mixed 0.5), the limit steps/s of compute alone, so the ratio is
about 1 - stall. The live producer is a real RingWriter process publishing pre-made samples as
fast as it can (lossy), so the input rate exceeds the compute. Target: stall < 5%.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from bench._common import cuda_variant, report, want_json

SHAPE = (8, 3, 64, 64)


def _arrays(i: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(i)
    return {"video": rng.integers(0, 255, size=SHAPE, dtype=np.uint8),
            "vec": rng.normal(size=64).astype(np.float32)}


def _producer(name: str, stop, rate: float) -> None:
    from protocol.ring import RingConfig, RingWriter
    from protocol.schema import SampleMeta, SampleSchema

    made = [_arrays(i) for i in range(8)]
    schema = SampleSchema.from_arrays(made[0])
    with RingWriter.create(RingConfig(name=name, slots=64, slot_bytes=256 << 10)) as w:
        i = 0
        t_next = time.monotonic()
        while not stop.is_set():
            w.publish(schema, SampleMeta(label=i % 2, index=i, generation=1), made[i % 8])
            i += 1
            t_next += 1.0 / rate
            delay = t_next - time.monotonic()
            if delay > 0:  # paced: on a 2-core machine a spinning producer would starve compute
                stop.wait(delay)


def _build_cache(root: Path, n: int) -> Path:
    from producer.cache_writer import CacheWriter
    from protocol.schema import SampleMeta, SampleSchema

    with CacheWriter(root / "cache", classes=["a", "b"]) as w:
        for i in range(n):
            a = _arrays(i % 16)
            w.add(f"train/{i}", "fp", "train", SampleSchema.from_arrays(a),
                  SampleMeta(label=i % 2, index=i), a)
        w.commit()
    return root / "cache"


def _calibrate(ms: float) -> tuple[torch.Tensor, int]:
    a = torch.randn(256, 256)
    iters = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ a
        dt = time.perf_counter() - t0
        if dt > 0.05:
            return a, max(1, int(iters * ms / 1000 / dt))
        iters *= 2


def _compute(a: torch.Tensor, iters: int) -> None:
    for _ in range(iters):
        a @ a


def _run(steps: int, batch: int, a, iters, cache: Path | None, ring: str | None,
         fraction: float) -> dict:
    from protocol.cache import CacheReader
    from trainer.datasets import LiveDiskMixer
    from trainer.prefetch import DevicePrefetcher, DiskLoader, RingLoader

    reader = CacheReader(cache, "train") if cache else None
    disk = DiskLoader(reader, batch).start() if reader else None
    live = RingLoader(ring, batch).start() if ring else None
    mixer = LiveDiskMixer(live, disk, fraction)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pf = DevicePrefetcher(mixer.get, dev)
    try:
        if live is not None:  # wait for the producer's first batch before timing
            deadline = time.monotonic() + 30
            while not live.ready() and time.monotonic() < deadline:
                time.sleep(0.01)
        wait = total = 0.0
        for s in range(steps + 5):
            t0 = time.perf_counter()
            b = None
            while b is None:
                b = pf.get(1.0)
            t1 = time.perf_counter()
            x = b.inputs["video"].float()  # what the loop does first: the uint8 -> float copy
            b.release()
            del x
            _compute(a, iters)
            t2 = time.perf_counter()
            if s >= 5:  # warm-up steps are not counted
                wait += t1 - t0
                total += t2 - t0
        return {"stall": wait / total, "steps_per_s": steps / total,
                "live_fraction": round(mixer.achieved_total, 3)}
    finally:
        pf.close()
        for x in (live, disk):
            if x is not None:
                x.close()
        if reader is not None:
            reader.close()


def main(argv: list[str] | None = None) -> dict | int:
    argv = sys.argv[1:] if argv is None else list(argv)

    def stall_cuda(rest):  # --device cuda: fed from GPU ring slots (bench/stall_cuda.py)
        from bench.stall_cuda import main

        return main(rest)

    handled, result = cuda_variant(argv, "python -m bench.stall", stall_cuda)
    if handled:
        return result
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--compute-ms", type=float, default=20.0)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args(argv)
    steps = 60 if args.quick else 300
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="mmfeed-bench-stall-"))
    name = f"mmbs{uuid.uuid4().hex[:10]}"
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    prod = None
    try:
        cache = _build_cache(root, 256)
        a, iters = _calibrate(args.compute_ms)
        t0 = time.perf_counter()
        for _ in range(steps):
            _compute(a, iters)
        alone = steps / (time.perf_counter() - t0)
        results = {"disk": _run(steps, args.batch_size, a, iters, cache, None, 0.0)}
        # The producer publishes 3x what the compute can consume: input rate exceeds compute.
        rate = 3.0 * alone * args.batch_size
        prod = ctx.Process(target=_producer, args=(name, stop, rate), daemon=True)
        prod.start()
        results["ring"] = _run(steps, args.batch_size, a, iters, None, name, 1.0)
        results["mixed"] = _run(steps, args.batch_size, a, iters, cache, name, 0.5)
    finally:
        stop.set()
        if prod is not None:
            prod.join(10)
            if prod.is_alive():
                prod.kill()
        shutil.rmtree(root, ignore_errors=True)
    for k, r in results.items():
        print(f"# {k:5s} stall {r['stall'] * 100:5.2f}%  {r['steps_per_s']:6.1f} steps/s  "
              f"live fraction {r['live_fraction']}")
    print(f"# compute alone {alone:.1f} steps/s ({1000 / alone:.1f} ms a step), batch "
          f"{args.batch_size} of {SHAPE} uint8")
    worst = min(r["steps_per_s"] for r in results.values())
    return report("stall", worst, "steps/s", "compute alone (no data)", alone,
                  args.json or want_json(argv),
                  stall={k: round(r["stall"], 4) for k, r in results.items()},
                  max_stall=round(max(r["stall"] for r in results.values()), 4),
                  compute_ms=args.compute_ms, quick=args.quick)


if __name__ == "__main__":
    out = main()
    sys.exit(out if isinstance(out, int) else 0)
