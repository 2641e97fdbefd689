"""The shared-memory ring, driven by real processes over real POSIX shared memory.

Every payload is patterned from its sample number (each u64 word == the number), so a torn
read (halves of two samples) is caught by one vectorised comparison per sample.
"""
from __future__ import annotations

import functools
import grp
import multiprocessing as mp
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import posix_ipc
import pytest

from protocol.errors import (NotARing, ProducerGone, RingFull, RingInUse, RingNotFound,
                             SchemaError, VersionMismatch)
from protocol.ring import RingConfig, RingReader, RingWriter
from protocol.ring_layout import H, MAGIC, RING_VERSION, RingHeader
from protocol.schema import ModalitySpec, SampleMeta, SampleSchema

sys.path.insert(0, str(Path(__file__).parent))
from _polling import wait_for  # noqa: E402
from _rings import procs, ring_name_fixture, shm_entries  # noqa: E402, F401  (procs: a fixture)

CTX = mp.get_context("fork")
WORDS = 8 * 1024  # 64 KiB payloads: big enough that a copy can be interrupted mid-way
SCHEMA = SampleSchema((ModalitySpec("words", "int64", (WORDS,)),))
SLOT = SCHEMA.payload_nbytes


def patterned(n: int) -> dict[str, np.ndarray]:
    return {"words": np.full(WORDS, n, np.int64)}


def meta(n: int, generation: int = 0) -> SampleMeta:
    return SampleMeta(label=n % 7, timestamp_ns=n, generation=generation, source="test", index=n)


# ring slots come fast: a short poll
wait_until = functools.partial(wait_for, timeout=10.0, interval=0.002)


ring_name = ring_name_fixture("mmft")


def start(procs, target, *args) -> mp.Process:
    p = CTX.Process(target=target, args=args, daemon=True)
    p.start()
    procs.append(p)
    return p


# --- child processes ---------------------------------------------------------------------


END = -2  # label of the last sample: readers stop there (the last sample is never lapped)


def _writer_proc(name, slots, mode, seconds, ready, go, done, result_q):
    with RingWriter.create(RingConfig(name, slots=slots, slot_bytes=SLOT, mode=mode)) as w:
        ready.set()
        go.wait(10)
        deadline = time.monotonic() + seconds
        n = 0
        while time.monotonic() < deadline:
            w.publish(SCHEMA, meta(n), patterned(n), timeout=10)
            n += 1
        w.publish(SCHEMA, SampleMeta(label=END, timestamp_ns=n, index=n), patterned(n))
        result_q.put(("writer", n + 1))
        done.wait(30)  # keep the ring until every reader has reported


def _checking_reader_proc(name, seed, use_view, ready, result_q):
    rng = random.Random(seed)
    torn = received = 0
    last = -1
    out = np.empty(SLOT, np.uint8)
    words = out.view(np.int64)
    with RingReader.attach(name, start="oldest") as r:
        ready.set()
        try:
            while True:
                if use_view:
                    v = r.receive_view(timeout=10)
                    if v is None:
                        break
                    ok = bool((v.arrays["words"] == v.meta.index).all())
                    if not v.still_valid():
                        continue  # overwritten while we looked: the API says discard it
                    n = v.meta.index
                else:
                    got = r.receive_into(out, timeout=10)
                    if got is None:
                        break
                    m = got[1]
                    n = m.index
                    ok = bool((words == n).all()) and m.timestamp_ns == n
                torn += not ok
                received += 1
                if n <= last:
                    torn += 1  # out of order would be as wrong as torn
                last = n
                if (v.meta if use_view else m).label == END:
                    break
                if rng.random() < 0.05:  # now and then fall behind, to get lapped
                    time.sleep(rng.random() * 0.003)
        except ProducerGone:
            pass
        s = r.stats()
    result_q.put(("reader", seed, torn, received, s.dropped, s.received, s.position - s.start,
                  last))


def test_reader_never_returns_a_torn_slot(ring_name, procs):
    # 1 writer + 3 readers (two copying, one zero-copy with still_valid) on a 4-slot ring.
    ready, go, done, q = CTX.Event(), CTX.Event(), CTX.Event(), CTX.Queue()
    start(procs, _writer_proc, ring_name, 4, "lossy", 1.5, ready, go, done, q)
    assert ready.wait(10)
    readers_ready = [CTX.Event() for _ in range(3)]
    for seed, ev in enumerate(readers_ready):
        start(procs, _checking_reader_proc, ring_name, seed, seed == 2, ev, q)
    for ev in readers_ready:
        assert ev.wait(10)
    go.set()
    results = [q.get(timeout=30) for _ in range(4)]
    published = next(r[1] for r in results if r[0] == "writer")
    done.set()  # let the writer close
    assert published > 100
    for _, seed, torn, received, dropped, stat_received, window, last in (
            r for r in results if r[0] == "reader"):
        assert torn == 0, f"reader {seed} saw {torn} torn or out-of-order samples"
        assert received > 0
        assert stat_received + dropped == window  # nothing vanishes without being counted
        assert last == published - 1  # every reader reached the end


def _slow_reader_proc(name, per_sample_s, until, ready, result_q):
    with RingReader.attach(name, start="oldest") as r:
        ready.set()
        indices = []
        out = np.empty(SLOT, np.uint8)
        while r.stats().position < until:
            got = r.receive_into(out, timeout=10)
            if got is None:
                break
            assert (out.view(np.int64) == got[1].index).all()
            indices.append(got[1].index)
            time.sleep(per_sample_s)  # a deliberately slow consumer
        s = r.stats()
        result_q.put((indices, s.received, s.dropped, s.start, s.position))


def test_lossy_drop_counts_add_up(ring_name, procs):
    n_samples = 400
    with RingWriter.create(RingConfig(ring_name, slots=4, slot_bytes=SLOT)) as w:
        ready, q = CTX.Event(), CTX.Queue()
        start(procs, _slow_reader_proc, ring_name, 0.001, n_samples, ready, q)
        assert ready.wait(10)
        for n in range(n_samples):
            w.publish(SCHEMA, meta(n), patterned(n), timeout=0)  # lossy: never waits
        indices, received, dropped, first, position = q.get(timeout=30)
    assert position == n_samples
    assert dropped > 0, "the slow reader should have been lapped"
    assert received == len(indices)
    assert received + dropped == n_samples - first
    assert indices == sorted(set(indices))


def test_lossy_writer_never_waits_for_slow_reader(ring_name):
    with RingWriter.create(RingConfig(ring_name, slots=2, slot_bytes=SLOT)) as w:
        with RingReader.attach(ring_name):  # registered, never reads
            for n in range(50):
                w.publish(SCHEMA, meta(n), patterned(n), timeout=0)
            assert w.stats().published == 50


def test_lossless_backpressure_slow_reader_misses_nothing(ring_name, procs):
    n_samples = 120
    with RingWriter.create(RingConfig(ring_name, slots=4, slot_bytes=SLOT,
                                      mode="lossless")) as w:
        ready, q = CTX.Event(), CTX.Queue()
        start(procs, _slow_reader_proc, ring_name, 0.002, n_samples, ready, q)
        assert ready.wait(10)
        blocked = 0
        for n in range(n_samples):
            try:
                w.publish(SCHEMA, meta(n), patterned(n), timeout=0)
            except RingFull:
                blocked += 1  # the reader holds the slot: wait for it for real now
                w.publish(SCHEMA, meta(n), patterned(n), timeout=20)
        indices, received, dropped, first, position = q.get(timeout=30)
    assert blocked > 0, "the writer should have had to wait for the slow reader"
    assert dropped == 0
    assert indices == list(range(n_samples))


def _stuck_reader_proc(name, ready):
    r = RingReader.attach(name, start="next")  # registers, then never reads
    ready.set()
    signal.pause()


def test_sigkilled_reader_does_not_block_lossless_writer_forever(ring_name, procs):
    with RingWriter.create(RingConfig(ring_name, slots=2, slot_bytes=SLOT,
                                      mode="lossless")) as w:
        ready = CTX.Event()
        p = start(procs, _stuck_reader_proc, ring_name, ready)
        assert ready.wait(10)
        w.publish(SCHEMA, meta(0), patterned(0), timeout=0)
        w.publish(SCHEMA, meta(1), patterned(1), timeout=0)
        with pytest.raises(RingFull, match="slowest reader is at sample 0"):
            w.publish(SCHEMA, meta(2), patterned(2), timeout=0.05)
        os.kill(p.pid, signal.SIGKILL)
        # Not reaped yet on purpose: a zombie must count as dead too.
        w.publish(SCHEMA, meta(2), patterned(2), timeout=20)
        assert w.stats().readers == 0
        p.join(5)


def test_lossless_writer_without_readers_does_not_wait(ring_name):
    with RingWriter.create(RingConfig(ring_name, slots=2, slot_bytes=SLOT,
                                      mode="lossless")) as w:
        for n in range(10):
            w.publish(SCHEMA, meta(n), patterned(n), timeout=0)


def _producer_proc(name, count, ready):
    w = RingWriter.create(RingConfig(name, slots=4, slot_bytes=SLOT))
    for n in range(count):
        w.publish(SCHEMA, meta(n), patterned(n))
    ready.set()
    signal.pause()


def test_create_refuses_a_live_producers_ring_naming_its_pid(ring_name, procs):
    ready = CTX.Event()
    p = start(procs, _producer_proc, ring_name, 1, ready)
    assert ready.wait(10)
    with pytest.raises(RingInUse, match=f"pid {p.pid}"):
        RingWriter.create(RingConfig(ring_name, slots=4, slot_bytes=SLOT))
    p.kill()
    p.join(5)


def test_sigkilled_producer_ring_is_replaced_and_old_readers_get_producer_gone(ring_name, procs):
    ready = CTX.Event()
    p = start(procs, _producer_proc, ring_name, 3, ready)
    assert ready.wait(10)
    old = RingReader.attach(ring_name, start="oldest")
    out = np.empty(SLOT, np.uint8)
    assert old.receive_into(out, timeout=5)[1].index == 0
    p.kill()
    p.join(5)
    with RingWriter.create(RingConfig(ring_name, slots=4, slot_bytes=SLOT)) as w:
        assert w.stats().epoch != old.epoch
        w.publish(SCHEMA, meta(100), patterned(100))
        # What the dead producer published is still whole and is delivered first ...
        assert [old.receive_into(out, timeout=5)[1].index for _ in range(2)] == [1, 2]
        # ... then the old reader is told, never handed the new producer's samples.
        with pytest.raises(ProducerGone, match="replaced by a new producer"):
            old.receive_into(out, timeout=5)
        old.close()
        with RingReader.attach(ring_name, start="oldest") as new:
            assert new.epoch == w.stats().epoch
            assert new.receive_into(out, timeout=5)[1].index == 100


# --- stale rings: a dead producer told apart from a live one by pid AND start time --------


def proc_start(pid: int) -> int:
    """Start time of `pid`: field 22 of /proc/PID/stat (read here independently of ring.py)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[19])


def read_header(name: str) -> RingHeader:
    with open(f"/dev/shm/{name}", "rb") as f:
        return RingHeader.unpack(f.read(256))


def forge(name: str, **fields: int) -> None:
    """Overwrite u64 header fields of the segment in place, as another process would."""
    with open(f"/dev/shm/{name}", "r+b") as f:
        for field, value in fields.items():
            f.seek(H[field])
            f.write(struct.pack("<Q", value))


@pytest.fixture
def other_process():
    """Start a live process that is not a ring producer, started after clock tick
    `after_tick` (so its start time differs from a producer's that ran before it, as a
    reused pid's would)."""
    started: list[subprocess.Popen] = []

    def spawn(after_tick: int = 0) -> subprocess.Popen:
        while True:
            p = subprocess.Popen(["sleep", "120"])
            started.append(p)
            if proc_start(p.pid) > after_tick:
                return p
            time.sleep(0.02)  # the same clock tick (10 ms): try again a tick later

    yield spawn
    for p in started:
        p.kill()
        p.wait(5)


def _sigkilled_producer(procs, ring_name, count: int = 1) -> RingHeader:
    """A producer that published `count` samples and was SIGKILLed: its ring stays behind."""
    ready = CTX.Event()
    p = start(procs, _producer_proc, ring_name, count, ready)
    assert ready.wait(10)
    p.kill()
    p.join(5)
    return read_header(ring_name)


def test_the_ring_header_names_its_producer_by_pid_and_start_time(ring_name, procs):
    ready = CTX.Event()
    p = start(procs, _producer_proc, ring_name, 1, ready)
    assert ready.wait(10)
    hdr = read_header(ring_name)
    assert (hdr.producer_pid, hdr.producer_start) == (p.pid, proc_start(p.pid))


@pytest.mark.parametrize("new_owner", ["the new producer itself", "another live process"])
def test_a_sigkilled_producers_ring_is_replaced_when_its_pid_was_reused(
        ring_name, procs, other_process, new_owner):
    # A restarted container starts its pids over: the dead producer's pid may now be the new
    # producer's own, or any other process's. Neither is the producer that wrote the ring.
    old = _sigkilled_producer(procs, ring_name)
    pid = os.getpid() if new_owner.startswith("the new") else \
        other_process(old.producer_start).pid
    forge(ring_name, producer_pid=pid)
    with RingWriter.create(RingConfig(ring_name, slots=4, slot_bytes=SLOT)) as w:
        assert w.stats().epoch != old.epoch and w.stats().producer_pid == os.getpid()


@pytest.mark.parametrize("new_owner", ["this process", "another live process"])
def test_a_reader_gets_producer_gone_when_its_producers_pid_was_reused(
        ring_name, procs, other_process, new_owner):
    old = _sigkilled_producer(procs, ring_name, count=1)
    pid = os.getpid() if new_owner == "this process" else \
        other_process(old.producer_start).pid
    forge(ring_name, producer_pid=pid)
    # Without the start time the reused pid looks alive: attach would succeed and wait forever.
    with pytest.raises(ProducerGone, match=f"pid {pid} died .*reused"):
        RingReader.attach(ring_name, start="oldest")


def test_a_second_writer_in_the_same_process_is_refused_until_the_first_closes(ring_name):
    # Our own pid in a header is not always a stale ring: this process may own it right now.
    w = RingWriter.create(RingConfig(ring_name, slots=2, slot_bytes=4096))
    with pytest.raises(RingInUse, match=f"pid {os.getpid()} .*own open writer"):
        RingWriter.create(RingConfig(ring_name, slots=2, slot_bytes=4096))
    tiny = SampleSchema((ModalitySpec("x", "uint8", (8,)),))
    w.publish(tiny, meta(0), {"x": np.zeros(8, np.uint8)})  # the first one's ring still works
    w.close()
    RingWriter.create(RingConfig(ring_name, slots=2, slot_bytes=4096)).close()


def test_without_a_start_time_a_live_pid_with_a_recent_heartbeat_is_taken_as_live(
        ring_name, procs, other_process):
    # No start time (no /proc where it ran, or an earlier build): only the heartbeat can
    # tell, and a recent one means "maybe live" - refusing beats destroying a live ring.
    old = _sigkilled_producer(procs, ring_name)
    pid = other_process(old.producer_start).pid
    forge(ring_name, producer_pid=pid, producer_start=0, heartbeat_ns=time.monotonic_ns())
    with pytest.raises(RingInUse, match=f"pid {pid} .*heartbeat is .* s old"):
        RingWriter.create(RingConfig(ring_name, slots=4, slot_bytes=SLOT))
    assert read_header(ring_name).epoch == old.epoch


def test_without_a_start_time_a_live_pid_whose_heartbeat_stopped_long_ago_is_stale(
        ring_name, procs, other_process):
    if time.monotonic() < 120:
        pytest.skip("CLOCK_MONOTONIC is younger than the forged heartbeat age (just booted)")
    old = _sigkilled_producer(procs, ring_name, count=1)
    pid = other_process(old.producer_start).pid
    forge(ring_name, producer_pid=pid, producer_start=0,
          heartbeat_ns=time.monotonic_ns() - 100 * 10**9)
    with pytest.raises(ProducerGone, match=f"pid {pid} died .*heartbeat stopped"):
        RingReader.attach(ring_name, start="oldest")
    with RingWriter.create(RingConfig(ring_name, slots=4, slot_bytes=SLOT)) as w:
        assert w.stats().epoch != old.epoch


def test_a_lossless_writer_blocked_by_a_slow_reader_keeps_its_heartbeat_moving(ring_name):
    # Blocked is not dead: where only the heartbeat can tell, it must keep advancing.
    config = RingConfig(ring_name, slots=2, slot_bytes=SLOT, mode="lossless")
    with RingWriter.create(config) as w, RingReader.attach(ring_name, start="next"):
        for n in range(2):
            w.publish(SCHEMA, meta(n), patterned(n), timeout=0)
        before = read_header(ring_name).heartbeat_ns
        with pytest.raises(RingFull):
            w.publish(SCHEMA, meta(2), patterned(2), timeout=1.0)
        assert read_header(ring_name).heartbeat_ns > before


def _other_version_ring(name: str, version: int, pid: int, start: int) -> bytes:
    """A segment as another release would leave it: our magic, another version, the producer's
    pid and start time at their fixed offsets, and a layout we know nothing about."""
    body = bytearray(random.Random(version).randbytes(8192))
    body[0:8] = MAGIC
    struct.pack_into("<I", body, H["version"], version)
    struct.pack_into("<Q", body, H["producer_pid"], pid)
    struct.pack_into("<Q", body, H["producer_start"], start)
    seg = posix_ipc.SharedMemory("/" + name, posix_ipc.O_CREX, mode=0o600, size=len(body))
    with open(f"/dev/shm/{name}", "r+b") as f:
        f.write(body)
    seg.close_fd()
    return bytes(body)


@pytest.mark.parametrize("version", [0, RING_VERSION + 1])
def test_a_dead_producers_ring_of_another_version_is_replaced(ring_name, other_process,
                                                              version):
    # An upgrade and a crash: the daemon must start without anybody cleaning /dev/shm.
    dead = other_process()
    pid, started = dead.pid, proc_start(dead.pid)
    dead.kill()
    dead.wait(5)
    _other_version_ring(ring_name, version, pid, started)
    with RingWriter.create(RingConfig(ring_name, slots=2, slot_bytes=SLOT)) as w:
        assert read_header(ring_name).version == RING_VERSION
        w.publish(SCHEMA, meta(7), patterned(7))
        with RingReader.attach(ring_name, start="oldest") as r:
            assert r.receive_into(np.empty(SLOT, np.uint8), timeout=5)[1].index == 7


@pytest.mark.parametrize("version", [0, RING_VERSION + 1])
def test_a_live_producers_ring_of_another_version_is_refused_naming_both_versions_and_its_pid(
        ring_name, other_process, version):
    live = other_process()
    body = _other_version_ring(ring_name, version, live.pid, proc_start(live.pid))
    with pytest.raises(VersionMismatch, match=f"pid {live.pid} .*version {version}, .*"
                                              f"version {RING_VERSION}"):
        RingWriter.create(RingConfig(ring_name, slots=2, slot_bytes=SLOT))
    assert open(f"/dev/shm/{ring_name}", "rb").read() == body  # left exactly as it was


def test_reader_of_a_dead_producer_gets_producer_gone(ring_name, procs):
    ready = CTX.Event()
    p = start(procs, _producer_proc, ring_name, 1, ready)
    assert ready.wait(10)
    with RingReader.attach(ring_name, start="next") as r:
        p.kill()
        p.join(5)
        with pytest.raises(ProducerGone, match=f"pid {p.pid} died"):
            r.receive_into(np.empty(SLOT, np.uint8), timeout=5)


def test_clean_close_tells_readers_after_they_drain(ring_name):
    w = RingWriter.create(RingConfig(ring_name, slots=4, slot_bytes=SLOT))
    r = RingReader.attach(ring_name, start="next")
    w.publish(SCHEMA, meta(0), patterned(0))
    w.close()
    out = np.empty(SLOT, np.uint8)
    assert r.receive_into(out, timeout=1)[1].index == 0
    with pytest.raises(ProducerGone, match="closed the ring"):
        r.receive_into(out, timeout=1)
    r.close()


def test_clean_close_removes_the_dev_shm_entries(ring_name):
    w = RingWriter.create(RingConfig(ring_name, slots=2, slot_bytes=SLOT, mode="lossless"))
    r = RingReader.attach(ring_name)
    assert len(shm_entries(ring_name)) == 3  # segment, writer and reader semaphores
    r.close()
    w.close()
    w.close()  # idempotent
    assert shm_entries(ring_name) == []


def test_interpreter_exit_without_close_removes_the_ring(ring_name):
    code = ("from protocol.ring import *; import os; "
            f"w = RingWriter.create(RingConfig({ring_name!r}, slots=2, slot_bytes=4096)); "
            f"assert os.path.exists('/dev/shm/{ring_name}')")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert shm_entries(ring_name) == []


def test_ring_and_semaphores_are_private_to_the_owner_by_default(ring_name):
    old = os.umask(0)  # the mode must not depend on the caller's umask
    try:
        with RingWriter.create(RingConfig(ring_name, slots=2, slot_bytes=4096)) as w, \
                RingReader.attach(ring_name):
            modes = {f: os.stat(f"/dev/shm/{f}").st_mode & 0o777 for f in shm_entries(ring_name)}
    finally:
        os.umask(old)
    # segment, writer semaphore, reader semaphore
    assert len(modes) == 3 and set(modes.values()) == {0o600}, modes


def test_group_setting_makes_ring_and_semaphores_0660_owned_by_the_group(ring_name):
    group = grp.getgrgid(os.getgid()).gr_name
    old = os.umask(0o077)  # a strict umask must not cut the group bits
    try:
        with RingWriter.create(RingConfig(ring_name, slots=2, slot_bytes=4096,
                                          group=group)), RingReader.attach(ring_name):
            st = {f: os.stat(f"/dev/shm/{f}") for f in shm_entries(ring_name)}
    finally:
        os.umask(old)
    assert len(st) == 3
    assert {s.st_mode & 0o777 for s in st.values()} == {0o660}
    assert {s.st_gid for s in st.values()} == {os.getgid()}


def test_late_reader_joins_at_the_newest_sample(ring_name):
    with RingWriter.create(RingConfig(ring_name, slots=8, slot_bytes=SLOT)) as w:
        for n in range(50):
            w.publish(SCHEMA, meta(n), patterned(n))
        out = np.empty(SLOT, np.uint8)
        with RingReader.attach(ring_name) as newest, \
                RingReader.attach(ring_name, start="oldest") as oldest, \
                RingReader.attach(ring_name, start="next") as nxt:
            assert newest.receive_into(out, timeout=0)[1].index == 49
            assert oldest.receive_into(out, timeout=0)[1].index == 42
            assert nxt.receive_into(out, timeout=0) is None
            w.publish(SCHEMA, meta(50), patterned(50))
            assert nxt.receive_into(out, timeout=1)[1].index == 50


def _generation_reader_proc(name, count, ready, q):
    with RingReader.attach(name, start="next") as r:
        ready.set()
        seen = []
        for _ in range(count):
            s = r.receive(timeout=10)
            a = s.arrays["frame"]
            seen.append((s.meta.generation, a.shape, int(a.reshape(-1)[0]), s.schema.schema_id))
        q.put(seen)


def test_schema_change_across_generations_reaches_readers_with_the_right_shapes(ring_name,
                                                                                 procs):
    rgb = SampleSchema((ModalitySpec("frame", "uint8", (3, 16, 16)),))
    gray = SampleSchema((ModalitySpec("frame", "uint8", (1, 32, 32)),
                         ModalitySpec("audio", "float32", (64,))))
    with RingWriter.create(RingConfig(ring_name, slots=4, slot_bytes=8192,
                                      mode="lossless")) as w:
        ready, q = CTX.Event(), CTX.Queue()
        start(procs, _generation_reader_proc, ring_name, 12, ready, q)
        assert ready.wait(10)
        w.set_generation(1)
        for n in range(6):
            w.publish(rgb, SampleMeta(generation=1, index=n),
                      {"frame": np.full((3, 16, 16), n, np.uint8)}, timeout=10)
        w.set_generation(2)
        assert w.stats().generation == 2
        for n in range(6, 12):
            w.publish(gray, SampleMeta(generation=2, index=n),
                      {"frame": np.full((1, 32, 32), n, np.uint8),
                       "audio": np.zeros(64, np.float32)}, timeout=10)
        seen = q.get(timeout=30)
    assert seen == [(1, (3, 16, 16), n, rgb.schema_id) for n in range(6)] + \
                  [(2, (1, 32, 32), n, gray.schema_id) for n in range(6, 12)]


def test_attach_refuses_other_version_and_names_both(ring_name):
    with RingWriter.create(RingConfig(ring_name, slots=2, slot_bytes=4096)):
        with open(f"/dev/shm/{ring_name}", "r+b") as f:  # a producer of another release
            f.seek(H["version"])
            f.write(struct.pack("<I", 99))
        with pytest.raises(VersionMismatch, match="version 99.*version 1"):
            RingReader.attach(ring_name)


def test_attach_to_a_garbage_segment_raises_not_a_ring_showing_its_first_bytes(ring_name):
    garbage = random.Random(7).randbytes(8192)
    seg = posix_ipc.SharedMemory("/" + ring_name, posix_ipc.O_CREX, mode=0o600, size=8192)
    with open(f"/dev/shm/{ring_name}", "r+b") as f:
        f.write(garbage)
    seg.close_fd()
    with pytest.raises(NotARing, match=garbage[:16].hex()):
        RingReader.attach(ring_name)
    # A producer must not destroy what may be another program's memory either.
    with pytest.raises(NotARing, match="not an mmfeed ring"):
        RingWriter.create(RingConfig(ring_name, slots=2, slot_bytes=4096))
    assert open(f"/dev/shm/{ring_name}", "rb").read(16) == garbage[:16]


def test_attach_to_a_tiny_segment_raises_not_a_ring(ring_name):
    seg = posix_ipc.SharedMemory("/" + ring_name, posix_ipc.O_CREX, mode=0o600, size=10)
    seg.close_fd()
    with pytest.raises(NotARing, match="10 bytes"):
        RingReader.attach(ring_name)


def test_attach_to_a_missing_ring_names_it_and_how_to_start_a_producer(ring_name):
    with pytest.raises(RingNotFound, match=f"{ring_name}.*mm-producer run"):
        RingReader.attach(ring_name)


def test_publish_rejects_a_sample_larger_than_a_slot_naming_both_sizes(ring_name):
    big = SampleSchema((ModalitySpec("x", "uint8", (5000,)),))
    with RingWriter.create(RingConfig(ring_name, slots=2, slot_bytes=4096)) as w:
        with pytest.raises(SchemaError, match="5000 bytes.*slot_bytes=4096"):
            w.publish(big, SampleMeta(), {"x": np.zeros(5000, np.uint8)})
        assert w.stats().published == 0


def test_receive_into_rejects_a_too_small_buffer_naming_both_sizes(ring_name):
    with RingWriter.create(RingConfig(ring_name, slots=2, slot_bytes=SLOT)) as w, \
            RingReader.attach(ring_name, start="next") as r:
        w.publish(SCHEMA, meta(0), patterned(0))
        with pytest.raises(ValueError, match=f"100 bytes.*{SLOT} bytes"):
            r.receive_into(np.empty(100, np.uint8), timeout=1)


def test_zero_copy_view_reports_when_the_writer_overwrote_it(ring_name):
    with RingWriter.create(RingConfig(ring_name, slots=2, slot_bytes=SLOT)) as w, \
            RingReader.attach(ring_name, start="next") as r:
        w.publish(SCHEMA, meta(0), patterned(0))
        v = r.receive_view(timeout=1)
        assert v.still_valid() and (v.arrays["words"] == 0).all()
        assert not v.arrays["words"].flags.writeable
        w.publish(SCHEMA, meta(1), patterned(1))
        w.publish(SCHEMA, meta(2), patterned(2))  # same slot as sample 0
        assert not v.still_valid()


def test_loan_writes_in_place_and_commit_publishes(ring_name):
    with RingWriter.create(RingConfig(ring_name, slots=2, slot_bytes=SLOT)) as w, \
            RingReader.attach(ring_name, start="next") as r:
        slot = w.loan(SCHEMA)
        slot.arrays["words"][:] = 5
        assert r.receive_into(np.empty(SLOT, np.uint8), timeout=0) is None  # not yet
        assert slot.commit(meta(5)) == 0
        s = r.receive(timeout=1)
        assert s.meta.index == 5 and (s.arrays["words"] == 5).all()


def test_stats_count_live_readers_and_their_drops(ring_name):
    with RingWriter.create(RingConfig(ring_name, slots=2, slot_bytes=SLOT)) as w, \
            RingReader.attach(ring_name, start="next") as r:
        for n in range(10):
            w.publish(SCHEMA, meta(n), patterned(n))
        r.receive_into(np.empty(SLOT, np.uint8), timeout=1)
        s = w.stats()
        assert (s.published, s.readers, s.dropped, s.mode, s.slots) == (10, 1, 8, "lossy", 2)
        assert r.stats().dropped == 8 and r.stats().received == 1


def test_publish_refuses_a_wrong_shape_before_touching_the_ring(ring_name):
    # A (1,) array would broadcast silently into the slot if only np.copyto checked it.
    with RingWriter.create(RingConfig(ring_name, slots=2, slot_bytes=SLOT)) as w, \
            RingReader.attach(ring_name, start="next") as r:
        with pytest.raises(SchemaError, match=r"'words': expected int64\[8192\], got int64\[1\]"):
            w.publish(SCHEMA, meta(0), {"words": np.zeros(1, np.int64)})
        with pytest.raises(SchemaError, match="schema expects"):
            w.publish(SCHEMA, meta(0), {**patterned(0), "extra": np.zeros(1, np.int64)})
        w.publish(SCHEMA, meta(0), patterned(0))  # the ring is still usable
        assert r.receive_into(np.empty(SLOT, np.uint8), timeout=1)[1].index == 0


def test_ring_demo_exchanges_samples_across_generations_and_leaves_nothing_behind():
    res = subprocess.run([sys.executable, "-m", "cli.ring_demo", "--seconds", "1"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "generation 2: video (4, 1, 96, 96)" in res.stdout
    assert "nothing left in /dev/shm" in res.stdout and res.stdout.rstrip().endswith("OK")


def _use_inherited_reader(reader, q):
    try:
        reader.receive_into(np.empty(SLOT, np.uint8), timeout=0)
        q.put("used")
    except Exception as e:  # noqa: BLE001 - the type and message are what is checked
        q.put(f"{type(e).__name__}: {e}")


def test_a_reader_inherited_through_fork_refuses_to_be_used(ring_name, procs):
    # Parent and child would move one reader entry's position; workers must attach themselves.
    with RingWriter.create(RingConfig(ring_name, slots=2, slot_bytes=SLOT)), \
            RingReader.attach(ring_name) as r:
        q = CTX.Queue()
        start(procs, _use_inherited_reader, r, q)
        assert q.get(timeout=10).startswith("RingError: reader of ring")


# --- spinning before sleeping (see "Convoys" in protocol/ring.py) -----------------------


_U64_ALL = (1 << 64) - 1


def _bit_set(name: str, word: str, bit: int) -> bool:
    """Read one header word of the ring from outside (a fresh unregistered reader)."""
    from protocol import _seqlock as sl
    with RingReader.attach(name, register=False) as peek:
        return bool(sl.load_seq_cst(peek._mm, H[word]) & bit)


def _receive_in_thread(r, out, results):
    def run():
        try:
            results.append(r.receive_into(out, timeout=None))
        except Exception as e:  # noqa: BLE001 - the test checks what was raised
            results.append(e)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_an_idle_reader_spins_only_briefly_then_sleeps_and_is_woken(ring_name):
    # If the spin were unbounded the waiting bit would never be set: the reader would burn
    # a core forever and a dead producer would go unnoticed.
    with RingWriter.create(RingConfig(ring_name, slots=4, slot_bytes=SLOT)) as w, \
            RingReader.attach(ring_name, start="next") as r:
        results: list = []
        t = _receive_in_thread(r, np.empty(SLOT, np.uint8), results)
        wait_until(lambda: _bit_set(ring_name, "waiting_mask", 1 << r._idx),
                   what="the reader to set its waiting bit and sleep")
        w.publish(SCHEMA, meta(0), patterned(0))
        t.join(10)
        assert not t.is_alive() and results[0][1].index == 0


def test_a_sleeping_reader_notices_its_producer_die(ring_name, procs):
    ready = CTX.Event()
    p = start(procs, _producer_proc, ring_name, 1, ready)
    assert ready.wait(10)
    with RingReader.attach(ring_name, start="next") as r:
        results: list = []
        t = _receive_in_thread(r, np.empty(SLOT, np.uint8), results)
        wait_until(lambda: _bit_set(ring_name, "waiting_mask", 1 << r._idx),
                   what="the reader to sleep")
        p.kill()
        p.join(5)
        t.join(10)  # timeout=None: only noticing the death ends this wait
        assert not t.is_alive()
        assert isinstance(results[0], ProducerGone) and f"pid {p.pid} died" in str(results[0])


def test_a_lossless_writer_spins_only_briefly_then_sleeps_until_the_reader_frees_space(
        ring_name):
    with RingWriter.create(RingConfig(ring_name, slots=2, slot_bytes=SLOT,
                                      mode="lossless")) as w, \
            RingReader.attach(ring_name, start="next") as r:
        w.publish(SCHEMA, meta(0), patterned(0), timeout=0)
        w.publish(SCHEMA, meta(1), patterned(1), timeout=0)
        done: list = []
        t = threading.Thread(target=lambda: done.append(
            w.publish(SCHEMA, meta(2), patterned(2), timeout=20)), daemon=True)
        t.start()
        wait_until(lambda: _bit_set(ring_name, "writer_waiting", _U64_ALL),
                   what="the writer to give up spinning and ask to be woken")
        out = np.empty(SLOT, np.uint8)
        assert r.receive_into(out, timeout=5)[1].index == 0
        t.join(10)
        assert done == [2]
        assert [r.receive_into(out, timeout=5)[1].index for _ in range(2)] == [1, 2]


def _pinned_ring_proc(name, q):
    # A process that may run on one CPU only: its peer cannot run while it spins.
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    try:
        with RingWriter.create(RingConfig(name, slots=2, slot_bytes=SLOT,
                                          mode="lossless")) as w, \
                RingReader.attach(name, start="next") as r:
            out = np.empty(SLOT, np.uint8)
            got = []
            for n in range(6):
                w.publish(SCHEMA, meta(n), patterned(n), timeout=5)
                got.append(r.receive_into(out, timeout=5)[1].index)
            q.put((w._spin_ns, r._spin_ns, got))
    except Exception as e:  # noqa: BLE001 - reported to the test
        q.put(repr(e))


def test_a_process_pinned_to_one_cpu_never_spins(ring_name, procs):
    q = CTX.Queue()
    start(procs, _pinned_ring_proc, ring_name, q)
    assert q.get(timeout=20) == (0, 0, [0, 1, 2, 3, 4, 5])


def _attach_in_child(name, q):
    try:
        with RingReader.attach(name, start="oldest") as r:
            q.put(r.receive_into(np.empty(SLOT, np.uint8), timeout=5)[1].index)
    except Exception as e:  # noqa: BLE001 - reported to the test
        q.put(repr(e))


def test_a_reader_attached_in_a_forked_child_works_there(ring_name, procs):
    # The fork check compares a counter bumped at fork with its value at attach: a reader
    # attached after the fork, in the child, must not be mistaken for an inherited one.
    with RingWriter.create(RingConfig(ring_name, slots=2, slot_bytes=SLOT)) as w:
        w.publish(SCHEMA, meta(5), patterned(5))
        q = CTX.Queue()
        start(procs, _attach_in_child, ring_name, q)
        assert q.get(timeout=10) == 5


def test_spin_until_returns_the_word_when_reached_or_when_its_budget_runs_out():
    import mmap

    from protocol import _seqlock as sl
    m = mmap.mmap(-1, 64)
    sl.store_release(m, 8, 5)
    assert sl.spin_until(m, 8, 5, 10**9) == 5          # already there: no spin at all
    assert sl.spin_until(m, 8, 6, 20_000, 256) == 5    # never reached: bounded, not forever
    with pytest.raises(ValueError, match="yield_every 100"):
        sl.spin_until(m, 8, 6, 1000, 100)
    with pytest.raises(IndexError, match="spin_until"):
        sl.spin_until(m, 64, 1, 1000)
