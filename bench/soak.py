"""Memory of both daemons over a long run: does anything grow while mmfeed trains for days?

    python -m bench.soak [--minutes 20] [--interval 10] [--quick] [--json]

Runs what a user runs: `mm-producer preprocess` of a synthetic dataset to a disk cache, then
`mm-producer run --loop --rate max` filling a ring and `mm-trainer run` training on the ring and
the cache together (mix 0.5), while a control client switches the video filter through five
specs (five sample schemas, so generations, schema changes and buffer pools are exercised),
every 30 s. Every `interval` seconds it reads each daemon's resident memory from
/proc/PID/status: RssAnon (the heap: what a leak grows) and RssShmem (the ring, fixed size).

Figure: RssAnon growth after warm-up (the first quarter of the run is set-up: imports, FFT
plans, page cache, first batches) as MiB per hour, a least-squares slope over the rest, beside
the RssAnon level it is a fraction of. There is no physical limit to set it against; the
expectation is a slope indistinguishable from zero (allocator noise is a few MiB either way),
and the figure that would show a leak is a steady positive slope over a long run.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from bench._common import machine
from producer.synth import make_dataset
from protocol.control import ControlClient, Timeouts

ROOT = Path(__file__).resolve().parents[1]
FILTERS = ("gray", "resize=48x36", "rgb", "resize=32x32,gray", "none")
SWITCH_EVERY_S = 30.0


@dataclass
class Track:
    """Samples of one daemon's memory: (seconds since start, RssAnon MiB, RssShmem MiB)."""

    name: str
    pid: int
    points: list[tuple[float, float, float]] = field(default_factory=list)

    def sample(self, t: float) -> None:
        fields = {}
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    if key in ("RssAnon", "RssShmem"):
                        fields[key] = int(rest.split()[0]) / 1024
        except OSError:
            return
        self.points.append((t, fields.get("RssAnon", 0.0), fields.get("RssShmem", 0.0)))

    def slope_mib_per_hour(self, after_s: float) -> tuple[float, float, float]:
        """(slope of RssAnon in MiB/h after `after_s`, RssAnon at that point, at the end)."""
        pts = [(t, a) for t, a, _ in self.points if t >= after_s]
        if len(pts) < 2:
            return 0.0, 0.0, 0.0
        n = len(pts)
        mt = sum(t for t, _ in pts) / n
        ma = sum(a for _, a in pts) / n
        var = sum((t - mt) ** 2 for t, _ in pts)
        slope = sum((t - mt) * (a - ma) for t, a in pts) / var if var else 0.0
        return slope * 3600.0, pts[0][1], pts[-1][1]


def _script(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"),
                            start_new_session=True)


def wait_for(cond, what: str, timeout: float, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(f"a daemon exited while waiting for {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.5)


def status(client: ControlClient) -> dict:
    try:
        return client.request("status")
    except Exception:  # not up yet, or busy: the caller polls again
        return {}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.soak",
                                 description="Resident memory of mm-producer and mm-trainer over "
                                             "a long run with filter switches.")
    ap.add_argument("--minutes", type=float, default=20.0, help="length of the run")
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between memory samples")
    ap.add_argument("--quick", action="store_true", help="3 minutes, a sample every 5 s")
    ap.add_argument("--json", action="store_true", help="last line: one JSON object")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    minutes, interval = (3.0, 5.0) if args.quick else (args.minutes, args.interval)
    work = Path(tempfile.mkdtemp(prefix="mmsoak"))
    runtime = Path(tempfile.mkdtemp(prefix="mms", dir="/tmp"))
    env = {**os.environ, "MMFEED_RUNTIME_DIR": str(runtime), "PYTHONUNBUFFERED": "1"}
    env.pop("NOTIFY_SOCKET", None)
    ring = f"mmsoak-{uuid.uuid4().hex[:6]}"
    data = make_dataset(work / "ds", per_class={"train": 4, "val": 2}, size=(64, 48))
    subprocess.run([_script("mm-producer"), "preprocess", str(data), "--cache", str(work / "cache"),
                    "--json"], env=env, stdout=subprocess.DEVNULL, check=True)
    procs: list[subprocess.Popen] = []
    producer = ControlClient(f"ipc://{runtime}/producer.sock", Timeouts(request=10.0, retries=0))
    trainer = ControlClient(f"ipc://{runtime}/trainer.sock", Timeouts(request=10.0, retries=0))
    try:
        procs.append(start([_script("mm-producer"), "run", "--source", str(data), "--ring", ring,
                            "--loop", "--rate", "max"], env, work / "producer.log"))
        wait_for(lambda: status(producer), "the producer", 60, procs)
        procs.append(start([_script("mm-trainer"), "run", "--cache", str(work / "cache"),
                            "--ring", ring, "--mix", "0.5", "--steps", "100000000",
                            "--batch-size", "8", "--checkpoint-dir", str(work / "ckpt"),
                            "--checkpoint-interval", "0"], env, work / "trainer.log"))
        wait_for(lambda: status(trainer).get("step", 0) >= 1, "the first training step", 180, procs)
        tracks = [Track("producer", procs[0].pid), Track("trainer", procs[1].pid)]
        t0 = time.monotonic()
        next_switch, k = SWITCH_EVERY_S, 0
        while (t := time.monotonic() - t0) < minutes * 60:
            for tr in tracks:
                tr.sample(t)
            if t >= next_switch:
                producer.request("filter", spec=FILTERS[k % len(FILTERS)])
                k += 1
                next_switch += SWITCH_EVERY_S
            if any(p.poll() is not None for p in procs):
                raise RuntimeError(f"a daemon exited during the soak; logs in {work}")
            # progress on stderr, so a --json run shows it too and its stdout stays parseable
            a = " ".join(f"{tr.name} anon {tr.points[-1][1]:.1f} MiB" for tr in tracks if tr.points)
            print(f"  t={t:6.0f}s  {a}", file=sys.stderr, flush=True)
            time.sleep(interval)
        published = status(producer).get("published")
        step = status(trainer).get("step")
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        producer.close()
        trainer.close()
    warm = minutes * 60 / 4
    out = {"bench": "soak", "minutes": minutes, "filter_switches": k, "published": published,
           "trainer_steps": step, "machine": machine(), "daemons": {}}
    for tr in tracks:
        slope, start_mib, end_mib = tr.slope_mib_per_hour(warm)
        shm = tr.points[-1][2] if tr.points else 0.0
        out["daemons"][tr.name] = {"rss_anon_slope_mib_per_hour": round(slope, 2),
                                   "rss_anon_after_warmup_mib": round(start_mib, 1),
                                   "rss_anon_end_mib": round(end_mib, 1),
                                   "rss_shmem_mib": round(shm, 1),
                                   "samples": len(tr.points),
                                   "rss_anon_mib_over_time": [[round(t), round(a, 1)]
                                                              for t, a, _ in tr.points]}
        print(f"soak {tr.name:8s} RssAnon {start_mib:.1f} -> {end_mib:.1f} MiB after warm-up, "
              f"slope {slope:+.2f} MiB/h over {minutes - warm / 60:.1f} min "
              f"(RssShmem {shm:.1f} MiB)")
    print(f"soak: {published} samples published, {step} training steps, {k} filter switches")
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
