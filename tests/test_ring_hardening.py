"""The ring under damage and hostile neighbours (issue 13 items 5-9): real producer and reader
processes, real POSIX shared memory, damage done from yet another process.

A producer here is a RingSink (the daemon's own ring owner, producer/ring_sink.py) in a
forked process that publishes patterned samples on command, so a test decides exactly what is
in the ring when it damages it. Readers that may meet a truncated segment run in their own
process: were the guard against SIGBUS missing, the test would see rc -7, not lose pytest.
"""
from __future__ import annotations

import functools
import multiprocessing as mp
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from producer.ring_sink import RingSink
from protocol.errors import NotARing, ProducerGone, RingDamaged, RingError, RingInUse
from protocol.ring import RingConfig, RingReader, RingWriter
from protocol.ring_layout import H, S, SLOT_HEADER_BYTES, SCHEMA_MAX, STATE_CLOSED, RingHeader
from protocol.schema import ModalitySpec, SampleMeta, SampleSchema

sys.path.insert(0, str(Path(__file__).parent))
from _polling import wait_for  # noqa: E402
from _rings import procs, ring_name_fixture, shm_entries  # noqa: E402, F401  (procs: a fixture)

CTX = mp.get_context("fork")
WORDS = 2048  # 16 KiB payloads
SCHEMA = SampleSchema((ModalitySpec("words", "int64", (WORDS,)),))
SLOT = SCHEMA.payload_nbytes
SLOTS = 4


def patterned(n: int) -> dict[str, np.ndarray]:
    return {"words": np.full(WORDS, n, np.int64)}


def meta(n: int) -> SampleMeta:
    return SampleMeta(label=n % 7, timestamp_ns=n, generation=1, source="test", index=n)


wait_until = functools.partial(wait_for, timeout=20.0, interval=0.005)


ring_name = ring_name_fixture("mmfh")


def header(name: str) -> RingHeader:
    with open(f"/dev/shm/{name}", "rb") as f:
        return RingHeader.unpack(f.read(256))


def damage(name: str, offset: int, data: bytes) -> None:
    """Write `data` at `offset` of the segment from another process (a real `python -c`)."""
    code = ("import os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
            "os.pwrite(fd, bytes.fromhex(sys.argv[3]), int(sys.argv[2]))")
    subprocess.run([sys.executable, "-c", code, f"/dev/shm/{name}", str(offset), data.hex()],
                   check=True)


def truncate(name: str, size: int) -> None:
    code = "import os, sys; fd = os.open(sys.argv[1], os.O_RDWR); os.ftruncate(fd, int(sys.argv[2]))"
    subprocess.run([sys.executable, "-c", code, f"/dev/shm/{name}", str(size)], check=True)


# --- a producer on command ------------------------------------------------------------------


def _commanded_producer(name, cmds, acks):
    keeper = RingSink(RingConfig(name, slots=SLOTS, slot_bytes=SLOT), RingWriter.create)
    acks.put(("ready", keeper.stats().epoch))
    n = 0
    try:
        while (cmd := cmds.get()) is not None:
            if cmd == "heartbeat":
                keeper.heartbeat()
            else:
                for _ in range(cmd):
                    keeper.publish(SCHEMA, meta(n), patterned(n), timeout=5)
                    n += 1
            acks.put(("done", n, keeper.stats().epoch, keeper.replacements))
    finally:
        keeper.close()


class Producer:
    def __init__(self, procs, name: str):
        self.cmds, self.acks = CTX.Queue(), CTX.Queue()
        self.proc = CTX.Process(target=_commanded_producer, args=(name, self.cmds, self.acks),
                                daemon=True)
        self.proc.start()
        procs.append(self.proc)
        kind, self.epoch = self.acks.get(timeout=20)
        assert kind == "ready"

    def publish(self, k: int) -> tuple[int, int, int]:
        """Publish k samples; returns (published so far, epoch, replacements)."""
        self.cmds.put(k)
        _, n, epoch, replaced = self.acks.get(timeout=30)
        return n, epoch, replaced

    def heartbeat(self) -> tuple[int, int, int]:
        self.cmds.put("heartbeat")
        _, n, epoch, replaced = self.acks.get(timeout=30)
        return n, epoch, replaced

    def stop(self) -> int:
        self.cmds.put(None)
        self.proc.join(20)
        return self.proc.exitcode

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(10)


def receive_all(r: RingReader, timeout: float = 5.0) -> list[int]:
    out, got = np.empty(SLOT, np.uint8), []
    while (x := r.receive_into(out, timeout=timeout)) is not None:
        assert (out.view(np.int64) == x[1].index).all()
        got.append(x[1].index)
        timeout = 0.2  # the rest is already published
    return got


# --- 13.5: a truncated segment kills nobody ---------------------------------------------------


def _streaming_producer(name, stop, q):
    """Publishes as fast as it can, heartbeating like the daemon; reports what it lived
    through when told to stop."""
    keeper = RingSink(RingConfig(name, slots=SLOTS, slot_bytes=SLOT), RingWriter.create)
    epochs, n = [keeper.stats().epoch], 0
    q.put(("ready", epochs[0]))
    try:
        while not stop.is_set():
            keeper.heartbeat()
            keeper.publish(SCHEMA, meta(n), patterned(n), timeout=5)
            n += 1
            if keeper.stats().epoch != epochs[-1]:
                epochs.append(keeper.stats().epoch)
                q.put(("epoch", epochs[-1]))
            time.sleep(0.0005)  # about 1-2 k samples/s: a camera, not a benchmark
    finally:
        keeper.close()
    q.put(("done", n, epochs, keeper.replacements))


def _truncation_reader(name, zero_copy, first_epoch, q):
    """Reads until it has seen the ring damaged and then samples of a new epoch."""
    seen: list[str] = []
    out = np.empty(SLOT, np.uint8)
    deadline = time.monotonic() + 60
    r = RingReader.attach(name, start="next")
    q.put(("attached", r.epoch))
    while time.monotonic() < deadline:
        try:
            if zero_copy:
                v = r.receive_view(timeout=1)
                if v is None:
                    continue
                words = v.arrays["words"].copy()
                if not v.still_valid():
                    continue
                index = v.meta.index
            else:
                got = r.receive_into(out, timeout=1)
                if got is None:
                    continue
                words, index = out.view(np.int64), got[1].index
            if not (words == index).all():
                q.put(("torn", index))
                return
            if r.epoch != first_epoch:
                q.put(("new epoch", r.epoch, seen))
                r.close()
                return
        except ProducerGone as e:  # RingDamaged, or the producer's fresh segment took the name
            seen.append(type(e).__name__)
            r.close()
            r = wait_until(lambda: _attach_or_none(name), what="a fresh segment to attach")
    q.put(("timeout", seen))


def _attach_or_none(name):
    try:
        return RingReader.attach(name, start="next")
    except (ProducerGone, NotARing):  # what the trainer's loops wait on (trainer/prefetch.py)
        return None


@pytest.mark.parametrize("zero_copy", [False, True], ids=["receive_into", "receive_view"])
@pytest.mark.parametrize("keep", ["nothing", "half the slots"])
def test_truncating_a_live_ring_kills_neither_producer_nor_reader_and_leaks_nothing(
        ring_name, procs, zero_copy, keep):
    stop, pq, rq = CTX.Event(), CTX.Queue(), CTX.Queue()
    producer = CTX.Process(target=_streaming_producer, args=(ring_name, stop, pq), daemon=True)
    producer.start()
    procs.append(producer)
    kind, epoch = pq.get(timeout=20)
    reader = CTX.Process(target=_truncation_reader, args=(ring_name, zero_copy, epoch, rq),
                         daemon=True)
    reader.start()
    procs.append(reader)
    assert rq.get(timeout=20)[0] == "attached"
    hdr = header(ring_name)
    truncate(ring_name, 0 if keep == "nothing" else hdr.slot_offset(SLOTS // 2) + 100)
    result = rq.get(timeout=90)
    reader.join(20)
    assert reader.exitcode == 0, f"reader died (rc {reader.exitcode}; -7 is SIGBUS): {result}"
    assert result[0] == "new epoch", result  # it was told, re-attached and read whole samples
    assert producer.is_alive(), f"producer died (rc {producer.exitcode}; -7 is SIGBUS)"
    stop.set()
    messages = [pq.get(timeout=30) for _ in range(2)]
    done = next(m for m in messages if m[0] == "done")
    producer.join(20)
    assert producer.exitcode == 0
    assert done[3] >= 1 and done[2][-1] != epoch  # it replaced its ring with a fresh one
    assert shm_entries(ring_name) == []  # no segment, no semaphore, no temporary left


def test_attach_to_a_truncated_ring_is_refused_naming_both_sizes(ring_name, procs):
    p = Producer(procs, ring_name)
    p.publish(2)
    total = header(ring_name).slot_offset(SLOTS)
    truncate(ring_name, 8192)
    with pytest.raises(RingDamaged, match=f"has 8192 bytes but its header describes {total}"):
        RingReader.attach(ring_name)
    # The producer notices at its next heartbeat (a size check, no page touched) and
    # replaces the ring; readers attach to the fresh one.
    n, epoch, replaced = p.heartbeat()
    assert replaced == 1 and epoch != p.epoch
    with RingReader.attach(ring_name, start="next") as r:
        p.publish(3)
        assert receive_all(r) == [2, 3, 4]
    assert p.stop() == 0


# --- 13.6: a damaged counter or slot is detached from, not crashed on -------------------------


def test_a_forged_published_counter_is_damage_not_a_skip_or_a_hang(ring_name, procs):
    p = Producer(procs, ring_name)
    p.publish(3)
    r = RingReader.attach(ring_name, start="oldest")
    assert receive_all(r) == [0, 1, 2]
    damage(ring_name, H["published"], struct.pack("<Q", 1 << 62))
    with pytest.raises(RingDamaged, match=r"counts 4611686018427387904 published samples.*"
                                          r"published counter is damaged"):
        r.receive_into(np.empty(SLOT, np.uint8), timeout=5)
    assert r.stats().dropped == 0  # nothing was counted as skipped on the forged word
    with pytest.raises(RingDamaged, match="published counter is damaged"):
        RingReader.attach(ring_name)  # the damage is still there: not healthy yet
    p.publish(1)  # the producer's next publish writes the counter again: healthy
    with RingReader.attach(ring_name, start="newest") as again:
        assert receive_all(again) == [3]
    assert p.stop() == 0


@pytest.mark.parametrize("field,data,match", [
    ("schema_len", struct.pack("<I", SCHEMA_MAX + 100), "schema encoding is 4068 bytes"),
    ("schema", b'{"modalities": [{"name": "x", "dtype": "float', "does not decode|hashes to"),
    ("schema", b"\xff\xfe garbage \x00\x01", "does not decode"),
    ("payload_nbytes", struct.pack("<Q", 1 << 40), "more than a slot's"),
    ("payload_nbytes", struct.pack("<Q", 8), "its schema .* makes"),
])
def test_a_damaged_slot_is_detached_from_with_what_is_wrong(ring_name, procs, field, data,
                                                           match):
    p = Producer(procs, ring_name)
    p.publish(2)
    off = header(ring_name).slot_offset(1)  # sample 1's slot
    where = off + (SLOT_HEADER_BYTES - SCHEMA_MAX if field == "schema" else S[field])
    damage(ring_name, where, data)
    # A fresh reader that meets sample 1 first decodes its schema (a known schema id would be
    # taken from the reader's cache: damaged text behind it is then harmless).
    r = RingReader.attach(ring_name, start="newest")
    out = np.empty(SLOT, np.uint8)
    with pytest.raises(RingDamaged, match=f"sample 1: .*({match})"):
        r.receive_into(out, timeout=5)
    with pytest.raises(RingError, match="is closed"):  # it detached
        r.receive_into(out, timeout=0)
    # The producer rewrites a slot's schema and sizes at every write: after one lap of the
    # ring every slot is whole again, and a reader that re-attaches reads on.
    p.publish(SLOTS)
    with RingReader.attach(ring_name, start="oldest") as again:
        assert receive_all(again) == [2, 3, 4, 5]
    assert p.stop() == 0


# --- 13.7: links and directories at the ring's name -------------------------------------------


def test_a_symlink_at_the_ring_name_is_refused_and_never_followed(ring_name, tmp_path):
    target = tmp_path / "victim"
    target.write_bytes(b"precious" * 1000)
    target.chmod(0o644)
    os.symlink(target, f"/dev/shm/{ring_name}")
    with pytest.raises(NotARing, match=f"is a symbolic link to '{target}'"):
        RingReader.attach(ring_name)
    with pytest.raises(NotARing, match="symbolic link"):
        RingWriter.create(RingConfig(ring_name, slots=2, slot_bytes=4096))
    assert target.read_bytes() == b"precious" * 1000 and target.stat().st_mode & 0o777 == 0o644
    assert os.path.islink(f"/dev/shm/{ring_name}")  # left alone


def test_a_directory_at_the_ring_name_is_refused_by_reader_and_producer(ring_name):
    os.mkdir(f"/dev/shm/{ring_name}")
    with pytest.raises(NotARing, match="is a directory"):
        RingReader.attach(ring_name)
    with pytest.raises(NotARing, match="is a directory"):
        RingWriter.create(RingConfig(ring_name, slots=2, slot_bytes=4096))


def test_a_symlink_at_a_reader_semaphore_is_refused_and_its_target_keeps_its_mode(
        ring_name, procs, tmp_path):
    p = Producer(procs, ring_name)
    target = tmp_path / "victim"
    target.write_bytes(b"x")
    target.chmod(0o644)
    os.symlink(target, f"/dev/shm/sem.{ring_name}.{p.epoch:016x}.r0")
    with pytest.raises(NotARing, match=f"sem.{ring_name}.* is a symbolic link"):
        RingReader.attach(ring_name)
    assert target.stat().st_mode & 0o777 == 0o644
    assert p.stop() == 0


# --- 13.8: a dead ring yields nothing new, ever ------------------------------------------------


def test_attach_to_a_sigkilled_producers_ring_never_returns_its_last_sample(ring_name, procs):
    p = Producer(procs, ring_name)
    p.publish(3)
    p.kill()
    for _ in range(3):  # what a re-attach loop does, again and again
        for start in ("newest", "oldest", "next"):
            with pytest.raises(ProducerGone, match="died"):
                RingReader.attach(ring_name, start=start)


def test_a_reader_that_drained_a_dead_ring_gets_producer_gone_and_nothing_after(ring_name,
                                                                              procs):
    p = Producer(procs, ring_name)
    r = RingReader.attach(ring_name, start="next")
    p.publish(2)
    p.kill()
    out = np.empty(SLOT, np.uint8)
    # published before it died: whole, and delivered once
    assert [r.receive_into(out, timeout=5)[1].index for _ in range(2)] == [0, 1]
    with pytest.raises(ProducerGone, match="died"):
        r.receive_into(out, timeout=5)
    r.close()
    with pytest.raises(ProducerGone):
        RingReader.attach(ring_name, resume=r.mark())


# --- 13.9: "closed" written into a live ring's header ------------------------------------------


def test_a_forged_closed_state_does_not_stop_readers_of_a_live_producer(ring_name, procs):
    # Decision: the header's state is advisory. Whether a ring ended is decided by its name
    # (a closing producer removes it first) and its producer's pid + start time.
    p = Producer(procs, ring_name)
    r = RingReader.attach(ring_name, start="next")
    damage(ring_name, H["state"], struct.pack("<Q", STATE_CLOSED))
    with RingReader.attach(ring_name, start="next") as late:  # attaching works too
        p.publish(SLOTS)
        assert receive_all(r) == list(range(SLOTS))
        assert receive_all(late) == list(range(SLOTS))
    with pytest.raises(RingInUse, match=f"live producer pid {p.proc.pid}"):
        RingWriter.create(RingConfig(ring_name, slots=2, slot_bytes=4096))  # not replaced
    p.heartbeat()  # and the producer puts the word back
    assert header(ring_name).state == 1
    r.close()
    assert p.stop() == 0


def test_a_reader_waiting_on_a_forged_closed_ring_is_woken_by_the_next_sample(ring_name,
                                                                             procs):
    p = Producer(procs, ring_name)
    r = RingReader.attach(ring_name, start="next")
    assert r.receive_into(np.empty(SLOT, np.uint8), timeout=0.3) is None  # waiting, no error
    damage(ring_name, H["state"], struct.pack("<Q", STATE_CLOSED))
    assert r.receive_into(np.empty(SLOT, np.uint8), timeout=0.3) is None  # still waiting
    p.publish(1)
    assert receive_all(r) == [0]
    r.close()
    assert p.stop() == 0


# --- the user-facing dataset over the ring ---------------------------------------------------


def test_ring_dataset_leaves_a_damaged_ring_and_reads_on_without_a_repeat_once_it_heals(
        ring_name, procs, caplog):
    import logging
    import threading

    from trainer.datasets import RingDataset

    p = Producer(procs, ring_name)
    ds = RingDataset(ring_name, start="next", max_samples=4, with_meta=True)
    got: list[int] = []
    errors: list[BaseException] = []

    def consume():
        try:
            for _, _, info in ds:
                got.append(info["index"])
        except BaseException as e:  # the test fails on it below
            errors.append(e)

    with caplog.at_level(logging.WARNING, logger="trainer.datasets"):
        t = threading.Thread(target=consume, daemon=True)
        t.start()
        wait_until(lambda: _registered(ring_name), what="the dataset's reader")
        p.publish(2)
        wait_until(lambda: len(got) == 2, what="the first two samples")
        damage(ring_name, H["published"], struct.pack("<Q", 1 << 62))
        wait_until(lambda: any("damaged" in r.getMessage() for r in caplog.records),
                   what="the damage noticed")
        p.publish(2)  # writes the counter again: healthy
        t.join(30)
    assert not errors, errors
    assert got == [0, 1, 2, 3]  # on after the damage, from where it was: none twice, none lost
    assert p.stop() == 0


def _registered(name: str) -> bool:
    return header(name).active_mask != 0
