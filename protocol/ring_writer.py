"""The producer's side of the ring: `RingWriter.create`, `loan`/`commit`, `publish`, the
lossless wait for space, `supersede` (a new layout under the same name), `close`.

Why each step is ordered as it is: the failure list at the top of ring.py.
"""
from __future__ import annotations

import dataclasses
import os
import secrets
import struct
import time
import weakref
from typing import Mapping

import numpy as np
import posix_ipc

from . import _seqlock as sl
from .errors import RingDamaged, RingError, RingFull, RingInUse, SchemaError
from .ring_layout import (H, MAGIC, MODES, S, SCHEMA_MAX, SLOT_HEADER_BYTES, STATE_CLOSED,
                          STATE_LIVE, STATE_SUPERSEDED, RingHeader, semaphore_name)
from .ring_liveness import (_SLICE_S, _SPIN_YIELD, _cpus_allowed, _own_epochs, _own_start,
                            _spin_budget_ns)
from .ring_owner import group_gid, segment_stat
from .ring_readers import ReaderTable
from .ring_segment import (_SHM_DIR, _U64, RingConfig, RingStats, _bits, _Mapping,
                           _name_inode, _posix_name, _replace_if_stale,
                           _ring_stats, _sem_path, _set_mode, _unlink_if_ours,
                           _unlink_semaphore)
from .schema import SampleMeta, SampleSchema

_SIZE_CHECK_NS = 1_000_000_000  # how often heartbeat() compares the segment's size
# schema_len, then the reserved bytes up to the encoding: written as one slice with it.
_SCHEMA_LEN = struct.Struct("<I")
_SCHEMA_GAP = SLOT_HEADER_BYTES - SCHEMA_MAX - S["schema_len"] - _SCHEMA_LEN.size


class Slot:
    """A loaned slot: write the payload in place through `arrays`, then `commit(meta)`, or
    give it back unpublished with `cancel()`.

    While loaned the slot's sequence is odd (2n+1 for sample n), so readers treat it as being
    written: a reader still on the sample the slot held before skips it as lapped (its bytes
    may already be half overwritten), and no reader sees sample n before `commit` counts it.
    `cancel()` leaves the sequence odd and `published` unchanged, which is exactly that state:
    the next loan takes the same slot and sample number again. A loan outlives neither a
    `supersede` nor a `close` of its writer: both cancel it, and a later `commit` says so.
    """

    __slots__ = ("_writer", "number", "schema", "arrays", "_off", "_done")

    def __init__(self, writer: "RingWriter", number: int, off: int, schema: SampleSchema,
                 arrays: dict[str, np.ndarray]):
        self._writer, self.number, self._off, self.schema = writer, number, off, schema
        self.arrays = arrays
        self._done: str | bool = False

    def commit(self, meta: SampleMeta) -> int:
        """Publish the slot; returns its sample number."""
        if self._done:
            raise RingError(f"sample {self.number} was already {self._done}; loan a new slot")
        self._done = "committed"
        self._writer._commit(self, meta)
        return self.number

    def retype(self, schema: SampleSchema) -> None:
        """Let the open loan carry `schema` instead (the sample made turned out to have
        another schema): same slot, same bytes, `arrays` become views of the new layout, so
        an input at the same offset, dtype and shape in both is already in place. SchemaError
        when `schema` does not fit the slot (nothing changed; cancel and publish instead)."""
        if self._done:
            raise RingError(f"sample {self.number} was already {self._done}; loan a new slot")
        self.arrays = self._writer._retype(self, schema)
        self.schema = schema

    def cancel(self) -> None:
        """Give the slot back without publishing (idempotent; after `commit`, a no-op). What
        was written into `arrays` is never seen by a reader; the next loan reuses the slot."""
        if self._done:
            return
        self._done = "cancelled"
        self._writer._cancel(self)

    @property
    def open(self) -> bool:
        """True until `commit` or `cancel` (or the writer moved or closed)."""
        return not self._done

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
        self._drop_loan()  # its views point into this segment: never committed into the new one
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
        self._readers = ReaderTable(mm, self._reader_off, hdr.slots)
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
                            f"committed; commit or cancel it before loaning another")
        sid = schema.schema_id
        need = self._nbytes.get(sid)
        if need is None:
            need = self._learn(schema)
        n = self._n
        if self._lossless:
            self._wait_for_space(n, timeout)
        i = n % self._slots
        off = self._slot_off[i]
        sl.write_begin(self._mm, off, 2 * n + 1)
        self._loaned = Slot(self, n, off, schema, self._slot_views(i, off, schema, need))
        return self._loaned

    def next_slot_needed(self) -> bool:
        """True when a registered reader that keeps up still needs the sample the next slot
        holds: in place writers copy then (ReaderTable.next_slot_needed says which readers
        count, and why). Call once a sample."""
        self._check_open()
        return self._readers.next_slot_needed(self._n)

    def _learn(self, schema: SampleSchema) -> int:
        """First sample of this schema: check it fits (once, not per sample) and keep its
        encoding; returns its payload size."""
        sid = schema.schema_id
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
        return need

    def _slot_views(self, i: int, off: int, schema: SampleSchema, need: int
                    ) -> dict[str, np.ndarray]:
        """Write `schema`'s encoding into slot `i` (at `off`, under an odd sequence) and return
        the slot's payload views in its layout."""
        sid = schema.schema_id
        mm = self._mm
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
        return views

    def _retype(self, slot: Slot, schema: SampleSchema) -> dict[str, np.ndarray]:
        self._check_open()
        need = self._nbytes.get(schema.schema_id)
        if need is None:
            need = self._learn(schema)
        return self._slot_views(slot.number % self._slots, slot._off, schema, need)

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

    def _cancel(self, slot: Slot) -> None:
        # The sequence stays odd (2n+1) and `published` at n: see Slot. Nothing else to undo.
        if self._loaned is slot:
            self._loaned = None

    def _drop_loan(self) -> None:
        """Cancel an outstanding loan before this writer stops owning its mapping."""
        slot = self._loaned
        if slot is not None and not slot._done:
            slot._done = "cancelled (the ring moved or closed)"
        self._loaned = None

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

    def _wait_for_space(self, n: int, timeout: float | None) -> None:
        lo = self._readers.slowest()[0]
        if lo is None or n < lo + self._slots:
            return  # the common case: no clock read, no spin set-up
        mm = self._mm
        deadline = None if timeout is None else time.monotonic() + timeout
        spin_end = time.monotonic_ns() + self._spin_ns if self._spin_ns else 0
        while True:
            lo, where = self._readers.slowest()
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
            lo = self._readers.slowest()[0]
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
                self._readers.evict_dead()
            except posix_ipc.SignalError:
                pass  # NOTE [signals in waits] (ring_reader.py): the loop looks again, sleeps again

    # --- status and lifetime -----------------------------------------------------------

    def stats(self) -> RingStats:
        self._check_open()
        return _ring_stats(self._mm, self.name, self._hdr, self._reader_off)

    @property
    def published(self) -> int:
        return self._n

    def holds(self, n: int) -> bool:
        """True while sample `n`'s slot still holds it whole (nothing loaned or written over
        it since): what a view of a published sample kept by the producer checks."""
        if self._closed:
            return False
        return sl.load_acquire(self._mm, self._slot_off[n % self._slots]) == 2 * n + 2

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
        self._drop_loan()
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
