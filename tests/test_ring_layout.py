"""The ring's byte layout: the header encoding round-trips, and offsets keep the properties
the seqlock and the wake-up protocol rely on (8-byte atomics, 64-byte reader entries,
page-aligned slots and payloads)."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.ring_layout import (FIXED_OFFSETS, H, HEADER_BYTES, MAX_READERS, READER_BYTES,
                                  S, SLOT_HEADER_BYTES, RingHeader)

u64 = st.integers(0, 2**64 - 1)
headers = st.builds(
    RingHeader, mode=st.integers(0, 1), slots=st.integers(1, 1 << 20),
    max_readers=st.integers(1, MAX_READERS), slot_bytes=st.integers(1, 1 << 40),
    producer_pid=st.integers(0, 2**31), epoch=u64, created_ns=u64, state=st.integers(0, 2),
    heartbeat_ns=u64, published=u64, generation=u64, waiting_mask=u64, writer_waiting=u64,
    active_mask=u64, producer_start=u64, magic=st.binary(min_size=8, max_size=8),
    version=st.integers(0, 2**32 - 1))


@settings(max_examples=200, deadline=None)
@given(headers)
def test_ring_header_round_trips_through_its_struct(h):
    packed = h.pack()
    assert len(packed) == HEADER_BYTES
    assert RingHeader.unpack(packed) == h


@settings(max_examples=100, deadline=None)
@given(headers)
def test_slots_and_payloads_are_page_aligned_and_after_the_reader_table(h):
    assert h.slots_offset >= HEADER_BYTES + READER_BYTES * h.max_readers
    assert h.slots_offset % 4096 == 0 and h.slot_stride % 4096 == 0
    assert h.slot_stride >= SLOT_HEADER_BYTES + h.slot_bytes
    assert (h.slot_offset(h.slots - 1) + SLOT_HEADER_BYTES) % 64 == 0
    assert h.total_bytes == h.slot_offset(h.slots - 1) + h.slot_stride


def test_magic_and_version_never_move():
    # Readers of every release find these two here, so they can name the other version.
    assert (H["magic"], H["version"]) == (0, 8)


def test_producer_pid_and_start_time_never_move():
    # A producer of every release reads these two in another release's ring to tell whether
    # its producer still runs (replace it when not); moving them strands such rings again.
    assert (H["producer_pid"], H["producer_start"]) == (56, 136)
    assert FIXED_OFFSETS == {"magic": 0, "version": 8, "producer_pid": 56, "producer_start": 136}


def test_the_reserved_header_bytes_pack_as_zero():
    # Fields added later come out of them, and 0 must mean "not recorded" for those fields.
    h = RingHeader(mode=0, slots=1, max_readers=1, slot_bytes=1, producer_pid=1, epoch=1)
    assert h.pack()[H["reserved"]:] == bytes(HEADER_BYTES - H["reserved"])


def test_every_atomic_word_is_8_byte_aligned():
    for k in ("state", "heartbeat_ns", "published", "generation", "waiting_mask",
              "writer_waiting", "active_mask"):
        assert H[k] % 8 == 0, k
    assert S["seq"] == 0 and READER_BYTES == 64
