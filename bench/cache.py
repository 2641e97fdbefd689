"""Disk cache read speed: CacheReader.read_into vs a raw sequential read of the same shard bytes.

Writes a synthetic cache of ~1 MiB video-clip records (1 GiB, 256 MiB with --quick) with the real
CacheWriter, then reads every record into one preallocated buffer:

- `cache`:  CacheReader.read_into(i, buf) for i in order (what a DataLoader worker does), and
            in a shuffled order (what training does) as an extra line;
  and in shuffled batches of 32 through read_batch_into (what a batched loader does);
- `raw`:    the physical limit: the shard files read start to end with readinto() into the
            same buffer in record-sized chunks, no index, no schema, no mmap.

Warm: page cache filled by a first pass, median of repeats. Cold: the page cache is dropped
before each repeat, by `echo 3 > /proc/sys/vm/drop_caches` when allowed, else by
posix_fadvise(POSIX_FADV_DONTNEED) on every shard file (the reader is closed first, because
the kernel keeps pages that a live mapping still uses). The line says which method ran.

    python -m bench.cache [--quick] [--json] [--dir DIR] [--gib N]
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench._common import repeat, report
from producer.cache_writer import CacheWriter
from protocol.cache import CacheReader
from protocol.schema import SampleMeta, SampleSchema

# A 16-frame 112x196 RGB clip: 1,053,696 bytes, deliberately not a page multiple so the
# alignment padding between records is part of what is measured.
CLIP = (16, 3, 112, 196)
BATCH = 32  # read_batch_into: prefetches the whole shuffled batch, then copies row by row


def write_cache(directory: Path, total_bytes: int) -> tuple[int, float]:
    schema = SampleSchema.from_arrays({"video": np.zeros(CLIP, np.uint8)})
    n = max(8, total_bytes // schema.payload_nbytes)
    payload = np.random.default_rng(0).integers(0, 256, schema.payload_nbytes, dtype=np.uint8)
    t0 = time.perf_counter()
    with CacheWriter(directory, classes=["a", "b"], config_hash="bench") as w:
        for i in range(n):
            payload[:8] = np.frombuffer(i.to_bytes(8, "little"), np.uint8)  # records differ
            w.add(f"train/a/{i:06d}", "fp", "train", schema,
                  SampleMeta(label=i % 2, timestamp_ns=i, index=i), payload=payload)
        w.commit()
    return n, time.perf_counter() - t0


def shard_files(directory: Path) -> list[Path]:
    with CacheReader(directory) as r:
        vdir = directory / f"v{r.version:06d}"
    return sorted(vdir.glob("shard-*.bin"))


def drop_cache(files: list[Path]) -> str:
    """Evict the files from the page cache; returns the method that worked."""
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        pass
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "fadvise(DONTNEED)"


def read_cache(reader: CacheReader, order: np.ndarray, buf: np.ndarray) -> int:
    total = 0
    for i in order:
        reader.read_into(int(i), buf)
        total += reader.payload_nbytes(int(i))
    return total


def read_batches(reader: CacheReader, order: np.ndarray, out: np.ndarray) -> int:
    total = 0
    for s in range(0, len(order), len(out)):
        idx = order[s: s + len(out)]
        reader.read_batch_into(idx, out[: len(idx)])
        total += len(idx) * out.shape[1]
    return total


def read_raw(files: list[Path], buf: np.ndarray, chunk: int) -> int:
    view = memoryview(buf)[:chunk]
    total = 0
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--quick", action="store_true", help="256 MiB instead of 1 GiB, fewer repeats")
    ap.add_argument("--gib", type=float, default=None, help="cache size in GiB")
    ap.add_argument("--dir", default=None, help="where to write the cache (a real disk, not tmpfs)")
    args = ap.parse_args(argv)
    size = int((args.gib if args.gib else (0.25 if args.quick else 1.0)) * (1 << 30))
    repeats = 3 if args.quick else 5

    work = Path(tempfile.mkdtemp(prefix="mmfeed-bench-cache-", dir=args.dir))
    try:
        n, write_s = write_cache(work / "cache", size)
        files = shard_files(work / "cache")
        reader = CacheReader(work / "cache")
        rec = reader.max_payload_nbytes
        buf = np.empty(rec, np.uint8)
        seq = np.arange(n)
        shuffled = np.random.default_rng(1).permutation(n)
        batch = np.empty((BATCH, rec), np.uint8)
        payload_bytes = n * rec
        print(f"cache: {n} records of {rec} B ({payload_bytes / 2**30:.2f} GiB) in {len(files)} "
              f"shard(s) at {work}; written at {payload_bytes / write_s / 1e9:.2f} GB/s")

        # --- warm ---------------------------------------------------------------------------
        raw_bytes = read_raw(files, buf, rec)  # also warms the page cache
        t_raw = repeat(lambda: read_raw(files, buf, rec), repeats=repeats)
        t_seq = repeat(lambda: read_cache(reader, seq, buf), repeats=repeats)
        t_rand = repeat(lambda: read_cache(reader, shuffled, buf), repeats=repeats)
        t_batch = repeat(lambda: read_batches(reader, shuffled, batch), repeats=repeats)
        warm_raw = raw_bytes / t_raw.median / 1e9
        warm_seq = payload_bytes / t_seq.median / 1e9
        warm_rand = payload_bytes / t_rand.median / 1e9
        warm_batch = payload_bytes / t_batch.median / 1e9
        for name, t, gbs in (("raw readinto", t_raw, warm_raw), ("cache sequential", t_seq, warm_seq),
                             ("cache shuffled", t_rand, warm_rand),
                             (f"cache batch{BATCH} shuf", t_batch, warm_batch)):
            lo, hi = t.spread
            samples = (raw_bytes / rec if name.startswith("raw") else n) / t.median
            print(f"  warm {name:17s} {gbs:6.2f} GB/s  {samples:8.0f} samples/s  "
                  f"(spread {lo * 1e3:.0f}-{hi * 1e3:.0f} ms)")

        # --- cold ---------------------------------------------------------------------------
        reader.close()
        cold = {"raw": [], "seq": [], "rand": [], "batch": []}
        method = ""
        for _ in range(max(2, repeats - 2)):
            for key in cold:
                method = drop_cache(files)
                r = CacheReader(work / "cache")  # opened outside the timing, like a worker's
                t0 = time.perf_counter()
                if key == "raw":
                    nbytes = read_raw(files, buf, rec)
                elif key == "batch":
                    nbytes = read_batches(r, shuffled, batch)
                else:
                    nbytes = read_cache(r, seq if key == "seq" else shuffled, buf)
                cold[key].append(nbytes / (time.perf_counter() - t0) / 1e9)
                r.close()
        cold_raw, cold_seq, cold_rand, cold_batch = (
            float(np.median(cold[k])) for k in ("raw", "seq", "rand", "batch"))
        print(f"  cold ({method}) raw readinto {cold_raw:.2f} GB/s | cache sequential "
              f"{cold_seq:.2f} GB/s (ratio {cold_seq / cold_raw:.2f}) | cache shuffled "
              f"{cold_rand:.2f} GB/s (ratio {cold_rand / cold_raw:.2f}) | cache batch{BATCH} "
              f"shuffled {cold_batch:.2f} GB/s (ratio {cold_batch / cold_raw:.2f})")

        return report(
            "cache", warm_seq, "GB/s", "raw sequential readinto (warm)", warm_raw, args.json,
            samples_per_s=round(n / t_seq.median, 1),
            record_bytes=rec, records=n,
            warm_shuffled_gbs=round(warm_rand, 4), warm_shuffled_ratio=round(warm_rand / warm_raw, 4),
            cold_method=method,
            cold_figure=round(cold_seq, 4), cold_limit=round(cold_raw, 4),
            cold_ratio=round(cold_seq / cold_raw, 4),
            cold_shuffled_gbs=round(cold_rand, 4),
            cold_batch_shuffled_gbs=round(cold_batch, 4),
            warm_batch_shuffled_gbs=round(warm_batch, 4),
            write_gbs=round(payload_bytes / write_s / 1e9, 4),
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
