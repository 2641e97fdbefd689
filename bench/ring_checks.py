"""What the ring's hardening costs a sample (BENCHMARKS.md "hardening").

    python -m bench.ring_checks [--quick] [--json]

The checks that guard a reader and a producer against a damaged, truncated or forged ring
(protocol/ring.py, NOTE [truncated segments] in protocol/_seqlock.c) are on the per-sample path
only where they cost no system call: a relaxed load of a fault counter in every seqlock call,
integer comparisons of what a whole read found, and the schema encoding rewritten into every
slot the producer writes (a copy of a few hundred bytes, so a damaged slot heals within a
lap). The segment's size is compared with an lstat once a second at the producer's heartbeat.

Figure: samples/s of one `publish` + one `receive_into` in one process, a small sample (32 KiB:
the per-sample overhead shows, the copies do not hide it). Limit: the same two copies with
`np.copyto` and nothing else (the copy floor of any ring). Also printed, for the design
choice: one `heartbeat()`, one `os.lstat`/`os.fstat` of the segment (what a per-receive size
check would add) and one `load_acquire`.
"""
from __future__ import annotations

import argparse
import os
import time
import uuid

import numpy as np

from bench._common import report, want_json


def _per_call_us(fn, n: int, rounds: int = 7) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter_ns() - t0) / n / 1000)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.ring_checks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    ap.add_argument("--json", action="store_true", help="print one JSON object last")
    args = ap.parse_args()

    from protocol import _seqlock as sl
    from protocol.ring import RingConfig, RingReader, RingWriter
    from protocol.ring_layout import H
    from protocol.schema import ModalitySpec, SampleMeta, SampleSchema

    n = 500 if args.quick else 5000
    schema = SampleSchema((ModalitySpec("video", "uint8", (8, 3, 16, 16)),
                           ModalitySpec("audio", "float32", (1, 64, 100)),
                           ModalitySpec("vec", "float32", (8,))))
    arrays = {m.name: np.zeros(m.shape, m.dtype) for m in schema.modalities}
    meta = SampleMeta(index=0)
    name = f"mmbench-checks-{uuid.uuid4().hex[:8]}"
    out = np.empty(1 << 20, np.uint8)
    with RingWriter.create(RingConfig(name, slots=8, slot_bytes=1 << 20)) as w, \
            RingReader.attach(name, start="next") as r:
        def one():
            w.publish(schema, meta, arrays)
            r.receive_into(out, timeout=0)

        ring_us = _per_call_us(one, n)
        hb_us = _per_call_us(w.heartbeat, n)
        path = f"/dev/shm/{name}"
        lstat_us = _per_call_us(lambda: os.lstat(path), n)
        fd = os.open(path, os.O_RDONLY)
        try:
            fstat_us = _per_call_us(lambda: os.fstat(fd), n)
        finally:
            os.close(fd)
        mm = r._mm
        load_us = _per_call_us(lambda: sl.load_acquire(mm, H["published"]), n)
    src = {k: v.copy() for k, v in arrays.items()}
    slot = {k: np.empty_like(v) for k, v in arrays.items()}
    dst = np.empty(schema.payload_nbytes, np.uint8)
    flat = np.zeros(schema.payload_nbytes, np.uint8)

    def copies():
        for k in src:
            np.copyto(slot[k], src[k])
        np.copyto(dst, flat)

    copy_us = _per_call_us(copies, n)
    print(f"per call: heartbeat {hb_us:.2f} us, lstat {lstat_us:.2f} us, fstat {fstat_us:.2f} "
          f"us, load_acquire {load_us * 1000:.0f} ns")
    report("ring_checks", 1e6 / ring_us, "samples/s", "two np.copyto", 1e6 / copy_us,
           args.json, sample_bytes=schema.payload_nbytes, publish_receive_us=round(ring_us, 3),
           heartbeat_us=round(hb_us, 3), lstat_us=round(lstat_us, 3),
           fstat_us=round(fstat_us, 3), load_acquire_ns=round(load_us * 1000, 1))


if __name__ == "__main__":
    want_json()
    main()
