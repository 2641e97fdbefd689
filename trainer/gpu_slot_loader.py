"""The live loader of a CUDA trainer: GPU ring slots -> batch on the training GPU, one
device-to-device copy per sample, no host copy (frames never touch the CPU).

    slot pool (producer's GPU memory, CUDA IPC) ──D2D copy──► (B, row) CUDA batch ─► model

`GpuRingLoader` is a `RingLoader` that switches paths per producer start: when the ring's
producer publishes GPU slot descriptors it reads them with `GpuRingReader`
(trainer/gpu_slot_reader.py); when the producer writes frames into the ring itself (`--device
cpu`, or no GPU on its side) it runs the host path of RingLoader unchanged. The trainer picks this class only when it
trains on CUDA (trainer/loop.py); a CPU trainer keeps RingLoader, which refuses a GPU-slot
ring with a message naming both sides.

NOTE [device batch reuse]: a batch buffer is on the GPU and the step reads it asynchronously.
`release()` (called by the training loop once the step's kernels that read the inputs are
queued) records an event on the releasing thread's current stream; the next `get()` of that
buffer makes this thread's stream wait on it, and `GpuRingReader.receive_batch_into` makes its
copy stream wait on this thread's stream: the refill is ordered after every read of the old
contents without a host wait.
"""
from __future__ import annotations

import logging
import threading
from collections import deque

import torch

from protocol.errors import ProducerGone, RingError
from protocol.schema import SampleSchema

from .batching import HostBatch, PoolCache, row_bytes
from .gpu_slot_reader import GpuRingReader
from .prefetch import _POLL_S, RingLoader

log = logging.getLogger(__name__)

__all__ = ["GpuRingLoader", "DeviceBufferPool"]


class DeviceBufferPool:
    """Reusable (B, row) uint8 CUDA buffers for one schema (NOTE [device batch reuse]).
    Labels stay in (unpinned) host memory: B integers, uploaded with the batch."""

    def __init__(self, schema: SampleSchema, batch_size: int, device: torch.device,
                 count: int = 4):
        self.schema, self.batch_size, self.device = schema, batch_size, torch.device(device)
        self.row = row_bytes(schema)
        self._free: deque = deque()
        self._made, self._count = 0, count
        self._cv = threading.Condition()

    def get(self, timeout: float | None = None):
        """A free (buffer, labels) pair, ordered after the reads of its last use; None after
        `timeout` with none free (the back-pressure that bounds GPU memory)."""
        with self._cv:
            if not self._free and self._made < self._count:
                self._made += 1
                return (torch.empty((self.batch_size, self.row), dtype=torch.uint8,
                                    device=self.device),
                        torch.empty(self.batch_size, dtype=torch.int64))
            if not self._cv.wait_for(lambda: bool(self._free), timeout):
                return None
            pair, ev = self._free.popleft()
        torch.cuda.current_stream(self.device).wait_event(ev)
        return pair

    def put(self, pair) -> None:
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        with self._cv:
            self._free.append((pair, ev))
            self._cv.notify()


class _GpuSlots(Exception):
    """Raised out of RingLoader's host loop: this producer start uses GPU slots."""


class GpuRingLoader(RingLoader):
    """RingLoader for a trainer on `device` (CUDA): GPU slot rings by device copies, host rings
    as RingLoader does. Batches are HostBatch objects whose `buf` is on the device (the
    prefetcher passes them through) and whose `copies` is 0: no host copy was made."""

    name = "ring loader (GPU slots)"

    def __init__(self, ring: str, batch_size: int, *, device: torch.device, **kw):
        super().__init__(ring, batch_size, **kw)
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"GpuRingLoader: device {self.device} is not a CUDA device; "
                             f"use RingLoader")
        self._dev_pools: PoolCache[DeviceBufferPool] = PoolCache(
            lambda schema: DeviceBufferPool(schema, self.batch_size, self.device,
                                            count=self._depth + 2))
        self.path = "host"    # "host" | "gpu-slots": what the current producer start uses

    def _on_gpu_slots(self, reader, refusal: str | None) -> None:
        if refusal is not None:
            reader.close()
            raise _GpuSlots()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.path = "host"
                super()._run()            # returns only when stopped
                return
            except _GpuSlots:
                self._drop_reader()
            if not self._run_gpu():
                return

    def _attach_gpu(self) -> GpuRingReader | None:
        while not self._stop.is_set():
            try:
                r = GpuRingReader.attach(self.ring, device=self.device, start=self.start_pos)
                log.info("ring %s: GPU slots, copying slot -> batch on %s (epoch %#x)",
                         self.ring, self.device, r.epoch)
                return r
            except (ProducerGone, RingError) as e:   # gone again between probe and attach
                log.warning("ring %s: %s; waiting for a producer", self.ring, e)
                self._stop.wait(0.1)
        return None

    def set_batch_size(self, n: int) -> None:
        """`mmctl batch N` on the GPU slot path too: device buffers of the new size."""
        super().set_batch_size(n)
        self._dev_pools = self._dev_pools.fresh()

    def _dev_pool(self, schema: SampleSchema) -> DeviceBufferPool:
        return self._dev_pools.get(schema)

    def _run_gpu(self) -> bool:
        """Batches from GPU slots until the producer goes (True: attach again) or we stop."""
        reader = self._attach_gpu()
        if reader is None:
            return False
        self.reader, self.path = reader, "gpu-slots"
        try:
            while not self._stop.is_set():
                try:
                    schema = reader.peek(timeout=_POLL_S)
                    if schema is None:
                        continue
                    pool = self._dev_pool(schema)
                    pair = self._take(pool)
                    if pair is None:
                        return False
                    buf, labels = pair
                    try:
                        got = reader.receive_batch_into(buf, timeout=self.max_wait_s)
                    except BaseException:
                        pool.put(pair)
                        raise
                except ProducerGone as e:
                    log.warning("ring %s: %s; re-attaching", self.ring, e)
                    self.stats.reattached += 1
                    return True
                if got is None:
                    pool.put(pair)
                    continue
                if not self._emit_gpu(pool, pair, *got):
                    return False
            return False
        finally:
            st = reader.stats()
            self.stats.dropped += st.dropped
            self._drop_reader()

    def _emit_gpu(self, pool: DeviceBufferPool, pair, schema: SampleSchema, metas) -> bool:
        buf, labels = pair
        if self.world_size > 1:
            keep = [i for i, m in enumerate(metas) if m.index % self.world_size == self.rank]
            if len(keep) < len(metas):
                self.stats.skipped += len(metas) - len(keep)
                if keep:
                    buf[:len(keep)] = buf[torch.tensor(keep, device=self.device)]
                metas = [metas[i] for i in keep]
        n = len(metas)
        if n == 0:
            pool.put(pair)
            return True
        labels[:n] = torch.tensor([m.label for m in metas], dtype=torch.int64)
        generation = metas[-1].generation
        self.stats.batches += 1
        self.stats.samples += n
        self.stats.generations.update({m.generation for m in metas})
        self.generation_seen = generation
        return self._put(HostBatch(schema, generation, buf, labels, n, live=n, copies=0,
                                   on_release=lambda: pool.put(pair)))
