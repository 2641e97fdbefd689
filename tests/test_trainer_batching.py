"""Batching by schema, views over pinned buffers, shape adapters, the cache dataset."""
from __future__ import annotations

import collections
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from _trainer_data import build_cache  # noqa: E402

from protocol.errors import SchemaError  # noqa: E402
from protocol.schema import SampleSchema  # noqa: E402
from trainer.adapt import AdaptError, ShapeAdapter, adapt_tensor  # noqa: E402
from trainer.batching import (BufferPool, PoolCache, group_batches, modality_views,  # noqa: E402
                              row_bytes)
from trainer.datasets import CacheDataset, GroupedBatchSampler, LiveDiskMixer  # noqa: E402
from trainer.queue_thread import LoaderError  # noqa: E402
from trainer.recent import RecentGenerations  # noqa: E402


def test_batches_never_mix_schemas_and_ranks_get_disjoint_equal_shards():
    groups = {1: np.arange(0, 37), 2: np.arange(37, 50)}
    plans = [group_batches(groups, 8, shuffle=True, seed=3, epoch=1, rank=r, world_size=2)
             for r in range(2)]
    assert len(plans[0]) == len(plans[1])  # DDP needs the same number of steps per rank
    for plan in plans:
        for b in plan:
            assert len({1 if i < 37 else 2 for i in b}) == 1
    seen = [set(np.concatenate(p).tolist()) for p in plans]
    assert seen[0] | seen[1] == set(range(50))


def test_modality_views_of_a_batch_buffer_equal_the_schema_layout():
    rng = np.random.default_rng(0)
    arrays = {"a": rng.integers(0, 255, (2, 3, 5), dtype=np.uint8),
              "b": rng.normal(size=(7,)).astype(np.float32),
              "c": rng.integers(0, 60000, (4,), dtype=np.uint16)}
    schema = SampleSchema.from_arrays(arrays)
    buf = torch.zeros((3, row_bytes(schema)), dtype=torch.uint8)
    schema.pack_into(arrays, buf.numpy()[1])
    views = modality_views(schema, buf)
    for k, a in arrays.items():
        assert views[k].shape == (3, *a.shape)
        assert np.array_equal(views[k][1].numpy(), a), k


@pytest.mark.parametrize("have, want", [
    ((1, 12, 12), (3, 16, 16)),      # grayscale + smaller -> rgb
    ((3, 16, 16), (1, 16, 16)),      # rgb -> gray
    ((2, 1, 8, 8), (4, 3, 16, 16)),  # clip: frames, channels and size
    ((5,), (8,)),                    # vector padded
    ((12,), (8,)),                   # vector truncated
])
def test_adapter_maps_any_shape_of_the_same_rank_to_the_expected_one(have, want):
    out = adapt_tensor(torch.rand(2, *have), want)
    assert tuple(out.shape) == (2, *want)


def test_gray_to_rgb_repeats_the_channel():
    x = torch.rand(1, 1, 4, 4)
    out = adapt_tensor(x, (3, 4, 4))
    assert all(torch.equal(out[0, c], x[0, 0]) for c in range(3))


def test_adapter_logs_once_per_generation_and_input(caplog):
    ad = ShapeAdapter({"video": (3, 8, 8)})
    with caplog.at_level(logging.WARNING, logger="trainer.adapt"):
        for _ in range(5):
            ad({"video": torch.rand(2, 1, 8, 8)}, generation=2)
        ad({"video": torch.rand(2, 1, 6, 6)}, generation=3)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 2 and "generation 2" in msgs[0] and "generation 3" in msgs[1]


def test_adapter_drops_an_input_of_another_rank_instead_of_crashing(caplog):
    ad = ShapeAdapter({"video": (3, 8, 8), "vec": (8,)})
    out = ad({"video": torch.rand(2, 8, 8, 2, 2), "vec": torch.rand(2, 8)}, generation=4)
    assert set(out) == {"vec"}
    with pytest.raises(AdaptError):
        adapt_tensor(torch.rand(2, 8), (3, 8, 8))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return build_cache(tmp_path_factory.mktemp("cache") / "c", n_train=30, n_val=6)


def test_cache_dataset_items_equal_the_cached_arrays(cache):
    ds = CacheDataset(cache, "train")
    inputs, label = ds[4]
    ref = ds.reader.view(4)
    assert label == ref.meta.label
    for k, a in ref.arrays.items():
        assert np.array_equal(inputs[k].numpy(), a)


def test_cache_dataset_in_dataloader_workers_gives_one_schema_batches(cache):
    ds = CacheDataset(cache, "train")
    dl = DataLoader(ds, batch_sampler=GroupedBatchSampler(ds, 8, seed=1), num_workers=2,
                    collate_fn=CacheDataset.collate)
    labels = []
    for inputs, lab in dl:
        assert inputs["video"].shape[1:] == (2, 3, 16, 16)
        labels.append(lab)
    got = torch.cat(labels)
    assert len(got) == len(ds) and sorted(got.tolist()) == sorted(ds.labels.tolist())


class _Src:
    def __init__(self, items):
        self.items = list(items)

    def get(self, timeout):
        return self.items.pop(0) if self.items else None


def test_mixer_follows_a_changed_fraction_when_both_sides_keep_up():
    live, disk = _Src([("L", torch.zeros(4))] * 400), _Src([("D", torch.zeros(4))] * 400)
    mx = LiveDiskMixer(live, disk, 0.25, window=200)
    got = [mx.get(0.1)[0] for _ in range(100)]
    assert abs(got.count("L") / 100 - 0.25) <= 0.02
    mx.set_fraction(0.8)
    got = [mx.get(0.1)[0] for _ in range(100)]
    assert abs(got[50:].count("L") / 50 - 0.8) <= 0.04


def test_mixer_falls_back_to_disk_when_the_ring_is_empty_and_says_so():
    mx = LiveDiskMixer(_Src([]), _Src([("D", torch.zeros(4))] * 50), 0.5)
    got = [mx.get(0.1)[0] for _ in range(20)]
    assert got == ["D"] * 20 and mx.achieved == 0.0 and mx.live_misses == 20


def test_mixer_over_plain_iterables_reads_both_to_their_end():
    mx = LiveDiskMixer(iter([("L", torch.zeros(4))] * 5), iter([("D", torch.zeros(4))] * 7), 0.5)
    got = [tag for tag, _ in mx]
    assert sorted(got) == ["D"] * 7 + ["L"] * 5


def test_mixer_source_that_raises_surfaces_the_error_naming_its_thread():
    # A plain iterable runs in a thread (queue_thread.IterableThread): an exception there must
    # reach the training loop, not end the stream as if the data had run out.
    def broken():
        yield ("D", torch.zeros(4))
        raise OSError("disk gone")

    mx = LiveDiskMixer(None, broken(), 0.0)
    with pytest.raises(LoaderError, match="mixer source thread failed.*disk gone"):
        list(mx)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_mixer_refuses_a_fraction_outside_0_1(bad):
    mx = LiveDiskMixer(_Src([]), _Src([]), 0.5)
    with pytest.raises(ValueError, match="fraction"):
        mx.set_fraction(bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the side-stream "
                    "prefetcher path; on the CPU the prefetcher is a no-op tested above")
def test_cuda_prefetcher_delivers_the_host_bytes_on_the_device(cache):
    from protocol.cache import CacheReader
    from trainer.prefetch import DevicePrefetcher, DiskLoader

    with CacheReader(cache, "train") as r:
        loader = DiskLoader(r, 8, shuffle=False, epochs=1).start()
        pf = DevicePrefetcher(loader.get, torch.device("cuda"))
        try:
            b = pf.get(5.0)
            assert b.inputs["video"].is_cuda and b.labels.is_cuda
            ref = r.view(0)
            assert np.array_equal(b.inputs["video"][0].cpu().numpy(), ref.arrays["video"])
        finally:
            pf.close()
            loader.close()


def test_cpu_prefetcher_is_a_no_op_over_the_host_buffer(cache):
    from protocol.cache import CacheReader
    from trainer.prefetch import DevicePrefetcher, DiskLoader

    with CacheReader(cache, "train") as r:
        loader = DiskLoader(r, 8, shuffle=False, epochs=1, pin=False).start()
        pf = DevicePrefetcher(loader.get, torch.device("cpu"))
        try:
            b = pf.get(5.0)
            # same memory as the host batch: no copy on the CPU path
            assert b.inputs["video"].data_ptr() >= b.host.buf.data_ptr()
            assert np.array_equal(b.inputs["video"][0].numpy(), r.view(0).arrays["video"])
            b.release()
        finally:
            pf.close()
            loader.close()


def test_cache_dataset_batch_equals_its_items_in_shuffled_order(cache):
    ds = CacheDataset(cache, "train")
    idx = np.random.default_rng(7).permutation(len(ds))[:13]
    inputs, labels = CacheDataset.collate(ds.__getitems__(idx))
    assert labels.tolist() == ds.labels[idx].tolist()
    for row, i in enumerate(idx):
        one, label = ds[int(i)]
        assert label == labels[row]
        for k, t in one.items():
            assert torch.equal(inputs[k][row], t)


def test_a_plain_shuffled_dataloader_reads_a_cache_of_one_schema(cache):
    ds = CacheDataset(cache, "train")
    seen = []
    for inputs, labels in DataLoader(ds, batch_size=7, shuffle=True):
        assert inputs["video"].shape[1:] == (2, 3, 16, 16) and inputs["vec"].shape[1:] == (8,)
        assert len(labels) == inputs["video"].shape[0]
        seen += labels.tolist()
    assert sorted(seen) == sorted(ds.labels.tolist())


def test_cpu_batches_come_with_their_views_built_by_the_loader_thread(cache):
    """The per-modality views cost ~0.5 ms a batch of Python; made by the training loop they
    were counted as stall (2% of the demo's 25 ms step). The loader thread makes them once,
    beside the step, and the prefetcher hands that same dict to the model."""
    from protocol.cache import CacheReader
    from trainer.prefetch import DevicePrefetcher, DiskLoader

    with CacheReader(cache, "train") as r:
        loader = DiskLoader(r, 8, shuffle=False, epochs=1, pin=False).start()
        pf = DevicePrefetcher(loader.get, torch.device("cpu"))
        try:
            b = pf.get(5.0)
            assert b.inputs is b.host.inputs()  # built before the loop took it, not per call
            assert np.array_equal(b.inputs["video"][0].numpy(), r.view(0).arrays["video"])
            b.release()
        finally:
            pf.close()
            loader.close()


def test_grouped_loader_hands_over_the_read_batch_without_another_copy(cache):
    ds = CacheDataset(cache, "train")
    batch = ds.__getitems__([3, 1, 4])
    inputs, labels = CacheDataset.collate(batch)
    assert inputs is batch.inputs and labels is batch.labels  # no stack, no second copy
    assert labels.tolist() == ds.labels[[3, 1, 4]].tolist()


@pytest.fixture(scope="module")
def mixed_cache(tmp_path_factory) -> Path:
    """A cache whose every third sample lacks `vec`: two sample schemas in one split."""
    from producer.cache_writer import CacheWriter
    from protocol.schema import SampleMeta, SampleSchema

    from _trainer_data import CLASSES, make_sample

    d = tmp_path_factory.mktemp("mixed") / "c"
    rng = np.random.default_rng(3)
    with CacheWriter(d, classes=CLASSES) as w:
        for i in range(12):
            arrays = make_sample(rng, i % 3)
            if i % 3 == 0:
                del arrays["vec"]
            w.add(f"train/x/{i:02d}", "fp", "train", SampleSchema.from_arrays(arrays),
                  SampleMeta(label=i % 3, index=i), arrays)
        w.commit()
    return d


def test_a_plain_dataloader_over_mixed_schemas_says_what_to_pass_instead(mixed_cache):
    ds = CacheDataset(mixed_cache, "train")
    with pytest.raises(SchemaError, match=r"GroupedBatchSampler\(dataset, batch_size, "
                       r"shuffle=True\), collate_fn=CacheDataset.collate"):
        list(DataLoader(ds, batch_size=6, shuffle=False))


def test_the_grouped_loader_batches_each_schema_apart(mixed_cache):
    ds = CacheDataset(mixed_cache, "train")
    loader = ds.loader(4, shuffle=True, seed=1)
    sizes = collections.Counter()
    for inputs, labels in loader:
        sizes[tuple(sorted(inputs))] += len(labels)
    assert sizes == {("video",): 4, ("vec", "video"): 8}


def test_disk_loader_batches_hold_exactly_the_records_of_their_plan(cache):
    from trainer.prefetch import DiskLoader

    ds = CacheDataset(cache, "train")
    loader = DiskLoader(ds.reader, 8, epochs=1, shuffle=True, seed=4).start()
    seen = []
    try:
        while not loader.exhausted:
            b = loader.get(1.0)
            if b is None:
                continue
            for row in range(b.n):
                # match the row to its record by content: every record is distinct
                one = {k: v[row] for k, v in b.inputs().items()}
                hits = [i for i in range(len(ds))
                        if all(torch.equal(ds[i][0][k], t) for k, t in one.items())]
                assert len(hits) == 1 and b.labels[row] == ds.labels[hits[0]]
                seen.append(hits[0])
            b.release()
    finally:
        loader.close()
    assert sorted(seen) == list(range(len(ds)))


def _schema(hw: int) -> SampleSchema:
    return SampleSchema.from_arrays({"video": np.zeros((2, 3, hw, hw), np.uint8)})


def test_pool_cache_keeps_the_most_recently_used_pools_and_makes_each_once():
    made: list[int] = []
    cache = PoolCache(lambda s: made.append(s.schema_id) or BufferPool(s, 2, count=1, pin=False),
                      keep=2)
    a, b, c = _schema(4), _schema(6), _schema(8)
    pa = cache.get(a)
    assert cache.get(a) is pa and len(made) == 1      # one pool per schema
    cache.get(b)
    cache.get(a)                                       # a is now the most recent
    cache.get(c)                                       # evicts b, the least recent
    assert len(cache) == 2 and cache.evicted == 1
    assert cache.get(a) is pa and len(made) == 3
    cache.get(b)                                       # b comes back as a new pool
    assert len(made) == 4 and cache.evicted == 2


def test_a_batch_from_an_evicted_pool_can_still_be_released():
    cache = PoolCache(lambda s: BufferPool(s, 2, count=1, pin=False), keep=1)
    pool = cache.get(_schema(4))
    buf = pool.get()
    cache.get(_schema(6))                              # evicts the pool while buf is lent out
    pool.put(buf)                                      # what HostBatch.release() does
    assert pool.get(timeout=0) is buf


def test_pool_cache_refuses_to_keep_nothing():
    with pytest.raises(ValueError, match="keep must be >= 1"):
        PoolCache(lambda s: s, keep=0)


def test_generations_kept_for_status_are_the_newest_ones_only():
    # A filter switched every few seconds for weeks: status must stay small enough to answer.
    seen = RecentGenerations()
    for g in range(1, 10_001):
        seen.add(g)
        seen.add(g)                      # every batch of a generation adds it again
    assert len(seen) == RecentGenerations.KEEP
    assert min(seen) == 10_001 - RecentGenerations.KEEP and max(seen) == 10_000
    seen.update({10_001, 5})             # one older than all it keeps is not kept
    assert 10_001 in seen and 5 not in seen and len(seen) == RecentGenerations.KEEP
