"""The producer's GPU slot pool: samples are written into GPU memory that trainer processes map
through CUDA IPC, and the shared-memory ring carries only a small descriptor (slot index, slot
sequence, payload schema) plus the ring's own metadata and seqlock. Frames never touch host memory.

    writer = open_writer(RingConfig(name="cam"), gpu="auto")   # GpuSlotWriter or RingWriter
    writer.publish(schema, meta, {"video": cuda_tensor})

Write order for sample n (why: protocol/gpu_slots.py's NOTE on torn GPU slots):
  1. loan the ring slot for n (readers see it as being written),
  2. table.begin(k, n): GPU slot k's seqlock word goes odd, on the host,
  3. device-to-device copies into slot k on the pool's side stream, after the caller's stream,
  4. event record + synchronise: the copies have finished,
  5. table.end(k): the word goes even; the descriptor is written into the loaned ring slot,
  6. commit: the ring publishes sample n.
k = n % G with G = ring slots + headroom GPU slots. In lossless mode the ring lets the writer
loan sample m only once every registered reader has moved past m - slots, so GPU slot k (next
rewritten by sample n + G) stays intact until the slowest reader is `headroom` samples past n:
a reader may have `headroom` device copies in flight, or train from a slot it holds, and
nothing is dropped.

NOTE [pool lifetime]: the producer owns the pool until close(): the table is marked closed and
unlinked first, then the ring (readers drain it and get ProducerGone), then the pool is freed.
torch's IPC ref counter from `_share_cuda_()` starts at 1 and each reader's mapping subtracts 1
when it is released, so torch keeps the freed pool out of the caching allocator ("limbo") until
the first reader lets go; with several readers that is a courtesy, not the guarantee - the
guarantee is that readers stop at ProducerGone. A reader still mapped when the producer exits
makes torch print its "Producer process has been terminated before all shared CUDA tensors
released" warning; that is expected on a producer restart under a running trainer.

Backends: "cuda" (torch's own CUDA IPC machinery: `UntypedStorage._share_cuda_()` on one
allocation holding every slot, mapped by readers with `_new_shared_cuda`) and "shm" (the same
protocol over a POSIX shared-memory pool, so the descriptor/table/seqlock logic runs and is
tested on machines without a GPU; it is never picked automatically).
"""
from __future__ import annotations

import dataclasses
import logging
import mmap
from typing import Mapping

import numpy as np
import posix_ipc
import torch

from protocol.gpu_slots import (DESCRIPTOR_MODALITY, DESCRIPTOR_SCHEMA, NO_CUDA_MESSAGE,
                                GpuDescriptor, GpuSlotTable, PoolExport, remove_stale_table,
                                say_no_cuda_once, table_name)
from protocol.errors import SchemaError
from protocol.ring import RingConfig, RingWriter
from protocol.schema import SampleMeta, SampleSchema

log = logging.getLogger(__name__)

__all__ = ["GpuSlotWriter", "GpuSlotPool", "open_writer", "choose_backend", "NO_CUDA_MESSAGE"]

SLOT_ALIGN = 4096   # slot starts: aligned for wide device loads and page-aligned in "shm"


def choose_backend(gpu: str) -> str | None:
    """`gpu` setting -> backend ("cuda" / "shm") or None for the plain host ring.

    "auto": CUDA when torch sees a device, else None (logged once); "off": None; "cuda" or
    "cuda:N": CUDA, and a clear error when there is none; "shm": the host-memory pool.
    """
    if gpu == "off":
        return None
    if gpu == "shm":
        return "shm"
    if gpu == "auto":
        if torch.cuda.is_available():
            return "cuda"
        say_no_cuda_once(log)
        return None
    if gpu == "cuda" or gpu.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"gpu={gpu!r}: torch sees no CUDA device (torch {torch.__version__},"
                               f" CUDA build {torch.version.cuda}); use gpu='auto' or 'off'")
        return "cuda"
    raise ValueError(f"gpu={gpu!r}: expected 'auto', 'off', 'cuda', 'cuda:N' or 'shm'")


def _stride(slot_bytes: int) -> int:
    return (slot_bytes + SLOT_ALIGN - 1) // SLOT_ALIGN * SLOT_ALIGN


class GpuSlotPool:
    """`slots` slots of `slot_bytes`, one allocation, exported once (`.export`)."""

    def __init__(self, ring: str, slots: int, slot_bytes: int, backend: str = "cuda",
                 device: int | str | torch.device = 0):
        self.slots, self.slot_bytes, self.stride = slots, slot_bytes, _stride(slot_bytes)
        self.backend = backend
        self._shm = self._mm = None
        size = slots * self.stride
        if backend == "cuda":
            dev = torch.device(device if not isinstance(device, int) else f"cuda:{device}")
            if dev.type != "cuda":
                raise ValueError(f"GPU slot pool: device {device!r} is not a CUDA device")
            self.device = torch.device("cuda", dev.index if dev.index is not None
                                       else torch.cuda.current_device())
            self.memory = torch.empty(size, dtype=torch.uint8, device=self.device)
            self.stream = torch.cuda.Stream(self.device)
            self.event = torch.cuda.Event()
            (dev_i, handle, nbytes, offset, ref, ref_off, ev, ev_sync) = \
                self.memory.untyped_storage()._share_cuda_()
            uuid = str(torch.cuda.get_device_properties(self.device).uuid)
            self.export = PoolExport("cuda", dev_i, uuid, bytes(handle), nbytes, offset,
                                     bytes(ref), ref_off, bytes(ev), bool(ev_sync))
        elif backend == "shm":
            self.device = torch.device("cpu")
            name = table_name(ring) + ".pool"
            try:
                posix_ipc.unlink_shared_memory(name)
            except posix_ipc.ExistentialError:
                pass
            self._shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
            self._mm = mmap.mmap(self._shm.fd, size)
            self._shm.close_fd()
            self.memory = torch.frombuffer(self._mm, dtype=torch.uint8)
            self.stream = self.event = None
            self.export = PoolExport("shm", -1, "", name.encode(), size)
        else:
            raise ValueError(f"GPU slot pool backend {backend!r}: expected 'cuda' or 'shm'")

    def slot(self, k: int) -> torch.Tensor:
        """The uint8 view of slot k (slot_bytes long)."""
        return self.memory[k * self.stride:k * self.stride + self.slot_bytes]

    def write(self, k: int, schema: SampleSchema, arrays: Mapping[str, object]) -> None:
        """Copy a sample into slot k and return only once the copies have finished: the caller
        publishes right after, and a reader may read the slot as soon as it sees that."""
        base = k * self.stride
        if self.stream is None:
            for m in schema.modalities:
                off = base + schema.offset(m.name)
                self.memory[off:off + m.nbytes].copy_(_as_bytes(arrays[m.name]))
            return
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)  # the caller's kernels that made the tensors come first
        with torch.cuda.stream(self.stream):
            for m in schema.modalities:
                off = base + schema.offset(m.name)
                self.memory[off:off + m.nbytes].copy_(_as_bytes(arrays[m.name]),
                                                      non_blocking=True)
            self.event.record(self.stream)
        self.event.synchronize()

    def close(self) -> None:
        self.memory = None
        if self.backend == "cuda":
            torch.cuda.ipc_collect()  # frees the pool once no reader maps it any more
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        if self._shm is not None:
            try:
                self._shm.unlink()
            except posix_ipc.ExistentialError:
                pass
            self._shm = None


def _as_bytes(a) -> torch.Tensor:
    """A tensor or numpy array -> flat uint8 tensor over the same memory (no copy)."""
    t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
    return t.contiguous().reshape(-1).view(torch.uint8)


def _check(schema: SampleSchema, arrays: Mapping[str, object]) -> None:
    if set(arrays) != set(schema.names):
        raise SchemaError(f"sample has modalities {sorted(arrays)}, schema expects "
                          f"{sorted(schema.names)}")
    for m in schema.modalities:
        a = arrays[m.name]
        dt = str(a.dtype).removeprefix("torch.")
        if dt != m.dtype or tuple(a.shape) != m.shape:
            raise SchemaError(f"modality {m.name!r}: expected {m.dtype}{list(m.shape)}, "
                              f"got {dt}{list(a.shape)}")


class GpuSlotWriter:
    """A RingWriter whose payloads live in a GPU slot pool. Same surface as RingWriter for the
    daemon (publish, set_generation, heartbeat, stats, published, close, context manager)."""

    def __init__(self, *_a, **_k):
        raise TypeError("use GpuSlotWriter.create(config, backend=..., device=...)")

    @classmethod
    def create(cls, config: RingConfig, *, backend: str = "cuda",
               device: int | str | torch.device = 0, headroom: int | None = None
               ) -> "GpuSlotWriter":
        """`headroom` GPU slots beyond the ring's (default: as many as the ring has) bound how
        many samples a lossless reader may copy per synchronisation."""
        if config.slot_bytes < DESCRIPTOR_SCHEMA.payload_nbytes:
            raise ValueError(f"ring {config.name}: slot_bytes {config.slot_bytes} cannot hold a "
                             f"GPU slot descriptor ({DESCRIPTOR_SCHEMA.payload_nbytes} B)")
        self = object.__new__(cls)
        self.config, self.backend = config, backend
        self.pool = self.table = None
        self.headroom = config.slots if headroom is None else int(headroom)
        if self.headroom < 1:
            raise ValueError(f"headroom={headroom}: expected at least 1 GPU slot beyond the ring's")
        self.gpu_slots = config.slots + self.headroom
        # The ring only carries descriptors: its slots need not be payload-sized in host memory.
        ring_cfg = dataclasses.replace(config, slot_bytes=DESCRIPTOR_SCHEMA.payload_nbytes)
        self.ring = RingWriter.create(ring_cfg)
        try:
            self.pool = GpuSlotPool(config.name, self.gpu_slots, config.slot_bytes, backend, device)
            self.table = GpuSlotTable.create(
                config.name, epoch=self.ring.stats().epoch, slots=self.gpu_slots,
                slot_bytes=config.slot_bytes, slot_stride=self.pool.stride,
                export=self.pool.export, mode=0o660 if config.group else 0o600)
        except BaseException:
            self.close()
            raise
        log.info("GPU slots on: %d slots of %d B on %s (%s backend)", self.gpu_slots,
                 config.slot_bytes, self.pool.device, backend)
        return self

    def publish(self, schema: SampleSchema, meta: SampleMeta, arrays: Mapping[str, object],
                timeout: float | None = None) -> int:
        """Write `arrays` (CUDA tensors; CPU tensors or numpy arrays are copied up) into the
        GPU slot of the next sample and publish its descriptor. Returns the sample number."""
        _check(schema, arrays)
        if schema.payload_nbytes > self.config.slot_bytes:
            raise SchemaError(f"ring {self.config.name}: payload of {schema.payload_nbytes} B "
                              f"exceeds the GPU slot size {self.config.slot_bytes}")
        slot = self.ring.loan(DESCRIPTOR_SCHEMA, timeout)
        k = slot.number % self.gpu_slots
        odd = self.table.begin(k, slot.number)
        try:
            self.pool.write(k, schema, arrays)
        finally:
            seq = self.table.end(k, odd)
        GpuDescriptor(k, seq, schema).pack_into(slot.arrays[DESCRIPTOR_MODALITY])
        return slot.commit(meta)

    def set_generation(self, generation: int) -> None:
        self.ring.set_generation(generation)

    def heartbeat(self) -> None:
        self.ring.heartbeat()

    def stats(self):
        return self.ring.stats()

    @property
    def published(self) -> int:
        return self.ring.published

    def close(self) -> None:
        """Table first (readers stop mapping), then ring, then the pool. Idempotent."""
        if self.table is not None:
            self.table.close()
            self.table = None
        if getattr(self, "ring", None) is not None:
            self.ring.close()
            self.ring = None
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def __enter__(self) -> "GpuSlotWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GpuSlotWriter({self.config.name}, {self.config.slots} x {self.config.slot_bytes} B)"


def open_writer(config: RingConfig, gpu: str = "auto",
                device: int | str | torch.device = 0) -> GpuSlotWriter | RingWriter:
    """The producer's ring: GPU slots when `gpu` selects them (see choose_backend), else the
    host ring as before (and a GPU table left by an earlier producer of that name is removed)."""
    backend = choose_backend(gpu)
    if backend is None:
        writer = RingWriter.create(config)
        remove_stale_table(config.name)
        return writer
    return GpuSlotWriter.create(config, backend=backend, device=device)
