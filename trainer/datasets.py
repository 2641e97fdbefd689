"""`torch.utils.data` datasets over the disk cache and the live ring, and the live/disk mixer.

Usable from a user's own training script, not only from the daemon:

    from torch.utils.data import DataLoader
    from trainer.datasets import CacheDataset, RingDataset, LiveDiskMixer, GroupedBatchSampler

    disk = CacheDataset("cache/", split="train")
    loader = DataLoader(disk, batch_sampler=GroupedBatchSampler(disk, 32), num_workers=2,
                        collate_fn=disk.collate)          # batches never mix shapes
    live = RingDataset("cam0", batch_size=32)             # yields schema-grouped batches
    for inputs, labels in DataLoader(live, batch_size=None, num_workers=2): ...

NOTE [workers and duplicates]: an IterableDataset is copied into every DataLoader worker, and a
ring delivers every sample to every registered reader. N workers each attaching a reader would
therefore see each sample N times (the trap the `IterableDataset` docstring warns about). So
`RingDataset.__iter__` (never `__init__`: the attachment is per process) attaches one reader per
worker and keeps only the samples whose `meta.index % num_workers == worker_id`: in lossless mode
every sample is delivered exactly once over all workers.
"""
from __future__ import annotations

import logging
import math
import multiprocessing
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Callable, Generic, Iterator, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from protocol.cache import CacheReader
from protocol.errors import ProducerGone, RingDamaged, SchemaError
from protocol.schema import SampleSchema

from .batching import SchemaBatcher, collate_samples, group_batches, modality_views, row_bytes
from .corrupt import CorruptRecords
from .layouts import unpack_inputs
from .queue_thread import IterableThread
from .ring_follow import RingFollower

log = logging.getLogger(__name__)


class SampleBatch(Sequence):
    """What `CacheDataset.__getitems__` returns: B samples read with one memcpy each into ONE
    (B, row) buffer. As a sequence it is B (inputs, label) pairs (views into that buffer, made
    only when asked), so PyTorch's default collate stacks it like any list of samples: a plain
    `DataLoader(ds, batch_size=B, shuffle=True)` works. `collated` is the batch as it already
    is, (inputs: name -> (B, ...), labels (B,)), which `CacheDataset.collate` hands over
    without a second copy."""

    __slots__ = ("inputs", "labels")

    def __init__(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor):
        self.inputs, self.labels = inputs, labels

    @property
    def collated(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return self.inputs, self.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, j):
        if isinstance(j, slice):
            return [self[k] for k in range(*j.indices(len(self)))]
        return {k: v[j] for k, v in self.inputs.items()}, int(self.labels[j])

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in self.inputs.items())
        return f"SampleBatch({len(self)} samples: {shapes})"


class CacheDataset(Dataset):
    """Map-style dataset over one split of the disk cache.

    `ds[i]` -> (inputs: dict name -> tensor, label). DataLoader reads a batch through
    `__getitems__(indices)`: one memcpy per sample from the mmap into one buffer, a
    `SampleBatch`. Two ways to load (docs/python-api.md):

        DataLoader(ds, batch_size=32, shuffle=True)          # a cache of one schema
        ds.loader(32)  # = DataLoader(ds, batch_sampler=GroupedBatchSampler(ds, 32),
                       #              collate_fn=CacheDataset.collate): any cache, one copy

    A batch cannot mix sample schemas (samples that lack a modality, or were made under
    another filter, have other shapes): the first way raises an error saying to use the
    second, which batches each schema apart. The reader reopens itself in each worker process.

    Video stores (`preprocess --video-store`): h264/hevc records are decoded into the batch by
    the reader's threads; NV12 video is converted to RGB here (on the CPU; to do it on your GPU
    instead, pass `unpack=False` and call `trainer.layouts.unpack_inputs(schema, inputs)` after
    `.to(device)`). A damaged record is left out of its batch, counted in `corrupt.count` and
    logged once (trainer/corrupt.py): a batch may then be shorter than asked; `ds[i]` of a
    damaged record raises CorruptRecord (naming record, sample and shard file).

    `transform` (trainer/transforms.py `build_transform`, the object `--transform` makes): applied
    to each batch `__getitems__` returns, after uint8 inputs became float in [0, 1] as in the
    trainer; in a DataLoader worker its generator is reseeded from the worker's seed once, so
    workers draw different numbers. (The trainer applies it on its device instead.)
    """

    def __init__(self, cache_dir: str | Path | CacheReader, split: str | None = "train", *,
                 transform=None, unpack: bool = True):
        self.reader = cache_dir if isinstance(cache_dir, CacheReader) else CacheReader(cache_dir, split)
        self.classes = self.reader.classes
        self.labels = self.reader.labels
        self.transform = transform
        self.unpack = unpack
        self.corrupt = CorruptRecords()
        self._seeded_worker: int | None = None

    def __len__(self) -> int:
        return len(self.reader)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def example_schema(self) -> SampleSchema:
        """The first record's schema as the model sees it (NV12 video as RGB)."""
        return self.reader.schema(0).unpacked()

    def schema_groups(self) -> dict[int, np.ndarray]:
        return self.reader.schema_groups()

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], int]:
        schema = self.reader.schema(i)
        buf = torch.empty(schema.payload_nbytes, dtype=torch.uint8)
        self.reader.read_into(i, buf.numpy())  # the one copy: mmap -> tensor memory
        views = modality_views(schema, buf.unsqueeze(0))
        if self.unpack:
            views = unpack_inputs(schema, views)
        return {k: v[0] for k, v in views.items()}, int(self.labels[i])

    def __getitems__(self, indices) -> SampleBatch:
        idx = np.asarray(indices, dtype=np.int64)
        schema = self.reader.schema(int(idx[0]))
        buf = torch.empty((len(idx), row_bytes(schema)), dtype=torch.uint8)
        try:
            _, metas = self.reader.read_batch_into(idx, buf.numpy())
        except SchemaError:
            groups = self.schema_groups()
            raise SchemaError(
                f"CacheDataset: one batch asks for samples of different schemas (this split "
                f"holds {len(groups)}: samples that lack a modality or were made under another "
                f"filter have other shapes), and a batch of tensors cannot mix shapes. Batch "
                f"each schema apart: DataLoader(dataset, batch_sampler=GroupedBatchSampler("
                f"dataset, batch_size, shuffle=True), collate_fn=CacheDataset.collate), or "
                f"dataset.loader(batch_size)") from None
        labels = torch.as_tensor(self.labels[idx], dtype=torch.int64)
        n = self.corrupt.drop_failed(buf, labels, len(idx), metas.failed)
        buf, labels = buf[:n], labels[:n]
        inputs = modality_views(schema, buf)
        if self.unpack:
            inputs = unpack_inputs(schema, inputs)
        if self.transform is not None:
            self._seed_for_worker()
            inputs = self.transform({k: v.float().div_(255.0) if v.dtype == torch.uint8 else v
                                     for k, v in inputs.items()})
        return SampleBatch(inputs, labels)

    def _seed_for_worker(self) -> None:
        info = get_worker_info()
        gen = getattr(self.transform, "generator", None)
        if info is not None and gen is not None and self._seeded_worker != info.id:
            gen.manual_seed(int(info.seed))
            self._seeded_worker = info.id

    @staticmethod
    def collate(batch):
        """collate_fn: a `SampleBatch` is handed over as it is, already collated (no second
        copy); a list of samples is stacked, refusing mixed shapes naming them."""
        if isinstance(batch, SampleBatch):
            return batch.collated
        if isinstance(batch, tuple) and len(batch) == 2 and isinstance(batch[1], torch.Tensor):
            return batch
        return collate_samples(batch)

    def loader(self, batch_size: int, *, shuffle: bool = True, seed: int = 0,
               drop_last: bool = False, rank: int = 0, world_size: int = 1,
               **dataloader_kwargs) -> DataLoader:
        """A DataLoader of (inputs, labels) batches of one schema each, shuffled per epoch
        (call `loader.batch_sampler.set_epoch(e)`), whatever schemas the cache holds;
        `dataloader_kwargs` go to DataLoader (num_workers, pin_memory, ...)."""
        sampler = GroupedBatchSampler(self, batch_size, shuffle=shuffle, seed=seed, rank=rank,
                                      world_size=world_size, drop_last=drop_last)
        return DataLoader(self, batch_sampler=sampler, collate_fn=CacheDataset.collate,
                          **dataloader_kwargs)


class GroupedBatchSampler(Sampler):
    """Batches of indices that share a schema, shuffled per epoch, sharded per rank."""

    def __init__(self, dataset: CacheDataset, batch_size: int, *, shuffle: bool = True,
                 seed: int = 0, rank: int = 0, world_size: int = 1, drop_last: bool = False):
        self.groups = dataset.schema_groups()
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _plan(self) -> list[np.ndarray]:
        return group_batches(self.groups, self.batch_size, shuffle=self.shuffle, seed=self.seed,
                             epoch=self.epoch, rank=self.rank, world_size=self.world_size,
                             drop_last=self.drop_last)

    def __iter__(self) -> Iterator[list[int]]:
        return (b.tolist() for b in self._plan())

    def __len__(self) -> int:
        return len(self._plan())


class RingDataset(IterableDataset):
    """Iterable over a live ring: yields (inputs, label), or schema-grouped (inputs, labels)
    batches when `batch_size` is given (use `DataLoader(ds, batch_size=None)` then).

    Attaches in `__iter__` (per worker, NOTE [workers and duplicates]). A producer that goes
    away (restart, crash), a damaged ring or a move to a new layout is a logged message and a
    re-attach, never an exception (a dead ring is never read again; a new layout is read from
    its oldest sample); iteration ends only after `max_samples` or after `idle_timeout`
    seconds without a sample. `group`: trust a ring of that group with mode 0660 besides this
    user's own (RingReader.attach).
    """

    def __init__(self, ring: str, *, batch_size: int | None = None, start: str = "newest",
                 max_samples: int | None = None, idle_timeout: float | None = None,
                 rank: int = 0, world_size: int = 1, with_meta: bool = False,
                 group: str | None = None):
        self.with_meta = with_meta  # yield (inputs, label, {"index", "generation"}) per sample
        self.ring = ring
        self.batch_size = batch_size
        self.start = start
        self.max_samples = max_samples
        self.idle_timeout = idle_timeout
        self.rank, self.world_size = rank, world_size
        self.group = group

    def _samples(self) -> Iterator[tuple[SampleSchema, object, dict[str, torch.Tensor], int]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        shard, nshards = self.rank * nw + wid, self.world_size * nw
        follow = RingFollower(self.ring, start=self.start, group=self.group)
        got = 0
        last = time.monotonic()
        try:
            while self.max_samples is None or got < self.max_samples:
                if self.idle_timeout is not None and time.monotonic() - last > self.idle_timeout:
                    return
                reader = follow.reader
                if reader is None:
                    deadline = None if self.idle_timeout is None else last + self.idle_timeout
                    reader = follow.attach(deadline)
                    if reader is None:
                        return
                try:
                    view = reader.receive_view(timeout=0.1)
                except ProducerGone as e:  # RingDamaged and RingSuperseded included
                    follow.lost(e)
                    continue
                if view is None:
                    continue
                last = time.monotonic()
                if nshards > 1 and view.meta.index % nshards != shard:
                    continue
                schema = view.schema
                out = torch.empty(schema.payload_nbytes, dtype=torch.uint8)
                rows = schema.views(out.numpy())
                for k, a in view.arrays.items():
                    np.copyto(rows[k], a)
                try:
                    if not view.still_valid():
                        continue  # lossy: overwritten while copied
                except RingDamaged as e:  # the segment shrank under the copy: zeros, not data
                    follow.lost(e)
                    continue
                tensors = {k: v[0] for k, v in modality_views(schema, out.unsqueeze(0)).items()}
                got += 1
                yield schema, view.meta, tensors, view.meta.label
        finally:
            follow.drop()

    def __iter__(self):
        if self.batch_size is None:
            for _, meta, tensors, label in self._samples():
                if self.with_meta:
                    yield tensors, label, {"index": meta.index, "generation": meta.generation}
                else:
                    yield tensors, label
            return
        batcher = SchemaBatcher(self.batch_size, flush_on_change=True)
        for schema, meta, tensors, label in self._samples():
            for group in batcher.add((schema.schema_id, meta.generation), (tensors, label)):
                yield collate_samples(group)
        for group in batcher.flush():
            yield collate_samples(group)


T = TypeVar("T")


def _size(item) -> int:
    n = getattr(item, "n", None)
    if n is not None:
        return int(n)
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor) \
            and item[1].dim() == 1:
        return int(item[1].shape[0])
    return 1


class LiveDiskMixer(IterableDataset, Generic[T]):
    """Draws items (samples or batches) from a live and a disk source at a live fraction.

    The fraction (`set_fraction`, `mmctl mix`) is honoured over a sliding window of samples:
    each draw goes to the side that is behind its share (a deficit scheduler, deterministic and
    free of the variance of coin flips). A live draw that finds nothing ready falls back to disk
    at once, so training never waits for an empty ring; `achieved` then shows the real fraction.

    Sources are objects with `get(timeout) -> item | None` (the daemon's loader threads) or
    plain iterables (wrapped in an `IterableThread`, queue_thread.py). The fraction lives in shared memory, so a
    mixer copied into DataLoader workers still follows `set_fraction` from the parent.
    """

    def __init__(self, live, disk, fraction: float = 0.5, *, window: int = 2048,
                 live_wait_s: float = 0.0, size: Callable[[object], int] = _size):
        self._live_src, self._disk_src = live, disk
        self._fraction = multiprocessing.Value("d", 0.0, lock=False)
        self.set_fraction(fraction)
        self.window = window
        self.live_wait_s = live_wait_s
        self._size = size
        self._recent: deque[tuple[bool, int]] = deque()
        self._recent_live = self._recent_total = 0
        self.samples_live = self.samples_disk = 0
        self.live_misses = 0

    # --- the fraction ------------------------------------------------------------------------

    @property
    def fraction(self) -> float:
        return float(self._fraction.value)

    def set_fraction(self, fraction: float) -> None:
        if not isinstance(fraction, (int, float)) or math.isnan(fraction) or not 0.0 <= fraction <= 1.0:
            raise ValueError(f"live fraction must be a number in [0, 1], got {fraction!r}")
        if fraction > 0 and self._live_src is None:
            raise ValueError("live fraction > 0 needs a ring (--ring NAME)")
        if fraction < 1 and self._disk_src is None:
            raise ValueError("live fraction < 1 needs a disk cache")
        self._fraction.value = float(fraction)

    @property
    def achieved(self) -> float:
        """Live share of the samples in the window (the last `window` samples drawn)."""
        return self._recent_live / self._recent_total if self._recent_total else 0.0

    @property
    def achieved_total(self) -> float:
        n = self.samples_live + self.samples_disk
        return self.samples_live / n if n else 0.0

    def _record(self, live: bool, n: int) -> None:
        self._recent.append((live, n))
        self._recent_total += n
        self._recent_live += n if live else 0
        while self._recent_total - self._recent[0][1] >= self.window:
            was_live, m = self._recent.popleft()
            self._recent_total -= m
            self._recent_live -= m if was_live else 0
        if live:
            self.samples_live += n
        else:
            self.samples_disk += n

    # --- drawing -----------------------------------------------------------------------------

    def want_live(self) -> bool:
        f = self.fraction
        if f <= 0.0 or self._live_src is None:
            return False
        if f >= 1.0 or self._disk_src is None:
            return True
        return self.achieved < f if self._recent_total else True

    def get(self, timeout: float) -> T | None:
        """The next item, or None when neither side had one within `timeout`."""
        live, disk = self._live_src, self._disk_src
        deadline = time.monotonic() + timeout
        if self.want_live():
            item = live.get(self.live_wait_s if disk is not None and self.fraction < 1 else 0.0)
            if item is not None:
                self._record(True, self._size(item))
                return item
            self.live_misses += 1
        while True:
            for is_live, src in ((False, disk), (True, live)):
                if src is None or (is_live and self.fraction <= 0):
                    continue
                item = src.get(0.0)
                if item is not None:
                    self._record(is_live, self._size(item))
                    return item
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            src = disk if disk is not None else live
            if getattr(src, "exhausted", False) and (live is None or self.fraction <= 0):
                return None
            item = src.get(min(left, 0.05))
            if item is not None:
                self._record(src is live, self._size(item))
                return item

    def __iter__(self) -> Iterator[T]:
        if self._live_src is not None and not hasattr(self._live_src, "get"):
            self._live_src = IterableThread(iter(self._live_src))
        if self._disk_src is not None and not hasattr(self._disk_src, "get"):
            self._disk_src = IterableThread(iter(self._disk_src))
        while True:
            item = self.get(1.0)
            if item is None:
                disk_done = self._disk_src is None or getattr(self._disk_src, "exhausted", False)
                live_done = self._live_src is None or getattr(self._live_src, "exhausted", False)
                if disk_done and (live_done or self.fraction <= 0):
                    return
                continue
            yield item
