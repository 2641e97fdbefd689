"""Samples/s into the model's device: mmfeed's disk loader vs a raw read vs a hand-written loader.

    python -m bench.loader [--quick] [--json] [--samples N]

All three read the same samples, in the same run, with a warm page cache (each runs once
before it is timed):

- mmfeed:   `DiskLoader` (CacheReader.read_batch_into -> a pooled, pinned-on-CUDA batch buffer,
            schema-grouped, shuffled) -> `DevicePrefetcher` (H2D on a side stream on CUDA, a
            no-op on the CPU) -> the batch's per-modality views on the device.
- limit:    a raw read of the same bytes: the cache's shard files read start to end with
            readinto() into one preallocated buffer of a batch's size (then one H2D copy per
            batch on CUDA). No shuffling, no per-sample work: what the disk + memcpy allow.
- baseline: what a user writes by hand: one .npy per modality per sample, a map-style
            Dataset whose __getitem__ np.loads them, DataLoader(batch_size, shuffle, workers=2,
            pin_memory on CUDA), then .to(device).

Target (issue 6): >= 0.8x the raw read, and ahead of the baseline.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench._common import machine, report, want_json


def _build(root: Path, n: int, shape: tuple[int, ...]) -> tuple[Path, Path]:
    from producer.cache_writer import CacheWriter
    from protocol.schema import SampleMeta, SampleSchema

    rng = np.random.default_rng(0)
    cache, npy = root / "cache", root / "npy"
    npy.mkdir()
    video = rng.integers(0, 255, size=(16, *shape), dtype=np.uint8)
    with CacheWriter(cache, classes=["a", "b"]) as w:
        for i in range(n):
            arrays = {"video": video[i % 16], "vec": rng.normal(size=64).astype(np.float32)}
            schema = SampleSchema.from_arrays(arrays)
            w.add(f"train/{i}", "fp", "train", schema, SampleMeta(label=i % 2, index=i), arrays)
            np.save(npy / f"{i:06d}_video.npy", arrays["video"])
            np.save(npy / f"{i:06d}_vec.npy", arrays["vec"])
        w.commit()
    return cache, npy


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def run_mmfeed(cache: Path, batch: int) -> int:
    from protocol.cache import CacheReader
    from trainer.prefetch import DevicePrefetcher, DiskLoader

    dev = _device()
    with CacheReader(cache, "train") as r:
        loader = DiskLoader(r, batch, epochs=1, shuffle=True).start()
        pf = DevicePrefetcher(loader.get, dev)
        n = 0
        try:
            while True:
                b = pf.get(0.2)
                if b is None:
                    if loader.exhausted:
                        break
                    continue
                n += b.n
                b.release()
        finally:
            pf.close()
            loader.close()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    return n


def run_raw(cache: Path, batch: int, record_bytes: int) -> int:
    """The same shard bytes, sequential readinto() into one batch-sized buffer (+ H2D on CUDA)."""
    from protocol.cache import read_current, version_name

    vdir = cache / version_name(read_current(cache))
    dev = _device()
    stride = -(-record_bytes // 4096) * 4096  # records sit at 4096-aligned offsets
    buf = torch.empty(batch * stride, dtype=torch.uint8, pin_memory=dev.type == "cuda")
    view = memoryview(buf.numpy())
    n = 0
    for shard in sorted(vdir.glob("shard-*.bin")):
        with open(shard, "rb", buffering=0) as f:
            while True:
                got = f.readinto(view)
                if not got:
                    break
                n += got // stride
                if dev.type == "cuda":
                    buf[:got].to(dev, non_blocking=True)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return n


class NpyDataset(torch.utils.data.Dataset):
    """The hand-written baseline: np.load per file in __getitem__."""

    def __init__(self, root: Path, n: int):
        self.root, self.n = root, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        video = np.load(self.root / f"{i:06d}_video.npy")
        vec = np.load(self.root / f"{i:06d}_vec.npy")
        return {"video": torch.from_numpy(video), "vec": torch.from_numpy(vec)}, i % 2


def run_baseline(npy: Path, n: int, batch: int, workers: int) -> int:
    dev = _device()
    dl = torch.utils.data.DataLoader(NpyDataset(npy, n), batch_size=batch, shuffle=True,
                                     num_workers=workers, pin_memory=dev.type == "cuda")
    got = 0
    for inputs, labels in dl:
        for v in inputs.values():
            v.to(dev, non_blocking=True)
        got += len(labels)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return got


def _rate(fn, repeats: int) -> tuple[float, list[float]]:
    fn()  # warm: page cache, pools, worker start-up paths
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = fn()
        rates.append(n / (time.perf_counter() - t0))
    return float(np.median(rates)), rates


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer samples and repeats")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2, help="baseline DataLoader workers")
    args = ap.parse_args(argv)
    n = args.samples or (256 if args.quick else 1024)
    repeats = 3 if args.quick else 5
    shape = (16, 3, 112, 112)  # a 16-frame 112x112 RGB clip (the usual video-model input): 588 KiB
    root = Path(tempfile.mkdtemp(prefix="mmfeed-bench-loader-"))
    try:
        cache, npy = _build(root, n, shape)
        from protocol.cache import CacheReader

        with CacheReader(cache, "train") as r:
            record = r.payload_nbytes(0)
        mm, mm_all = _rate(lambda: run_mmfeed(cache, args.batch_size), repeats)
        raw, raw_all = _rate(lambda: run_raw(cache, args.batch_size, record), repeats)
        base, base_all = _rate(lambda: run_baseline(npy, n, args.batch_size, args.workers), repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    mb = record / 1e6
    print(f"# {n} samples of {record} B, batch {args.batch_size}, device {_device()}, "
          f"{machine()}")
    print(f"# mmfeed   {mm:9.0f} samples/s ({mm * mb:7.0f} MB/s)  spread {min(mm_all):.0f}-{max(mm_all):.0f}")
    print(f"# raw read {raw:9.0f} samples/s ({raw * mb:7.0f} MB/s)  spread {min(raw_all):.0f}-{max(raw_all):.0f}")
    print(f"# baseline {base:9.0f} samples/s ({base * mb:7.0f} MB/s)  spread {min(base_all):.0f}-{max(base_all):.0f}"
          f"  (np.load DataLoader, {args.workers} workers)")
    return report("loader", mm, "samples/s", "raw read of the same bytes", raw,
                  args.json or want_json(argv), baseline=round(base, 2),
                  vs_baseline=round(mm / base, 3), samples=n, sample_bytes=record,
                  device=str(_device()), quick=args.quick)


if __name__ == "__main__":
    main()
