"""The cost of per-stage timing (protocol/stages.py), against the smallest work it times.

Both daemons time every stage of every sample and step (NOTE [cheap timing]): two
`perf_counter_ns()` calls and a `Stage.add` (a ring store, two additions, a bisect). This
prints how many of those records one core makes per second, beside how many 64 KiB sample
copies it makes per second (a small ring slot copied into a batch row: the cheapest stage the
timer wraps). The ratio is how many stage records cost as much as that one copy: the higher,
the less the timing matters. Also printed: the cost of reading the percentiles (a `status`
request or a scrape), which is paid per read, never per sample.

    python -m bench.stages [--json] [--records N]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from bench._common import repeat, report
from protocol.stages import StageTimer, now_ns

SAMPLE_BYTES = 64 * 1024


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.stages", description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line last")
    ap.add_argument("--records", type=int, default=200_000, help="stage records per repeat")
    a = ap.parse_args(argv)
    n = a.records
    timer = StageTimer("bench")
    stage = timer.stage("ring_copy", "data")

    def timed() -> None:
        for _ in range(n):
            t = now_ns()
            stage.since(t)

    records = repeat(timed, repeats=5)
    src = np.random.default_rng(0).integers(0, 255, SAMPLE_BYTES, dtype=np.uint8)
    dst = np.empty_like(src)
    copies = max(1000, n // 10)

    def copy() -> None:
        for _ in range(copies):
            np.copyto(dst, src)

    copy_t = repeat(copy, repeats=5)
    for name in ("forward", "backward", "optimizer", "wait", "to_device", "disk_read"):
        for _ in range(512):
            timer.stage(name, "compute").add(1000)
    t0 = time.perf_counter()
    for _ in range(100):
        timer.summary()
    read_ms = (time.perf_counter() - t0) / 100 * 1e3
    report("stages", n / records.median, "records/s", "64 KiB sample copies", copies / copy_t.median,
           a.json, ns_per_record=round(records.median / n * 1e9, 1),
           summary_ms_for_7_stages=round(read_ms, 3))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
