"""Host loader threads (disk cache, live ring) and the device prefetcher.

Two threads fill pinned host batches, the training loop takes them through `DevicePrefetcher`:

    CacheReader ──memcpy──► pinned batch ─┐
                                          ├─ LiveDiskMixer ─► DevicePrefetcher ─► model
    ring slot ────memcpy──► pinned batch ─┘                   (side stream + event on CUDA)

NOTE [one host copy]: a live sample crosses host memory once. `RingLoader` runs in the trainer's
own process and copies the slot's payload (read through a zero-copy `receive_view`) straight
into the row of a preallocated pinned batch buffer: the copy is numpy's memcpy, which releases
the GIL. DataLoader workers would copy the slot into a worker tensor, pickle it through shared
memory, then pin it: three copies. Every copy is counted (`LoaderStats.copies`) and the count
per live sample is shown in `status`.

NOTE [shutdown order] (queue_thread.py): 1) set the stop event; 2) the loader threads notice it
within one receive timeout (they never block without one) and stop; 3) join them; 4) only then
close the ring reader and the cache reader, which the threads were using. A thread blocked on a
full output queue also wakes on the stop event (it puts with a timeout).

The loader threads are `QueueThread`s (queue_thread.py); `RingLoader` follows the ring across
producer restarts, new layouts and damage with a `RingFollower` (ring_follow.py), the core it
shares with `RingDataset` (datasets.py).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from protocol.cache import compact_rows
from protocol.errors import ProducerGone, RingDamaged, RingError
from protocol.gpu_slots import DESCRIPTOR_SCHEMA
from protocol.schema import SampleSchema
from protocol.stages import now_ns

from .corrupt import CorruptRecords
from .layouts import unpack_inputs
from .nvdec import decode_deferred
from .batching import (BatchKey, BufferPool, HostBatch, PoolCache, group_batches,
                       modality_views, pin_available, row_bytes)
from .gpu_slot_reader import gpu_slot_refusal
from .queue_thread import POLL_S as _POLL_S
from .queue_thread import LoaderError, QueueThread
from .recent import RecentGenerations
from .ring_follow import RingFollower

log = logging.getLogger(__name__)

DESCRIPTOR_SCHEMA_ID = DESCRIPTOR_SCHEMA.schema_id  # a GPU slot descriptor, not a payload

__all__ = ["DeviceBatch", "DevicePrefetcher", "DiskLoader", "LoaderError", "LoaderStats",
           "RingLoader", "WorkerDiskLoader"]


@dataclass
class LoaderStats:  # the three re-attach counts are ring_follow.FollowCounts' fields
    batches: int = 0
    samples: int = 0
    copies: int = 0          # host copies of samples made by this loader
    dropped: int = 0         # samples read but discarded (torn lossy read, partial at shutdown)
    reattached: int = 0      # every re-attach, whatever the cause (the two below included)
    relayouts: int = 0       # the producer moved the ring to a new layout (bigger slots)
    damaged: int = 0         # the ring was found damaged and left (RingDamaged)
    skipped: int = 0         # live samples left to this ring's other readers (rank split)
    generations: set = field(default_factory=RecentGenerations)  # newest 256 seen
    corrupt: int = 0         # cache records skipped because their bytes were damaged


class _LoaderThread(QueueThread[HostBatch]):
    """A QueueThread of HostBatches with loader counters; a batch never taken goes back to
    its pool."""

    stage = None  # protocol.stages.Stage the trainer sets: this thread's read/copy times

    def __init__(self, depth: int = 2):
        super().__init__(depth)
        self.stats = LoaderStats()

    def _discard(self, batch: HostBatch) -> None:
        batch.release()

    def _new_pool(self, schema: SampleSchema) -> BufferPool:
        return BufferPool(schema, self.batch_size, count=self._depth + 2, pin=self._pin)

    def set_batch_size(self, n: int) -> None:
        """`mmctl batch N`: batches started from now on hold n samples. Batches already in
        the queue keep their size; buffers of the old size are freed as they come back."""
        if n < 1:
            raise ValueError(f"batch size must be >= 1, got {n}")
        self.batch_size = n
        pools = getattr(self, "_pools", None)
        if pools is not None:
            self._pools = pools.fresh()

    def _pool(self, schema: SampleSchema) -> BufferPool:
        return self._pools.get(schema)

    def _take(self, pool):
        """A free (buffer, labels) pair of `pool`, waiting for one while not stopped (the
        back-pressure that bounds pinned memory); None once stopped."""
        while not self._stop.is_set():
            pair = pool.get(timeout=_POLL_S)
            if pair is not None:
                return pair
        return None


class DiskLoader(_LoaderThread):
    """Reads shuffled, schema-grouped batches of a CacheReader into pinned pool buffers.

    Each rank reads its own shard (`group_batches`); `position` (epoch, batch) of the last
    batch handed out is saved in checkpoints so a resumed run continues the same order.
    """

    name = "disk loader"

    def __init__(self, reader, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, epochs: int | None = None,
                 start: tuple[int, int] = (0, 0), depth: int = 2, pin: bool | None = None,
                 defer_video: bool = False):
        super().__init__(depth)
        self.reader = reader
        # compressed clips left for the device to decode after the copy (trainer/nvdec.py)
        self.defer_video = defer_video
        self.batch_size = batch_size
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        self.epochs = epochs
        self.start_at = start
        self._groups = reader.schema_groups()
        self._pin = pin
        self._labels = torch.as_tensor(reader.labels, dtype=torch.int64)
        self._depth = depth
        self._pools: PoolCache[BufferPool] = PoolCache(self._new_pool)
        self._corrupt = CorruptRecords()  # damaged records skipped (trainer/corrupt.py)

    def batches_per_epoch(self) -> int:
        return len(group_batches(self._groups, self.batch_size, shuffle=False, seed=0, epoch=0,
                                 rank=self.rank, world_size=self.world_size))

    def _plan(self, epoch: int, skip: int) -> tuple[list, int, int]:
        """(this epoch's batches, the batch size they have, where to go on). A batch size
        changed mid-epoch (`mmctl batch`) re-plans the epoch in the new size and goes on at
        the same fraction of it: later epochs are exact, the one of the change covers its
        samples approximately (some may come twice, some not)."""
        bs = self.batch_size
        plan = group_batches(self._groups, bs, shuffle=self.shuffle, seed=self.seed,
                             epoch=epoch, rank=self.rank, world_size=self.world_size)
        return plan, bs, skip

    def _run(self) -> None:
        epoch, skip = self.start_at
        while not self._stop.is_set() and (self.epochs is None or epoch < self.epochs):
            plan, bs, k = self._plan(epoch, skip)
            while k < len(plan):
                if self.batch_size != bs:
                    plan, bs, k = self._plan(epoch, round(k * bs / self.batch_size))
                    continue
                idx = plan[k]
                schema = self.reader.schema(int(idx[0]))
                pool = self._pool(schema)
                pair = self._take(pool)
                if pair is None:
                    return
                buf, labels = pair
                t_ns = now_ns()
                if self.defer_video:
                    _, metas = self.reader.read_batch_into(idx, buf.numpy(), defer_video=True)
                else:
                    _, metas = self.reader.read_batch_into(idx, buf.numpy())
                if self.stage is not None:
                    self.stage.since(t_ns)
                if metas.cold and k + 1 < len(plan):
                    # reading from disk: start the next batch's reads now, behind this one's
                    # training (warm batches skip this: fadvise walks the page cache per page)
                    self.reader.prefetch(plan[k + 1])
                labels[: len(idx)] = self._labels[torch.from_numpy(idx)]
                n = self._corrupt.drop_failed(buf, labels, len(idx), metas.failed)
                self.stats.corrupt = self._corrupt.count
                if n == 0:  # every record of the batch was damaged: nothing to train on
                    pool.put(pair)
                    continue
                gen = int(metas.generation[0])
                b = HostBatch(schema, gen, buf, labels, n, live=0, copies=n,
                              on_release=lambda pair=pair, pool=pool: pool.put(pair))
                b.position = (epoch, k + 1)  # type: ignore[attr-defined]
                deferred = getattr(metas, "deferred", ())
                if deferred and metas.failed:  # rows moved by drop_failed: follow them
                    deferred = _follow_moves(deferred, metas.failed, len(idx))
                b.deferred = deferred  # type: ignore[attr-defined]
                b.prepare_inputs()  # CPU trainer: views (and NV12 -> RGB) here, beside the step
                self.stats.batches += 1
                self.stats.samples += n
                self.stats.copies += n
                if not self._put(b):
                    return
                k += 1
            epoch, skip = epoch + 1, 0


def _follow_moves(deferred, failed, n: int) -> tuple:
    """Deferred clips' rows after `compact_rows` moved good rows into the failed ones' places."""
    keep = compact_rows(np.zeros((n, 0), np.uint8), n, failed)
    where = {int(src): dst for dst, src in enumerate(keep.tolist())}
    return tuple((where[row], rec, blob) for row, rec, blob in deferred if row in where)


class RingLoader(_LoaderThread):
    """The live-ring reader thread: slot -> pinned batch row, one copy (NOTE [one host copy]).

    Samples are grouped by (schema, generation) into up to MAX_OPEN_BATCHES open batches; a
    batch is handed out when it is full, when a newer generation arrives (an older one will not
    come back), or when it has waited `max_wait_s` (a slow stream still gets trained on). A
    producer that goes away is a warning and a re-attach loop, never an exception. With `world_size > 1` every rank keeps
    the samples whose `meta.index % world_size == rank`, so ranks do not train on duplicates;
    `rank`/`world_size` are this reader's place among the ring's readers (the trainer passes
    LOCAL_RANK/LOCAL_WORLD_SIZE: the ring is its node's, NOTE [live split] in topology.py).
    """

    name = "ring loader"

    def __init__(self, ring: str, batch_size: int, *, start: str = "newest", rank: int = 0,
                 world_size: int = 1, max_wait_s: float = 0.5, depth: int = 2,
                 pin: bool | None = None, attach: Callable | None = None,
                 group: str | None = None):
        super().__init__(depth)
        self.ring = ring
        self.group = group  # also trust a ring of this group with mode 0660 (RingReader.attach)
        self.batch_size = batch_size
        self.start_pos = start
        self.rank, self.world_size = rank, world_size
        self.max_wait_s = max_wait_s
        self._pin = pin
        self._depth = depth
        self._pools: PoolCache[BufferPool] = PoolCache(self._new_pool)
        self.generation_seen = -1
        self.follow = RingFollower(
            ring, start=start, group=group, stop=self._stop, counts=self.stats,
            on_attach=lambda r: self._on_gpu_slots(r, gpu_slot_refusal(r)),
            note="training goes on from disk meanwhile")

    @property
    def reader(self):
        """The ring reader in use, None while waiting for a producer."""
        return self.follow.reader

    @reader.setter
    def reader(self, r) -> None:  # GpuRingLoader's GPU-slot reader
        self.follow.reader = r

    @property
    def attached(self) -> bool:
        return self.follow.attached

    def _on_gpu_slots(self, reader, refusal: str | None) -> None:
        """The ring's producer writes frames into GPU slots (`refusal` says so; None: it does
        not). This host loader cannot read them: refuse, naming both sides. The CUDA trainer's
        loader (trainer/gpu_slot_loader.py) overrides this to switch to the GPU slot path."""
        if refusal is not None:
            reader.close()
            raise RingError(refusal)

    # Open batches kept at once: one per (schema, generation) seen recently. Samples of several
    # schemas interleave in a real stream (an unknown sensor whose metadata only some recordings
    # carry, a generation switch): closing the batch at every schema change would hand the
    # model batches of one or two samples. A new key beyond this many evicts the oldest bucket.
    MAX_OPEN_BATCHES = 4

    def _run(self) -> None:
        buckets: dict[BatchKey, dict] = {}  # key -> schema, pool, buf, rows, labels, n, since

        def emit(key: BatchKey) -> bool:
            o = buckets.pop(key)
            if o["n"] == 0:
                o["pool"].put((o["buf"], o["labels"]))
                return True
            b = HostBatch(o["schema"], key.generation, o["buf"], o["labels"], o["n"],
                          live=o["n"], copies=o["n"],
                          on_release=lambda p=(o["buf"], o["labels"]), pool=o["pool"]: pool.put(p))
            b.prepare_inputs()
            self.stats.batches += 1
            return self._put(b)

        def emit_all() -> bool:
            return all(emit(k) for k in list(buckets))

        def emit_stale() -> bool:
            now = time.monotonic()
            return all(emit(k) for k, o in list(buckets.items())
                       if now - o["since"] > self.max_wait_s)

        try:
            while not self._stop.is_set():
                if self.reader is None and self.follow.attach() is None:
                    break
                try:
                    view = self.reader.receive_view(timeout=_POLL_S)
                except ProducerGone as e:  # RingDamaged and RingSuperseded included
                    self.follow.lost(e)
                    if not emit_all():
                        return
                    continue
                if view is None:
                    if not emit_stale():
                        return
                    continue
                meta = view.meta
                if view.schema.schema_id == DESCRIPTOR_SCHEMA_ID:
                    # A GPU-slot producer that was still writing its slot table at attach.
                    self._on_gpu_slots(self.reader, gpu_slot_refusal(self.reader) or (
                        f"ring {self.ring}: samples are GPU slot descriptors"))
                    continue
                if self.world_size > 1 and meta.index % self.world_size != self.rank:
                    self.stats.skipped += 1
                    continue
                key = BatchKey(view.schema.schema_id, meta.generation)
                o = buckets.get(key)
                if o is None:
                    # An older generation never comes back once a newer one arrives: hand its
                    # partial batches out now instead of waiting for max_wait_s.
                    older = [k for k in buckets if k.generation < meta.generation]
                    if not all(emit(k) for k in older):
                        return
                    if len(buckets) >= self.MAX_OPEN_BATCHES:
                        oldest = min(buckets, key=lambda k: buckets[k]["since"])
                        if not emit(oldest):
                            return
                    pool = self._pool(view.schema)
                    pair = self._take(pool)
                    if pair is None:
                        return
                    buf, labels = pair
                    o = buckets[key] = {"schema": view.schema, "pool": pool, "buf": buf,
                                        "rows": buf.numpy(), "labels": labels, "n": 0,
                                        "since": time.monotonic()}
                j = o["n"]
                t_ns = now_ns()
                row = view.schema.views(o["rows"][j])
                for name, src in view.arrays.items():
                    np.copyto(row[name], src)  # the one host copy of this sample
                if self.stage is not None:
                    self.stage.since(t_ns)
                try:
                    valid = view.still_valid()
                except RingDamaged as e:  # the segment shrank under the copy: zeros, not data
                    self.stats.dropped += 1
                    self.follow.lost(e)
                    continue
                if not valid:  # lossy: overwritten while we copied; discard the row
                    self.stats.dropped += 1
                    continue
                o["labels"][j] = meta.label
                o["n"] = j + 1
                self.stats.samples += 1
                self.stats.copies += 1
                self.stats.generations.add(meta.generation)
                self.generation_seen = meta.generation
                # >= and the buffer's own size: after `mmctl batch` an open batch may have
                # been started under the old size
                if o["n"] >= min(self.batch_size, len(o["labels"])) and not emit(key):
                    return
                if not emit_stale():
                    return
        finally:
            for o in buckets.values():
                self.stats.dropped += o["n"]
                o["pool"].put((o["buf"], o["labels"]))

    def _drop_reader(self) -> None:
        self.follow.drop()

    def close(self) -> None:
        super().close()
        self._drop_reader()


@dataclass
class DeviceBatch:
    """A batch on the training device: per-modality views, labels and where it came from."""

    schema: SampleSchema
    generation: int
    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    n: int
    live: int
    copies: int
    host: HostBatch | None = None

    def release(self) -> None:
        """On the CPU path the inputs are views of the host buffer: call after converting."""
        if self.host is not None:
            self.host.release()
            self.host = None


class DevicePrefetcher:
    """Moves host batches to the device one step ahead, overlapping the copy with compute.

    CUDA: the whole (B, row) pinned buffer goes over in ONE non_blocking copy on a side stream;
    an event recorded after it is waited on by the compute stream when the batch is taken
    (`wait_event`, not a host sync), so compute never waits for a copy that could have started
    earlier; the host buffer returns to its pool only once that event completed.
    CPU: a clean no-op - the batch's views of the host buffer are handed through unchanged.
    """

    def __init__(self, get: Callable[[float], HostBatch | None], device: torch.device):
        self._get = get
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(device=self.device) if self.cuda else None
        self._next: tuple[DeviceBatch, object] | None = None
        self._in_flight: list[tuple[HostBatch, object]] = []

    def _upload(self, hb: HostBatch) -> tuple[DeviceBatch, object]:
        if self.cuda and hb.buf.device == self.device:
            # Already on the device (GPU ring slots, trainer/gpu_slot_loader.py): nothing to upload.
            # The buffer goes back to its pool from the loop's release() after the step's
            # kernels that read it were queued; the pool orders its refill after them.
            labels = hb.labels[: hb.n].to(self.device)
            return DeviceBatch(hb.schema, hb.generation, hb.inputs(), labels, hb.n, hb.live,
                               hb.copies, host=hb), None
        deferred = getattr(hb, "deferred", None)  # compressed clips to decode after the copy
        if not self.cuda:
            if deferred:
                decode_deferred(hb.schema, hb.data, deferred)
            db = DeviceBatch(hb.schema, hb.generation, hb.inputs(), hb.labels[: hb.n], hb.n,
                             hb.live, hb.copies, host=hb)
            return db, None
        with torch.cuda.stream(self._stream):
            data = hb.data.to(self.device, non_blocking=True)
            labels = hb.labels[: hb.n].to(self.device, non_blocking=True)
            if deferred:  # NVDEC into the rows on the device (trainer/nvdec.py)
                decode_deferred(hb.schema, data, deferred)
            # packed modalities (NV12) cross the bus packed and are unpacked on the device,
            # on this stream: after their copy, before the event the step waits on
            inputs = unpack_inputs(hb.schema, modality_views(hb.schema, data))
            ev = torch.cuda.Event()
            ev.record(self._stream)
        db = DeviceBatch(hb.schema, hb.generation, inputs, labels, hb.n, hb.live, hb.copies)
        self._in_flight.append((hb, ev))
        return db, ev

    def _recycle(self) -> None:
        keep = []
        for hb, ev in self._in_flight:
            if ev.query():
                hb.release()
            else:
                keep.append((hb, ev))
        self._in_flight = keep

    def get(self, timeout: float) -> DeviceBatch | None:
        """The next device batch (None if none within `timeout`); starts the next upload."""
        if self.cuda:
            self._recycle()
        cur = self._next
        self._next = None
        if cur is None:
            hb = self._get(timeout)
            if hb is None:
                return None
            cur = self._upload(hb)
        if self.cuda:
            hb = self._get(0.0)  # start the following copy now, behind this step's compute
            if hb is not None:
                self._next = self._upload(hb)
            db, ev = cur
            if ev is not None:
                torch.cuda.current_stream(self.device).wait_event(ev)
            for t in (*db.inputs.values(), db.labels):
                t.record_stream(torch.cuda.current_stream(self.device))
            return db
        return cur[0]

    def close(self) -> None:
        if self._next is not None:
            db, _ = self._next
            db.release()
            self._next = None
        if self.cuda:
            torch.cuda.synchronize(self.device)
            for hb, _ in self._in_flight:
                hb.release()
            self._in_flight = []


class _RawBatches(torch.utils.data.Dataset):
    """Worker side of `WorkerDiskLoader`: a whole index batch -> one (B, row) uint8 tensor."""

    def __init__(self, reader):
        self.reader = reader

    def __len__(self) -> int:
        return len(self.reader)

    def __getitems__(self, idx):
        idx = np.asarray(idx, dtype=np.int64)
        schema = self.reader.schema(int(idx[0]))
        buf = torch.empty((len(idx), row_bytes(schema)), dtype=torch.uint8)
        _, metas = self.reader.read_batch_into(idx, buf.numpy())
        labels = torch.as_tensor(self.reader.labels[idx], dtype=torch.int64)
        if metas.failed:  # dropped here; the parent reports them (WorkerDiskLoader._run)
            keep = compact_rows(buf, len(idx), metas.failed, extra=(labels,))
            buf, labels = buf[: len(keep)], labels[: len(keep)]
        failed = [(f.record, str(f.error)) for f in metas.failed]
        return buf, labels, int(idx[0]), failed


def _identity(x):
    return x


class WorkerDiskLoader(DiskLoader):
    """`--workers N`: the disk side read by N DataLoader worker processes instead of a thread.

    For a disk that needs more than one reading core. Costs more host copies per sample
    (worker buffer -> shared memory -> pinned on CUDA), which `LoaderStats.copies` counts.
    """

    name = "disk loader (workers)"

    def __init__(self, reader, batch_size: int, *, workers: int, **kw):
        super().__init__(reader, batch_size, **kw)
        self.workers = workers

    def _plans(self):
        epoch, skip = self.start_at
        while self.epochs is None or epoch < self.epochs:
            plan, bs, k = self._plan(epoch, skip)
            while k < len(plan):
                if self.batch_size != bs:
                    plan, bs, k = self._plan(epoch, round(k * bs / self.batch_size))
                    continue
                yield (epoch, k + 1), plan[k].tolist()
                k += 1
            epoch, skip = epoch + 1, 0

    def _run(self) -> None:
        from collections import deque as _deque

        positions: _deque = _deque()

        def sampler():
            for pos, idx in self._plans():
                positions.append(pos)
                yield idx

        pin = pin_available() if self._pin is None else self._pin
        dl = torch.utils.data.DataLoader(
            _RawBatches(self.reader), batch_sampler=sampler(), num_workers=self.workers,
            collate_fn=_identity, pin_memory=pin, prefetch_factor=2,
            multiprocessing_context="fork")
        copies = 3 if pin else 2  # mmap -> worker tensor -> shared memory (-> pinned)
        it = iter(dl)
        try:
            for buf, labels, first, failed in it:
                if self._stop.is_set():
                    return
                for record, message in failed:
                    self._corrupt.report(record, message)
                self.stats.corrupt = self._corrupt.count
                n = buf.shape[0]
                if n == 0:
                    positions.popleft()
                    continue
                b = HostBatch(self.reader.schema(first), self.reader.meta(first).generation,
                              buf, labels, n, live=0, copies=copies * n)
                b.position = positions.popleft()  # type: ignore[attr-defined]
                b.prepare_inputs()
                self.stats.batches += 1
                self.stats.samples += n
                self.stats.copies += copies * n
                if not self._put(b):
                    return
        finally:
            del it
