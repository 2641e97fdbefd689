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
"""
from __future__ import annotations

import grp
import mmap
import os
import secrets
import stat
import struct
import time
import weakref
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import posix_ipc

from . import _seqlock as sl
from .errors import (NotARing, ProducerGone, RingError, RingFull, RingInUse, RingNotFound,
                     SchemaError, VersionMismatch)
from .ring_layout import (FIXED_OFFSETS, H, MAGIC, MAX_READERS, MODES, R, READER_BYTES,
                          RING_VERSION, S, SCHEMA_MAX, SLOT_HEADER_BYTES, SLOT_INFO,
                          SLOT_INFO_BYTES, SLOT_INFO_OFF, STATE_CLOSED, STATE_LIVE,
                          STATE_STARTING, RingHeader, semaphore_name)
from .schema import Sample, SampleMeta, SampleSchema

__all__ = ["RingConfig", "RingWriter", "RingReader", "RingStats", "ReaderStats", "Slot",
           "SampleView"]

_SLICE_S = 0.1          # longest single sleep: how soon a dead peer is noticed
# How long a waiting side spins before it sleeps (see "Convoys"): about two 1 MiB copies.
# `_spin_budget_ns()` makes it zero on one CPU, where the peer cannot run while we spin.
_SPIN_NS = 50_000
# Pause-probes between sched_yield() calls inside a spin (about 5 us): when more processes
# than cores want to run (4 readers + a writer on 2 cores), a spinner hands its core to the
# runnable peer instead of holding it for the whole budget.
_SPIN_YIELD = 256
_STARTUP_WAIT_S = 2.0   # how long attach/create wait for a producer that is still starting
# Where /proc cannot tell a producer from a new process that reuses its pid (no /proc, hidepid,
# a ring from a build that did not record the start time), a producer whose pid is alive but
# whose heartbeat is older than this counts as gone. Generous on purpose: replacing a live
# ring is far worse than a restart that waits for it. The daemon heartbeats every loop, a
# writer blocked in lossless mode every `_SLICE_S`; an idle library writer should call
# `heartbeat()` well within this.
_HEARTBEAT_STALE_S = 30.0
_MAX_NAME = 200
_U64 = (1 << 64) - 1
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # Linux only; elsewhere pages fault lazily
_SHM_DIR = "/dev/shm"   # where Linux keeps POSIX shm and semaphores (inode checks, chmod)


# Bumped in every forked child: a reader compares it with the value at attach instead of
# calling getpid() (a system call) on every receive.
_fork_count = 0


def _after_fork_in_child() -> None:
    global _fork_count
    _fork_count += 1


os.register_at_fork(after_in_child=_after_fork_in_child)


def _cpus_allowed() -> int:
    """How many CPUs this process may run on (taskset, cgroup cpuset). Asked at
    create/attach, not at import, so a process pinned after import is seen."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux: trust the core count
        return os.cpu_count() or 1


def _spin_budget_ns(cpus: int) -> int:
    """`_SPIN_NS`, or 0 on one CPU: there the peer we wait for cannot run while we spin, so
    every spin would be pure loss."""
    return _SPIN_NS if cpus > 1 else 0


def _posix_name(name: str) -> str:
    bare = name[1:] if name.startswith("/") else name
    if not bare or "/" in bare or len(bare) > _MAX_NAME or "\0" in bare:
        raise ValueError(
            f"ring name {name!r}: expected 1-{_MAX_NAME} characters without '/' (a leading "
            f"'/' is allowed and added when missing)")
    return "/" + bare


def _sem_path(posix_name: str) -> str:
    return f"{_SHM_DIR}/sem.{posix_name[1:]}"


def _proc_stat(pid: int) -> tuple[bytes, int] | None:
    """(state letter, start time) of `pid` from /proc/PID/stat, or None where it cannot be read
    (no such process, no /proc, /proc mounted hidepid). The start time is field 22, clock
    ticks since boot: with the pid it names one process, as a reused pid starts later."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # the name (field 2) may hold ")"
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _own_start() -> int:
    """This process's start time for the header; 0 (= unknown) where /proc cannot tell."""
    st = _proc_stat(os.getpid())
    return 0 if st is None else st[1]


def _pid_exists(pid: int) -> bool:
    if not 0 < pid < 1 << 31:  # a pid the kernel could never hand out (damaged header)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    return True


def _pid_alive(pid: int) -> bool:
    """True when `pid` is a running process. A zombie (killed, not yet reaped) counts as dead:
    it will never read or write again. (Readers' entries: a reader's pid reused while its
    entry is registered keeps that entry until the new process exits.)"""
    if not _pid_exists(pid):
        return False
    st = _proc_stat(pid)
    return st is None or st[0] not in (b"Z", b"X")


# Epochs of the RingWriters open in this process: with them a header naming our own pid is
# told apart from one left by an earlier process that had our pid (see `_producer_alive`).
_own_epochs: set[int] = set()


def _producer_alive(pid: int, start: int, epoch: int | None,
                    heartbeat_ns: int | None) -> tuple[bool, str]:
    """Is the producer that wrote a ring header still running? Returns (verdict, why), `why`
    worded for an error message.

    The rule, most certain first:

    1. Our own pid: alive exactly when this process has an open writer of that epoch. A
       ring of our pid and another epoch was left by an earlier process that had our pid (a
       restarted container) or by this process before an exec; `epoch` None (a ring of
       another protocol version, which this process never writes) is never ours.
    2. No process with that pid, or a zombie: gone.
    3. Start time recorded and /proc readable: alive exactly when the running process
       started when the producer did; a later start is a new process reusing the pid.
    4. Otherwise the pid is alive but may be reused, and only the heartbeat can tell: gone
       once it is older than `_HEARTBEAT_STALE_S`, alive before (and when `heartbeat_ns` is
       None - another version's header, whose heartbeat we cannot find).
    """
    if pid == os.getpid():
        if epoch is not None and epoch in _own_epochs:
            return True, f"it is this process's own open writer (pid {pid})"
        return False, (f"pid {pid} is this process, which has no writer of that ring: the "
                       f"pid was reused")
    if not _pid_exists(pid):
        return False, f"no process has pid {pid}"
    st = _proc_stat(pid)
    if st is not None and st[0] in (b"Z", b"X"):
        return False, f"pid {pid} is a zombie"
    if st is not None and start:
        if st[1] == start:
            return True, f"pid {pid} is running since clock tick {start}"
        return False, (f"pid {pid} is now another process (started at clock tick {st[1]}, "
                       f"the producer at {start}): the pid was reused")
    unsure = (f"pid {pid} is alive but cannot be told from a new process reusing the pid ("
              + ("no start time in the ring header" if st is not None else
                 f"/proc/{pid}/stat unreadable") + ")")
    if heartbeat_ns is None:
        return True, f"{unsure} and its heartbeat cannot be read"
    age = (time.monotonic_ns() - heartbeat_ns) / 1e9
    if age < _HEARTBEAT_STALE_S:
        return True, (f"{unsure}; its last heartbeat is {max(age, 0.0):.1f} s old, a ring "
                      f"counts as abandoned after {_HEARTBEAT_STALE_S:.0f} s without one")
    return False, f"{unsure}, and its heartbeat stopped {age:.0f} s ago"


def _bits(mask: int):
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


def _set_mode(path: str | None, fd: int | None, mode: int, gid: int | None) -> None:
    """Apply the exact mode (umask may have cut bits) and group to a segment or semaphore."""
    if fd is not None:
        os.fchmod(fd, mode)
        if gid is not None:
            os.fchown(fd, -1, gid)
    elif path is not None and os.path.exists(path):
        os.chmod(path, mode)
        if gid is not None:
            os.chown(path, -1, gid)


def _unlink_semaphore(name: str) -> None:
    try:
        posix_ipc.unlink_semaphore(name)
    except posix_ipc.ExistentialError:
        pass


def _first_bytes(buf) -> str:
    head = bytes(buf[:16])
    return f"{head!r} (hex {head.hex()})"


@dataclass(frozen=True)
class RingConfig:
    """How a producer creates its ring. `slot_bytes` bounds the payload of one sample."""

    name: str                  # POSIX name without the leading slash is fine; we add it
    slots: int = 8
    slot_bytes: int = 8 << 20  # max payload bytes per slot (schema.payload_nbytes must fit)
    mode: str = "lossy"        # "lossy" | "lossless"
    group: str | None = None   # when set: mode 0660 and chgrp to this group; else 0600
    max_readers: int = 64

    def __post_init__(self) -> None:
        _posix_name(self.name)
        if self.mode not in MODES:
            raise ValueError(f"ring mode {self.mode!r}: expected one of {', '.join(MODES)}")
        if not isinstance(self.slots, int) or not 1 <= self.slots <= 1 << 20:
            raise ValueError(f"ring slots {self.slots!r}: expected an integer in 1..{1 << 20}")
        if not isinstance(self.slot_bytes, int) or not 1 <= self.slot_bytes <= 1 << 40:
            raise ValueError(f"ring slot_bytes {self.slot_bytes!r}: expected a positive integer")
        if not isinstance(self.max_readers, int) or not 1 <= self.max_readers <= MAX_READERS:
            raise ValueError(
                f"ring max_readers {self.max_readers!r}: expected 1..{MAX_READERS}")


@dataclass(frozen=True)
class RingStats:
    """What `mmctl status` shows about a ring (a snapshot)."""

    name: str
    mode: str
    slots: int
    slot_bytes: int
    epoch: int
    generation: int
    published: int
    readers: int            # registered readers whose process is alive
    dropped: int            # samples skipped, summed over registered readers
    heartbeat_age_s: float
    producer_pid: int


@dataclass(frozen=True)
class ReaderStats:
    """One reader's counters. Over its window, received + dropped == position - start."""

    received: int
    dropped: int
    retried: int            # copies thrown away because the slot changed under them
    position: int           # next sample number wanted
    start: int              # first sample number of the window


class _Mapping:
    """Owns one open segment: the posix_ipc handle, its mmap and a numpy view of it.

    `close()` is idempotent and safe after a half-built constructor (class-level defaults).
    """

    shm = None
    mm = None
    np = None
    inode = 0

    def __init__(self, shm: posix_ipc.SharedMemory, size: int | None = None):
        self.shm = shm
        self.size = shm.size if size is None else size
        # MAP_POPULATE: fault every page in now (and, for the producer, allocate it), so no
        # sample pays for first-touch page faults - 2048 per 8 MiB slot per process otherwise.
        self.mm = mmap.mmap(shm.fd, self.size, flags=mmap.MAP_SHARED | _MAP_POPULATE)
        self.np = np.frombuffer(self.mm, np.uint8)
        self.inode = os.fstat(shm.fd).st_ino
        self.shm.close_fd()

    def close(self) -> None:
        self.np = None
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:
                pass  # zero-copy views still alive: the mapping goes when they do
            self.mm = None


def _name_inode(posix_name: str) -> int | None:
    try:
        return os.stat(_SHM_DIR + posix_name).st_ino
    except FileNotFoundError:
        return None


# --------------------------------------------------------------------------------------------
# writer


class Slot:
    """A loaned slot: write the payload in place through `arrays`, then `commit(meta)`.

    While loaned the slot's sequence is odd, so readers treat it as being written.
    """

    __slots__ = ("_writer", "number", "schema", "arrays", "_off", "_done")

    def __init__(self, writer: "RingWriter", number: int, off: int, schema: SampleSchema,
                 arrays: dict[str, np.ndarray]):
        self._writer, self.number, self._off, self.schema = writer, number, off, schema
        self.arrays = arrays
        self._done = False

    def commit(self, meta: SampleMeta) -> int:
        """Publish the slot; returns its sample number."""
        if self._done:
            raise RingError(f"sample {self.number} was already committed")
        self._done = True
        self._writer._commit(self, meta)
        return self.number

    def __repr__(self) -> str:
        return f"Slot(sample {self.number}, {self.schema!r})"


class RingWriter:
    """The producer's side of a ring; exactly one per ring name. Use `create()`.

    `close()` (or leaving the `with` block, or interpreter exit) removes the segment and its
    semaphores: a clean exit leaves nothing in /dev/shm.
    """

    _map: _Mapping | None = None
    _closed = True

    def __init__(self, *_a, **_k):
        raise TypeError("use RingWriter.create(RingConfig(...))")

    # --- construction ------------------------------------------------------------------

    @classmethod
    def create(cls, config: RingConfig) -> "RingWriter":
        """Create the ring. A stale ring (producer dead or closed, judged by pid and start
        time: `_producer_alive`) at that name is replaced, whatever its protocol version; a
        live one raises RingInUse naming its pid (VersionMismatch, naming both versions and
        the pid, when it is another version's); a segment that is not a ring raises NotARing
        (it may belong to someone else, so it is left alone)."""
        self = object.__new__(cls)
        self._closed = True
        self.config = config
        self.name = _posix_name(config.name)
        self._perm = 0o660 if config.group else 0o600
        self._gid = None
        if config.group:
            try:
                self._gid = grp.getgrnam(config.group).gr_gid
            except KeyError:
                raise ValueError(f"ring group {config.group!r}: no such group") from None
        self._hdr = RingHeader(
            mode=MODES.index(config.mode), slots=config.slots, max_readers=config.max_readers,
            slot_bytes=config.slot_bytes, producer_pid=os.getpid(),
            producer_start=_own_start(), epoch=secrets.randbits(64) or 1,
            created_ns=time.time_ns(),
        )
        shm = None
        for _ in range(3):
            try:
                shm = posix_ipc.SharedMemory(self.name, posix_ipc.O_CREX, mode=self._perm,
                                             size=self._hdr.total_bytes)
                break
            except posix_ipc.ExistentialError:
                _replace_if_stale(self.name)
        if shm is None:
            raise RingInUse(f"ring {self.name}: another producer keeps re-creating it")
        try:
            _set_mode(None, shm.fd, self._perm, self._gid)
            self._map = _Mapping(shm, self._hdr.total_bytes)
            self._init_segment()
        except BaseException:
            # Half-built: never leave a segment without a live owner behind.
            if self._map is not None:
                self._map.close()
            else:
                shm.close_fd()
            _unlink_if_ours(self.name, None)
            raise
        return self

    def _init_segment(self) -> None:
        hdr, mm = self._hdr, self._map.mm
        self._mm = mm
        self._slots = hdr.slots
        self._slot_bytes = hdr.slot_bytes
        self._lossless = hdr.mode == 1
        self._slot_off = [hdr.slot_offset(i) for i in range(hdr.slots)]
        self._reader_off = [hdr.reader_offset(i) for i in range(hdr.max_readers)]
        self._slot_schema = [0] * hdr.slots       # schema_id last written into each slot
        self._views: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        self._specs: dict[int, list] = {}           # schema_id -> [(name, dtype, shape)]
        self._nbytes: dict[int, int] = {}           # schema_id -> payload bytes (checked)
        self._reader_sems: dict[int, posix_ipc.Semaphore] = {}
        self._n = 0
        self._loaned: Slot | None = None
        self._wsem_name = semaphore_name(self.name, hdr.epoch, "w")
        _unlink_semaphore(self._wsem_name)
        self._wsem = posix_ipc.Semaphore(self._wsem_name, posix_ipc.O_CREX, mode=self._perm,
                                         initial_value=0)
        _set_mode(_sem_path(self._wsem_name), None, self._perm, self._gid)
        # Everything but the magic first; the magic, then state=live (release) last, so a
        # reader that sees "live" sees a complete header.
        packed = hdr.pack()
        mm[8:len(packed)] = packed[8:]
        sl.store_release(mm, H["heartbeat_ns"], time.monotonic_ns())
        mm[0:8] = MAGIC
        sl.store_release(mm, H["state"], STATE_LIVE)
        self._closed = False
        self._owner_pid = os.getpid()
        _own_epochs.add(hdr.epoch)
        self._spin_ns = _spin_budget_ns(_cpus_allowed())
        self._finalizer = weakref.finalize(self, _finalize_writer, self.name, self._hdr.epoch,
                                           self._hdr.max_readers, self._map.inode,
                                           self._owner_pid)

    # --- publishing --------------------------------------------------------------------

    def loan(self, schema: SampleSchema, timeout: float | None = None) -> Slot:
        """Reserve the next slot and return writable views of its payload (no copy).

        Lossless mode waits (up to `timeout`, None = forever) until the slowest live reader
        has finished with the slot; RingFull when it did not in time.
        """
        self._check_open()
        if self._loaned is not None and not self._loaned._done:
            raise RingError(f"ring {self.name}: sample {self._loaned.number} is loaned and not "
                            f"committed; commit it before loaning another")
        sid = schema.schema_id
        need = self._nbytes.get(sid)
        if need is None:  # first sample of this schema: check it once, not per sample
            need = schema.payload_nbytes
            if need > self._slot_bytes:
                raise SchemaError(
                    f"ring {self.name}: sample payload of {need} bytes ({schema!r}) does not "
                    f"fit slot_bytes={self._slot_bytes}; create the ring with slot_bytes >= "
                    f"{need}")
            enc = schema.encode()
            if len(enc) > SCHEMA_MAX:
                raise SchemaError(f"ring {self.name}: schema encoding of {len(enc)} bytes "
                                  f"exceeds the slot's {SCHEMA_MAX} bytes; use fewer modalities")
            self._nbytes[sid] = need
        n = self._n
        if self._lossless:
            self._wait_for_space(n, timeout)
        i = n % self._slots
        off = self._slot_off[i]
        mm = self._mm
        sl.write_begin(mm, off, 2 * n + 1)
        if self._slot_schema[i] != sid:
            enc = schema.encode()
            struct.pack_into("<I", mm, off + S["schema_len"], len(enc))
            base = off + SLOT_HEADER_BYTES - SCHEMA_MAX
            mm[base:base + len(enc)] = enc
            self._slot_schema[i] = sid
        views = self._views.get((i, sid))
        if views is None:
            p = off + SLOT_HEADER_BYTES
            views = schema.views(self._map.np[p:p + need])
            self._views[(i, sid)] = views
        self._loaned = Slot(self, n, off, schema, views)
        return self._loaned

    def _commit(self, slot: Slot, meta: SampleMeta) -> None:
        mm, off, n = self._mm, slot._off, slot.number
        meta.pack_into(mm, off + S["meta"])
        sid = slot.schema.schema_id
        struct.pack_into("<QQ", mm, off + S["schema_id"], sid, self._nbytes[sid])
        sl.write_end(mm, off, 2 * n + 1)
        sl.store_seq_cst(mm, H["published"], n + 1)
        sl.store_release(mm, H["heartbeat_ns"], time.monotonic_ns())
        self._n = n + 1
        self._loaned = None
        waiting = sl.load_seq_cst(mm, H["waiting_mask"])
        if waiting:
            self._wake(sl.fetch_and(mm, H["waiting_mask"], _U64 ^ waiting) & waiting)

    def publish(self, schema: SampleSchema, meta: SampleMeta, arrays: Mapping[str, np.ndarray],
                timeout: float | None = None) -> int:
        """Copy one sample into the next slot and publish it; returns its sample number.

        Checks names, dtypes and shapes before touching the ring, so a bad sample never
        leaves a half-written slot.
        """
        specs = self._specs.get(schema.schema_id)
        if specs is None:
            specs = self._specs[schema.schema_id] = [
                (m.name, np.dtype(m.dtype), m.shape) for m in schema.modalities]
        if len(arrays) != len(specs) or not all(
                (a := arrays.get(k)) is not None and a.dtype == dt and a.shape == sh
                for k, dt, sh in specs):
            schema.check(arrays)  # raises, naming the modality and both layouts
        slot = self.loan(schema, timeout)
        for name, view in slot.arrays.items():
            np.copyto(view, arrays[name], casting="no")
        return slot.commit(meta)

    def set_generation(self, generation: int) -> None:
        self._check_open()
        sl.store_release(self._mm, H["generation"], int(generation))

    def heartbeat(self) -> None:
        """Prove liveness while idle (publish() does this too)."""
        self._check_open()
        sl.store_release(self._mm, H["heartbeat_ns"], time.monotonic_ns())

    # --- waiting and waking ------------------------------------------------------------

    def _reader_sem(self, i: int) -> posix_ipc.Semaphore | None:
        sem = self._reader_sems.get(i)
        if sem is None:
            try:
                sem = posix_ipc.Semaphore(semaphore_name(self.name, self._hdr.epoch, f"r{i}"))
            except posix_ipc.ExistentialError:
                return None
            self._reader_sems[i] = sem
        return sem

    def _wake(self, mask: int) -> None:
        for i in _bits(mask):
            sem = self._reader_sem(i)
            if sem is not None:
                sem.release()

    def _slowest(self) -> tuple[int | None, int]:
        """The smallest position over registered readers (None when there are none), and the
        offset of that reader's position word (what a spin waits on)."""
        mm = self._mm
        active = sl.load_seq_cst(mm, H["active_mask"])
        lo, where = None, 0
        for i in _bits(active):
            off = self._reader_off[i] + R["position"]
            p = sl.load_seq_cst(mm, off)
            if lo is None or p < lo:
                lo, where = p, off
        return lo, where

    def _wait_for_space(self, n: int, timeout: float | None) -> None:
        lo = self._slowest()[0]
        if lo is None or n < lo + self._slots:
            return  # the common case: no clock read, no spin set-up
        mm = self._mm
        deadline = None if timeout is None else time.monotonic() + timeout
        spin_end = time.monotonic_ns() + self._spin_ns if self._spin_ns else 0
        while True:
            lo, where = self._slowest()
            if lo is None or n < lo + self._slots:
                return
            left = spin_end - time.monotonic_ns() if spin_end else 0
            if deadline is not None:
                left = min(left, int((deadline - time.monotonic()) * 1e9))
            if left > 0:
                # See "Convoys": the slowest reader is usually mid-copy on the other core.
                # One budget for the whole wait: several readers never multiply it.
                sl.spin_until(mm, where, n - self._slots + 1, left, _SPIN_YIELD)
                continue
            # Sleep until half the ring is free, not one slot: one wake-up per slots/2
            # samples instead of a context switch per sample. Stored as target + 1 (0 = awake).
            target = n - self._slots + 1 + (self._slots - 1) // 2
            sl.store_seq_cst(mm, H["writer_waiting"], target + 1)
            lo = self._slowest()[0]
            if lo is None or n < lo + self._slots:
                sl.store_seq_cst(mm, H["writer_waiting"], 0)
                return
            wait = _SLICE_S
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    sl.store_seq_cst(mm, H["writer_waiting"], 0)
                    raise RingFull(
                        f"ring {self.name} (lossless): sample {n} found no free slot within "
                        f"{timeout:.3f} s; the slowest reader is at sample {lo}")
            try:
                self._wsem.acquire(wait)
            except posix_ipc.BusyError:
                # Blocked, not dead: keep the heartbeat moving (see `_producer_alive`, rule 4).
                sl.store_release(mm, H["heartbeat_ns"], time.monotonic_ns())
                self._evict_dead_readers()

    def _evict_dead_readers(self) -> list[int]:
        """Unregister readers whose process is gone, so they stop holding the writer back."""
        mm, evicted = self._mm, []
        for i in _bits(sl.load_seq_cst(mm, H["active_mask"])):
            off = self._reader_off[i]
            pid = sl.load_acquire(mm, off + R["pid"])
            if not _pid_alive(pid):
                _release_entry(mm, i, off, pid)
                evicted.append(i)
        return evicted

    # --- status and lifetime -----------------------------------------------------------

    def stats(self) -> RingStats:
        self._check_open()
        return _ring_stats(self._mm, self.name, self._hdr, self._reader_off)

    @property
    def published(self) -> int:
        return self._n

    def _check_open(self) -> None:
        if self._closed:
            raise RingError(f"ring {getattr(self, 'name', '?')} is closed")

    def close(self) -> None:
        """Mark the ring closed, wake every reader (they raise ProducerGone once drained),
        and remove the segment and semaphores. Idempotent."""
        if self._closed:
            return
        self._closed = True
        mm = self._mm
        sl.store_seq_cst(mm, H["state"], STATE_CLOSED)
        self._wake(sl.load_seq_cst(mm, H["active_mask"]))
        for sem in self._reader_sems.values():
            sem.close()
        self._reader_sems.clear()
        self._wsem.close()
        self._views.clear()
        self._loaned = None
        self._mm = None
        self._map.close()
        self._finalizer()  # unlinks shm + semaphores exactly once

    def __enter__(self) -> "RingWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"published {self._n}"
        return (f"RingWriter({self.name!r}, {self.config.mode}, {self.config.slots} x "
                f"{self.config.slot_bytes} B, {state})")


def _finalize_writer(name: str, epoch: int, max_readers: int, inode: int, owner: int) -> None:
    _own_epochs.discard(epoch)
    if os.getpid() != owner:
        return  # a forked child must not remove its parent's ring
    _unlink_if_ours(name, inode)
    _unlink_semaphore(semaphore_name(name, epoch, "w"))
    for i in range(max_readers):
        _unlink_semaphore(semaphore_name(name, epoch, f"r{i}"))


def _unlink_if_ours(name: str, inode: int | None) -> None:
    """Unlink the segment at `name` unless a newer producer already replaced it."""
    if inode is not None and _name_inode(name) != inode:
        return
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        pass


def _release_entry(mm, i: int, off: int, pid: int) -> None:
    sl.fetch_and(mm, H["active_mask"], _U64 ^ (1 << i))
    sl.fetch_and(mm, H["waiting_mask"], _U64 ^ (1 << i))
    sl.store_seq_cst(mm, off + R["state"], 0)
    sl.compare_exchange(mm, off + R["pid"], pid, 0)


def _ring_stats(mm, name: str, hdr: RingHeader, reader_off: list[int]) -> RingStats:
    active = sl.load_seq_cst(mm, H["active_mask"])
    readers = dropped = 0
    for i in _bits(active):
        off = reader_off[i]
        if _pid_alive(sl.load_acquire(mm, off + R["pid"])):
            readers += 1
        dropped += sl.load_acquire(mm, off + R["dropped"])
    hb = sl.load_acquire(mm, H["heartbeat_ns"])
    return RingStats(
        name=name.lstrip("/"), mode=MODES[hdr.mode], slots=hdr.slots, slot_bytes=hdr.slot_bytes,
        epoch=hdr.epoch, generation=sl.load_acquire(mm, H["generation"]),
        published=sl.load_acquire(mm, H["published"]), readers=readers, dropped=dropped,
        heartbeat_age_s=max(0.0, (time.monotonic_ns() - hb) / 1e9),
        producer_pid=hdr.producer_pid)


def _replace_if_stale(name: str) -> None:
    """A segment already exists at `name`: remove it if its producer is gone, else refuse."""
    try:
        shm = posix_ipc.SharedMemory(name)
    except posix_ipc.ExistentialError:
        return  # vanished meanwhile: just retry the create
    head = b""
    try:
        size = shm.size
        if size:
            with mmap.mmap(shm.fd, min(size, 4096)) as mm:
                deadline = time.monotonic() + _STARTUP_WAIT_S
                while size >= 8 and bytes(mm[:8]) == b"\0" * 8 and time.monotonic() < deadline:
                    time.sleep(0.01)  # another producer may be half-way through create()
                head = bytes(mm[:256])
    finally:
        shm.close_fd()
    if head[:8] == b"\0" * 8 or not head:
        # Empty or all-zero header: a producer crashed inside create(). Nobody can use it.
        _unlink_if_ours(name, None)
        return
    if head[:8] != MAGIC:
        raise NotARing(
            f"{_SHM_DIR}{name} exists and is not an mmfeed ring (first bytes "
            f"{_first_bytes(head)}); it may belong to another program: pick another ring "
            f"name, or remove it yourself if it is stale")
    version = struct.unpack_from("<I", head, H["version"])[0] if len(head) >= 12 else None
    if version != RING_VERSION:
        _replace_other_version(name, head, version)
        return
    if len(head) < 256:
        raise NotARing(f"{_SHM_DIR}{name} is a truncated ring header ({len(head)} bytes); "
                       f"remove it")
    old = RingHeader.unpack(head)
    if old.state != STATE_CLOSED:
        alive, why = _producer_alive(old.producer_pid, old.producer_start, old.epoch,
                                     old.heartbeat_ns)
        if alive:
            raise RingInUse(
                f"ring {name} belongs to live producer pid {old.producer_pid} ({why}); stop "
                f"that producer or choose another ring name")
    # Stale: its producer died (or closed without unlinking). Replace it.
    _unlink_if_ours(name, None)
    _unlink_semaphore(semaphore_name(name, old.epoch, "w"))
    for i in range(min(old.max_readers, MAX_READERS)):
        _unlink_semaphore(semaphore_name(name, old.epoch, f"r{i}"))


def _replace_other_version(name: str, head: bytes, version: int | None) -> None:
    """A ring of another protocol version is at `name` (magic checked): replace it when its
    producer is gone - after a crash and an upgrade nobody should have to clean /dev/shm by
    hand - and refuse, naming both versions and the pid, while it runs. Only the fixed
    offsets (ring_layout.FIXED_OFFSETS) are read; its semaphores follow that release's
    naming, which we cannot know, so they are left (a few bytes each)."""
    where = f"existing ring {_SHM_DIR}{name}"
    if version is None or len(head) < FIXED_OFFSETS["producer_start"] + 8:
        raise NotARing(f"{_SHM_DIR}{name} has the mmfeed magic but only {len(head)} bytes of "
                       f"header; remove it if no producer is starting there")
    pid = struct.unpack_from("<Q", head, FIXED_OFFSETS["producer_pid"])[0]
    start = struct.unpack_from("<Q", head, FIXED_OFFSETS["producer_start"])[0]
    alive, why = _producer_alive(pid, start, None, None)
    if alive:
        raise VersionMismatch(f"{where} of live producer pid {pid} ({why})", version,
                              RING_VERSION)
    _unlink_if_ours(name, None)


# --------------------------------------------------------------------------------------------
# reader


class SampleView:
    """A zero-copy sample: `arrays` are read-only views into the ring.

    In lossy mode the writer may overwrite the slot at any time: use the data, then call
    `still_valid()`; if it is False, what you read may be torn - discard it. In lossless mode
    a registered reader keeps the slot until its next receive call, so the view stays valid
    until then.
    """

    __slots__ = ("schema", "meta", "arrays", "number", "_mm", "_off", "_seq")

    def __init__(self, schema, meta, arrays, number, mm, off, seq):
        self.schema, self.meta, self.arrays, self.number = schema, meta, arrays, number
        self._mm, self._off, self._seq = mm, off, seq

    def still_valid(self) -> bool:
        return sl.validate(self._mm, self._off) == self._seq

    def __repr__(self) -> str:
        return f"SampleView(sample {self.number}, {self.schema!r})"


class RingReader:
    """A reader of one ring, in any process. Use `attach()`; not thread-safe (one per thread).

    `start`: "newest" joins at the most recent published sample, "oldest" at the oldest one
    still in the ring, "next" at the next one to be published. A registered reader gets
    semaphore wake-ups and, in lossless mode, holds the writer back until it has read;
    `register=False` (monitoring tools) polls and never holds anyone back.
    """

    _map: _Mapping | None = None
    _closed = True
    _idx = -1

    def __init__(self, *_a, **_k):
        raise TypeError("use RingReader.attach(name)")

    @classmethod
    def attach(cls, name: str, *, start: str = "newest", register: bool = True) -> "RingReader":
        if start not in ("newest", "oldest", "next"):
            raise ValueError(f"start={start!r}: expected 'newest', 'oldest' or 'next'")
        self = object.__new__(cls)
        self.name = _posix_name(name)
        try:
            shm = posix_ipc.SharedMemory(self.name)
        except posix_ipc.ExistentialError:
            raise RingNotFound(
                f"no ring named {self.name.lstrip('/')!r} ({_SHM_DIR}{self.name} does not "
                f"exist): start a producer first, e.g. `mm-producer run --source SRC --ring "
                f"{self.name.lstrip('/')}`") from None
        except posix_ipc.PermissionsError:
            raise RingError(
                f"ring {self.name}: permission denied; rings are mode 0600 (owner only) unless "
                f"the producer sets a group (0660)") from None
        try:
            self._open(shm, start, register)
        except BaseException:
            self.close()
            raise
        return self

    def _open(self, shm: posix_ipc.SharedMemory, start: str, register: bool) -> None:
        size = os.fstat(shm.fd).st_size
        deadline = time.monotonic() + _STARTUP_WAIT_S
        while size == 0 and time.monotonic() < deadline:
            time.sleep(0.01)  # a producer between shm_open and ftruncate inside create()
            size = os.fstat(shm.fd).st_size
        if size < 256:
            head = b""
            if size:
                with mmap.mmap(shm.fd, size) as m:
                    head = bytes(m[:size])
            shm.close_fd()
            raise NotARing(
                f"{_SHM_DIR}{self.name} is {size} bytes, too small for an mmfeed ring header "
                f"(256); first bytes {_first_bytes(head)}")
        self._map = _Mapping(shm, size)
        mm = self._mm = self._map.mm
        deadline = time.monotonic() + _STARTUP_WAIT_S
        while bytes(mm[:8]) == b"\0" * 8 and time.monotonic() < deadline:
            time.sleep(0.01)  # a producer is inside create(): the magic is written last
        if bytes(mm[:8]) != MAGIC:
            raise NotARing(
                f"{_SHM_DIR}{self.name} is not an mmfeed ring: it starts with "
                f"{_first_bytes(mm)}, expected the magic {MAGIC!r}")
        version = struct.unpack_from("<I", mm, H["version"])[0]
        if version != RING_VERSION:
            raise VersionMismatch(f"ring {self.name}", version, RING_VERSION)
        while sl.load_acquire(mm, H["state"]) == STATE_STARTING:
            if time.monotonic() > deadline:
                raise ProducerGone(f"ring {self.name}: its producer never finished starting")
            time.sleep(0.01)
        hdr = self._hdr = RingHeader.unpack(mm)
        if hdr.total_bytes > size or hdr.max_readers > MAX_READERS or hdr.slots < 1:
            raise NotARing(f"{_SHM_DIR}{self.name}: header describes {hdr.total_bytes} bytes "
                           f"but the segment has {size}; it is damaged")
        self._slots = hdr.slots
        self._slot_bytes = hdr.slot_bytes
        self._lossless = hdr.mode == 1
        self._slot_off = [hdr.slot_offset(i) for i in range(hdr.slots)]
        self._info = bytearray(SLOT_INFO_BYTES)
        self._schemas: dict[int, SampleSchema] = {}
        self._received = self._dropped = self._retried = 0
        self._pending: int | None = None
        self._wsem = None
        self._sem = None
        self._closed = False
        self._pid = os.getpid()
        self._forks = _fork_count
        self._spin_ns = _spin_budget_ns(_cpus_allowed())
        if sl.load_acquire(mm, H["state"]) == STATE_CLOSED:
            raise ProducerGone(f"ring {self.name}: its producer pid {hdr.producer_pid} closed it")
        published = sl.load_seq_cst(mm, H["published"])
        pos = {"newest": max(published - 1, 0), "oldest": max(published - self._slots, 0),
               "next": published}[start]
        self._pos = self._start = pos
        if register:
            self._register(pos)

    def _register(self, pos: int) -> None:
        mm, hdr, me = self._mm, self._hdr, os.getpid()
        for i in range(hdr.max_readers):
            off = hdr.reader_offset(i)
            pid = sl.load_acquire(mm, off + R["pid"])
            if pid == 0:
                ok = sl.compare_exchange(mm, off + R["pid"], 0, me)
            elif pid != me and not _pid_alive(pid):
                ok = sl.compare_exchange(mm, off + R["pid"], pid, me)
                if ok:
                    _release_entry_bits(mm, i)
            else:
                ok = False
            if ok:
                break
        else:
            raise RingError(f"ring {self.name}: all {hdr.max_readers} reader entries are in "
                            f"use by live processes")
        self._idx, self._roff, self._bit = i, off, 1 << i
        perm = stat.S_IMODE(os.stat(_SHM_DIR + self.name).st_mode)
        sname = semaphore_name(self.name, hdr.epoch, f"r{i}")
        self._sem = posix_ipc.Semaphore(sname, posix_ipc.O_CREAT, mode=perm, initial_value=0)
        try:
            _set_mode(_sem_path(sname), None, perm, None)
        except PermissionError:
            pass  # created by another user earlier; its mode was set then
        if self._lossless:
            try:
                self._wsem = posix_ipc.Semaphore(semaphore_name(self.name, hdr.epoch, "w"))
            except posix_ipc.ExistentialError:
                raise ProducerGone(f"ring {self.name}: producer's semaphore is gone") from None
        sl.store_release(mm, off + R["token"], secrets.randbits(64))
        sl.store_release(mm, off + R["start"], pos)
        sl.store_release(mm, off + R["dropped"], 0)
        sl.store_seq_cst(mm, off + R["position"], pos)
        sl.store_seq_cst(mm, off + R["state"], 1)
        sl.fetch_or(mm, H["active_mask"], self._bit)

    # --- receiving ---------------------------------------------------------------------

    def receive_into(self, out, timeout: float | None = None
                     ) -> tuple[SampleSchema, SampleMeta] | None:
        """Copy the next sample's payload into `out` (a writable contiguous buffer: numpy
        uint8 array, bytearray, a pinned tensor's numpy view) with one GIL-released memcpy.

        Returns (schema, meta), or None when nothing arrived within `timeout` (None = wait
        forever, 0 = don't wait). `schema.views(out)` gives the arrays. Raises ProducerGone
        once every published sample is read and the producer closed, died or was replaced.
        """
        cap = out.nbytes if isinstance(out, np.ndarray) else memoryview(out).nbytes
        got = self._next(timeout, cap, out)
        return None if got is None else (got[0], got[1])

    def receive(self, timeout: float | None = None) -> Sample | None:
        """Convenience: a fresh buffer per sample; arrays are views of it (owned copies)."""
        buf = np.empty(self._slot_bytes, np.uint8)
        got = self.receive_into(buf, timeout)
        if got is None:
            return None
        schema, meta = got
        return Sample(schema, meta, schema.views(buf[:schema.payload_nbytes]))

    def receive_view(self, timeout: float | None = None) -> SampleView | None:
        """Zero-copy: read-only views into the slot. See SampleView for when they stay valid."""
        got = self._next(timeout, None, None)
        if got is None:
            return None
        schema, meta, n, off, seq = got
        p = off + SLOT_HEADER_BYTES
        arrays = schema.views(self._map.np[p:p + schema.payload_nbytes])
        for a in arrays.values():
            a.flags.writeable = False
        return SampleView(schema, meta, arrays, n, self._mm, off, seq)

    def _next(self, timeout, cap, out):
        self._check_open()
        if _fork_count != self._forks:
            # A forked child shares the parent's reader entry and position: both would move
            # it. DataLoader workers must attach in their own process (in __iter__).
            raise RingError(f"reader of ring {self.name} was attached in pid {self._pid} and "
                            f"used in pid {os.getpid()}; attach in each process")
        if self._pending is not None:
            self._advance(self._pending)
            self._pending = None
        mm, slots = self._mm, self._slots
        deadline = None if timeout is None else time.monotonic() + timeout
        suspicious = 0
        while True:
            n = self._pos
            published = sl.load_acquire(mm, H["published"])
            if n >= published:
                if not self._wait(n, deadline):
                    return None
                continue
            if n + slots < published:
                self._skip(published - slots)
                continue
            off = self._slot_off[n % slots]
            want = 2 * n + 2
            seq = sl.load_acquire(mm, off)
            if seq != want:
                if seq > want:        # lapped: a newer sample is (being) written there
                    self._skip(max(n + 1, sl.load_acquire(mm, H["published"]) - slots))
                    continue
                # Older than a sample that was already published: not our producer's slot.
                suspicious += 1
                self._check_producer()
                if suspicious > 1000:
                    raise RingError(f"ring {self.name}: slot {n % slots} holds sequence {seq}, "
                                    f"expected {want} for published sample {n}; it is damaged")
                continue
            schema_id, nbytes, slen = SLOT_INFO.unpack_from(mm, off + SLOT_INFO_OFF)
            if out is None:
                got = sl.read(mm, off, off + SLOT_INFO_OFF, self._info, 0, SLOT_INFO_BYTES)
            else:
                if nbytes > cap:
                    if sl.validate(mm, off) != want:
                        continue
                    raise ValueError(
                        f"receive_into: buffer of {cap} bytes is smaller than sample {n}'s "
                        f"payload of {nbytes} bytes; size it to the ring's slot_bytes "
                        f"({self._slot_bytes})")
                got = sl.read2(mm, off, off + SLOT_INFO_OFF, self._info, SLOT_INFO_BYTES,
                               off + SLOT_HEADER_BYTES, out, 0, nbytes)
            if got != want:
                self._retried += 1
                continue
            schema = self._schemas.get(schema_id)
            if schema is None:
                schema = self._load_schema(off, want, slen, schema_id)
                if schema is None:
                    self._retried += 1
                    continue
            meta = SampleMeta.unpack_from(self._info, 0)
            self._received += 1
            if out is None:
                # Zero-copy: keep the slot (lossless) until the caller's next receive.
                self._pos = n + 1
                self._pending = n + 1
                return schema, meta, n, off, want
            self._advance(n + 1)
            return schema, meta

    def _load_schema(self, off: int, want: int, slen: int, schema_id: int):
        if not 0 < slen <= SCHEMA_MAX:
            return None
        buf = bytearray(slen)
        if sl.read(self._mm, off, off + SLOT_HEADER_BYTES - SCHEMA_MAX, buf, 0, slen) != want:
            return None
        schema = SampleSchema.decode(bytes(buf))
        if schema.schema_id != schema_id:
            raise SchemaError(f"ring {self.name}: slot schema encoding hashes to "
                              f"{schema.schema_id:#x}, slot says {schema_id:#x}")
        self._schemas[schema_id] = schema
        return schema

    def _advance(self, pos: int) -> None:
        self._pos = pos
        if self._idx < 0:
            return
        mm = self._mm
        sl.store_seq_cst(mm, self._roff + R["position"], pos)
        if self._lossless:
            ww = sl.load_seq_cst(mm, H["writer_waiting"])  # the writer's target + 1, or 0
            if ww and pos >= ww - 1 and sl.compare_exchange(mm, H["writer_waiting"], ww, 0):
                if self._wsem is not None:
                    self._wsem.release()

    def _skip(self, to: int) -> None:
        if to <= self._pos:
            return
        self._dropped += to - self._pos
        if self._idx >= 0:
            sl.store_release(self._mm, self._roff + R["dropped"], self._dropped)
        self._advance(to)

    def _wait(self, n: int, deadline: float | None) -> bool:
        """Sleep until sample n is published; False at the deadline. Raises ProducerGone."""
        mm = self._mm
        if sl.load_acquire(mm, H["state"]) == STATE_CLOSED:
            raise ProducerGone(
                f"ring {self.name}: producer pid {self._hdr.producer_pid} closed the ring "
                f"after {n} samples; re-attach when a new producer runs")
        wait = _SLICE_S
        if deadline is not None:
            wait = min(wait, deadline - time.monotonic())
            if wait <= 0:
                return False
        if self._spin_ns:
            # See "Convoys": spin on `published` first; at most one budget per call, so a
            # dead producer is still noticed by the sleep's timeout below within _SLICE_S.
            spin = min(self._spin_ns, int(wait * 1e9))
            if sl.spin_until(mm, H["published"], n + 1, spin, _SPIN_YIELD) > n:
                return True
        if self._idx < 0:
            # Unregistered: no semaphore of our own; poll at a modest rate.
            time.sleep(min(wait, 0.0005))
            if time.monotonic() - getattr(self, "_last_check", 0.0) > _SLICE_S:
                self._last_check = time.monotonic()
                self._check_producer()
            return True
        sl.fetch_or(mm, H["waiting_mask"], self._bit)
        if sl.load_seq_cst(mm, H["published"]) > n:
            sl.fetch_and(mm, H["waiting_mask"], _U64 ^ self._bit)
            return True
        try:
            self._sem.acquire(wait)
        except posix_ipc.BusyError:
            sl.fetch_and(mm, H["waiting_mask"], _U64 ^ self._bit)
            self._check_producer()
        return True

    def _check_producer(self) -> None:
        hdr = self._hdr
        inode = _name_inode(self.name)
        if inode != self._map.inode:
            what = "removed" if inode is None else "replaced by a new producer"
            raise ProducerGone(
                f"ring {self.name} (producer pid {hdr.producer_pid}, epoch {hdr.epoch:#x}) was "
                f"{what}; re-attach to continue")
        alive, why = _producer_alive(hdr.producer_pid, hdr.producer_start, hdr.epoch,
                                     sl.load_acquire(self._mm, H["heartbeat_ns"]))
        if not alive:
            raise ProducerGone(
                f"ring {self.name}: producer pid {hdr.producer_pid} died ({why}); re-attach "
                f"when a new producer has replaced the ring")

    # --- status and lifetime -----------------------------------------------------------

    def stats(self) -> ReaderStats:
        return ReaderStats(received=self._received, dropped=self._dropped,
                           retried=self._retried, position=self._pos, start=self._start)

    @property
    def epoch(self) -> int:
        return self._hdr.epoch

    @property
    def generation(self) -> int:
        """The ring's current layout generation (header)."""
        self._check_open()
        return sl.load_acquire(self._mm, H["generation"])

    def ring_stats(self) -> RingStats:
        self._check_open()
        hdr = self._hdr
        return _ring_stats(self._mm, self.name, hdr,
                           [hdr.reader_offset(i) for i in range(hdr.max_readers)])

    def _check_open(self) -> None:
        if self._closed:
            raise RingError(f"reader of ring {getattr(self, 'name', '?')} is closed")

    def close(self) -> None:
        """Unregister and unmap. Idempotent; never removes the ring (the producer owns it)."""
        if self._map is None:
            return
        if self._idx >= 0 and self._mm is not None:
            try:
                _release_entry(self._mm, self._idx, self._roff, os.getpid())
            except (ValueError, IndexError):
                pass
            self._idx = -1
        for sem in (getattr(self, "_sem", None), getattr(self, "_wsem", None)):
            if sem is not None:
                sem.close()
        self._sem = self._wsem = None
        self._closed = True
        self._mm = None
        self._map.close()
        self._map = None

    def __enter__(self) -> "RingReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RingReader({self.name!r}, at sample {getattr(self, '_pos', '?')})"


def _release_entry_bits(mm, i: int) -> None:
    sl.fetch_and(mm, H["active_mask"], _U64 ^ (1 << i))
    sl.fetch_and(mm, H["waiting_mask"], _U64 ^ (1 << i))
