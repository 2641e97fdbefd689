"""Preprocess on Ray against the local pool: samples/s of `--ray` over samples/s of the local
process pool on the same machine, same dataset, same cores (the overhead ratio), plus the three
figures the N-node scaling estimate in BENCHMARKS.md is made of.

    python -m bench.ray_preprocess [--quick] [--json] [--samples N]

Figures
- ray_preprocess: samples/s of `mm-producer preprocess --ray ADDRESS` into a fresh cache, a new
  process per run (a new Ray job: its workers start and import per run, as a user's run does)
  against a Ray cluster of this machine's cores started once with `ray start --head` (its
  start-up is reported beside, not in the figure). Limit: samples/s of `mm-producer
  preprocess --workers CORES` (the local pool, also a new process per run) on the same samples
  in the same bench run. Ratio = Ray / local: what Ray's job start, scheduling, task submission
  and the scratch-file hand-over cost on one machine (1.0 = nothing; above 1 = Ray's start-up
  beat the pool's).
- per_sample_core_s: seconds of one core per sample in the local pool run (cores / samples/s):
  the decode cost that N nodes divide.
- store_mb_per_s: the driver's side of a run, alone: payload bytes copied from chunk files into
  a shard (`CacheWriter.add(payload=...)` from a memory map, as `store` does) per second,
  including the shard fsync (and the commit of a few hundred records). On one machine both files are on one disk; on a cluster this is
  the shared file system's read + write bandwidth as seen from the driver.
- commit_s_per_1k: `CacheWriter.commit()` seconds per 1000 records (index, schemas, keys,
  manifest, fsyncs, the CURRENT rename), timed on a cache of many small records.
Ray is needed (`pip install 'mmfeed[ray]'`): without it the bench exits 2 with
{"bench", "skipped"}.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench._common import machine, report, repeat
from producer.cache_writer import CacheWriter
from producer.pipeline import PipelineConfig
from producer.preprocess import run_preprocess
from producer.synth import make_dataset
from protocol.cache import open_version
from protocol.schema import SampleMeta, SampleSchema


def _store_mb_per_s(tmp: Path, nbytes: int, records: int) -> float:
    """Chunk file -> shard through CacheWriter.add(payload=memoryview of a map), + commit."""
    per = max(4096, nbytes // records)
    scratch = tmp / "chunk.bin"
    scratch.write_bytes(np.random.default_rng(0).integers(0, 255, per * records,
                                                          dtype=np.uint8).tobytes())
    schema = SampleSchema.from_arrays({"x": np.zeros(per, np.uint8)})
    cache = tmp / "store-cache"
    t0 = time.perf_counter()
    with open(scratch, "rb") as f, CacheWriter(cache, classes=["a"]) as w:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        view = memoryview(mm)
        for i in range(records):
            w.add(f"train/a/{i:06d}", "fp", "train", schema, SampleMeta(label=0, index=i),
                  payload=view[i * per:(i + 1) * per])
        view.release()
        mm.close()
        w.commit()  # the shard's fsync; the index of a few hundred records is negligible
        seconds = time.perf_counter() - t0
    shutil.rmtree(cache, ignore_errors=True)
    scratch.unlink()
    return per * records / seconds / 1e6


def _commit_s_per_1k(tmp: Path, records: int) -> float:
    schema = SampleSchema.from_arrays({"x": np.zeros(64, np.uint8)})
    payload = bytes(64)
    cache = tmp / "commit-cache"
    with CacheWriter(cache, classes=["a"]) as w:
        for i in range(records):
            w.add(f"train/a/{i:07d}", "fp", "train", schema, SampleMeta(label=0, index=i),
                  payload=payload)
        t0 = time.perf_counter()
        w.commit()
        seconds = time.perf_counter() - t0
    shutil.rmtree(cache, ignore_errors=True)
    return seconds / records * 1000


#: A throw-away cluster on this machine: no token (one left in ~/.ray by an earlier local
#: `ray.init()` would otherwise turn token auth on for the cluster but not for every driver).
RAY_ENV = {"RAY_AUTH_MODE": "disabled"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Cluster:
    """`ray start --head --block` of this machine's cores, as a user starts one; stopped as a
    process group at the end."""

    def __init__(self, tmp: Path, cpus: int):
        self.port = _free_port()
        self.log = tmp / "ray-head.log"
        t0 = time.perf_counter()
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "ray"), "start", "--head", "--port",
                 str(self.port), "--num-cpus", str(cpus), "--node-ip-address", "127.0.0.1",
                 "--include-dashboard", "false", "--disable-usage-stats", "--block",
                 "--temp-dir", str(tmp / "ray")],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, **RAY_ENV, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "1"})
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"ray start failed: {self.log.read_text()[-2000:]}")
            time.sleep(0.2)
        self.start_s = time.perf_counter() - t0
        self.address = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 45), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue


def _cli_run(root: Path, cache: Path, *extra: str) -> dict:
    """One `mm-producer preprocess` process, as a user runs it; its --json summary."""
    p = subprocess.run([str(Path(sys.executable).parent / "mm-producer"), "preprocess",
                        str(root), "--cache", str(cache), "--filter", "resize=112x112",
                        "--clip-frames", "8", "--json", "--quiet", *extra],
                       capture_output=True, text=True, timeout=3600,
                       env={**os.environ, **RAY_ENV})
    if p.returncode != 0:
        raise RuntimeError(f"preprocess {' '.join(extra)} exited {p.returncode}: "
                           f"{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer samples and repeats")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--samples", type=int, default=None, help="train samples per class")
    args = ap.parse_args(argv)
    try:
        import ray  # noqa: F401
    except ImportError:
        print(json.dumps({"bench": "ray_preprocess",
                          "skipped": "Ray is not installed: pip install 'mmfeed[ray]'"}))
        sys.exit(2)
    per_class = args.samples or (4 if args.quick else 40)
    repeats = 1 if args.quick else 3
    workers = os.cpu_count() or 1
    tmp = Path(tempfile.mkdtemp(prefix="bench-ray-preprocess-"))
    cluster = None
    try:
        root = make_dataset(tmp / "dataset", per_class={"train": per_class}, size=(320, 240),
                            clip_seconds=2.0, seed=0)
        caches = iter(range(10_000))
        last: dict = {}

        def run(*extra: str) -> None:
            cache = tmp / f"cache{next(caches)}"
            s = _cli_run(root, cache, *extra)
            assert not s["rejected"] and s["processed"] == s["cached"], s["rejected"]
            last.clear()
            last.update(s)
            shutil.rmtree(cache)

        local = repeat(lambda: run("--workers", str(workers)), repeats, warmup=1)
        n = last["cached"]
        cluster = _Cluster(tmp, workers)  # its start-up is reported, not in the figure
        remote = repeat(lambda: run("--ray", cluster.address), repeats, warmup=1)
        assert last["ray"]["cpus"] == workers, last["ray"]
        v = open_version(_sized(root, tmp))
        sample_bytes = int(np.load(v.path / "index.npy")["nbytes"].mean())
        local_rate, ray_rate = n / local.median, n / remote.median
        store = _store_mb_per_s(tmp, (32 if args.quick else 256) << 20,
                                32 if args.quick else 256)
        commit = _commit_s_per_1k(tmp, 20_000 if args.quick else 200_000)
        print(f"# {n} samples, video 320x240 2 s -> 8x3x112x112, {workers} cores, each run a "
              f"new `mm-producer preprocess` process; local pool {local_rate:.1f} samples/s, "
              f"Ray {ray_rate:.1f} samples/s (cluster start {cluster.start_s:.1f} s, not in "
              f"the figure); store {store:.0f} MB/s, commit {commit * 1000:.2f} ms per 1k "
              f"records, {sample_bytes / 1e6:.2f} MB per sample; load average "
              f"{os.getloadavg()[0]:.2f}; {machine()}", file=sys.stderr)
        return report("ray_preprocess", ray_rate, "samples/s",
                      f"local pool over {workers} cores", local_rate, args.json,
                      samples=n, workers=workers,
                      per_sample_core_s=round(workers / local_rate, 5),
                      store_mb_per_s=round(store, 1), commit_s_per_1k=round(commit, 5),
                      sample_bytes=sample_bytes, ray_start_s=round(cluster.start_s, 2),
                      ray_run_seconds=[round(x, 3) for x in remote.seconds],
                      local_run_seconds=[round(x, 3) for x in local.seconds],
                      load_avg=[round(x, 2) for x in os.getloadavg()])
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _sized(root: Path, tmp: Path) -> Path:
    cache = tmp / "sized"
    if not cache.exists():
        run_preprocess(root, cache, PipelineConfig(filter="resize=112x112", clip_frames=8),
                       workers=0, progress=False)
    return cache


if __name__ == "__main__":
    main()
