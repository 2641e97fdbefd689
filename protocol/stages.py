"""Per-stage timing that is cheap enough to leave on, and the sentence that names the bottleneck.

Both daemons time every stage a sample or a step goes through (the producer: demux/decode,
each modality's pipeline, the ring write and the wait for a free slot; the trainer: the wait
for data, the disk read, the ring copy, the move to the device, forward, backward, the
optimiser). `status`, `mmctl top` and the Prometheus exporter show them as rolling
percentiles, grouped, and `bottleneck()` says in words which stage holds the run back.

NOTE [cheap timing]: the hot path pays for two `time.perf_counter_ns()` calls and one
`Stage.add(ns)`: a store into a preallocated list used as a ring (the last WINDOW
durations), two integer additions and a `bisect` into fixed histogram bounds (what
Prometheus needs: cumulative bucket counts since start). No allocation, no lock, no logging,
no numpy per call. Percentiles are computed only when someone reads them (`summary()`: a
status request or a scrape), from a copy of the ring. Each stage has ONE writing thread (a
loader thread, the clip reader, the main loop); readers on other threads may see a sample
being written, which only shifts a percentile by one entry - never worth a lock on the hot
path. Measured cost: `python -m bench.stages` (figures in BENCHMARKS.md when measured).
"""
from __future__ import annotations

import bisect
import time
from dataclasses import dataclass
from typing import Mapping

WINDOW = 512
#: Histogram upper bounds in seconds (Prometheus `le`), from 50 us to 10 s.
BUCKETS_S = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
             0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BOUNDS_NS = [round(b * 1e9) for b in BUCKETS_S]

now_ns = time.perf_counter_ns

#: What each stage name means, for people (status, `mmctl top`, metrics help).
LABELS = {
    # producer
    "demux_decode": "video+audio clip (demux, decode, filter)",
    "video": "video (demux, decode, filter)",
    "audio": "audio (decode, log-mel)",
    "lidar": "lidar (read, bird's-eye view)",
    "radar": "radar (read, method)",
    "unknown": "unknown sensors (read)",
    "ring_write": "ring write (copy into the slot)",
    "ring_wait": "ring wait (no free slot: lossless back-pressure)",
    # trainer
    "wait": "wait for a batch (data stall)",
    "disk_read": "disk read (a batch from the cache)",
    "ring_copy": "ring copy (a slot into the batch)",
    "to_device": "to device (upload, to float, adapt shapes)",
    "forward": "forward (and loss)",
    "backward": "backward",
    "optimizer": "optimizer step",
}


class Stage:
    """Durations of one stage: the last `window` in a ring, and totals since start."""

    __slots__ = ("name", "group", "label", "_ring", "_pos", "_n", "count", "sum_ns", "buckets")

    def __init__(self, name: str, group: str, label: str = "", window: int = WINDOW):
        if window < 1:
            raise ValueError(f"Stage window must be >= 1, got {window}")
        self.name, self.group, self.label = name, group, label or LABELS.get(name, name)
        self._ring = [0] * window
        self._pos = 0
        self._n = window
        self.count = 0
        self.sum_ns = 0
        self.buckets = [0] * (len(_BOUNDS_NS) + 1)   # the last one is +Inf

    def add(self, ns: int) -> None:
        """Record one duration in nanoseconds (the hot path: see NOTE [cheap timing])."""
        pos = self._pos
        self._ring[pos] = ns
        self._pos = pos + 1 if pos + 1 < self._n else 0
        self.count += 1
        self.sum_ns += ns
        self.buckets[bisect.bisect_left(_BOUNDS_NS, ns)] += 1

    def since(self, t0_ns: int) -> int:
        """`add(now - t0_ns)`; returns now, so consecutive stages chain without another call."""
        t = now_ns()
        self.add(t - t0_ns)
        return t

    def recent(self) -> list[int]:
        """The durations in the window (ns), oldest first."""
        n, pos, ring = self.count, self._pos, list(self._ring)
        if n < self._n:
            return ring[:n]
        return ring[pos:] + ring[:pos]

    def stats(self) -> "StageStats | None":
        """Percentiles over the window; None before the first duration."""
        data = sorted(self.recent())
        if not data:
            return None

        def q(p: float) -> float:
            return data[min(len(data) - 1, int(p * len(data)))] / 1e6

        return StageStats(self.name, self.group, self.label, q(0.5), q(0.9), q(0.99),
                          sum(data) / len(data) / 1e6, self.count)


@dataclass(frozen=True)
class StageStats:
    name: str
    group: str
    label: str
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    count: int

    def to_dict(self) -> dict:
        return {"label": self.label, "p50_ms": round(self.p50_ms, 3),
                "p90_ms": round(self.p90_ms, 3), "p99_ms": round(self.p99_ms, 3),
                "mean_ms": round(self.mean_ms, 3), "count": self.count}


class StageTimer:
    """The stages of one daemon. `stage(name, group)` once at set-up (keep the object: the
    hot path calls its `add`), `summary()` when status or metrics are read."""

    def __init__(self, daemon: str, window: int = WINDOW):
        self.daemon = daemon
        self.window = window
        self.stages: dict[str, Stage] = {}

    def stage(self, name: str, group: str, label: str = "") -> Stage:
        st = self.stages.get(name)
        if st is None:
            st = self.stages[name] = Stage(name, group, label, self.window)
        return st

    def summary(self) -> dict[str, dict[str, dict]]:
        """{group: {stage: {label, p50_ms, p90_ms, p99_ms, mean_ms, count}}} of the stages
        that ran at least once, groups in the order their first stage was made."""
        out: dict[str, dict[str, dict]] = {}
        for st in list(self.stages.values()):
            s = st.stats()
            if s is not None:
                out.setdefault(st.group, {})[st.name] = s.to_dict()
        return out


# --- the bottleneck, in words ----------------------------------------------------------------

#: A trainer that waits for data more than this share of its step time is data-bound.
DATA_BOUND_STALL = 0.2


def _flat(stages: Mapping[str, Mapping[str, dict]] | None) -> dict[str, dict]:
    return {name: s for group in (stages or {}).values() for name, s in group.items()}


def slowest(stages: Mapping[str, Mapping[str, dict]] | None, names=None) -> tuple[str, dict,
                                                                                   float] | None:
    """(stage, its stats, its share of the summed mean time) of the stage with the largest
    mean among `names` (all when None), or None when none ran."""
    flat = {k: v for k, v in _flat(stages).items() if names is None or k in names}
    total = sum(v["mean_ms"] for v in flat.values())
    if not flat or total <= 0:
        return None
    name = max(flat, key=lambda k: flat[k]["mean_ms"])
    return name, flat[name], flat[name]["mean_ms"] / total


def producer_bottleneck(status: Mapping | None) -> str | None:
    """"producer: video (demux, decode, filter) takes 81% of each sample (p50 120.3 ms); 1.6
    samples/s" - or the ring wait when a lossless ring's reader holds it back."""
    if not status:
        return None
    worst = slowest(status.get("stages"))
    if worst is None:
        return None
    name, s, share = worst
    rate = status.get("samples_per_s")
    rate_txt = f"; {rate:.1f} samples/s" if isinstance(rate, (int, float)) else ""
    if name == "ring_wait":
        return (f"producer: waits for a free ring slot {share:.0%} of the time (p50 "
                f"{s['p50_ms']:.1f} ms; a lossless ring's slowest reader holds it){rate_txt}")
    return (f"producer: {s['label']} takes {share:.0%} of each sample (p50 {s['p50_ms']:.1f} "
            f"ms){rate_txt}")


def trainer_bottleneck(status: Mapping | None) -> str | None:
    """Data-bound (the live supply, or the disk) or compute-bound, in one sentence."""
    if not status:
        return None
    stall = status.get("stall_fraction")
    stages = status.get("stages")
    if status.get("live_starved") and status.get("live_note"):
        return status["live_note"]
    if isinstance(stall, (int, float)) and stall >= DATA_BOUND_STALL:
        flat = _flat(stages)
        disk = flat.get("disk_read")
        where = (f"; the disk loader reads a batch in {disk['p50_ms']:.1f} ms (p50)"
                 if disk else "")
        return (f"trainer: data-bound, it waits for data {stall:.0%} of each step{where}; more "
                f"--workers, a faster disk or a higher live supply would help")
    worst = slowest(stages, ("to_device", "forward", "backward", "optimizer"))
    if worst is None:
        return None
    name, s, share = worst
    stall_txt = f"; waits for data {stall:.0%} of the step" if isinstance(stall, (int, float)) \
        else ""
    return (f"trainer: compute-bound, {s['label']} takes {share:.0%} of the step's compute (p50 "
            f"{s['p50_ms']:.1f} ms){stall_txt}")


def bottleneck(producer: Mapping | None, trainer: Mapping | None) -> str | None:
    """The run's bottleneck across both daemons: a starved trainer names the producer's
    slowest stage too ("live starved: producer 1.6 samples/s, trainer wants 5.0 ...; producer:
    video (demux, decode, filter) takes 81% of each sample")."""
    t, p = trainer_bottleneck(trainer), producer_bottleneck(producer)
    if trainer and trainer.get("live_starved") and p:
        return f"{t}; {p}"
    return t or p


__all__ = ["BUCKETS_S", "LABELS", "Stage", "StageStats", "StageTimer", "WINDOW", "bottleneck", "now_ns",
           "producer_bottleneck", "slowest", "trainer_bottleneck"]
