"""Batches that never mix shapes, collated into preallocated (pinned) host buffers.

A batch is ONE contiguous uint8 tensor of shape (B, row_bytes): row j holds sample j's payload
exactly as `SampleSchema` lays it out (the bytes of a ring slot or a cache record). Every
modality is then a strided view of that tensor, so:

- collating is a memcpy per sample straight from the mmap / ring slot into its row (no
  per-sample tensors, no torch.stack);
- moving a batch to the GPU is one contiguous host-to-device copy of the whole buffer, after
  which the per-modality views are taken on the device (`modality_views`).

Samples are grouped by `BatchKey` (schema id and generation): a batch has one schema by
construction, so shapes can never mix inside it. Buffers come from a `BufferPool` per key and
go back to it when the step that used them is over (`HostBatch.release()`), so the steady state
allocates nothing and pins nothing new (pinning is slow: a page-locking syscall per buffer).
"""
from __future__ import annotations

import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable, Generic, Iterator, Sequence, TypeVar

import numpy as np
import torch

from protocol.schema import SampleSchema

ROW_ALIGN = 64  # every modality offset is 64-aligned, so rows must be too (dtype views)

TORCH_DTYPES = {
    "uint8": torch.uint8, "int8": torch.int8, "int16": torch.int16, "int32": torch.int32,
    "int64": torch.int64, "float16": torch.float16, "float32": torch.float32,
    "float64": torch.float64, "uint16": torch.uint16,
}


def pin_available() -> bool:
    """Pinned memory only helps (and only works) with a CUDA device."""
    return torch.cuda.is_available()


def row_bytes(schema: SampleSchema) -> int:
    return (schema.payload_nbytes + ROW_ALIGN - 1) // ROW_ALIGN * ROW_ALIGN


def modality_views(schema: SampleSchema, buf: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-modality (B, *shape) views of a (B, row_bytes) uint8 tensor, on whatever device it is.

    Views, not copies: column slice -> reinterpret dtype -> unflatten; all are strided views
    because each modality's bytes are contiguous within a row and rows are 64-byte aligned.
    """
    out = {}
    for m in schema.modalities:
        off = schema.offset(m.name)
        col = buf[:, off: off + m.nbytes]
        t = col.view(TORCH_DTYPES[m.dtype]) if m.dtype != "uint8" else col
        out[m.name] = t.unflatten(1, m.stored_shape)
    return out


@dataclass(frozen=True)
class BatchKey:
    """What must be equal for two samples to share a batch."""

    schema_id: int
    generation: int


class BufferPool:
    """Reusable (B, row) uint8 buffers for one schema; pinned when CUDA is available.

    `get()` blocks (with the caller's stop check) when all buffers are in use: that is the
    back-pressure that bounds host memory when the loader runs ahead of training.
    """

    def __init__(self, schema: SampleSchema, batch_size: int, count: int = 3,
                 pin: bool | None = None):
        self.schema = schema
        self.batch_size = batch_size
        self.row = row_bytes(schema)
        self.pin = pin_available() if pin is None else pin
        self._free: deque[tuple[torch.Tensor, torch.Tensor]] = deque()
        self._made = 0
        self._count = count
        self._cv = threading.Condition()

    def _new(self) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.empty((self.batch_size, self.row), dtype=torch.uint8, pin_memory=self.pin)
        labels = torch.empty(self.batch_size, dtype=torch.int64, pin_memory=self.pin)
        self._made += 1
        return t, labels

    def get(self, timeout: float | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A free (buffer, labels) pair, or None after `timeout` seconds with none free."""
        with self._cv:
            if not self._free and self._made < self._count:
                return self._new()
            if not self._cv.wait_for(lambda: bool(self._free), timeout):
                return None
            return self._free.popleft()

    def put(self, buf: tuple[torch.Tensor, torch.Tensor]) -> None:
        with self._cv:
            self._free.append(buf)
            self._cv.notify()


P = TypeVar("P")


class PoolCache(Generic[P]):
    """Buffer pools by schema: the `keep` most recently used ones, made on first use.

    WHY bounded: every new sample shape on the ring (`mmctl filter resize=...` during a sweep,
    a sensor switched on) is a new schema, and each pool holds up to depth+2 whole batches
    (pinned when CUDA is present; 128 MB for 32 one-MiB samples). Kept forever, a trainer
    switched through sizes for days would grow without end. An evicted pool is only
    forgotten: batches still out keep it alive through their release callback, and its
    buffers are freed when the last of them comes back.
    """

    def __init__(self, make: Callable[[SampleSchema], P], keep: int = 6):
        if keep < 1:
            raise ValueError(f"PoolCache keep must be >= 1, got {keep}")
        self._make = make
        self._keep = keep
        self._pools: OrderedDict[int, P] = OrderedDict()
        self.evicted = 0

    def get(self, schema: SampleSchema) -> P:
        pool = self._pools.get(schema.schema_id)
        if pool is not None:
            self._pools.move_to_end(schema.schema_id)
            return pool
        pool = self._pools[schema.schema_id] = self._make(schema)
        while len(self._pools) > self._keep:
            self._pools.popitem(last=False)
            self.evicted += 1
        return pool

    def fresh(self) -> "PoolCache[P]":
        """An empty cache with the same factory and bound (a new batch size: pools are made
        again, of the new size). Swapped in whole, so a loader thread never sees it half
        cleared; batches still out keep their old pool alive until they are released."""
        return PoolCache(self._make, self._keep)

    def __len__(self) -> int:
        return len(self._pools)


@dataclass
class HostBatch:
    """One batch in host memory: B rows of one schema and generation, plus labels.

    `live` counts the rows that came from the ring; `copies` the host copies those live
    samples took to get here (1 on the reader-thread path). `release()` hands the buffer
    back to its pool once nothing reads it any more (after the H2D copy, or after the step
    on the CPU where the model reads the host buffer directly).
    """

    schema: SampleSchema
    generation: int
    buf: torch.Tensor  # (capacity, row) uint8; rows [:n] valid
    labels: torch.Tensor  # (capacity,) int64
    n: int
    live: int = 0
    copies: int = 0
    on_release: Callable[[], None] | None = field(default=None, repr=False)
    _inputs: dict | None = field(default=None, init=False, repr=False)

    @property
    def data(self) -> torch.Tensor:
        return self.buf[: self.n]

    def views(self) -> dict[str, torch.Tensor]:
        """Per-modality views of the rows as stored (packed layouts still packed)."""
        return modality_views(self.schema, self.data)

    def inputs(self) -> dict[str, torch.Tensor]:
        """What the model takes: the views, packed modalities (NV12) unpacked on the buffer's
        device (trainer/layouts.py); `prepare_inputs` may have done it already."""
        if self._inputs is not None:
            return self._inputs
        from .layouts import unpack_inputs

        return unpack_inputs(self.schema, self.views())

    def prepare_inputs(self) -> None:
        """Build what `inputs()` returns now and keep it: a CPU trainer's loader thread calls
        it, so the per-modality views (and NV12 -> RGB for packed layouts) are made beside
        the step instead of inside the training loop's wait for data. The views cost about
        0.5 ms a batch of Python (slice, view, unflatten per modality): 2% of the demo
        model's 25 ms step, counted as stall when the loop made them (BENCHMARKS ## video
        store). Only for buffers the model reads in place (not pinned): a pinned batch is
        copied to the device first and viewed there."""
        if self._inputs is None and not self.buf.is_pinned() and not getattr(self, "deferred", ()):
            self._inputs = self.inputs()  # (deferred clips: decoded later, viewed after that)

    def release(self) -> None:
        cb, self.on_release = self.on_release, None
        if cb is not None:
            cb()

    def __repr__(self) -> str:
        return (f"HostBatch({self.schema!r}, gen={self.generation}, n={self.n}, "
                f"live={self.live})")


def group_batches(groups: dict[int, np.ndarray], batch_size: int, *, shuffle: bool, seed: int,
                  epoch: int, rank: int = 0, world_size: int = 1,
                  drop_last: bool = False) -> list[np.ndarray]:
    """Index batches for a map-style dataset, each inside one schema group.

    Like DistributedSampler, every rank gets the same number of batches (groups are padded
    by wrapping around) and a disjoint shard; like a shuffled sampler, the order changes per
    epoch but is the same on every rank for a given (seed, epoch), so ranks agree on it.
    """
    rng = np.random.default_rng([seed, epoch])
    batches: list[np.ndarray] = []
    for sid in sorted(groups):
        idx = np.asarray(groups[sid], dtype=np.int64)
        if shuffle:
            idx = rng.permutation(idx)
        per_rank = -(-len(idx) // world_size)
        if len(idx) < per_rank * world_size:  # pad so every rank has the same count
            idx = np.concatenate([idx, np.resize(idx, per_rank * world_size - len(idx))])
        mine = idx[rank::world_size]
        for s in range(0, len(mine), batch_size):
            b = mine[s: s + batch_size]
            if drop_last and len(b) < batch_size:
                continue
            batches.append(b)
    if shuffle:
        order = rng.permutation(len(batches))
        batches = [batches[i] for i in order]
    return batches


def collate_samples(samples: Sequence[tuple[dict[str, torch.Tensor], int]]
                    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """collate_fn for DataLoaders over our datasets: stacks, refusing mixed shapes loudly."""
    first = samples[0][0]
    for arrays, _ in samples[1:]:
        for k, v in arrays.items():
            if k not in first or first[k].shape != v.shape:
                raise ValueError(
                    f"collate: modality {k!r} has shapes {tuple(first[k].shape) if k in first else None}"
                    f" and {tuple(v.shape)} in one batch; batch by schema (SchemaBatcher)")
    inputs = {k: torch.stack([s[0][k] for s in samples]) for k in first}
    return inputs, torch.tensor([s[1] for s in samples], dtype=torch.int64)


class SchemaBatcher:
    """Groups a stream of (key, sample) into lists of one key; for user-side iterable pipelines.

    A partial group is emitted when the key changes and `flush_on_change` is set (a live
    stream switches generation and does not come back), else held until it fills.
    """

    def __init__(self, batch_size: int, flush_on_change: bool = True):
        self.batch_size = batch_size
        self.flush_on_change = flush_on_change
        self._open: dict[object, list] = {}

    def add(self, key: object, item: object) -> Iterator[list]:
        if self.flush_on_change:
            for k in [k for k in self._open if k != key]:
                yield self._open.pop(k)
        group = self._open.setdefault(key, [])
        group.append(item)
        if len(group) >= self.batch_size:
            yield self._open.pop(key)

    def flush(self) -> Iterator[list]:
        while self._open:
            yield self._open.pop(next(iter(self._open)))
