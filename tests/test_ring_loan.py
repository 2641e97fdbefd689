"""The ring's loan path (protocol/ring_writer.py `RingWriter.loan`, `Slot.commit`,
`Slot.cancel`): a sample written in place into the slot, published or given back, with the
seqlock still protecting readers in other processes."""
from __future__ import annotations

import multiprocessing as mp
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _rings import procs, ring_name_fixture, shm_entries  # noqa: E402, F401  (procs: a fixture)

from protocol.errors import ProducerGone, RingError, SchemaError
from protocol.ring import RingConfig, RingReader, RingWriter
from protocol.schema import ModalitySpec, SampleMeta, SampleSchema

CTX = mp.get_context("fork")
WORDS = 8 * 1024  # 64 KiB payloads: a scribble can be caught half-way by a reader
SCHEMA = SampleSchema((ModalitySpec("words", "int64", (WORDS,)),))
SLOT = SCHEMA.payload_nbytes
END = -2


def meta(n: int, label: int = 0) -> SampleMeta:
    return SampleMeta(label=label, timestamp_ns=n, generation=1, source="loan", index=n)


ring_name = ring_name_fixture("mmfl")


def _reader_proc(name, ready, result_q):
    """Receive until END; report every index seen and how many were not whole."""
    seen, bad = [], 0
    out = np.empty(SLOT, np.uint8)
    words = out.view(np.int64)
    with RingReader.attach(name, start="oldest") as r:
        ready.set()
        try:
            while True:
                got = r.receive_into(out, timeout=20)
                if got is None:
                    break
                m = got[1]
                bad += not bool((words == m.index).all())
                seen.append(m.index)
                if m.label == END:
                    break
        except ProducerGone:
            pass
    result_q.put((seen, bad))


def test_cancelled_loans_are_never_read_and_every_committed_one_is(ring_name, procs):
    # Lossless, so the reader must get every committed sample; every third loan is scribbled
    # over with a poison value and cancelled, then the same sample is loaned and committed.
    count = 600
    ready, q = CTX.Event(), CTX.Queue()
    with RingWriter.create(RingConfig(ring_name, slots=4, slot_bytes=SLOT,
                                      mode="lossless")) as w:
        p = CTX.Process(target=_reader_proc, args=(ring_name, ready, q), daemon=True)
        p.start()
        procs.append(p)
        assert ready.wait(10)
        for n in range(count):
            if n % 3 == 0:
                slot = w.loan(SCHEMA, timeout=20)
                slot.arrays["words"][: WORDS // 2] = -1  # half written, then given back
                slot.cancel()
            slot = w.loan(SCHEMA, timeout=20)
            slot.arrays["words"][:] = n
            assert slot.commit(meta(n, END if n == count - 1 else 0)) == n
        seen, bad = q.get(timeout=60)
    assert bad == 0, f"{bad} samples read with a cancelled loan's bytes in them"
    assert seen == list(range(count))


def test_a_cancelled_loan_gives_back_its_sample_number(ring_name):
    with RingWriter.create(RingConfig(ring_name, slots=2, slot_bytes=SLOT)) as w, \
            RingReader.attach(ring_name, start="next") as r:
        slot = w.loan(SCHEMA)
        slot.arrays["words"][:] = 9
        slot.cancel()
        assert w.published == 0 and w.stats().published == 0
        assert r.receive_into(np.empty(SLOT, np.uint8), timeout=0) is None
        again = w.loan(SCHEMA)
        assert again.number == 0
        again.arrays["words"][:] = 4
        assert again.commit(meta(4)) == 0
        s = r.receive(timeout=1)
        assert s.meta.index == 4 and (s.arrays["words"] == 4).all()


def test_a_reader_on_the_slot_a_cancelled_loan_scribbled_on_skips_it_counted(ring_name):
    with RingWriter.create(RingConfig(ring_name, slots=2, slot_bytes=SLOT)) as w, \
            RingReader.attach(ring_name, start="oldest") as r:
        for n in range(2):
            w.publish(SCHEMA, meta(n), {"words": np.full(WORDS, n, np.int64)})
        slot = w.loan(SCHEMA)  # sample 2 takes slot 0, which holds sample 0 the reader is on
        slot.arrays["words"][:] = -1
        slot.cancel()
        s = r.receive(timeout=1)
        assert s.meta.index == 1 and (s.arrays["words"] == 1).all()
        assert r.stats().dropped == 1  # sample 0 is gone: skipped and counted, never torn


def test_commit_after_cancel_is_refused_and_cancel_after_commit_changes_nothing(ring_name):
    with RingWriter.create(RingConfig(ring_name, slots=2, slot_bytes=SLOT)) as w:
        slot = w.loan(SCHEMA)
        slot.cancel()
        slot.cancel()  # idempotent
        with pytest.raises(RingError, match="already cancelled; loan a new slot"):
            slot.commit(meta(0))
        done = w.loan(SCHEMA)
        done.commit(meta(0))
        done.cancel()
        assert w.published == 1 and not done.open


def test_a_second_loan_while_one_is_open_is_refused_saying_commit_or_cancel(ring_name):
    with RingWriter.create(RingConfig(ring_name, slots=2, slot_bytes=SLOT)) as w:
        w.loan(SCHEMA)
        with pytest.raises(RingError, match="commit or cancel it"):
            w.loan(SCHEMA)


def test_a_loan_of_another_schema_than_the_slot_last_held_is_read_with_its_own(ring_name):
    other = SampleSchema((ModalitySpec("video", "uint8", (2, 3, 8, 8)),
                          ModalitySpec("audio", "float32", (1, 4, 5))))
    with RingWriter.create(RingConfig(ring_name, slots=1, slot_bytes=SLOT)) as w, \
            RingReader.attach(ring_name, start="next") as r:
        w.publish(SCHEMA, meta(0), {"words": np.zeros(WORDS, np.int64)})
        assert r.receive(timeout=1).schema == SCHEMA
        slot = w.loan(other)  # the one slot held SCHEMA: same bytes, another layout
        slot.arrays["video"][:] = 7
        slot.arrays["audio"][:] = 0.5
        slot.commit(meta(1))
        s = r.receive(timeout=1)
        assert s.schema == other
        assert (s.arrays["video"] == 7).all() and (s.arrays["audio"] == 0.5).all()


def test_a_loan_too_big_for_the_slots_is_refused_naming_both_sizes(ring_name):
    big = SampleSchema((ModalitySpec("words", "int64", (2 * WORDS,)),))
    with RingWriter.create(RingConfig(ring_name, slots=2, slot_bytes=SLOT)) as w:
        with pytest.raises(SchemaError, match=f"{2 * SLOT} bytes.*slot_bytes={SLOT}"):
            w.loan(big)
        w.loan(SCHEMA).commit(meta(0))  # the ring is untouched and usable
        assert w.published == 1


def test_a_move_to_a_new_layout_cancels_the_outstanding_loan(ring_name):
    w = RingWriter.create(RingConfig(ring_name, slots=2, slot_bytes=SLOT))
    try:
        slot = w.loan(SCHEMA)
        w = w.supersede(slot_bytes=2 * SLOT)
        with pytest.raises(RingError, match="moved or closed"):
            slot.commit(meta(0))
        with RingReader.attach(ring_name, start="oldest") as r:
            again = w.loan(SCHEMA)
            again.arrays["words"][:] = 3
            again.commit(meta(3))
            s = r.receive(timeout=1)
            assert s.meta.index == 3 and (s.arrays["words"] == 3).all()
    finally:
        w.close()


def test_closing_the_writer_cancels_the_outstanding_loan(ring_name):
    w = RingWriter.create(RingConfig(ring_name, slots=2, slot_bytes=SLOT))
    slot = w.loan(SCHEMA)
    w.close()
    with pytest.raises(RingError, match="moved or closed"):
        slot.commit(meta(0))
    assert not shm_entries(ring_name)


def test_lossless_loan_waits_for_the_slowest_reader_like_publish(ring_name):
    from protocol.errors import RingFull

    with RingWriter.create(RingConfig(ring_name, slots=2, slot_bytes=SLOT,
                                      mode="lossless")) as w, \
            RingReader.attach(ring_name, start="next") as r:
        for n in range(2):
            w.loan(SCHEMA).commit(meta(n))
        with pytest.raises(RingFull, match="slowest reader is at sample 0"):
            w.loan(SCHEMA, timeout=0.05)
        r.receive(timeout=1)
        w.loan(SCHEMA, timeout=1).commit(meta(2))
        assert w.published == 3


def test_a_loan_retyped_to_another_schema_keeps_what_already_sits_at_the_same_place(ring_name):
    a = SampleSchema((ModalitySpec("video", "uint8", (2, 3, 8, 8)),
                      ModalitySpec("imu", "float32", (6, 10))))
    b = SampleSchema((ModalitySpec("video", "uint8", (2, 3, 8, 8)),
                      ModalitySpec("imu", "float32", (256,))))
    with RingWriter.create(RingConfig(ring_name, slots=2, slot_bytes=SLOT)) as w, \
            RingReader.attach(ring_name, start="next") as r:
        slot = w.loan(a)
        slot.arrays["video"][:] = 9          # made in place under schema a
        slot.retype(b)                       # the sample turned out to be of schema b
        slot.arrays["imu"][:] = 0.25
        slot.commit(meta(0))
        s = r.receive(timeout=1)
        assert s.schema == b
        assert (s.arrays["video"] == 9).all() and (s.arrays["imu"] == 0.25).all()


def test_a_retype_beyond_the_slot_is_refused_and_leaves_the_loan_open(ring_name):
    big = SampleSchema((ModalitySpec("words", "int64", (2 * WORDS,)),))
    with RingWriter.create(RingConfig(ring_name, slots=2, slot_bytes=SLOT)) as w:
        slot = w.loan(SCHEMA)
        with pytest.raises(SchemaError, match=f"slot_bytes={SLOT}"):
            slot.retype(big)
        assert slot.open and slot.schema == SCHEMA
        slot.cancel()
        assert w.published == 0


def test_the_writer_says_when_the_next_slot_still_holds_a_readers_next_sample(ring_name):
    """What in-place writers check before a loan: a loan takes the slot for the whole
    making of a sample, where publish overwrites it only once the sample is made."""
    with RingWriter.create(RingConfig(ring_name, slots=2, slot_bytes=SLOT)) as w, \
            RingReader.attach(ring_name, start="oldest") as r:
        assert not w.next_slot_needed()  # the reader has nothing to read yet
        for n in range(2):
            w.publish(SCHEMA, meta(n), {"words": np.full(WORDS, n, np.int64)})
        assert w.next_slot_needed()  # sample 2 would take slot 0: the reader's next, sample 0
        assert r.receive(timeout=1).meta.index == 0
        assert not w.next_slot_needed()
        for n in range(2, 4):
            w.publish(SCHEMA, meta(n), {"words": np.full(WORDS, n, np.int64)})
        # The reader (at sample 1) has not looked, but sample 1 is gone already: it is lapped,
        # and nothing a write does to slot 0 (sample 2) can give it sample 1 back.
        assert not w.next_slot_needed()


def test_a_ring_without_registered_readers_never_needs_its_next_slot(ring_name):
    with RingWriter.create(RingConfig(ring_name, slots=2, slot_bytes=SLOT)) as w:
        for n in range(5):
            w.publish(SCHEMA, meta(n), {"words": np.full(WORDS, n, np.int64)})
            assert not w.next_slot_needed()


def test_a_reader_the_writer_keeps_lapping_is_not_protected_by_copies(ring_name):
    """A slower lossy reader loses (written - read) samples whichever slot a write takes, so
    copying for it saves nothing; once it keeps up again, a moment's lag is protected again."""
    from protocol.ring_readers import LAPPED_WINDOW

    def write(w, n):
        w.next_slot_needed()  # what the producer asks before each sample (it samples drops)
        w.publish(SCHEMA, meta(n), {"words": np.full(WORDS, n, np.int64)})

    with RingWriter.create(RingConfig(ring_name, slots=2, slot_bytes=SLOT)) as w, \
            RingReader.attach(ring_name, start="oldest") as r:
        for n in range(4):
            write(w, n)
        assert r.receive(timeout=1).meta.index == 2 and r.stats().dropped == 2  # lapped
        write(w, 4)
        assert r.stats().dropped == 2
        assert not w.next_slot_needed()  # a full ring behind, but lapped a sample ago
        assert [r.receive(timeout=1).meta.index for _ in range(2)] == [3, 4]
        n = 5
        for _ in range(LAPPED_WINDOW * 2 + 1):  # keeps up for more than the window
            write(w, n)
            assert r.receive(timeout=1).meta.index == n
            n += 1
        write(w, n)
        write(w, n + 1)
        assert w.next_slot_needed()  # a moment's lag of a reader that keeps up: protected
