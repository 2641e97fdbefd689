"""The trainer's side of GPU ring slots: map the producer's slot pool once per producer start
(epoch) and copy slot -> batch on the GPU, device to device. The CPU ring delivers only the
descriptor (slot index, slot sequence, payload schema) with the sample's meta.

    reader = open_reader("cam", device="auto")     # GpuRingReader, or RingReader on the host path
    got = reader.receive_batch_into(batch_u8)       # batch_u8: uint8 CUDA (B, >= payload)

Why a copy is checked after it finished: in lossy mode the producer may rewrite a slot while
we copy it. The slot's seqlock word (protocol/gpu_slots.py) is compared with the descriptor's
sequence before the copy is enqueued and again after the copy's event has completed; a slot
that changed is dropped and replaced by the next sample, never returned torn. In lossless mode
the ring holds the producer back until this reader has moved past a sample, so
`receive_slot()` can hand out tensors that alias the slot itself (see NOTE [view lifetime]).

NOTE [stream order]: the reader copies on its own CUDA stream. Before its first copy into
`out` that stream waits for the caller's current stream (the previous step may still read
`out`), and every copy has finished (event synchronised) when receive_batch_into returns, so
the caller may use `out` on any stream without waiting for ours.

NOTE [view lifetime]: GPU slot k is rewritten by sample n + G (G = ring slots + headroom), and a
lossless producer may loan that sample once this reader's position passes n + headroom. Kernels
that read a view run asynchronously, so "valid until the next receive call" is not enough on a
GPU: each receive_slot() records an event on the caller's stream before it moves the position,
and waits for the event recorded `headroom` calls earlier, i.e. for the work that used the view
whose slot the producer may reach next. In steady state that event has long completed.

Fallback: `open_reader(device="auto")` without CUDA returns the host RingReader and logs once
"no CUDA device: GPU slots off, frames go through host shared memory"; a ring whose producer
keeps frames in GPU memory cannot be read without CUDA, and says so.
"""
from __future__ import annotations

import logging
import mmap
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import posix_ipc
import torch

from protocol.errors import RingError, SchemaError
from protocol.gpu_slots import (DESCRIPTOR_BYTES, NO_CUDA_MESSAGE, GpuDescriptor, GpuSlotTable,
                                GpuTableError, StaleGpuTable, is_descriptor, say_no_cuda_once)
from protocol.ring import RingReader
from protocol.schema import SampleMeta, SampleSchema

log = logging.getLogger(__name__)

__all__ = ["GpuRingReader", "GpuSlotView", "GpuReaderStats", "open_reader", "select_path",
           "gpu_slot_refusal", "NO_CUDA_MESSAGE"]



@dataclass(frozen=True)
class GpuReaderStats:
    received: int      # samples returned
    dropped: int       # GPU slot rewritten before or during our copy (lossy), never returned
    mappings: int      # pool mappings made (1 per producer start: handles are mapped once)
    copies: int        # device-to-device slot copies enqueued
    syncs: int         # host waits on the copy event


class _MappedPool:
    """The producer's slot pool, mapped into this process (once)."""

    def __init__(self, table: GpuSlotTable, device: torch.device):
        ex = table.export
        self.stride, self.slot_bytes, self._mm = table.slot_stride, table.slot_bytes, None
        if ex.backend == "cuda":
            local = _local_cuda_index(ex.device_uuid, ex.device)
            # torch's CUDA IPC import (what torch.multiprocessing's rebuild_cuda_tensor calls):
            # cudaIpcOpenMemHandle once per handle and process (the allocator caches it), waits
            # on the producer's export event, and decrements torch's shared ref counter on free.
            storage = torch.UntypedStorage._new_shared_cuda(
                local, ex.handle, ex.pool_bytes, ex.pool_offset, ex.ref_counter,
                ex.ref_counter_offset, ex.event_handle, ex.event_sync)
            self.memory = torch.empty(0, dtype=torch.uint8, device=f"cuda:{local}").set_(
                storage, 0, (ex.pool_bytes,), (1,))
        else:
            shm = posix_ipc.SharedMemory(ex.handle.decode())
            try:
                self._mm = mmap.mmap(shm.fd, ex.pool_bytes)
            finally:
                shm.close_fd()
            self.memory = torch.frombuffer(self._mm, dtype=torch.uint8)

    def slot(self, k: int) -> torch.Tensor:
        return self.memory[k * self.stride:k * self.stride + self.slot_bytes]

    def close(self) -> None:
        self.memory = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a GpuSlotView still aliases it; the mapping goes with it
                pass
            self._mm = None


def _local_cuda_index(uuid: str, fallback: int) -> int:
    """The producer names its GPU by uuid: CUDA_VISIBLE_DEVICES may number it differently here."""
    for i in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(i).uuid) == uuid:
            return i
    if not uuid and fallback < torch.cuda.device_count():
        return fallback
    raise GpuTableError(f"GPU slots live on GPU {uuid}, which this process cannot see "
                        f"({torch.cuda.device_count()} visible; check CUDA_VISIBLE_DEVICES)")


class GpuSlotView:
    """A sample that aliases its GPU slot (`tensors`). Lossless: valid until this reader's next
    receive call. Lossy: check `still_valid()` after use and discard the result when False."""

    __slots__ = ("schema", "meta", "tensors", "number", "_table", "_slot", "_seq")

    def __init__(self, schema, meta, tensors, table, slot, seq):
        self.schema, self.meta, self.tensors = schema, meta, tensors
        self._table, self._slot, self._seq = table, slot, seq

    def still_valid(self) -> bool:
        """True when the slot still holds this sample. On CUDA, synchronise the work that
        read `tensors` first: the check must come after the reads it vouches for."""
        return self._table.seq_after(self._slot) == self._seq

    def __repr__(self) -> str:
        return f"GpuSlotView(slot {self._slot}, {self.schema!r})"


def _views(schema: SampleSchema, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {}
    for m in schema.modalities:
        off = schema.offset(m.name)
        dt = getattr(torch, m.dtype)
        out[m.name] = flat[off:off + m.nbytes].view(dt).view(m.shape)
    return out


class GpuRingReader:
    """A reader of a ring whose producer writes into GPU slots. One per thread, like RingReader.
    The descriptor comes through the host ring (seqlock-checked there), the payload by a device
    copy checked against the slot's own seqlock."""

    def __init__(self, *_a, **_k):
        raise TypeError("use GpuRingReader.attach(name, device=...)")

    @classmethod
    def attach(cls, name: str, *, device: str | torch.device | None = None,
               start: str = "newest", register: bool = True) -> "GpuRingReader":
        self = object.__new__(cls)
        self.ring = None
        self._table = self._pool = None
        self.ring = RingReader.attach(name, start=start, register=register)
        try:
            if device is None:
                device = "cuda" if torch.cuda.is_available() else "cpu"
            self.device = torch.device(device)
            self._cuda = self.device.type == "cuda"
            self._stream = torch.cuda.Stream(self.device) if self._cuda else None
            self._event = torch.cuda.Event() if self._cuda else None
            self._desc = np.empty(DESCRIPTOR_BYTES, np.uint8)
            self._schemas: dict[int, SampleSchema] = {}
            self._held = None          # a descriptor of another schema, for the next batch
            self._view_events: list = []   # NOTE [view lifetime]: one per receive_slot call
            self._view_calls = 0
            self._lossless = self.ring.ring_stats().mode == "lossless"
            self._ring_slots = self.ring.ring_stats().slots
            self._received = self._dropped = self._mappings = self._copies = self._syncs = 0
        except BaseException:
            self.close()
            raise
        return self

    # --- mapping ---------------------------------------------------------------------------

    def _ensure_mapped(self) -> None:
        if self._pool is not None:
            return
        self._table = GpuSlotTable.attach(self.ring.name, self.ring.epoch)
        self._pool = _MappedPool(self._table, self.device)
        self._mappings += 1
        # How many copies may be in flight before one must finish (see producer/gpu_slot_writer.py).
        self._window = max(1, self._table.slots - self._ring_slots)

    # --- receiving -------------------------------------------------------------------------

    def _next_descriptor(self, timeout):
        """(GpuDescriptor, SampleMeta) of the next sample, or None on timeout."""
        if self._held is not None:
            got, self._held = self._held, None
            return got
        got = self.ring.receive_into(self._desc, timeout)
        if got is None:
            return None
        schema, meta = got
        if not is_descriptor(schema):
            raise SchemaError(
                f"ring {self.ring.name}: sample {meta.index} ({schema!r}) carries its payload in "
                f"host memory, not a GPU slot descriptor: its producer does not use GPU slots; "
                f"attach with trainer.gpu_slot_reader.open_reader(), which picks the host path "
                f"then")
        self._ensure_mapped()
        return GpuDescriptor.unpack_from(self._desc, self._schemas), meta

    def peek(self, timeout: float | None = None) -> SampleSchema | None:
        """The schema of the next sample, without consuming it (None on timeout): a loader
        picks the batch buffer for that schema, then calls receive_batch_into."""
        if self._held is None:
            got = self._next_descriptor(timeout)
            if got is None:
                return None
            self._held = got
        return self._held[0].schema

    def receive_into(self, out: torch.Tensor, timeout: float | None = None
                     ) -> tuple[SampleSchema, SampleMeta] | None:
        """Copy the next sample's payload (device to device) into `out`, a uint8 tensor of at
        least the payload's size; `trainer.gpu_slot_reader._views(schema, out)` gives the arrays."""
        got = self.receive_batch_into(out.reshape(1, -1), timeout)
        return None if got is None else (got[0], got[1][0])

    def receive_batch_into(self, out: torch.Tensor, timeout: float | None = None
                           ) -> tuple[SampleSchema, list[SampleMeta]] | None:
        """Fill rows of `out` (uint8 (B, >= payload), on this reader's device) with the next
        samples of ONE schema; a sample of another schema waits for the next call. Returns
        (schema, metas) for rows 0..len(metas)-1 (fewer than B when `timeout` passed first),
        or None when nothing arrived. One host wait per `window` copies, not one per sample."""
        if out.dtype != torch.uint8 or out.dim() != 2:
            raise ValueError(f"receive_batch_into: expected a uint8 (B, N) tensor, got "
                             f"{out.dtype} {tuple(out.shape)}")
        self._retire_views()
        if self._stream is not None and out.is_cuda:
            self._stream.wait_stream(torch.cuda.current_stream(out.device))  # NOTE [stream order]
        deadline = None if timeout is None else time.monotonic() + timeout
        schema, metas, flight = None, [], []   # flight: (row, slot, seq) not yet checked
        stop = False
        while not stop and len(metas) < out.shape[0]:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            got = self._next_descriptor(left)
            if got is None:
                stop = True                          # timed out: return what we have
            else:
                d, meta = got
                if schema is None:
                    schema = d.schema
                    self._check_out(out, schema)
                if d.schema.schema_id != schema.schema_id:
                    self._held, stop = got, True     # another schema: the next batch's
                elif self._table.seq(d.slot) != d.seq:
                    self._dropped += 1               # rewritten before we got to it
                else:
                    row, nb = len(metas), schema.payload_nbytes
                    self._copy(out[row, :nb], self._pool.slot(d.slot)[:nb])
                    flight.append((row, d.slot, d.seq))
                    metas.append(meta)
            # Settle when the batch is full, when we stop, or (lossless) before the producer
            # could reach a slot still being copied; dropped rows are then refilled.
            if flight and (stop or len(metas) == out.shape[0]
                           or (self._lossless and len(flight) >= self._window)):
                metas = self._settle(out, metas, flight)
                flight = []
        if not metas:
            return None
        self._received += len(metas)
        return schema, metas

    def _check_out(self, out: torch.Tensor, schema: SampleSchema) -> None:
        if schema.payload_nbytes > out.shape[1]:
            raise ValueError(f"receive_batch_into: rows of {out.shape[1]} B are smaller than "
                             f"the payload of {schema.payload_nbytes} B")
        if out.device != self._pool.memory.device and not (
                self._cuda and out.device.type == "cuda"):
            raise ValueError(f"receive_batch_into: out is on {out.device}, the GPU slots on "
                             f"{self._pool.memory.device}")

    def _copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if self._stream is None:
            dst.copy_(src)
        else:
            with torch.cuda.stream(self._stream):
                dst.copy_(src, non_blocking=True)
        self._copies += 1

    def _sync(self) -> None:
        if self._stream is not None:
            self._event.record(self._stream)
            self._event.synchronize()
            self._syncs += 1

    def _settle(self, out, metas, flight):
        """Wait for the copies in `flight`, then keep only rows whose slot did not change;
        later rows move down over dropped ones so rows 0..len-1 stay dense."""
        self._sync()
        bad = {row for row, slot, seq in flight if self._table.seq_after(slot) != seq}
        if not bad:
            return metas
        self._dropped += len(bad)
        keep = [r for r in range(len(metas)) if r not in bad]
        # Row `old` >= `new` and rows below `old` were never a source again: a plain row copy
        # on our stream, no temporary (a clone on another stream would race with it).
        for new, old in enumerate(keep):
            if new != old:
                self._copy(out[new], out[old])
        self._sync()
        return [metas[r] for r in keep]

    def _guard_view(self) -> None:
        """NOTE [view lifetime]: before this call moves the ring position, wait for the work
        enqueued before the call `headroom` calls ago (lossless CUDA views only)."""
        if self._stream is None or not self._lossless or self._pool is None:
            return
        h = self._window
        if len(self._view_events) != h + 1:
            self._view_events = [torch.cuda.Event() for _ in range(h + 1)]
            self._view_calls = 0
        c = self._view_calls
        if c >= h:
            self._view_events[(c - h) % (h + 1)].synchronize()
        self._view_events[c % (h + 1)].record(torch.cuda.current_stream(self.device))
        self._view_calls = c + 1

    def _retire_views(self) -> None:
        """Before a copying receive moves the position: every view handed out is done with."""
        if self._view_calls:
            torch.cuda.current_stream(self.device).synchronize()
            self._view_calls = 0

    def receive_slot(self, timeout: float | None = None) -> GpuSlotView | None:
        """Zero-copy: tensors aliasing the GPU slot. Lossless: the slot is not rewritten before
        this reader has made `headroom` more receive calls, and on CUDA those calls wait for
        the work queued on the caller's stream (NOTE [view lifetime]). Lossy: call
        `still_valid()` after using the tensors and discard the result when it is False.
        None when nothing arrived within `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._guard_view()
            got = self._next_view_descriptor(
                None if deadline is None else max(0.0, deadline - time.monotonic()))
            if got is None:
                return None
            d, meta = got
            if self._table.seq(d.slot) != d.seq:
                self._dropped += 1       # lapped before we looked: the next one
                continue
            flat = self._pool.slot(d.slot)[:d.schema.payload_nbytes]
            self._received += 1
            return GpuSlotView(d.schema, meta, _views(d.schema, flat), self._table, d.slot,
                               d.seq)

    def _next_view_descriptor(self, timeout):
        if self._held is not None:
            got, self._held = self._held, None
            return got
        while True:
            view = self.ring.receive_view(timeout)
            if view is None:
                return None
            if not is_descriptor(view.schema):
                raise SchemaError(f"ring {self.ring.name}: sample {view.meta.index} is not a GPU "
                                  f"slot descriptor; its producer does not use GPU slots")
            np.copyto(self._desc, next(iter(view.arrays.values())))
            if view.still_valid():
                break
            self._dropped += 1           # lossy ring slot overwritten while we read it
        self._ensure_mapped()
        return GpuDescriptor.unpack_from(self._desc, self._schemas), view.meta

    # --- the rest --------------------------------------------------------------------------

    def stats(self) -> GpuReaderStats:
        return GpuReaderStats(self._received, self._dropped, self._mappings, self._copies,
                              self._syncs)

    @property
    def epoch(self) -> int:
        return self.ring.epoch

    def close(self) -> None:
        """Drop the mapping (torch unmaps it once no tensor aliases it) and the ring. Idempotent."""
        if getattr(self, "_pool", None) is not None:
            self._pool.close()
            self._pool = None
        if getattr(self, "_table", None) is not None:
            self._table.close()
            self._table = None
        if getattr(self, "ring", None) is not None:
            self.ring.close()
            self.ring = None

    def __enter__(self) -> "GpuRingReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


views = _views


def select_path(name: str, device: str | torch.device | None = "auto") -> str:
    """"gpu-slots" when this process has CUDA (and `device` allows it) and ring `name`'s
    producer publishes a live GPU slot table; else "host". Raises RingError when the producer
    keeps frames in GPU memory but this process has no CUDA: such a ring cannot be read here."""
    want_cuda = device == "auto" or device is None or torch.device(device).type == "cuda"
    probe = RingReader.attach(name, register=False)
    backend = None
    try:
        table = GpuSlotTable.attach(probe.name, probe.epoch)
        backend = table.export.backend
        table.close()
    except (StaleGpuTable, GpuTableError):
        pass  # no table, or one left by an earlier producer: the host ring
    finally:
        probe.close()
    has_table = backend is not None
    cuda = torch.cuda.is_available()
    if backend == "cuda" and not (cuda and want_cuda):
        raise RingError(
            f"ring {name}: its producer keeps frames in GPU memory (GPU slots) and this process "
            f"has {'no CUDA device' if not cuda else f'device={device!r}'}; run the producer "
            f"with GPU slots off (gpu='off') or this trainer on the producer's GPU")
    if not cuda:
        say_no_cuda_once(log)
    return "gpu-slots" if has_table else "host"


def gpu_slot_refusal(ring: RingReader) -> str | None:
    """Why a host-memory reader cannot train from `ring`, or None when it can: the ring's
    producer (this epoch) publishes GPU slot descriptors, so its frames are not in the ring."""
    try:
        table = GpuSlotTable.attach(ring.name, ring.epoch)
    except (StaleGpuTable, GpuTableError):
        return None
    backend = table.export.backend
    table.close()
    where = "GPU memory (CUDA IPC slots)" if backend == "cuda" else f"a {backend} slot pool"
    return (f"ring {ring.name.lstrip('/')}: its producer keeps frames in {where} and the ring "
            f"carries only slot descriptors; this trainer reads host memory ("
            f"{'no CUDA device' if not torch.cuda.is_available() else 'device is not CUDA'}). "
            f"Run the producer with --device cpu, or the trainer with --device cuda on the "
            f"producer's machine")


def open_reader(name: str, device: str | torch.device | None = "auto", **attach_kw
                ) -> GpuRingReader | RingReader:
    """The trainer's reader for ring `name`: GpuRingReader on the GPU slot path, else the host
    RingReader (see select_path for the choice and its one log line)."""
    if select_path(name, device) == "gpu-slots":
        dev = None if device in (None, "auto") else device
        return GpuRingReader.attach(name, device=dev, **attach_kw)
    return RingReader.attach(name, **attach_kw)
