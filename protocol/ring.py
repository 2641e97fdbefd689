"""The shared-memory ring: one producer process publishes samples, any number of readers in
any number of processes receive them. Byte layout: `ring_layout.py`.

Failures this module exists to prevent, and how:

* Torn samples. Every slot is a seqlock: the writer makes its sequence word odd (2n+1 for
  sample n), writes, then makes it even (2n+2). A reader copies between two loads of that
  word and keeps the copy only if both loads saw 2n+2 - the sample it asked for. A slot
  overwritten during the copy is retried; one already overwritten by a newer sample
  ("lapped") is counted as dropped, never returned.
* Reordered stores. The seqlock is only correct if the odd store is visible before the
  payload stores, the payload before the even store, and the reader's payload loads sit
  between its two sequence loads. x86-64 gives that for free; Arm64 and POWER do not.
  Python cannot emit a fence, so all sequence and counter accesses go through
  `protocol._seqlock` (C11 atomics: release/acquire plus explicit fences; see NOTE [ring
  memory ordering] in _seqlock.c), which is correct on every architecture.
* Lost wake-ups. A reader with nothing to read sets its bit in the header's waiting_mask
  (seq_cst read-modify-write), re-loads `published` (seq_cst), and only then sleeps on its
  own posix_ipc semaphore. The writer stores `published` (seq_cst) and then loads the mask
  (seq_cst): by the store-load ordering of seq_cst at least one of the two sees the other,
  so either the reader sees the sample or the writer sees the bit and posts. The writer
  waiting for space in lossless mode uses the same pattern with `writer_waiting` and the
  readers' `position` words (the writer asks to be woken when half the ring is free). All
  sleeps have timeouts, so a dead peer costs at most one slice (`_SLICE_S`) before it is
  noticed.
* Convoys. Before either side takes that sleeping path it spins (`_SPIN_NS`, in C with the
  GIL released) on the one word it waits for: `published` for a reader, the slowest
  reader's `position` for a lossless writer. On a multi-core machine the peer is usually
  microseconds away; a semaphore sleep costs the waker a futex wake-up and the sleeper a
  wake-up latency (p50 ~35 us under KVM), and the two sides fall into step, taking turns to
  sleep instead of copying at the same time (1 MiB samples, one reader: it slept on 24% of
  samples idle, 85% under load; with the spin, on 0.1% and ~20% - BENCHMARKS.md "ring").
  The spin only shortens the wait: it is a read, so every ordering argument above is
  unchanged. It yields the CPU every few microseconds (more processes than cores: the peer
  may need ours) and is off when the process may use one CPU only.
* A dead peer holding everybody back. A lossless writer waits only for registered readers
  whose pid is alive (a SIGKILLed or zombie reader is evicted); a reader notices a dead,
  closed or replaced producer while it waits and raises `ProducerGone`.
* Silent reuse of someone else's memory. `attach` checks magic and version before trusting
  any other byte; `create` replaces a ring only when its producer is provably gone.
* A stale ring taken for a live one, or a live one for a stale one. A pid alone does not
  name a process: after a SIGKILL the pid is reused (a restarted container starts its pids
  over, so the new producer may get the dead one's pid itself). The header holds the
  producer's pid AND its start time (/proc/PID/stat), and both sides judge "is the producer
  running" by the pair - see `_producer_alive` for the whole rule, including where /proc
  cannot tell.

The ring is five modules, one job each, and this one is their public face
(`from protocol.ring import RingWriter, RingReader, RingConfig, ...`):

    ring_layout.py    the byte layout: header, reader table, slot header (one struct each)
    ring_liveness.py  is the producer / a reader still running (pid + start time); wait budgets
    ring_segment.py   the segment: name, RingConfig and size, mapping, stale-ring replacement
    ring_writer.py    RingWriter: create, loan/commit/publish, lossless wait, supersede, close
    ring_readers.py   the writer's view of its readers: slowest, next slot needed, evict dead
    ring_reader.py    RingReader: attach, receive_into/receive/receive_view, wait, close
    ring_owner.py     whose segment it is (uid, group, mode), checked before trusting it
"""
from __future__ import annotations

from .ring_reader import RingReader, SampleView
from .ring_segment import (DEFAULT_MAX_RING_BYTES, ReaderStats, RingConfig, RingStats,
                           header_generation)
from .ring_writer import RingWriter, Slot

__all__ = ["RingConfig", "RingWriter", "RingReader", "RingStats", "ReaderStats", "Slot",
           "SampleView", "DEFAULT_MAX_RING_BYTES", "header_generation"]
