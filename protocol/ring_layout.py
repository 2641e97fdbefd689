"""The byte layout of an mmfeed ring: header, reader table, slots. No I/O, no processes.

Every offset the ring uses comes from the three `struct` formats below, never from a number
written by hand: change a field here and every offset follows. `magic` and `version` never
move, so a reader of any release can tell "not a ring" from "another version" before
trusting anything else. `producer_pid` and `producer_start` never move either (`FIXED_OFFSETS`):
a producer of any release can tell whether the producer of another release's ring is
still running, and replace the ring when it is not (a crash, then an upgrade).

Segment::

    0                 HEADER (256 bytes, HEADER_STRUCT)
    256               reader table: max_readers x 64-byte READER_STRUCT entries
    slots_offset      slot 0 (4096-aligned), slot 1 at + slot_stride, ...

Header (HEADER_STRUCT, little-endian)::

    off  size  field            who writes     how
      0     8  magic            producer       once, b"MMFRING\\0" (never moves)
      8     4  version          producer       once, RING_VERSION (never moves)
     12     4  mode             producer       once, 0 lossy / 1 lossless
     16     4  slots            producer       once
     20     4  max_readers      producer       once, <= 64 (one bit each in waiting_mask)
     24     8  slot_bytes       producer       once, payload capacity of a slot
     32     8  slot_stride      producer       once, bytes from one slot to the next
     40     8  slots_offset     producer       once
     48     8  readers_offset   producer       once
     56     8  producer_pid     producer       once (never moves)
     64     8  epoch            producer       once, random u64, new at every start
     72     8  created_ns       producer       once, CLOCK_REALTIME, for people
     80     8  state            producer       atomic: 0 starting, 1 live, 2 closed,
                                               3 superseded (a new layout took the name);
                                               advisory: readers decide by name + pid
     88     8  heartbeat_ns     producer       atomic, CLOCK_MONOTONIC at last publish/heartbeat
     96     8  published        producer       atomic seq_cst, samples published so far
    104     8  generation       producer       atomic, current layout generation
    112     8  waiting_mask     both           atomic: bit i = reader i sleeps on its semaphore
    120     8  writer_waiting   both           atomic: writer sleeps until a reader reaches
                                               this value - 1 (0 = writer awake)
    128     8  active_mask      readers        atomic: bit i = reader entry i is registered
    136     8  producer_start   producer       once, the producer's start time (field 22 of
                                               /proc/PID/stat: clock ticks since boot), 0 =
                                               unknown (no /proc); pid + start name one
                                               process, a reused pid has another start
                                               (never moves)
    144   112  reserved         zero

Reader table entry i (READER_STRUCT, 64 bytes: one cache line, so readers never share one)::

    off  size  field     how
      0     8  pid       atomic CAS 0 -> pid claims the entry; 0 = free
      8     8  state     atomic: 0 free, 1 active (counted by a lossless writer)
     16     8  position  atomic seq_cst: the next sample number this reader wants
     24     8  start     first sample number of the reader's window
     32     8  dropped   samples skipped (lapped or evicted) so far
     40     8  token     random per registration (tells re-registrations apart)
     48    16  reserved

    The reader's wake-up semaphore is `semaphore_name(ring, epoch, i)`; its "waiting
    flag" is bit i of the header's waiting_mask, so the writer learns with ONE load per
    publish whether anybody sleeps (no per-publish scan of the table).

Slot (SLOT_STRUCT then the schema encoding, then the payload at +SLOT_HEADER_BYTES)::

    off  size  field           how
      0     8  seq             seqlock word: 2n+1 while sample n is written, 2n+2 once
                               published, so it also names the sample the slot holds
      8    88  meta            SampleMeta (META_STRUCT)
     96     8  schema_id       SampleSchema.schema_id, 0 = never written
    104     8  payload_nbytes  bytes of payload actually used
    112     4  schema_len      length of the schema encoding below
    116    12  reserved
    128  3968  schema          SampleSchema.encode() (written only when the slot's schema
                               changes; readers decode only for an unseen schema_id)
   4096     -  payload         schema.payload_nbytes <= slot_bytes, 64-byte aligned modalities
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from .schema import META_STRUCT

MAGIC = b"MMFRING\0"
# Version 1 since the first release. `producer_start` came out of the reserved bytes without
# a bump: releases before it leave those bytes zero (= "start unknown", which every release
# handles) and ignore them when reading, so the two share rings exactly as before.
RING_VERSION = 1
MODES = ("lossy", "lossless")
# `state` is advisory for readers (any process that can write the segment can write it): what
# ends a reader's ring is the name no longer pointing at its segment, or the producer (pid +
# start time) being gone. SUPERSEDED came after version 1 without a bump: an older reader
# treats it like LIVE until it sees the name point elsewhere, which is the same outcome.
STATE_STARTING, STATE_LIVE, STATE_CLOSED, STATE_SUPERSEDED = 0, 1, 2, 3
MAX_READERS = 64  # one bit each in the header's waiting_mask
PAGE = 4096


def _fields(spec: tuple[tuple[str, str], ...]) -> tuple[struct.Struct, dict[str, int]]:
    """One struct format per record; field offsets are derived from it, never typed twice."""
    fmt = "<" + "".join(f for _, f in spec)
    offs = {name: struct.calcsize("<" + "".join(f for _, f in spec[:i])) for i, (name, _) in
            enumerate(spec)}
    return struct.Struct(fmt), offs


HEADER_STRUCT, H = _fields((
    ("magic", "8s"), ("version", "I"), ("mode", "I"), ("slots", "I"), ("max_readers", "I"),
    ("slot_bytes", "Q"), ("slot_stride", "Q"), ("slots_offset", "Q"), ("readers_offset", "Q"),
    ("producer_pid", "Q"), ("epoch", "Q"), ("created_ns", "Q"), ("state", "Q"),
    ("heartbeat_ns", "Q"), ("published", "Q"), ("generation", "Q"), ("waiting_mask", "Q"),
    ("writer_waiting", "Q"), ("active_mask", "Q"), ("producer_start", "Q"),
    ("reserved", "112s"),
))
HEADER_BYTES = HEADER_STRUCT.size  # 256
# Offsets every release keeps, whatever else its header holds (tests/test_ring_layout.py).
FIXED_OFFSETS = {"magic": 0, "version": 8, "producer_pid": 56, "producer_start": 136}

READER_STRUCT, R = _fields((
    ("pid", "Q"), ("state", "Q"), ("position", "Q"), ("start", "Q"), ("dropped", "Q"),
    ("token", "Q"), ("reserved", "16s"),
))
READER_BYTES = READER_STRUCT.size  # 64

SLOT_STRUCT, S = _fields((
    ("seq", "Q"), ("meta", f"{META_STRUCT.size}s"), ("schema_id", "Q"), ("payload_nbytes", "Q"),
    ("schema_len", "I"), ("reserved", "12s"),
))
SLOT_HEADER_BYTES = PAGE
SCHEMA_MAX = SLOT_HEADER_BYTES - SLOT_STRUCT.size  # 3968 bytes of schema encoding
# What a reader copies beside the payload: meta .. schema_len (the seq word is checked, not copied).
SLOT_INFO_OFF = S["meta"]
SLOT_INFO_BYTES = S["reserved"] - S["meta"]
SLOT_INFO = struct.Struct(f"<{META_STRUCT.size}xQQI")  # schema_id, payload_nbytes, schema_len

assert HEADER_BYTES == 256 and READER_BYTES == 64 and SLOT_STRUCT.size == 128
assert all(H[k] == off for k, off in FIXED_OFFSETS.items())
assert all(H[k] % 8 == 0 for k in ("state", "published", "waiting_mask", "writer_waiting",
                                   "active_mask", "heartbeat_ns", "generation"))


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class RingHeader:
    """The header's fields as plain values; `pack`/`unpack` are exact inverses."""

    mode: int
    slots: int
    max_readers: int
    slot_bytes: int
    producer_pid: int
    epoch: int
    created_ns: int = 0
    state: int = STATE_STARTING
    heartbeat_ns: int = 0
    published: int = 0
    generation: int = 0
    waiting_mask: int = 0
    writer_waiting: int = 0
    active_mask: int = 0
    producer_start: int = 0
    magic: bytes = MAGIC
    version: int = RING_VERSION

    @property
    def readers_offset(self) -> int:
        return HEADER_BYTES

    @property
    def slots_offset(self) -> int:
        return _align(HEADER_BYTES + READER_BYTES * self.max_readers, PAGE)

    @property
    def slot_stride(self) -> int:
        # Page-aligned (so 64-byte aligned too): payloads start on a page in every slot.
        return _align(SLOT_HEADER_BYTES + self.slot_bytes, PAGE)

    @property
    def total_bytes(self) -> int:
        return self.slots_offset + self.slots * self.slot_stride

    def slot_offset(self, i: int) -> int:
        return self.slots_offset + i * self.slot_stride

    def reader_offset(self, i: int) -> int:
        return self.readers_offset + i * READER_BYTES

    def pack(self) -> bytes:
        return HEADER_STRUCT.pack(
            self.magic, self.version, self.mode, self.slots, self.max_readers, self.slot_bytes,
            self.slot_stride, self.slots_offset, self.readers_offset, self.producer_pid,
            self.epoch, self.created_ns, self.state, self.heartbeat_ns, self.published,
            self.generation, self.waiting_mask, self.writer_waiting, self.active_mask,
            self.producer_start, b"",
        )

    @classmethod
    def unpack(cls, buf, offset: int = 0) -> "RingHeader":
        """Decode without judging; `check()` does that. Derived offsets are recomputed."""
        (magic, version, mode, slots, max_readers, slot_bytes, _stride, _soff, _roff, pid,
         epoch, created, state, hb, published, gen, wmask, wwait, amask, pstart,
         _r) = HEADER_STRUCT.unpack_from(buf, offset)
        return cls(mode=mode, slots=slots, max_readers=max_readers, slot_bytes=slot_bytes,
                   producer_pid=pid, epoch=epoch, created_ns=created, state=state,
                   heartbeat_ns=hb, published=published, generation=gen, waiting_mask=wmask,
                   writer_waiting=wwait, active_mask=amask, producer_start=pstart, magic=magic,
                   version=version)


def semaphore_name(ring: str, epoch: int, who: str) -> str:
    """posix_ipc name of a wake-up semaphore: `who` is "w" (writer) or "r<i>" (reader i).

    The epoch is part of the name so that a restarted producer never shares a semaphore
    with readers still holding the dead producer's ones.
    """
    return f"{ring}.{epoch:016x}.{who}"
