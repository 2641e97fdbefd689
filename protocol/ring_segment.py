"""The ring's shared-memory segment: its name, its config and size, its mapping, and what to
do with one already at the name (replace a stale ring, refuse a live one or another program's).

Also the header counters both sides read for `stats()`. The writer and the reader
(ring_writer.py, ring_reader.py) build on these; the byte layout is ring_layout.py.
"""
from __future__ import annotations

import mmap
import os
import struct
import time
import weakref
from dataclasses import dataclass

import numpy as np
import posix_ipc

from . import _seqlock as sl
from .errors import MmfeedError, NotARing, RingDamaged, RingInUse, RingTooLarge, VersionMismatch
from .ring_layout import (FIXED_OFFSETS, H, MAGIC, MAX_READERS, MODES, R, RING_VERSION,
                          RingHeader, semaphore_name)
from .ring_liveness import _STARTUP_WAIT_S, _pid_alive, _producer_alive
from .ring_owner import check_reader_owner, check_writer_owner, chmod_nofollow, segment_stat

# A fault in a guarded mapping (a truncated segment) surfaces as RingDamaged from every
# seqlock call on that mapping: NOTE [truncated segments] in _seqlock.c.
sl.set_lost_error(RingDamaged)

_MAX_NAME = 200
# The default cap on one ring layout's shared memory (RingConfig.max_bytes, --max-ring-bytes):
# 8 slots of 8-frame 1080p RGB clips (~48 MiB each) fit with room for audio and sensors.
DEFAULT_MAX_RING_BYTES = 1 << 30
_U64 = (1 << 64) - 1
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # Linux only; elsewhere pages fault lazily
_SHM_DIR = "/dev/shm"   # where Linux keeps POSIX shm and semaphores (inode checks, chmod)


def _posix_name(name: str) -> str:
    bare = name[1:] if name.startswith("/") else name
    if not bare or "/" in bare or len(bare) > _MAX_NAME or "\0" in bare:
        raise ValueError(
            f"ring name {name!r}: expected 1-{_MAX_NAME} characters without '/' (a leading "
            f"'/' is allowed and added when missing)")
    return "/" + bare


def _sem_path(posix_name: str) -> str:
    return f"{_SHM_DIR}/sem.{posix_name[1:]}"



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


def _release_entry_bits(mm, i: int) -> None:
    sl.fetch_and(mm, H["active_mask"], _U64 ^ (1 << i))
    sl.fetch_and(mm, H["waiting_mask"], _U64 ^ (1 << i))


def header_generation(name: str) -> int | None:
    """The generation in the header of the ring at `name`, whether its producer runs or died
    (a SIGKILLed producer leaves its ring behind: exactly the header a restart must read, and
    one `RingReader.attach` refuses, since a dead ring never yields a sample). None when there
    is no ring of this version there, or one this user does not own (ring_owner.py). Read with
    pread, never mapped: a segment someone shrinks meanwhile cannot raise SIGBUS here."""
    posix = _posix_name(name)
    path = _SHM_DIR + posix
    if segment_stat(path) is None:
        return None
    try:
        shm = posix_ipc.SharedMemory(posix)
    except (posix_ipc.Error, OSError, ValueError):
        return None
    try:
        check_reader_owner(os.fstat(shm.fd), path, posix, None)
        head = os.pread(shm.fd, 256, 0)
    except (MmfeedError, OSError):
        return None
    finally:
        shm.close_fd()
    if len(head) < 256 or head[:8] != MAGIC:
        return None
    if struct.unpack_from("<I", head, H["version"])[0] != RING_VERSION:
        return None
    return RingHeader.unpack(head).generation
