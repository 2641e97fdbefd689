"""`python -m bench.ring --profile`: where one writer's and one reader's time goes, per
phase of the ring's own code (its seqlock calls timed by a stand-in `sl`, its semaphores
wrapped), in child processes. Split out of bench/ring.py, which runs it."""
from __future__ import annotations

import collections
import os
import time
import uuid

import numpy as np

import protocol.ring_liveness as ring_liveness
import protocol.ring_reader as ring_reader
import protocol.ring_writer as ring_writer
from bench.ring import FORK, _count, _schema
from protocol import _seqlock as sl
from protocol.ring import RingConfig, RingReader, RingWriter
from protocol.schema import SampleMeta



class _PhaseClock:
    """Per-phase nanoseconds and counts. Installed in a child process only: it stands in for
    the `sl` of protocol.ring_writer / ring_reader (timing the named seqlock calls) and wraps
    the ring's semaphores, so the ring's own code is measured unchanged."""

    def __init__(self, timed: set[str]):
        self.ns: collections.Counter = collections.Counter()
        self.calls: collections.Counter = collections.Counter()
        for name in dir(sl):
            if not name.startswith("_"):
                fn = getattr(sl, name)
                setattr(self, name, self._timed(name, fn) if name in timed else fn)

    def _timed(self, name, fn):
        def call(*args):
            t0 = time.perf_counter_ns()
            try:
                return fn(*args)
            finally:
                self.ns[name] += time.perf_counter_ns() - t0
                self.calls[name] += 1
        return call

    def wrap_sem(self, sem, name):
        clock = self

        class Sem:
            def acquire(self, *a):
                return clock._timed(f"{name}.acquire (sleep)", sem.acquire)(*a)

            def release(self):
                return clock._timed(f"{name}.release (wake)", sem.release)()

            def close(self):
                sem.close()
        return Sem()

    def table(self, per: int) -> dict:
        return {k: (self.calls[k], round(self.ns[k] / per / 1e3, 2)) for k in sorted(self.ns)}


def _profile_writer(name, size, count, ready, go, done, q):
    clock = _PhaseClock({"spin_until"})
    ring_writer.sl = clock
    schema, src = _schema(size), np.full(size, 7, np.uint8)
    with RingWriter.create(RingConfig(name, slots=8, slot_bytes=size, mode="lossless")) as w:
        w._wsem = clock.wrap_sem(w._wsem, "writer sem")
        ready.set()
        go.wait(60)
        t = collections.Counter()
        t0 = time.perf_counter_ns()
        for n in range(count):
            a = time.perf_counter_ns()
            slot = w.loan(schema, 60)          # includes the wait for a free slot
            b = time.perf_counter_ns()
            np.copyto(slot.arrays["payload"], src)
            c = time.perf_counter_ns()
            slot.commit(SampleMeta(index=n))   # includes posting a sleeping reader
            d = time.perf_counter_ns()
            t["loan (wait for space)"] += b - a
            t["copy into slot"] += c - b
            t["commit (+ wake)"] += d - c
        total = time.perf_counter_ns() - t0
        phases = {k: round(v / count / 1e3, 2) for k, v in t.items()}
        q.put(("writer", round(total / count / 1e3, 2), phases, clock.table(count)))
        done.wait(60)


def _profile_reader(name, size, count, ready, q):
    clock = _PhaseClock({"spin_until", "read2"})
    ring_reader.sl = clock
    out = np.empty(size, np.uint8)
    with RingReader.attach(name, start="next") as r:
        r._sem = clock.wrap_sem(r._sem, "reader sem")
        ready.set()
        r.receive_into(out, timeout=60)
        clock.ns.clear()
        clock.calls.clear()
        t0 = time.perf_counter_ns()
        for _ in range(count - 1):
            r.receive_into(out, timeout=60)
        total = time.perf_counter_ns() - t0
        q.put(("reader", round(total / (count - 1) / 1e3, 2),
               {"GB/s": round(size * (count - 1) / total, 2)}, clock.table(count - 1)))


def profile(size: int, budget: float) -> None:
    """Print per-sample microseconds of each phase on both sides of a 1-reader ring: where
    the time goes (copy, spin, semaphore sleep, wake) and how often each side slept."""
    name = f"mmfeed-bench-prof-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    count = _count(size, budget)
    ready, go, done, rready, q = (FORK.Event(), FORK.Event(), FORK.Event(), FORK.Event(),
                                  FORK.Queue())
    w = FORK.Process(target=_profile_writer, args=(name, size, count, ready, go, done, q))
    w.start()
    assert ready.wait(30), "ring writer did not start"
    r = FORK.Process(target=_profile_reader, args=(name, size, count, rready, q))
    r.start()
    assert rready.wait(30), "ring reader did not start"
    go.set()
    res = sorted(q.get(timeout=300) for _ in range(2))
    done.set()
    r.join(30)
    w.join(30)
    print(f"# profile: 1 writer, 1 reader, {size} B samples, {count} samples; us per sample "
          f"(calls, us per sample) - spin budget {ring_liveness._SPIN_NS} ns")
    for side, per, phases, calls in res:
        print(f"{side:<7} {per:8.2f} us/sample  {phases}")
        for k, (c, us) in calls.items():
            print(f"          {k:<28}{c:>7} calls {us:8.2f} us/sample")
