"""The readers' side of the ring: `RingReader.attach`, `receive_into` (one GIL-released copy),
`receive_view` (zero-copy), the seqlock read and the sleep until the next sample.

Why each step is ordered as it is: the failure list at the top of ring.py.
"""
from __future__ import annotations

import os
import secrets
import stat
import struct
import time

import numpy as np
import posix_ipc

from . import _seqlock as sl
from . import ring_liveness
from .errors import (NotARing, ProducerGone, RingDamaged, RingError, RingNotFound,
                     RingNotOwned, RingSuperseded, VersionMismatch)
from .ring_layout import (H, MAGIC, MAX_READERS, R, RING_VERSION, SCHEMA_MAX,
                          SLOT_HEADER_BYTES, SLOT_INFO, SLOT_INFO_BYTES, SLOT_INFO_OFF,
                          STATE_CLOSED, STATE_LIVE, STATE_STARTING, STATE_SUPERSEDED,
                          RingHeader, semaphore_name)
from .ring_liveness import (_SLICE_S, _SPIN_YIELD, _STARTUP_WAIT_S, _cpus_allowed, _pid_alive,
                            _producer_alive, _spin_budget_ns)
from .ring_owner import check_kind, check_reader_owner, describe_owner, group_gid, segment_stat
from .ring_segment import (_SHM_DIR, _U64, ReaderStats, RingStats, _first_bytes, _held,
                           _Mapping, _name_inode, _posix_name, _release_entry,
                           _release_entry_bits, _ring_stats, _sem_path, _set_mode,
                           _unlink_semaphore)
from .schema import Sample, SampleMeta, SampleSchema


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
        self._forks = ring_liveness.forks()
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
        if ring_liveness.forks() != self._forks:
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
        except posix_ipc.SignalError:
            # NOTE [signals in waits]: posix_ipc raises where the C library returned EINTR,
            # i.e. for any signal with a Python handler (the daemons' SIGTERM, a user's
            # SIGINT). Python's own rule (PEP 475) is to run the handler - at the next
            # bytecode, where an exception it raises propagates - and to wait again; so does
            # this wait: the caller loops, finds nothing new and sleeps again.
            sl.fetch_and(mm, H["waiting_mask"], _U64 ^ self._bit)
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
