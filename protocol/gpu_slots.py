"""GPU ring slots, the wire side: the slot descriptor that travels through the CPU ring and the
GPU slot table (a sidecar shared-memory segment `<ring>.gpu`) that tells readers how to map the
producer's GPU memory. No torch here (protocol/ never imports it): the producer's pool is in
producer/gpu_slot_writer.py, the trainer's mapping in trainer/gpu_slot_reader.py and its loader
thread in trainer/gpu_slot_loader.py. docs/gpu.md has the picture.

Why a sidecar and not the ring header: the ring's byte layout belongs to protocol/ring.py and is
versioned on its own; the GPU table changes for other reasons (CUDA handle formats). The sidecar
carries the ring's epoch, so a table left by an earlier producer is never trusted.

Failures this module exists to prevent:

* A torn GPU slot. Each GPU slot has a seqlock word in the table (one cache line each). The
  producer makes it odd (2n+1 for sample n) on the host BEFORE it enqueues the device copy into
  the slot, waits for the copy to finish (CUDA event), then makes it even (2n+2) and only then
  publishes the descriptor. A reader checks the word equals the descriptor's `seq` before its
  device-to-device copy (`seq`, an acquire load) and again after that copy has finished, host
  synchronised (`seq_after`, acquire fence + load): any rewrite that overlapped the copy was
  enqueued after its odd host store, so the second check sees it. The ordering assumed: the
  odd store is visible before the producer's copy is enqueued (write_begin's release fence;
  the CUDA driver's doorbell is a later store), and the even store after the producer's event
  completed (write_end is a release store). x86 gives both for free, Arm needs the fences.
* Reading a stale table. Magic, version and the ring epoch are checked before any other byte is
  trusted; a reader of another version gets `VersionMismatch` naming both.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np
import posix_ipc

from . import _seqlock as sl
from .errors import NotARing, RingError, SchemaError, VersionMismatch
from .schema import ModalitySpec, SampleSchema

#: Said once per process side (the producer's writer, the trainer's reader) when CUDA is
#: missing and GPU slots quietly fall back to the host ring: the one wording of that fact.
NO_CUDA_MESSAGE = "no CUDA device: GPU slots off, frames go through host shared memory"
_no_cuda_said: set[str] = set()   # names of the loggers that said it


def say_no_cuda_once(log) -> None:
    """Log NO_CUDA_MESSAGE at INFO on `log`, the first time for that logger only."""
    if log.name not in _no_cuda_said:
        _no_cuda_said.add(log.name)
        log.info(NO_CUDA_MESSAGE)

__all__ = ["GpuDescriptor", "DESCRIPTOR_SCHEMA", "DESCRIPTOR_BYTES", "is_descriptor",
           "PoolExport", "GpuSlotTable", "GpuTableError", "StaleGpuTable", "table_name",
           "GPU_TABLE_VERSION", "BACKENDS"]

# --- the descriptor: one CPU-ring sample per GPU sample -----------------------------------
#
#  off size field
#    0    4 magic b"MGD1"
#    4    2 version (DESCRIPTOR_VERSION)
#    6    2 flags (0)
#    8    4 GPU slot index
#   12    4 reserved
#   16    8 seq: the slot's seqlock value once written (2n+2)
#   24    8 payload schema_id
#   32    8 payload bytes
#   40    4 schema encoding length L
#   44    L schema encoding (SampleSchema.encode(), precomputed bytes, never re-serialised)
# The sample's SampleMeta (label, generation, timestamp, source, index) is the ring's own.
DESC_MAGIC = b"MGD1"
DESCRIPTOR_VERSION = 1
DESC_STRUCT = struct.Struct("<4sHHIIQQQI")
DESCRIPTOR_BYTES = 4096
DESCRIPTOR_MODALITY = "mmfeed.gpu_slot"
DESCRIPTOR_SCHEMA = SampleSchema((ModalitySpec(DESCRIPTOR_MODALITY, "uint8", (DESCRIPTOR_BYTES,)),))
_SCHEMA_ROOM = DESCRIPTOR_BYTES - DESC_STRUCT.size


def is_descriptor(schema: SampleSchema) -> bool:
    """True for a ring sample that points at a GPU slot instead of carrying the payload."""
    return schema.schema_id == DESCRIPTOR_SCHEMA.schema_id


@dataclass(frozen=True)
class GpuDescriptor:
    slot: int
    seq: int
    schema: SampleSchema

    def pack_into(self, buf: np.ndarray) -> None:
        """Write into the descriptor modality's uint8 array (DESCRIPTOR_BYTES)."""
        enc = self.schema.encode()
        if len(enc) > _SCHEMA_ROOM:
            raise SchemaError(f"GPU slot descriptor: schema encoding of {len(enc)} bytes exceeds "
                              f"the {_SCHEMA_ROOM} bytes a descriptor holds")
        DESC_STRUCT.pack_into(buf, 0, DESC_MAGIC, DESCRIPTOR_VERSION, 0, self.slot, 0, self.seq,
                              self.schema.schema_id, self.schema.payload_nbytes, len(enc))
        buf[DESC_STRUCT.size:DESC_STRUCT.size + len(enc)] = np.frombuffer(enc, np.uint8)

    @classmethod
    def unpack_from(cls, buf, schemas: dict[int, SampleSchema] | None = None) -> "GpuDescriptor":
        """Inverse of pack_into. `schemas` caches decoded schemas by id: the JSON is parsed once
        per schema, not per sample. Raises SchemaError on anything that is not a descriptor."""
        if len(buf) < DESC_STRUCT.size:
            raise SchemaError(f"GPU slot descriptor: {len(buf)} bytes, expected {DESCRIPTOR_BYTES}")
        magic, ver, _f, slot, _r, seq, sid, nbytes, slen = DESC_STRUCT.unpack_from(buf, 0)
        if magic != DESC_MAGIC:
            raise SchemaError(f"GPU slot descriptor: magic {magic!r}, expected {DESC_MAGIC!r}")
        if ver != DESCRIPTOR_VERSION:
            raise VersionMismatch("GPU slot descriptor", ver, DESCRIPTOR_VERSION)
        schema = None if schemas is None else schemas.get(sid)
        if schema is None:
            if not 0 < slen <= _SCHEMA_ROOM:
                raise SchemaError(f"GPU slot descriptor: schema length {slen}, expected "
                                  f"1..{_SCHEMA_ROOM}")
            schema = SampleSchema.decode(bytes(buf[DESC_STRUCT.size:DESC_STRUCT.size + slen]))
            if schema.schema_id != sid or schema.payload_nbytes != nbytes:
                raise SchemaError(f"GPU slot descriptor: schema encoding hashes to "
                                  f"{schema.schema_id:#x} ({schema.payload_nbytes} B), descriptor "
                                  f"says {sid:#x} ({nbytes} B)")
            if schemas is not None:
                schemas[sid] = schema
        return cls(slot, seq, schema)


# --- the GPU slot table: sidecar segment `<ring>.gpu` --------------------------------------
#
#  off  size field
#    0     8 magic b"MMFGPUT\0"
#    8     4 version (GPU_TABLE_VERSION)
#   12     4 slots
#   16     8 state (atomic): 0 starting, 1 live, 2 closed
#   24     8 epoch of the ring this table belongs to
#   32     8 slot_bytes (max payload per slot)
#   40     8 slot_stride (bytes between slot starts in the pool)
#   48     8 pool_bytes (size of the exported storage)
#   56     8 pool_offset (storage offset inside the exported allocation)
#   64     8 ref_counter_offset (torch's CUDA IPC ref counter)
#   72     4 device index (producer's numbering)
#   76     4 producer pid
#   80    16 backend name ("cuda" | "shm"), NUL padded
#   96     2 handle length, 2 ref counter length, 2 event handle length, 1 event sync, 1 pad
#  104    40 device uuid (str), NUL padded
#  256  1024 memory handle (cudaIpcMemHandle, or torch's expandable-segment handle; or shm name)
# 1280   256 ref counter handle (torch: name of its shared ref-counter file)
# 1536    64 event handle (cudaIpcEventHandle)
# 2048 + 64*i: slot i's seqlock word (u64), one cache line per slot
TABLE_MAGIC = b"MMFGPUT\0"
GPU_TABLE_VERSION = 1
_HEAD = struct.Struct("<8sII")                  # magic, version, slots
_INFO = struct.Struct("<QQQQQQiI16sHHHBx40s")   # from offset 24
_STATE_OFF, _INFO_OFF = 16, 24
_HANDLE_OFF, _HANDLE_MAX = 256, 1024
_REF_OFF, _REF_MAX = 1280, 256
_EVENT_OFF, _EVENT_MAX = 1536, 64
_SLOTS_OFF, _SLOT_WORD = 2048, 64
STATE_STARTING, STATE_LIVE, STATE_CLOSED = 0, 1, 2
BACKENDS = ("cuda", "shm")


def table_name(ring: str) -> str:
    """POSIX name of the sidecar for ring `ring` ("/cam" -> "/cam.gpu")."""
    bare = ring[1:] if ring.startswith("/") else ring
    return "/" + bare + ".gpu"


class GpuTableError(RingError):
    """The GPU slot table is missing, damaged, or does not fit this reader."""


class StaleGpuTable(GpuTableError):
    """The table belongs to another producer start than the ring (epoch differs)."""


@dataclass(frozen=True)
class PoolExport:
    """What a reader needs to map the producer's slot pool: the fields of torch's
    `UntypedStorage._share_cuda_()` for backend "cuda", a POSIX shm name for backend "shm"."""

    backend: str
    device: int
    device_uuid: str
    handle: bytes
    pool_bytes: int
    pool_offset: int = 0
    ref_counter: bytes = b""
    ref_counter_offset: int = 0
    event_handle: bytes = b""
    event_sync: bool = False

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r}: expected one of {BACKENDS}")
        for what, v, cap in (("handle", self.handle, _HANDLE_MAX),
                             ("ref_counter", self.ref_counter, _REF_MAX),
                             ("event_handle", self.event_handle, _EVENT_MAX)):
            if len(v) > cap:
                raise GpuTableError(f"GPU slot table: {what} of {len(v)} bytes exceeds {cap}")


class GpuSlotTable:
    """The sidecar segment. The producer `create()`s it (after its ring, with the ring's epoch)
    and `close()`s it (unlinks); readers `attach()` and check it against their ring's epoch.
    `begin(slot, n)` / `end(slot, odd)` / `seq(slot)` are the per-slot seqlock."""

    _mm = None
    _shm = None
    _owner = False

    def __init__(self, *_a, **_k):
        raise TypeError("use GpuSlotTable.create(...) or GpuSlotTable.attach(...)")

    @staticmethod
    def nbytes(slots: int) -> int:
        return _SLOTS_OFF + _SLOT_WORD * slots

    @classmethod
    def create(cls, ring: str, *, epoch: int, slots: int, slot_bytes: int, slot_stride: int,
               export: PoolExport, mode: int = 0o600) -> "GpuSlotTable":
        """Write the table for a ring the caller has just created (it owns the name, so any
        table already there is stale and is replaced). State goes live last."""
        self = object.__new__(cls)
        self.name = table_name(ring)
        try:
            posix_ipc.unlink_shared_memory(self.name)
        except posix_ipc.ExistentialError:
            pass
        self._shm = posix_ipc.SharedMemory(self.name, posix_ipc.O_CREX, mode=mode,
                                           size=cls.nbytes(slots))
        self._owner = True
        try:
            self._mm = mmap.mmap(self._shm.fd, cls.nbytes(slots))
            self._shm.close_fd()
            _HEAD.pack_into(self._mm, 0, TABLE_MAGIC, GPU_TABLE_VERSION, slots)
            _INFO.pack_into(self._mm, _INFO_OFF, epoch, slot_bytes, slot_stride,
                            export.pool_bytes, export.pool_offset, export.ref_counter_offset,
                            export.device, os.getpid(), export.backend.encode(),
                            len(export.handle), len(export.ref_counter), len(export.event_handle),
                            int(export.event_sync), export.device_uuid.encode()[:40])
            self._mm[_HANDLE_OFF:_HANDLE_OFF + len(export.handle)] = export.handle
            self._mm[_REF_OFF:_REF_OFF + len(export.ref_counter)] = export.ref_counter
            self._mm[_EVENT_OFF:_EVENT_OFF + len(export.event_handle)] = export.event_handle
            self._load(epoch)
            sl.store_release(self._mm, _STATE_OFF, STATE_LIVE)
        except BaseException:
            self.close()
            raise
        return self

    @classmethod
    def attach(cls, ring: str, epoch: int) -> "GpuSlotTable":
        """Open and check the table of ring `ring` whose header says `epoch`.
        GpuTableError (missing/not live), NotARing (magic), VersionMismatch, StaleGpuTable."""
        self = object.__new__(cls)
        self.name = table_name(ring)
        try:
            self._shm = posix_ipc.SharedMemory(self.name)
        except posix_ipc.ExistentialError:
            raise GpuTableError(f"no GPU slot table {self.name}: the producer of ring "
                                f"{ring.lstrip('/')} does not use GPU slots") from None
        try:
            size = os.fstat(self._shm.fd).st_size
            if size < _SLOTS_OFF:
                raise NotARing(f"{self.name}: {size} bytes, too small for a GPU slot table")
            self._mm = mmap.mmap(self._shm.fd, size)
            self._shm.close_fd()
            magic, version, slots = _HEAD.unpack_from(self._mm, 0)
            if magic != TABLE_MAGIC:
                raise NotARing(f"{self.name} is not an mmfeed GPU slot table (magic {magic!r}, "
                               f"expected {TABLE_MAGIC!r})")
            if version != GPU_TABLE_VERSION:
                raise VersionMismatch(f"GPU slot table {self.name}", version, GPU_TABLE_VERSION)
            if size < cls.nbytes(slots):
                raise NotARing(f"{self.name}: {size} bytes, {slots} slots need "
                               f"{cls.nbytes(slots)}")
            state = sl.load_acquire(self._mm, _STATE_OFF)
            self._load(None)
            if self.epoch != epoch:
                raise StaleGpuTable(f"GPU slot table {self.name} belongs to producer epoch "
                                    f"{self.epoch:#x} (pid {self.producer_pid}), the ring has "
                                    f"epoch {epoch:#x}: left by an earlier producer")
            if state != STATE_LIVE:
                raise GpuTableError(f"GPU slot table {self.name} is "
                                    f"{'starting' if state == STATE_STARTING else 'closed'}")
        except BaseException:
            self.close()
            raise
        return self

    def _load(self, epoch: int | None) -> None:
        (ep, self.slot_bytes, self.slot_stride, pool_bytes, pool_offset, ref_off, device, pid,
         backend, hlen, rlen, elen, esync, uuid) = _INFO.unpack_from(self._mm, _INFO_OFF)
        self.slots = _HEAD.unpack_from(self._mm, 0)[2]
        self.epoch = ep if epoch is None else epoch
        self.producer_pid = pid
        backend_s = backend.rstrip(b"\0").decode("ascii", "replace")
        if backend_s not in BACKENDS or hlen > _HANDLE_MAX or rlen > _REF_MAX or elen > _EVENT_MAX:
            raise NotARing(f"{self.name}: damaged GPU slot table (backend {backend_s!r}, handle "
                           f"lengths {hlen}/{rlen}/{elen})")
        self.export = PoolExport(
            backend=backend_s, device=device, device_uuid=uuid.rstrip(b"\0").decode(),
            handle=bytes(self._mm[_HANDLE_OFF:_HANDLE_OFF + hlen]), pool_bytes=pool_bytes,
            pool_offset=pool_offset, ref_counter=bytes(self._mm[_REF_OFF:_REF_OFF + rlen]),
            ref_counter_offset=ref_off, event_handle=bytes(self._mm[_EVENT_OFF:_EVENT_OFF + elen]),
            event_sync=bool(esync))

    # --- per-slot seqlock ----------------------------------------------------------------

    def _word(self, slot: int) -> int:
        if not 0 <= slot < self.slots:
            raise GpuTableError(f"{self.name}: GPU slot {slot} out of range 0..{self.slots - 1}")
        return _SLOTS_OFF + _SLOT_WORD * slot

    def begin(self, slot: int, number: int) -> int:
        """Producer: mark `slot` as being written with sample `number`; returns the odd seq."""
        return sl.write_begin(self._mm, self._word(slot), 2 * number + 1)

    def end(self, slot: int, odd: int) -> int:
        """Producer: the slot's device writes have finished; returns the even seq readers want."""
        sl.write_end(self._mm, self._word(slot), odd)
        return odd + 1

    def seq(self, slot: int) -> int:
        """Reader, BEFORE using a slot: the word, loaded with acquire, so the device copy the
        caller enqueues next (stores into the CUDA push buffer) cannot be ordered before it."""
        return sl.load_acquire(self._mm, self._word(slot))

    def seq_after(self, slot: int) -> int:
        """Reader, AFTER a copy finished (event synchronised) or a view was used: an acquire
        fence, then the word, so the loads that saw the copy finish come before this load."""
        return sl.validate(self._mm, self._word(slot))

    def mark_closed(self) -> None:
        if self._mm is not None:
            sl.store_release(self._mm, _STATE_OFF, STATE_CLOSED)

    def close(self) -> None:
        """Detach; the producer's table is also marked closed and unlinked. Idempotent."""
        if self._owner and self._mm is not None:
            self.mark_closed()
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        if self._shm is not None:
            if self._owner:
                try:
                    self._shm.unlink()
                except posix_ipc.ExistentialError:
                    pass
            try:
                self._shm.close_fd()
            except Exception:  # noqa: BLE001 - already closed
                pass
            self._shm = None
        self._owner = False

    def __enter__(self) -> "GpuSlotTable":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"GpuSlotTable({self.name}, {getattr(self, 'slots', '?')} slots of "
                f"{getattr(self, 'slot_bytes', '?')} B, epoch {getattr(self, 'epoch', 0):#x})")


def remove_stale_table(ring: str) -> bool:
    """Unlink `<ring>.gpu` (the caller just created ring `ring` without GPU slots, so any table
    there was left by an earlier producer). True when one was removed."""
    try:
        posix_ipc.unlink_shared_memory(table_name(ring))
        return True
    except posix_ipc.ExistentialError:
        return False
