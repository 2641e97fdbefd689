"""A plain ring reader process for bench.faults: attached to every ring it is given, it reads
whatever is published until it is stopped, the way a user's own script reads a ring.

    python -m bench._ring_reader RING [RING ...]

bench.faults SIGKILLs it now and then (a reader that dies holding a reader entry and a
semaphore, the thing a producer must shrug off) and starts a new one. A ring that is gone,
replaced, superseded or not there yet is attached again a moment later: a producer killed
and restarted is the normal case here, not an error. Anything else the ring library raises
ends the process with its traceback, which the bench counts as a crash. SIGTERM closes the
readers (unregistering them) and exits 0.
"""
from __future__ import annotations

import signal
import sys
import time

from protocol.errors import RingError
from protocol.ring import RingReader

RETRY_S = 0.2   # between attach attempts on a ring that is not (or no longer) usable
WAIT_S = 0.05   # longest wait on one ring before looking at the next


def main(names: list[str]) -> int:
    if not names:
        print("usage: python -m bench._ring_reader RING [RING ...]", file=sys.stderr)
        return 2
    stop = False

    def on_term(_sig, _frame) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    readers: dict[str, RingReader | None] = dict.fromkeys(names)
    retry_at = dict.fromkeys(names, 0.0)
    received = 0
    try:
        while not stop:
            for name in names:
                r = readers[name]
                if r is None:
                    if time.monotonic() < retry_at[name]:
                        continue
                    try:
                        readers[name] = r = RingReader.attach(name, start="newest")
                    except RingError:  # not there yet, dead, replaced: a producer restarting
                        retry_at[name] = time.monotonic() + RETRY_S
                        continue
                try:
                    if r.receive(timeout=WAIT_S) is not None:
                        received += 1
                except RingError:  # ProducerGone, RingSuperseded, RingDamaged: attach again
                    r.close()
                    readers[name] = None
                    retry_at[name] = time.monotonic() + RETRY_S
            if all(r is None for r in readers.values()):
                time.sleep(WAIT_S)  # nothing attached: the next attach is RETRY_S away
    finally:
        for r in readers.values():
            if r is not None:
                r.close()
    print(f"ring reader: {received} samples received", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
