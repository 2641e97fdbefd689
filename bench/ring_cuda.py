"""GPU ring slots: producer GPU slot -> trainer batch, GB/s, vs an in-process device copy.

    python -m bench.ring --device cuda [--json] [--mib M] [--samples N] [--batch B]
    (dispatched here by bench/ring.py; `python -m bench.ring_cuda` works too)

A real producer process (GpuSlotWriter, lossless, CUDA IPC pool) publishes N samples of M MiB
from a tensor already on the GPU; this process reads them with GpuRingReader.receive_batch_into
into a (B, M MiB) CUDA batch: descriptor through the shm ring, slot seqlock checks, one
device-to-device copy per sample, one host wait per window. The figure is payload GB/s as the
trainer sees it; the limit is the same bytes copied device-to-device inside one process
(`batch.copy_(src)` of the same shape), measured in the same run. Target: ratio >= 0.8.
Without a GPU: one line saying why, exit 2 (bench/_cuda.py).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
import uuid

from bench._common import report
from bench._cuda import cuda_missing, skip


def _producer(name: str, nbytes: int, count: int, ready, go, done) -> None:
    import torch

    from producer.gpu_slot_writer import GpuSlotWriter
    from protocol.ring import RingConfig
    from protocol.schema import ModalitySpec, SampleMeta, SampleSchema

    schema = SampleSchema((ModalitySpec("video", "uint8", (nbytes,)),))
    src = torch.arange(nbytes, device="cuda", dtype=torch.int64).remainder_(251).to(torch.uint8)
    cfg = RingConfig(name=name, slots=8, slot_bytes=nbytes, mode="lossless")
    with GpuSlotWriter.create(cfg, backend="cuda", device="cuda") as w:
        ready.set()
        go.wait(60)
        for i in range(count):
            w.publish(schema, SampleMeta(index=i), {"video": src}, timeout=60)
        done.wait(120)   # the pool must outlive the reader's last copy


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ring --device cuda")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    ap.add_argument("--mib", type=float, default=8.0, help="payload per sample (default 8 MiB)")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args(argv)
    why = cuda_missing()
    if why is not None:
        return skip("ring_cuda", why, args.json)
    import torch

    from trainer.gpu_slot_reader import GpuRingReader

    nbytes = int(args.mib * (1 << 20)) // 64 * 64
    out = torch.empty((args.batch, nbytes), dtype=torch.uint8, device="cuda")
    src = torch.empty_like(out).random_(0, 255)

    # The limit: the same bytes, device to device, in one process.
    for _ in range(3):
        out.copy_(src)
    torch.cuda.synchronize()
    reps = max(3, args.samples // args.batch)
    t0 = time.perf_counter()
    for _ in range(reps):
        out.copy_(src)
    torch.cuda.synchronize()
    d2d = reps * args.batch * nbytes / (time.perf_counter() - t0) / 1e9

    ctx = mp.get_context("spawn")
    ready, go, done = ctx.Event(), ctx.Event(), ctx.Event()
    name = f"mmbrc{uuid.uuid4().hex[:10]}"
    prod = ctx.Process(target=_producer, args=(name, nbytes, args.samples, ready, go, done),
                       daemon=True)
    prod.start()
    try:
        if not ready.wait(120):
            raise RuntimeError("GPU slot producer did not start in 120 s")
        with GpuRingReader.attach(name, device="cuda", start="oldest") as r:
            go.set()
            got = 0
            t0 = None
            while got < args.samples:
                res = r.receive_batch_into(out, timeout=60)
                if res is None:
                    raise RuntimeError(f"no sample after {got}")
                if t0 is None:        # timing starts after the first batch (mapping, warm-up)
                    t0, first = time.perf_counter(), len(res[1])
                got += len(res[1])
            secs = time.perf_counter() - t0
            st = r.stats()
    finally:
        go.set()
        done.set()
        prod.join(30)
        if prod.is_alive():
            prod.kill()
    gbs = (got - first) * nbytes / secs / 1e9
    print(f"# {got} samples of {nbytes / 2**20:.1f} MiB, batch {args.batch}: copies {st.copies}, "
          f"host waits {st.syncs}, dropped {st.dropped}, mappings {st.mappings}")
    report("ring_cuda", gbs, "GB/s", "in-process D2D copy", d2d, args.json,
           samples=got, mib=args.mib, batch=args.batch, syncs=st.syncs, dropped=st.dropped,
           target_ratio=0.8)
    return 0


if __name__ == "__main__":
    sys.exit(main())
