"""Samples/s into the model's device: mmfeed's disk loader vs a raw read vs a hand-written loader.

    python -m bench.loader [--quick] [--json] [--samples N]

All read the same samples, in the same run, with a warm page cache, in steady state (what a
training run sees after its first epoch: pools allocated, the reader open), repeats interleaved
round-robin so that load from other processes hits every contender alike:

- mmfeed:   one `DiskLoader` (CacheReader.read_batch_into -> a pooled, pinned-on-CUDA batch
            buffer, schema-grouped, shuffled) -> `DevicePrefetcher` (H2D on a side stream on
            CUDA, a no-op on the CPU) -> the batch's per-modality views on the device; one
            repeat = one epoch, the first epoch is the warm-up.
- limit (the fair one, `limit`): a raw shuffled read of the same bytes: the same batches in
            the same order (`group_batches`, same seed and epoch), each record pread() from its
            shard at its index offset straight into its row of a preallocated batch buffer
            (then one H2D copy per batch on CUDA). No index checks, schemas, threads or queue.
- ceiling (`limit_sequential`): the shard files read start to end with preadv(), a batch's
            worth of bytes per call: what the page cache + memcpy allow with no seeking at all.

Both raw reads rotate through as many batch buffers as the loader's pool holds (4: a loader
must fill one batch while others are trained on). One buffer of 19 MB would stay in this CPU's
32 MB L3 cache and measure a cache-resident copy no loader gets; the single-buffer sequential
read is printed too (`sequential_1buf`), as the figure the first version of this bench used.
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
from typing import Callable

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


class MmfeedRun:
    """One reader + DiskLoader + DevicePrefetcher kept open across repeats (steady state)."""

    def __init__(self, cache: Path, batch: int):
        from protocol.cache import CacheReader
        from trainer.prefetch import DevicePrefetcher, DiskLoader

        self.dev = _device()
        self.reader = CacheReader(cache, "train")
        self.loader = DiskLoader(self.reader, batch, epochs=None, shuffle=True).start()
        self.per_epoch = self.loader.batches_per_epoch()
        self.pf = DevicePrefetcher(self.loader.get, self.dev)

    def epoch(self) -> int:
        """Consume an epoch's batches; returns the samples the loader READ in the meantime.

        Not the samples consumed: between repeats the loader runs ahead and fills its queue
        (3 batches, ~9% of an epoch), which would be a free head start here and CPU taken from
        the next contender. Counting what it produced while timed is its steady-state rate.
        """
        start = self.loader.stats.samples
        for _ in range(self.per_epoch):
            b = None
            while b is None:
                b = self.pf.get(1.0)
            b.release()
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
        return self.loader.stats.samples - start

    def settle(self, deadline_s: float = 5.0) -> None:
        """Untimed: wait until the loader's read-ahead is done (queue full, thread blocked),
        so the next contender's timing does not share the CPU with it."""
        end = time.monotonic() + deadline_s
        while not self.loader._q.full() and time.monotonic() < end:
            time.sleep(0.001)  # polling a condition with a deadline (bench only)

    def close(self) -> None:
        self.pf.close()
        self.loader.close()
        self.reader.close()


class RawRun:
    """The limits: the same bytes read with bare syscalls into one preallocated batch buffer."""

    def __init__(self, cache: Path, batch: int, buffers: int = 4):
        from protocol.cache import INDEX_FILE, read_current, version_name
        from trainer.batching import group_batches

        vdir = cache / version_name(read_current(cache))
        self.index = np.load(vdir / INDEX_FILE)
        self.shards = sorted(vdir.glob("shard-*.bin"))
        self.fds = [os.open(p, os.O_RDONLY) for p in self.shards]
        self.dev = _device()
        self.batch = batch
        self.nbytes = int(self.index["nbytes"][0])
        self.stride = -(-self.nbytes // 4096) * 4096  # records sit at 4096-aligned offsets
        row = -(-self.nbytes // 64) * 64  # the loader's batch row (trainer.batching.row_bytes)
        pin = self.dev.type == "cuda"
        # as many buffers as DiskLoader's pool (depth 2 + 2), pages touched once, as its are
        self.rows = [torch.zeros((batch, row), dtype=torch.uint8, pin_memory=pin)
                     for _ in range(buffers)]
        self.seq = [torch.zeros(batch * self.stride, dtype=torch.uint8, pin_memory=pin)
                    for _ in range(buffers)]
        sids = self.index["schema_id"]
        self.groups = {int(s): np.flatnonzero(sids == s) for s in np.unique(sids)}
        self._group_batches = group_batches
        self._epoch = 0

    def shuffled(self) -> int:
        """The loader's batches (same seed and epoch sequence), record by record with pread."""
        plan = self._group_batches(self.groups, self.batch, shuffle=True, seed=0,
                                   epoch=self._epoch)
        self._epoch += 1
        offs, shard, n = self.index["offset"], self.index["shard"], self.nbytes
        views = [[memoryview(r.numpy()[j])[:n] for j in range(self.batch)] for r in self.rows]
        count = 0
        for b, idx in enumerate(plan):
            rows = views[b % len(views)]
            for j, i in enumerate(idx.tolist()):
                os.preadv(self.fds[shard[i]], [rows[j]], int(offs[i]))
            count += len(idx)
            if self.dev.type == "cuda":
                self.rows[b % len(views)][: len(idx)].to(self.dev, non_blocking=True)
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
        return count

    def sequential(self, buffers: int | None = None) -> int:
        """The shard files start to end, a batch's bytes per read, rotating buffers."""
        bufs = self.seq[: buffers or len(self.seq)]
        views = [memoryview(b.numpy()) for b in bufs]
        n = calls = 0
        for fd in self.fds:
            off, size = 0, os.fstat(fd).st_size
            while off < size:
                got = os.preadv(fd, [views[calls % len(views)]], off)
                if not got:
                    break
                off += got
                n += got // self.stride
                if self.dev.type == "cuda":
                    bufs[calls % len(views)][:got].to(self.dev, non_blocking=True)
                calls += 1
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
        return n

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


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


def _rates(fns: dict[str, Callable[[], int]], repeats: int,
           settle: dict[str, Callable[[], None]] | None = None) -> dict[str, list[float]]:
    """Samples/s of each fn, `repeats` times, round-robin (after one warm-up call each);
    `settle[name]()` runs untimed after that fn."""
    settle = settle or {}
    for k, fn in fns.items():
        fn()  # warm: page cache, pools, first epoch, worker start-up paths
        settle.get(k, lambda: None)()
    rates: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            n = fn()
            rates[k].append(n / (time.perf_counter() - t0))
            settle.get(k, lambda: None)()
    return rates


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
    mm = raw = None
    try:
        cache, npy = _build(root, n, shape)
        mm, raw = MmfeedRun(cache, args.batch_size), RawRun(cache, args.batch_size)
        record = raw.nbytes
        rates = _rates({
            "mmfeed": mm.epoch,
            "raw shuffled": raw.shuffled,
            "raw sequential": raw.sequential,
            "sequential_1buf": lambda: raw.sequential(1),
        }, repeats, settle={"mmfeed": mm.settle})
        # The baseline apart, after mmfeed's reader closed: DataLoader forks its workers per
        # epoch, and forking a process that holds 600 MB of populated shard maps and pinned
        # pools copies their page tables: 3x slower workers, measured, which is not its fault.
        mm.close()
        mm = None
        rates.update(_rates({"baseline": lambda: run_baseline(npy, n, args.batch_size,
                                                              args.workers)}, repeats))
    finally:
        for run in (mm, raw):
            if run is not None:
                run.close()
        shutil.rmtree(root, ignore_errors=True)
    med = {k: float(np.median(v)) for k, v in rates.items()}
    mb = record / 1e6
    print(f"# {n} samples of {record} B, batch {args.batch_size}, device {_device()}, "
          f"{repeats} repeats round-robin, steady state, warm page cache; {machine()}; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for k, v in rates.items():
        extra = f"  (np.load DataLoader, {args.workers} workers)" if k == "baseline" else ""
        print(f"# {k:15s} {med[k]:9.0f} samples/s ({med[k] * mb:7.0f} MB/s)  "
              f"spread {min(v):.0f}-{max(v):.0f}{extra}")
    print(f"# mmfeed vs raw shuffled {med['mmfeed'] / med['raw shuffled']:.2f}, vs raw sequential "
          f"{med['mmfeed'] / med['raw sequential']:.2f}, vs sequential_1buf "
          f"{med['mmfeed'] / med['sequential_1buf']:.2f}, vs baseline "
          f"{med['mmfeed'] / med['baseline']:.1f}x")
    return report("loader", med["mmfeed"], "samples/s", "raw shuffled pread of the same bytes",
                  med["raw shuffled"], args.json or want_json(argv),
                  limit_sequential=round(med["raw sequential"], 2),
                  ratio_sequential=round(med["mmfeed"] / med["raw sequential"], 4),
                  sequential_1buf=round(med["sequential_1buf"], 2),
                  baseline=round(med["baseline"], 2),
                  vs_baseline=round(med["mmfeed"] / med["baseline"], 3), samples=n,
                  sample_bytes=record, device=str(_device()), quick=args.quick,
                  load_average=round(os.getloadavg()[0], 2))


if __name__ == "__main__":
    main()
