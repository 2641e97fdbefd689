"""A signal whose handler returns does not break a ring wait (PEP 475's rule for system calls).

Readers and lossless writers sleep on posix_ipc semaphores; a sleep interrupted by a signal
raised posix_ipc.SignalError out of `receive` or `publish`, so a process with a SIGTERM handler
(both daemons, any user script that stops cleanly) died of the signal it meant to handle.
Found by bench.faults: its ring reader, stopped with SIGTERM, exited 1 with that traceback.
Real processes, real signals, real shared memory.
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

from protocol.ring import RingConfig, RingReader, RingWriter
from protocol.schema import ModalitySpec, SampleMeta, SampleSchema

sys.path.insert(0, str(Path(__file__).parent))
from _rings import ring_name_fixture  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = SampleSchema((ModalitySpec("x", "int64", (16,)),))

# The child installs a SIGTERM handler that only counts, says "ready", then does one ring
# operation that sleeps until the parent lets it finish; it prints what it got and exits 0.
CHILD_PRELUDE = textwrap.dedent("""
    import signal, sys
    import numpy as np
    from protocol.ring import RingConfig, RingReader, RingWriter
    from protocol.schema import ModalitySpec, SampleMeta, SampleSchema
    SCHEMA = SampleSchema((ModalitySpec("x", "int64", (16,)),))
    signals = []
    signal.signal(signal.SIGTERM, lambda *_: signals.append(1))
    name = sys.argv[1]
""")

READER_CHILD = CHILD_PRELUDE + textwrap.dedent("""
    r = RingReader.attach(name, start="next")
    print("ready", flush=True)
    while True:
        got = r.receive(timeout=0.5)
        if got is not None:
            print("received", int(got.arrays["x"][0]), len(signals) > 0, flush=True)
            break
        if signals:
            print("signalled", flush=True)
    r.close()
""")

WRITER_CHILD = CHILD_PRELUDE + textwrap.dedent("""
    w = RingWriter.create(RingConfig(name, slots=2, slot_bytes=SCHEMA.payload_nbytes,
                                     mode="lossless"))
    print("ready", flush=True)
    while w.stats().readers < 1:  # the parent's reader, registered before anything is sent
        w.heartbeat()
    for n in range(4):  # the parent's reader holds slots 0-1: sample 2 waits for space
        w.publish(SCHEMA, SampleMeta(label=0, timestamp_ns=n, generation=1, source="t",
                                     index=n), {"x": np.full(16, n, np.int64)}, timeout=60)
        if n == 2:
            print("published past the wait", len(signals) > 0, flush=True)
    w.close()
""")


def _child(code: str, name: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", code, name], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _line(p: subprocess.Popen, timeout: float = 30.0) -> str:
    r, _, _ = select.select([p.stdout], [], [], timeout)
    assert r, f"no line from the child in {timeout} s; stderr: {p.stderr.read()[-2000:]}"
    line = p.stdout.readline().strip()
    assert line, f"the child exited ({p.wait()}); stderr: {p.stderr.read()[-2000:]}"
    return line


def _signal_until(p: subprocess.Popen, expected: str, timeout: float = 30.0) -> None:
    """SIGTERM the child (it keeps waiting) until it says it saw the signal: each signal
    lands in the semaphore sleep that fills almost all of its wait."""
    deadline = time.monotonic() + timeout
    while True:
        assert p.poll() is None, f"the child died of the signal: {p.stderr.read()[-2000:]}"
        p.send_signal(signal.SIGTERM)
        r, _, _ = select.select([p.stdout], [], [], 0.2)
        if r:
            line = p.stdout.readline().strip()
            assert line, f"the child died of the signal: {p.stderr.read()[-2000:]}"
            assert line == expected, line
            return
        assert time.monotonic() < deadline, "the child never said it saw a signal"


ring_name = ring_name_fixture("mmsig", hex_chars=8)


def test_a_reader_waiting_for_a_sample_survives_a_signal_its_process_handles(ring_name):
    w = RingWriter.create(RingConfig(ring_name, slots=4, slot_bytes=SCHEMA.payload_nbytes))
    child = _child(READER_CHILD, ring_name)
    try:
        assert _line(child) == "ready"
        _signal_until(child, "signalled")
        w.publish(SCHEMA, SampleMeta(label=0, timestamp_ns=1, generation=1, source="t",
                                     index=0), {"x": np.full(16, 7, np.int64)})
        assert _line(child) == "received 7 True"
        assert child.wait(30) == 0, child.stderr.read()[-2000:]
    finally:
        child.kill()
        child.wait()
        w.close()


def test_a_lossless_writer_waiting_for_space_survives_a_signal_its_process_handles(ring_name):
    child = _child(WRITER_CHILD, ring_name)
    try:
        assert _line(child) == "ready"
        r = RingReader.attach(ring_name, start="oldest")
        try:
            # The writer publishes 0 and 1, then sleeps for space until this reader reads.
            deadline = time.monotonic() + 30
            while r.ring_stats().published < 2:
                assert time.monotonic() < deadline, "the writer never filled the ring"
                time.sleep(0.01)
            for _ in range(5):  # several signals while it sleeps for space; none may kill it
                assert child.poll() is None, f"the writer died: {child.stderr.read()[-2000:]}"
                child.send_signal(signal.SIGTERM)
                time.sleep(0.1)  # apart, so they are five deliveries, not one pending signal
            got = [int(r.receive(timeout=30).arrays["x"][0]) for _ in range(4)]
        finally:
            r.close()
        assert got == [0, 1, 2, 3]
        assert _line(child) == "published past the wait True"
        assert child.wait(30) == 0, child.stderr.read()[-2000:]
    finally:
        child.kill()
        child.wait()
