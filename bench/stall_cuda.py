"""Data stall of a ResNet-sized training step fed from GPU ring slots, the disk cache and both.

    python -m bench.stall --device cuda [--json] [--steps N] [--batch B]

Sources, each through mmfeed's own path into the same step:
  ring   a real producer process (GpuSlotWriter, lossless, CUDA IPC pool) publishes video clips
         (8, 3, 112, 112) uint8 that are already on the GPU, faster than the model consumes
         them; GpuRingLoader (slot -> batch, device to device) -> LiveDiskMixer (live only)
  disk   a cache of the same clips (CacheWriter, page cache warm): DiskLoader (pinned host
         batches) -> LiveDiskMixer (disk only); the prefetcher uploads on its side stream
  mixed  both at live fraction 0.5
-> DevicePrefetcher -> uint8 -> float -> a ResNet-18-sized conv net (bf16 autocast, forward +
backward + SGD). Figure: steps/s of the worst source; limit: the same steps on one pre-made
batch on the GPU, measured in the same run; each source's stall = 1 - its steps/s / alone.
Target: stall < 2% for every source (ratio > 0.98).
Without a GPU: one line saying why, exit 2 (bench/_cuda.py).
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

from bench._common import report
from bench._cuda import cuda_missing, skip

CLIP = (8, 3, 112, 112)


def _producer(name: str, ready, stop) -> None:
    import torch

    from producer.gpu_slot_writer import GpuSlotWriter
    from protocol.errors import RingFull
    from protocol.ring import RingConfig
    from protocol.schema import ModalitySpec, SampleMeta, SampleSchema

    schema = SampleSchema((ModalitySpec("video", "uint8", CLIP),))
    clips = torch.randint(0, 255, (16, *CLIP), dtype=torch.uint8, device="cuda")
    cfg = RingConfig(name=name, slots=64, slot_bytes=schema.payload_nbytes, mode="lossless")
    with GpuSlotWriter.create(cfg, backend="cuda", device="cuda") as w:
        ready.set()
        i = 0
        while not stop.is_set():
            try:
                w.publish(schema, SampleMeta(label=i % 10, index=i), {"video": clips[i % 16]},
                          timeout=0.1)
                i += 1
            except RingFull:
                pass


def _build_cache(root: Path, n: int) -> Path:
    """n records of the ring's clip shape in a real cache (what `mm-producer preprocess` writes)."""
    import numpy as np

    from producer.cache_writer import CacheWriter
    from protocol.schema import SampleMeta, SampleSchema

    rng = np.random.default_rng(0)
    clips = [{"video": rng.integers(0, 255, CLIP, dtype=np.uint8)} for _ in range(16)]
    schema = SampleSchema.from_arrays(clips[0])
    with CacheWriter(root / "cache", classes=[str(i) for i in range(10)]) as w:
        for i in range(n):
            w.add(f"train/{i}", "fp", "train", schema, SampleMeta(label=i % 10, index=i),
                  clips[i % 16])
        w.commit()
    return root / "cache"


def _model():
    import torch
    from torch import nn

    def block(cin, cout, stride):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                             nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    # ResNet-18's widths and depth (no skips: the cost, not the accuracy, is what matters here).
    return nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.MaxPool2d(3, 2, 1), block(64, 64, 1), block(64, 64, 1),
                         block(64, 128, 2), block(128, 128, 1), block(128, 256, 2),
                         block(256, 256, 1), block(256, 512, 2), block(512, 512, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10)
                         ).cuda().to(memory_format=torch.channels_last)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.stall --device cuda")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args(argv)
    why = cuda_missing()
    if why is not None:
        return skip("stall_cuda", why, args.json)
    import torch
    import torch.nn.functional as F

    from trainer.datasets import LiveDiskMixer
    from trainer.gpu_slot_loader import GpuRingLoader
    from trainer.prefetch import DevicePrefetcher

    dev = torch.device("cuda")
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(video_u8, labels):
        x = video_u8.flatten(0, 1).float().div_(255).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(x).unflatten(0, video_u8.shape[:2]).mean(1)
            loss = F.cross_entropy(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    fixed = torch.randint(0, 255, (args.batch, *CLIP), dtype=torch.uint8, device=dev)
    fixed_y = torch.randint(0, 10, (args.batch,), device=dev)
    for _ in range(10):
        step(fixed, fixed_y)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step(fixed, fixed_y)
    torch.cuda.synchronize()
    alone = args.steps / (time.perf_counter() - t0)

    def fed(pf) -> tuple[float, float]:
        """(steps/s, ms a step spent waiting for its batch) over args.steps after 10 warm-up."""
        wait = 0.0
        for s in range(args.steps + 10):
            if s == 10:                       # warm-up steps are not counted
                torch.cuda.synchronize()
                t0, wait = time.perf_counter(), 0.0
            t1 = time.perf_counter()
            b = None
            while b is None:
                b = pf.get(1.0)
            wait += time.perf_counter() - t1
            step(b.inputs["video"], b.labels)
            b.release()
        torch.cuda.synchronize()
        return args.steps / (time.perf_counter() - t0), wait / args.steps * 1000

    from protocol.cache import CacheReader
    from trainer.prefetch import DiskLoader

    work = Path(tempfile.mkdtemp(prefix="mmbsc"))
    cache = _build_cache(work, 512)
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    name = f"mmbsc{uuid.uuid4().hex[:10]}"
    prod = ctx.Process(target=_producer, args=(name, ready, stop), daemon=True)
    prod.start()
    runs: dict[str, dict] = {}
    copies = None
    try:
        if not ready.wait(120):
            raise RuntimeError("GPU slot producer did not start in 120 s")
        for source, fraction in (("ring", 1.0), ("disk", 0.0), ("mixed", 0.5)):
            live = disk = reader = pf = None
            try:
                if fraction > 0:
                    live = GpuRingLoader(name, args.batch, device=dev, start="next").start()
                if fraction < 1:
                    reader = CacheReader(cache, "train")
                    disk = DiskLoader(reader, args.batch).start()  # pinned when CUDA is up
                mixer = LiveDiskMixer(live, disk, fraction)
                pf = DevicePrefetcher(mixer.get, dev)
                steps_s, wait_ms = fed(pf)
                runs[source] = {"steps_per_s": round(steps_s, 2), "wait_ms": round(wait_ms, 3),
                                "stall": round(1 - steps_s / alone, 4),
                                "live_fraction": round(mixer.achieved_total, 3)}
                if source == "ring":
                    copies = live.stats.copies
            finally:
                if pf is not None:
                    pf.close()
                for x in (live, disk, reader):
                    if x is not None:
                        x.close()
    finally:
        stop.set()
        prod.join(30)
        if prod.is_alive():
            prod.kill()
        shutil.rmtree(work, ignore_errors=True)
    print(f"# ResNet-18-sized step, batch {args.batch} x {CLIP}: alone {alone:.1f} steps/s; "
          f"host copies on the GPU-slot path: {copies}")
    for source, r in runs.items():
        print(f"# {source:5s}: {r['steps_per_s']:.1f} steps/s, stall {r['stall'] * 100:.2f}%, "
              f"waiting {r['wait_ms']:.2f} ms a step, live fraction {r['live_fraction']}")
    worst = min(runs, key=lambda k: runs[k]["steps_per_s"])
    report("stall_cuda", runs[worst]["steps_per_s"], "steps/s", "step alone (no data)", alone,
           args.json, worst=worst, stall=runs[worst]["stall"], runs=runs, batch=args.batch,
           target_ratio=0.98)
    return 0


if __name__ == "__main__":
    sys.exit(main())
