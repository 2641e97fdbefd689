"""A few seconds of the shared-memory ring: one writer process, two reader processes.

    python -m cli.ring_demo [--seconds S] [--mode lossy|lossless]

The writer publishes synthetic camera + audio samples and, half-way, switches to a new
generation with another schema (grayscale, larger frames), as `mmctl filter gray` will. One
reader keeps up; the other is deliberately slow, so in lossy mode it is lapped and counts
what it missed (in lossless mode it slows the writer down instead). Each reader checks every
payload against the pattern the writer wrote, then everybody reports what they exchanged.
This is the interim `make demo` until the daemons exist.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time
import uuid

import numpy as np

from protocol.errors import ProducerGone
from protocol.ring import RingConfig, RingReader, RingWriter
from protocol.schema import ModalitySpec, SampleMeta, SampleSchema

RGB = SampleSchema((ModalitySpec("video", "uint8", (4, 3, 64, 64)),
                    ModalitySpec("audio", "float32", (1, 64, 101))))
GRAY = SampleSchema((ModalitySpec("video", "uint8", (4, 1, 96, 96)),
                     ModalitySpec("audio", "float32", (1, 64, 101))))


def _arrays(schema: SampleSchema, n: int) -> dict[str, np.ndarray]:
    return {m.name: np.full(m.shape, n % 251, m.dtype) for m in schema.modalities}


def _writer(name, mode, seconds, ready, go, q):
    cfg = RingConfig(name, slots=8, slot_bytes=max(RGB.payload_nbytes, GRAY.payload_nbytes),
                     mode=mode)
    with RingWriter.create(cfg) as w:
        ready.set()
        go.wait(30)
        start = time.monotonic()
        n, per_gen = 0, {1: 0, 2: 0}
        w.set_generation(1)
        while (t := time.monotonic() - start) < seconds:
            gen = 1 if t < seconds / 2 else 2
            if gen == 2 and per_gen[2] == 0:
                w.set_generation(2)
            schema = RGB if gen == 1 else GRAY
            w.publish(schema, SampleMeta(label=n % 10, timestamp_ns=time.monotonic_ns(),
                                         generation=gen, source="demo", index=n),
                      _arrays(schema, n), timeout=5)
            per_gen[gen] += 1
            n += 1
            time.sleep(0.001)  # a 1 kHz sensor, roughly
        q.put(("writer", os.getpid(), n, per_gen, w.stats()))
    # leaving the block closed the ring: readers drain it, then get ProducerGone


def _reader(label, name, per_sample_s, ready, q):
    out = np.empty(max(RGB.payload_nbytes, GRAY.payload_nbytes), np.uint8)
    shapes, bad = {}, 0
    with RingReader.attach(name, start="next") as r:
        ready.set()
        while True:
            try:
                got = r.receive_into(out, timeout=10)
            except ProducerGone:
                break
            if got is None:
                break
            schema, meta = got
            arrays = schema.views(out)
            bad += int(not all((a == meta.index % 251).all() for a in arrays.values()))
            shapes[meta.generation] = {k: tuple(v.shape) for k, v in arrays.items()}
            if per_sample_s:
                time.sleep(per_sample_s)  # a slow consumer, on purpose
        q.put(("reader", label, os.getpid(), r.stats(), shapes, bad))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--mode", choices=("lossy", "lossless"), default="lossy")
    args = ap.parse_args(argv)
    ctx = mp.get_context("fork")
    name = f"mmfeed-demo-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    ready, go, q = ctx.Event(), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(name, args.mode, args.seconds, ready, go, q))]
    procs[0].start()
    if not ready.wait(30):
        raise SystemExit("the writer did not start")
    for label, delay in (("fast", 0.0), ("slow", 0.004)):
        ev = ctx.Event()
        p = ctx.Process(target=_reader, args=(label, name, delay, ev, q))
        p.start()
        procs.append(p)
        if not ev.wait(30):
            raise SystemExit(f"the {label} reader did not start")
    print(f"ring {name!r} ({args.mode}, 8 slots): writer pid {procs[0].pid}, readers "
          f"{procs[1].pid} (fast) and {procs[2].pid} (slow); running {args.seconds:.1f} s")
    go.set()
    results = [q.get(timeout=args.seconds + 60) for _ in procs]
    for p in procs:
        p.join(30)
    ok = True
    for res in results:
        if res[0] == "writer":
            _, pid, n, per_gen, st = res
            print(f"writer  pid {pid}: published {n} samples (generation 1: {per_gen[1]}, "
                  f"generation 2: {per_gen[2]}); ring saw {st.readers} live readers, "
                  f"{st.dropped} drops")
    for res in sorted((r for r in results if r[0] == "reader"), key=lambda r: r[1]):
        _, label, pid, st, shapes, bad = res
        window = st.position - st.start
        print(f"reader  pid {pid} ({label}): received {st.received}, dropped {st.dropped} "
              f"(received + dropped = {st.received + st.dropped} of {window} in its window), "
              f"retried {st.retried}, corrupt {bad}")
        for gen, s in sorted(shapes.items()):
            print(f"        generation {gen}: {', '.join(f'{k} {v}' for k, v in s.items())}")
        ok &= bad == 0 and st.received + st.dropped == window
    gone = [f for f in os.listdir("/dev/shm") if name in f]
    print(f"after the writer closed: {'nothing' if not gone else gone} left in /dev/shm")
    print("OK" if ok and not gone else "FAILED")
    return 0 if ok and not gone else 1


if __name__ == "__main__":
    raise SystemExit(main())
