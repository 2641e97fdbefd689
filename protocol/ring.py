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

import mmap
import os
import secrets
import stat
import struct
import time
import weakref
import dataclasses
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import posix_ipc

from . import _seqlock as sl
from .errors import (NotARing, ProducerGone, RingDamaged, RingError, RingFull, RingInUse,
                     RingNotFound, RingNotOwned, RingSuperseded, RingTooLarge, SchemaError,
                     VersionMismatch)
from .ring_layout import (FIXED_OFFSETS, H, HEADER_BYTES, MAGIC, MAX_READERS, MODES, R, READER_BYTES,
                          RING_VERSION, S, SCHEMA_MAX, SLOT_HEADER_BYTES, SLOT_INFO,
                          SLOT_INFO_BYTES, SLOT_INFO_OFF, STATE_CLOSED, STATE_LIVE,
                          STATE_STARTING, STATE_SUPERSEDED, RingHeader, semaphore_name)
from .ring_owner import (check_kind, check_reader_owner, check_writer_owner, chmod_nofollow,
                         describe_owner, group_gid, segment_stat)
from .schema import Sample, SampleMeta, SampleSchema

# A fault in a guarded mapping (a truncated segment) surfaces as RingDamaged from every
# seqlock call on that mapping: NOTE [truncated segments] in _seqlock.c.
sl.set_lost_error(RingDamaged)

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
_SIZE_CHECK_NS = 1_000_000_000  # how often heartbeat() compares the segment's size
_STARTUP_WAIT_S = 2.0   # how long attach/create wait for a producer that is still starting
# Where /proc cannot tell a producer from a new process that reuses its pid (no /proc, hidepid,
# a ring from a build that did not record the start time), a producer whose pid is alive but
# whose heartbeat is older than this counts as gone. Generous on purpose: replacing a live
# ring is far worse than a restart that waits for it. The daemon heartbeats every loop, a
# writer blocked in lossless mode every `_SLICE_S`; an idle library writer should call
# `heartbeat()` well within this.
_HEARTBEAT_STALE_S = 30.0
_MAX_NAME = 200
# The default cap on one ring layout's shared memory (RingConfig.max_bytes, --max-ring-bytes):
# 8 slots of 8-frame 1080p RGB clips (~48 MiB each) fit with room for audio and sensors.
DEFAULT_MAX_RING_BYTES = 1 << 30
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
    """Apply the exact mode (umask may have cut bits) and group to a segment or semaphore;
    a path is changed through an O_NOFOLLOW descriptor (never a link's target)."""
    if fd is not None:
        os.fchmod(fd, mode)
        if gid is not None:
            os.fchown(fd, -1, gid)
    elif path is not None and os.path.lexists(path):
        chmod_nofollow(path, mode, gid)


def _unlink_semaphore(name: str) -> None:
    try:
        posix_ipc.unlink_semaphore(name)
    except posix_ipc.ExistentialError:
        pass


# schema_len, then the reserved bytes up to the encoding: written as one slice with it.
_SCHEMA_LEN = struct.Struct("<I")
_SCHEMA_GAP = SLOT_HEADER_BYTES - SCHEMA_MAX - S["schema_len"] - _SCHEMA_LEN.size


def _held(seq: int) -> str:
    """What a slot's sequence word says it holds, for messages."""
    if seq == 0:
        return "no sample yet"
    return f"sample {(seq - 1) // 2}" + (" (being written)" if seq & 1 else "")


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
    # Shared memory one layout may take (header + slots x slot stride); `create` refuses more
    # with RingTooLarge, and so does a /dev/shm without that much free space.
    max_bytes: int = DEFAULT_MAX_RING_BYTES

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
        if not isinstance(self.max_bytes, int) or self.max_bytes < 1:
            raise ValueError(f"ring max_bytes {self.max_bytes!r}: expected a positive integer")

    def layout(self, slot_bytes: int | None = None) -> RingHeader:
        """The header (sizes, offsets) of this config, or of it with other `slot_bytes`."""
        return RingHeader(mode=MODES.index(self.mode), slots=self.slots,
                          max_readers=self.max_readers,
                          slot_bytes=self.slot_bytes if slot_bytes is None else slot_bytes,
                          producer_pid=0, epoch=0)

    def check_size(self, slot_bytes: int | None = None, why: str = "") -> int:
        """Total shared-memory bytes of the layout with `slot_bytes` (default: this config's);
        RingTooLarge, saying what would fit, when it is above `max_bytes` or than /dev/shm
        has free. `why` says what asked for the size (a sample of N bytes)."""
        hdr = self.layout(slot_bytes)
        total = hdr.total_bytes
        what = (f"ring {_posix_name(self.name)}: {self.slots} slots x {hdr.slot_stride} bytes "
                f"(slot_bytes {hdr.slot_bytes}{', ' + why if why else ''}) = {total} bytes "
                f"of shared memory")
        fix = ("lower the sample size (a `resize=WxH` filter, fewer --clip-frames), use fewer "
               "--slots")
        if total > self.max_bytes:
            raise RingTooLarge(f"{what}, above the cap of {self.max_bytes} bytes "
                               f"(--max-ring-bytes); {fix}, or raise the cap")
        try:
            vfs = os.statvfs(_SHM_DIR)
            free = vfs.f_bavail * vfs.f_frsize
        except OSError:
            free = None
        if free is not None and total > free:
            raise RingTooLarge(f"{what}, but {_SHM_DIR} has {free} bytes free; {fix}, or give "
                               f"{_SHM_DIR} more room (tmpfs size=)")
        return total


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

    The mapping is guarded (NOTE [truncated segments] in _seqlock.c): if another process
    shrinks the segment, the pages it cut read as zeros instead of killing this process with
    SIGBUS, and every seqlock call on the mapping raises RingDamaged from then on.
    `close()` is idempotent and safe after a half-built constructor (class-level defaults).
    """

    shm = None
    mm = None
    np = None
    inode = 0
    guard = -1

    def __init__(self, shm: posix_ipc.SharedMemory, size: int | None = None,
                 label: str = "ring", path: str = ""):
        self.shm = shm
        self.size = shm.size if size is None else size
        # MAP_POPULATE: fault every page in now (and, for the producer, allocate it), so no
        # sample pays for first-touch page faults - 2048 per 8 MiB slot per process otherwise.
        self.mm = mmap.mmap(shm.fd, self.size, flags=mmap.MAP_SHARED | _MAP_POPULATE)
        self.guard = sl.guard(self.mm, label, path)
        self.np = np.frombuffer(self.mm, np.uint8)
        self.stat = os.fstat(shm.fd)
        self.inode = self.stat.st_ino
        self.shm.close_fd()

    @property
    def lost(self) -> bool:
        """True once a page of this mapping was found cut (the segment was truncated)."""
        return self.guard >= 0 and sl.guard_faults(self.guard) > 0

    def close(self) -> None:
        self.np = None
        if self.mm is not None:
            try:
                self.mm.close()
                sl.unguard(self.guard)  # unmapped: the range may be reused by anything now
            except BufferError:
                # zero-copy views still alive: the mapping goes when they do, and its guard
                # entry with it (never before: an unguarded cut page would be a SIGBUS)
                weakref.finalize(self.mm, sl.unguard, self.guard)
            self.guard = -1
            self.mm = None


def _name_inode(posix_name: str) -> int | None:
    """The inode at the ring's name (lstat: a link planted there is not followed), or None."""
    st = segment_stat(_SHM_DIR + posix_name)
    return None if st is None else st.st_ino


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
        """Create the ring. A stale ring (producer dead, judged by pid and start time:
        `_producer_alive`; the header's state is not trusted) of this uid at that name is
        replaced, whatever its protocol version; a live one raises RingInUse naming its pid
        (VersionMismatch, naming both versions and the pid, when it is another version's); a
        segment that is not a ring raises NotARing, one of another user RingNotOwned, a link
        or a directory NotARing (all left alone). A layout above `config.max_bytes` or the
        free space of /dev/shm raises RingTooLarge before anything is created."""
        config.check_size()
        self = cls._new(config)
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
        self._build(shm, None)
        return self

    @classmethod
    def _new(cls, config: RingConfig) -> "RingWriter":
        self = object.__new__(cls)
        self._closed = True
        self.config = config
        self.name = _posix_name(config.name)
        self._perm = 0o660 if config.group else 0o600
        self._gid = group_gid(config.group)
        self._hdr = RingHeader(
            mode=MODES.index(config.mode), slots=config.slots, max_readers=config.max_readers,
            slot_bytes=config.slot_bytes, producer_pid=os.getpid(),
            producer_start=_own_start(), epoch=secrets.randbits(64) or 1,
            created_ns=time.time_ns(),
        )
        return self

    def _build(self, shm: posix_ipc.SharedMemory, temp: str | None) -> None:
        """Map and initialise a freshly created segment (`temp`: the name it was created
        under, to be renamed by the caller; None: created at the ring's name)."""
        try:
            _set_mode(None, shm.fd, self._perm, self._gid)
            self._map = _Mapping(shm, self._hdr.total_bytes,
                                 f"ring {self.name} (epoch {self._hdr.epoch:#x})",
                                 _SHM_DIR + self.name)
            self._init_segment()
        except BaseException:
            # Half-built: never leave a segment without a live owner behind.
            if self._map is not None:
                self._map.close()
            else:
                shm.close_fd()
            _unlink_if_ours(self.name if temp is None else temp, None)
            raise

    def supersede(self, config: RingConfig | None = None, *, slot_bytes: int | None = None,
                  why: str = "") -> "RingWriter":
        """Move the ring to a new layout under the same name and return its writer (new
        epoch); this writer is closed. Readers of the old layout read what it holds, then
        get RingSuperseded and re-attach by name (the trainer's loops do that by
        themselves). `config` (default: this one) with `slot_bytes` when given; `why` goes
        into a RingTooLarge message.

        How: the new segment is created under a temporary name and renamed over the ring's
        name (rename(2) in /dev/shm: atomic, so an attaching reader finds the old layout or
        the new one, never nothing); the old header is marked superseded first, its readers
        are woken, its semaphores removed. Also the way out of a damaged ring (RingDamaged):
        a truncated segment is replaced by a fresh one the same way. Memory: until the last
        reader of the old layout lets go, both segments exist."""
        config = config or self.config
        if slot_bytes is not None:
            config = dataclasses.replace(config, slot_bytes=slot_bytes)
        if _posix_name(config.name) != self.name:
            raise ValueError(f"supersede: ring {self.name} cannot move to another name")
        config.check_size(why=why)
        new = RingWriter._new(config)
        temp = f"{self.name}.next-{secrets.token_hex(4)}"
        shm = posix_ipc.SharedMemory(temp, posix_ipc.O_CREX, mode=new._perm,
                                     size=new._hdr.total_bytes)
        new._build(shm, temp)
        here = _name_inode(self.name)
        if here is not None and here != self._map.inode:
            new._discard(temp)
            raise RingInUse(f"ring {self.name}: the name no longer holds this producer's ring "
                            f"(epoch {self._hdr.epoch:#x}); another process replaced it")
        self._mark(STATE_SUPERSEDED)  # before the rename: a reader never sees "replaced"
        try:
            os.rename(_SHM_DIR + temp, _SHM_DIR + self.name)
        except OSError:
            self._mark(STATE_LIVE)
            new._discard(temp)
            raise
        self._retire(None)
        return new

    def _discard(self, temp: str) -> None:
        """Drop a writer built under `temp` that never took the ring's name."""
        self._closed = True
        self._finalizer.detach()
        _own_epochs.discard(self._hdr.epoch)
        self._wsem.close()
        _unlink_semaphore(self._wsem_name)
        self._map.close()
        _unlink_if_ours(temp, None)

    def _mark(self, state: int) -> None:
        try:
            sl.store_seq_cst(self._mm, H["state"], state)
        except RingDamaged:
            pass  # a truncated header: its readers find out from their own mapping

    def _init_segment(self) -> None:
        hdr, mm = self._hdr, self._map.mm
        self._mm = mm
        self._slots = hdr.slots
        self._slot_bytes = hdr.slot_bytes
        self._lossless = hdr.mode == 1
        self._slot_off = [hdr.slot_offset(i) for i in range(hdr.slots)]
        self._reader_off = [hdr.reader_offset(i) for i in range(hdr.max_readers)]
        self._views: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        self._specs: dict[int, list] = {}           # schema_id -> [(name, dtype, shape)]
        self._nbytes: dict[int, int] = {}           # schema_id -> payload bytes (checked)
        self._encoded: dict[int, bytes] = {}        # schema_id -> schema encoding
        self._reader_sems: dict[int, posix_ipc.Semaphore] = {}
        self._n = 0
        self._loaned: Slot | None = None
        self._size_check_ns = 0
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
        self._arm_finalizer()

    def _arm_finalizer(self) -> None:
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
            self._encoded[sid] = _SCHEMA_LEN.pack(len(enc)) + bytes(_SCHEMA_GAP) + enc
        n = self._n
        if self._lossless:
            self._wait_for_space(n, timeout)
        i = n % self._slots
        off = self._slot_off[i]
        mm = self._mm
        sl.write_begin(mm, off, 2 * n + 1)
        # The schema length and encoding go into every slot write, not only when the slot's
        # schema changes: a slot damaged by another process heals within one lap of the ring
        # (a reader that met the damage re-attaches and would meet it again otherwise). One
        # copy of a few hundred bytes (BENCHMARKS.md "hardening").
        enc = self._encoded[sid]
        mm[off + S["schema_len"]:off + S["schema_len"] + len(enc)] = enc
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
                (m.name, np.dtype(m.dtype), m.stored_shape) for m in schema.modalities]
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
        """Prove liveness while idle (publish() does this too). Also the writer's cheap
        health check: a `state` someone else wrote is put back to live (readers treat it as
        advisory anyway, ring_layout.STATE_*), and about once a second the segment's size is
        compared with the layout (an lstat, ~1 us): a shrink raises RingDamaged even where no
        page was touched yet. Call `supersede()` then to go on with a fresh segment."""
        self._check_open()
        mm = self._mm
        now = time.monotonic_ns()
        sl.store_release(mm, H["heartbeat_ns"], now)
        if sl.load_acquire(mm, H["state"]) != STATE_LIVE:
            sl.store_seq_cst(mm, H["state"], STATE_LIVE)
        if now >= self._size_check_ns:
            self._size_check_ns = now + _SIZE_CHECK_NS
            self.check_segment()

    def check_segment(self) -> None:
        """RingDamaged when the segment at the ring's name is this ring's and smaller than its
        layout (truncated by another process). A name that holds something else is no
        concern of this writer's until it closes (it never unlinks what is not its own)."""
        st = segment_stat(_SHM_DIR + self.name)
        total = self._hdr.total_bytes
        if st is not None and st.st_ino == self._map.inode and st.st_size < total:
            raise RingDamaged(
                f"ring {self.name} (epoch {self._hdr.epoch:#x}): {_SHM_DIR}{self.name} has "
                f"{st.st_size} bytes, its layout {total} ({self._slots} slots x "
                f"{self._hdr.slot_stride} bytes): another process truncated it")
        if self._map.lost:
            sl.load_acquire(self._mm, 0)  # raises RingDamaged, saying what was lost

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
        """Remove the segment and semaphores, mark the ring closed and wake every reader
        (they raise ProducerGone once drained). Idempotent; works on a damaged ring too."""
        self._retire(STATE_CLOSED)

    def _retire(self, state: int | None) -> None:
        """Close this writer: wake every registered reader after the name and semaphores are
        gone (so a woken reader finds the ring removed, or superseded, at once), storing
        `state` into the header first when given."""
        if self._closed:
            return
        self._closed = True
        mm = self._mm
        try:
            active = sl.load_seq_cst(mm, H["active_mask"])
        except RingDamaged:
            active = 0  # a truncated header: readers find out from their own mapping
        for i in _bits(active):
            self._reader_sem(i)  # opened before their names go
        self._finalizer()  # unlinks shm (if the name is still ours) + semaphores exactly once
        if state is not None:
            self._mark(state)
        self._wake(active)
        for sem in self._reader_sems.values():
            sem.close()
        self._reader_sems.clear()
        self._wsem.close()
        self._views.clear()
        self._loaned = None
        self._mm = None
        self._map.close()

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
    """Something already exists at `name`: remove it if it is a ring of this uid whose
    producer is gone, else refuse (NotARing for a link, a directory or another program's
    segment, RingNotOwned for another user's, RingInUse for a live producer's)."""
    path = _SHM_DIR + name
    st = segment_stat(path)
    if st is None:
        return  # vanished meanwhile: just retry the create
    check_writer_owner(st, path, name)
    try:
        shm = posix_ipc.SharedMemory(name)
    except posix_ipc.ExistentialError:
        return
    except (OSError, ValueError, posix_ipc.Error) as e:  # swapped for a link or a directory
        raise NotARing(f"ring {name}: {path} cannot be opened as shared memory ({e}); "
                       f"remove it or choose another ring name") from None
    head = b""
    try:
        fst = os.fstat(shm.fd)
        check_writer_owner(fst, path, name)  # on the descriptor: what we read is what we judge
        inode = fst.st_ino
        # pread, not mmap: a segment someone shrinks meanwhile cannot raise SIGBUS here
        head = os.pread(shm.fd, 256, 0)
        deadline = time.monotonic() + _STARTUP_WAIT_S
        while len(head) >= 8 and head[:8] == b"\0" * 8 and time.monotonic() < deadline:
            time.sleep(0.01)  # another producer may be half-way through create()
            head = os.pread(shm.fd, 256, 0)
    finally:
        shm.close_fd()
    if head[:8] == b"\0" * 8 or not head:
        # Empty or all-zero header: a producer crashed inside create(). Nobody can use it.
        _unlink_if_ours(name, inode)
        return
    if head[:8] != MAGIC:
        raise NotARing(
            f"{_SHM_DIR}{name} exists and is not an mmfeed ring (first bytes "
            f"{_first_bytes(head)}); it may belong to another program: pick another ring "
            f"name, or remove it yourself if it is stale")
    version = struct.unpack_from("<I", head, H["version"])[0] if len(head) >= 12 else None
    if version != RING_VERSION:
        _replace_other_version(name, head, version, inode)
        return
    if len(head) < 256:
        raise NotARing(f"{_SHM_DIR}{name} is a truncated ring header ({len(head)} bytes); "
                       f"remove it")
    old = RingHeader.unpack(head)
    # Whatever the header's state says (anyone who can write the segment can write "closed"
    # into it): a producer that closes its ring removes it, so a ring still here is judged by
    # its producer alone.
    alive, why = _producer_alive(old.producer_pid, old.producer_start, old.epoch,
                                 old.heartbeat_ns)
    if alive:
        raise RingInUse(
            f"ring {name} belongs to live producer pid {old.producer_pid} ({why}); stop "
            f"that producer or choose another ring name")
    # Stale: its producer died. Replace it.
    _unlink_if_ours(name, inode)
    _unlink_semaphore(semaphore_name(name, old.epoch, "w"))
    for i in range(min(old.max_readers, MAX_READERS)):
        _unlink_semaphore(semaphore_name(name, old.epoch, f"r{i}"))


def _replace_other_version(name: str, head: bytes, version: int | None, inode: int) -> None:
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
    _unlink_if_ours(name, inode)


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
    def attach(cls, name: str, *, start: str = "newest", register: bool = True,
               group: str | None = None, resume: tuple[int, int] | None = None
               ) -> "RingReader":
        """Attach to ring `name`.

        Refuses, with what to do: a name that holds nothing (RingNotFound), a link, a
        directory or another program's segment (NotARing), a segment of a user this reader
        does not trust (RingNotOwned: not its own uid, nor `group` with mode 0660;
        ring_owner.py), a ring whose producer is gone (ProducerGone: a dead ring never
        yields a sample again, not even its newest one) and a damaged ring (RingDamaged: the
        segment is smaller than its header says, or `published` counts samples its slots do
        not hold). `resume=(epoch, position)`, from a previous reader's `mark()`: on the same
        epoch, start where that reader stopped (no sample twice); otherwise `start`.
        """
        if start not in ("newest", "oldest", "next"):
            raise ValueError(f"start={start!r}: expected 'newest', 'oldest' or 'next'")
        self = object.__new__(cls)
        self.name = _posix_name(name)
        gid = group_gid(group)
        path = _SHM_DIR + self.name
        missing = RingNotFound(
            f"no ring named {self.name.lstrip('/')!r} ({path} does not exist): start a "
            f"producer first, e.g. `mm-producer run --source SRC --ring "
            f"{self.name.lstrip('/')}`")
        st = segment_stat(path)
        if st is None:
            raise missing
        check_kind(st, path, self.name)
        try:
            shm = posix_ipc.SharedMemory(self.name)
        except posix_ipc.ExistentialError:
            raise missing from None
        except posix_ipc.PermissionsError:
            raise RingNotOwned(
                f"ring {self.name}: permission denied: {path} is {describe_owner(st)}; rings "
                f"are mode 0600 (the producer's user only) unless the producer sets a group "
                f"(0660): run as the producer's user or in its --group") from None
        except (OSError, ValueError, posix_ipc.Error) as e:  # a link/dir swapped in meanwhile
            raise NotARing(f"ring {self.name}: {path} cannot be opened as shared memory "
                           f"({e}); remove it or choose another ring name") from None
        try:
            # On the descriptor: the segment judged is the one read (no lstat/open race).
            check_reader_owner(os.fstat(shm.fd), path, self.name, gid)
            self._open(shm, start, register, gid, resume)
        except BaseException:
            if self._map is None:
                shm.close_fd()
            self.close()
            raise
        return self

    def _open(self, shm: posix_ipc.SharedMemory, start: str, register: bool, gid: int | None,
              resume: tuple[int, int] | None) -> None:
        size = os.fstat(shm.fd).st_size
        deadline = time.monotonic() + _STARTUP_WAIT_S
        while size == 0 and time.monotonic() < deadline:
            time.sleep(0.01)  # a producer between shm_open and ftruncate inside create()
            size = os.fstat(shm.fd).st_size
        if size < 256:
            head = os.pread(shm.fd, size, 0) if size else b""
            raise NotARing(
                f"{_SHM_DIR}{self.name} is {size} bytes, too small for an mmfeed ring header "
                f"(256); first bytes {_first_bytes(head)}")
        self._map = _Mapping(shm, size, f"ring {self.name}", _SHM_DIR + self.name)
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
        if not (1 <= hdr.slots and 1 <= hdr.max_readers <= MAX_READERS and hdr.slot_bytes):
            raise RingDamaged(f"ring {self.name}: its header is damaged ({hdr.slots} slots, "
                              f"{hdr.max_readers} reader entries, slot_bytes "
                              f"{hdr.slot_bytes})")
        if hdr.total_bytes > size:
            raise RingDamaged(
                f"ring {self.name} (epoch {hdr.epoch:#x}): {_SHM_DIR}{self.name} has {size} "
                f"bytes but its header describes {hdr.total_bytes} ({hdr.slots} slots x "
                f"{hdr.slot_stride} bytes): the segment was truncated or its header damaged")
        self._slots = hdr.slots
        self._slot_bytes = hdr.slot_bytes
        self._lossless = hdr.mode == 1
        self._slot_off = [hdr.slot_offset(i) for i in range(hdr.slots)]
        self._info = bytearray(SLOT_INFO_BYTES)
        self._schemas: dict[int, tuple[SampleSchema, int]] = {}  # id -> (schema, nbytes)
        self._received = self._dropped = self._retried = 0
        self._pending: int | None = None
        self._wsem = None
        self._sem = None
        self._gid = gid
        self._state_check = 0.0
        self._closed = False
        self._pid = os.getpid()
        self._forks = _fork_count
        self._spin_ns = _spin_budget_ns(_cpus_allowed())
        # The header's state is advisory (ring_layout.STATE_*): whether this ring can still
        # bring anything new is decided by its name and its producer's pid + start time.
        # A dead producer's ring is refused here, so a re-attach loop never re-reads its
        # newest sample as if it were new.
        self._check_producer()
        published = sl.load_seq_cst(mm, H["published"])
        self._check_published(published)
        pos = {"newest": max(published - 1, 0), "oldest": max(published - self._slots, 0),
               "next": published}[start]
        self._start = pos
        if resume is not None and resume[0] == hdr.epoch:
            # The same ring a previous reader of ours left: go on after its last sample.
            self._start = min(resume[1], published)
            pos = max(self._start, published - self._slots)
            self._dropped = pos - self._start
        self._pos = pos
        if register:
            self._register(pos)

    def mark(self) -> tuple[int, int]:
        """(epoch, position): pass as `attach(resume=...)` to a later reader so that a
        re-attach to the same ring goes on where this reader stopped."""
        return self._hdr.epoch, self._pos

    def _check_published(self, published: int) -> None:
        """RingDamaged when the header counts a sample the ring never held: the writer
        stores a slot's sequence (release) before `published` (seq_cst) and `published` was
        loaded first, so the newest counted sample's slot holds it or a later one."""
        if published == 0:
            return
        n = published - 1
        seq = sl.load_acquire(self._mm, self._slot_off[n % self._slots])
        if seq < 2 * n + 2:
            raise self._damaged(n, f"the header counts {published} published samples, but "
                                   f"slot {n % self._slots} holds "
                                   f"{_held(seq)}: the published counter is damaged")

    def _damaged(self, n: int, what: str) -> RingDamaged:
        """Detach (close) and return the error to raise, naming the ring and the damage."""
        hdr = self._hdr
        err = RingDamaged(f"ring {self.name} (epoch {hdr.epoch:#x}, producer pid "
                          f"{hdr.producer_pid}) is damaged, sample {n}: {what}; this reader "
                          f"detached: re-attach when a healthy producer serves the ring")
        self.close()
        return err

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
        seg = self._map.stat
        perm = stat.S_IMODE(seg.st_mode)
        sname = semaphore_name(self.name, hdr.epoch, f"r{i}")
        spath = _sem_path(sname)
        try:
            self._sem = posix_ipc.Semaphore(sname, posix_ipc.O_CREAT, mode=perm,
                                            initial_value=0)
        except (OSError, ValueError, posix_ipc.Error) as e:  # a link or a directory there
            st = segment_stat(spath)
            if st is not None:
                check_kind(st, spath, self.name)
            raise RingError(f"ring {self.name}: cannot open its reader semaphore {spath} "
                            f"({e})") from None
        try:
            _set_mode(spath, None, perm, seg.st_gid if perm & 0o070 else None)
        except PermissionError:
            pass  # created by another reader's user earlier; its mode was set then
        st = segment_stat(spath)
        if st is not None:  # who else could post it, or make it never be posted
            check_reader_owner(st, spath, self.name, seg.st_gid if perm == 0o660 else None)
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
        while True:
            n = self._pos
            published = sl.load_acquire(mm, H["published"])
            if n >= published:
                if not self._wait(n, deadline):
                    return None
                continue
            if n + slots < published:
                self._check_published(published)  # a forged counter must not skip us ahead
                self._skip(published - slots)
                continue
            off = self._slot_off[n % slots]
            want = 2 * n + 2
            seq = sl.load_acquire(mm, off)
            if seq != want:
                if seq > want:        # lapped: a newer sample is (being) written there
                    self._skip(max(n + 1, sl.load_acquire(mm, H["published"]) - slots))
                    continue
                # `published` (loaded first, acquire) counts sample n, and the writer stores
                # a slot's sequence before `published`: no healthy ring shows an older one.
                raise self._damaged(n, f"the header counts {published} published samples, "
                                       f"but slot {n % slots} holds {_held(seq)}")
            schema_id, nbytes, slen = SLOT_INFO.unpack_from(mm, off + SLOT_INFO_OFF)
            if nbytes > self._slot_bytes or (out is not None and nbytes > cap):
                if sl.validate(mm, off) != want:
                    continue  # read while being overwritten: not this sample's size
                if nbytes > self._slot_bytes:
                    raise self._damaged(n, f"slot {n % slots} says its payload is {nbytes} "
                                           f"bytes, more than a slot's {self._slot_bytes}")
                raise ValueError(
                    f"receive_into: buffer of {cap} bytes is smaller than sample {n}'s "
                    f"payload of {nbytes} bytes; size it to the ring's slot_bytes "
                    f"({self._slot_bytes})")
            if out is None:
                got = sl.read(mm, off, off + SLOT_INFO_OFF, self._info, 0, SLOT_INFO_BYTES)
            else:
                got = sl.read2(mm, off, off + SLOT_INFO_OFF, self._info, SLOT_INFO_BYTES,
                               off + SLOT_HEADER_BYTES, out, 0, nbytes)
            if got != want:
                self._retried += 1
                continue
            # From here on what was read is whole (the sequence did not move from the first
            # load to the last), so whatever does not fit is damage, never a race.
            known = self._schemas.get(schema_id)
            if known is None:
                known = self._load_schema(off, want, slen, schema_id, n)
                if known is None:
                    self._retried += 1
                    continue
            schema, size = known
            if size != nbytes:
                raise self._damaged(n, f"slot {n % slots} says its payload is {nbytes} bytes, "
                                       f"its schema {schema!r} makes {size}")
            meta = SampleMeta.unpack_from(self._info, 0)
            self._received += 1
            if out is None:
                # Zero-copy: keep the slot (lossless) until the caller's next receive.
                self._pos = n + 1
                self._pending = n + 1
                return schema, meta, n, off, want
            self._advance(n + 1)
            return schema, meta

    def _load_schema(self, off: int, want: int, slen: int, schema_id: int, n: int
                     ) -> tuple[SampleSchema, int] | None:
        """Decode a slot's schema (first sample of an unseen schema id). None: the slot
        changed while read (retry); RingDamaged: what a whole read found cannot be a
        producer's (the encoding is validated before anything trusts it)."""
        where = f"slot {n % self._slots}"
        if not 0 < slen <= SCHEMA_MAX:
            if sl.validate(self._mm, off) != want:
                return None
            raise self._damaged(n, f"{where} says its schema encoding is {slen} bytes, "
                                   f"expected 1..{SCHEMA_MAX}")
        buf = bytearray(slen)
        if sl.read(self._mm, off, off + SLOT_HEADER_BYTES - SCHEMA_MAX, buf, 0, slen) != want:
            return None
        try:
            schema = SampleSchema.decode(bytes(buf))
            size = schema.payload_nbytes
        except Exception as e:  # untrusted bytes: any failure to decode is damage
            raise self._damaged(n, f"{where}'s schema does not decode ({type(e).__name__}: "
                                   f"{e}); first bytes {_first_bytes(buf)}") from None
        if schema.schema_id != schema_id:
            raise self._damaged(n, f"{where}'s schema encoding hashes to "
                                   f"{schema.schema_id:#x}, the slot says {schema_id:#x}")
        if size > self._slot_bytes:
            raise self._damaged(n, f"{where}'s schema {schema!r} needs {size} bytes, more "
                                   f"than a slot's {self._slot_bytes}")
        self._schemas[schema_id] = (schema, size)
        return schema, size

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
        if sl.load_acquire(mm, H["state"]) != STATE_LIVE:
            # Closed or superseded - or so says a word anyone who can write the segment can
            # write. A closing or superseding producer takes the name away first, so the
            # name and the producer's pid decide (at most once per slice: a forged state
            # must not turn every wait into an lstat and a /proc read). A live producer
            # behind a forged state goes on being read.
            now = time.monotonic()
            if now >= self._state_check:
                self._state_check = now + _SLICE_S
                self._check_producer()
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
        """ProducerGone (RingSuperseded) unless the ring's name still holds this reader's
        segment and its producer (pid + start time) is running."""
        hdr = self._hdr
        inode = _name_inode(self.name)
        if inode != self._map.inode:
            state = sl.load_acquire(self._mm, H["state"])
            if inode is None and state == STATE_CLOSED:
                raise ProducerGone(
                    f"ring {self.name}: producer pid {hdr.producer_pid} closed the ring after "
                    f"{sl.load_acquire(self._mm, H['published'])} samples; re-attach when a "
                    f"new producer runs")
            if inode is not None and state == STATE_SUPERSEDED:
                raise RingSuperseded(
                    f"ring {self.name}: producer pid {hdr.producer_pid} moved it to a new "
                    f"layout (this one: epoch {hdr.epoch:#x}, {hdr.slots} slots x "
                    f"{hdr.slot_bytes} bytes, every sample read); re-attach by name")
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
            except (ValueError, IndexError, RingDamaged):
                pass
            if _name_inode(self.name) != self._map.inode:
                # Its producer removed (or moved on from) this ring and its semaphores, maybe
                # before this reader registered: nobody else will remove ours.
                _unlink_semaphore(semaphore_name(self.name, self._hdr.epoch, f"r{self._idx}"))
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


def peek_generation(name: str) -> int | None:
    """The layout generation in the header of ring `name`, dead producer or live, without
    attaching (a reader refuses a dead ring: it never yields a sample again; but a new
    producer must still continue the numbers a SIGKILLed one left in its header). None when
    nothing of ours, of this version, is there. Never follows a link; opens read-only."""
    path = _SHM_DIR + _posix_name(name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() \
                or st.st_size < HEADER_BYTES:
            return None
        buf = os.pread(fd, HEADER_BYTES, 0)
    finally:
        os.close(fd)
    if len(buf) < HEADER_BYTES or buf[:len(MAGIC)] != MAGIC:
        return None
    hdr = RingHeader.unpack(buf)
    return int(hdr.generation) if hdr.version == RING_VERSION else None
