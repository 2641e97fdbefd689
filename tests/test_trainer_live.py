"""Training from a live ring filled by a real RingWriter in another process."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from _trainer_data import LiveProducer, build_cache, cleanup_ring, unique_name  # noqa: E402

from trainer.batching import modality_views  # noqa: E402
from trainer.datasets import RingDataset  # noqa: E402
from trainer.loop import Trainer, TrainConfig  # noqa: E402
from trainer.prefetch import RingLoader  # noqa: E402


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return build_cache(tmp_path_factory.mktemp("cache") / "c", n_train=60, n_val=30)


@pytest.fixture
def ring():
    name = unique_name()
    producers: list[LiveProducer] = []

    def start(**kw) -> LiveProducer:
        p = LiveProducer(name, **kw).start()
        producers.append(p)
        return p

    yield name, start
    for p in producers:
        p.stop()
    cleanup_ring(name)


def _until(cond, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _train(tr: Trainer, steps: int) -> None:
    target = tr.step + steps
    while tr.step < target:
        assert tr.step_once(timeout=10.0), "no batch within 10 s"


def test_mix_ratio_is_honoured_within_tolerance_when_both_sides_keep_up(cache, ring, tmp_path):
    name, start = ring
    # "Both sides keep up" made true by construction, not by machine speed: a lossless
    # producer blocks on a full ring, so a live batch is always waiting when the mixer asks.
    start(mode="lossless")
    tr = Trainer(TrainConfig(cache=cache, ring=name, mix=0.3, batch_size=8, checkpoint_dir=tmp_path))
    try:
        _until(lambda: tr.live.ready(), what="first live batch")
        _train(tr, 60)
        assert abs(tr.mixer.achieved - 0.3) <= 0.1, tr.mixer.achieved
        tr.mixer.set_fraction(0.7)  # what `mmctl mix 0.7` does
        _train(tr, 90)
        assert abs(tr.mixer.achieved - 0.7) <= 0.1, tr.mixer.achieved
        # NOTE [one host copy]: a live sample is copied once, slot -> pinned batch row.
        assert tr.copies_per_sample() == 1.0
    finally:
        tr.close()


def test_shape_change_mid_run_is_adapted_without_crash_or_mixed_batches(cache, ring, tmp_path,
                                                                      caplog):
    name, start = ring
    start(rate=2000, gray_after=40, )  # generation 2: grayscale 12x12 instead of rgb 16x16
    tr = Trainer(TrainConfig(cache=cache, ring=name, mix=1.0, batch_size=8,
                             checkpoint_dir=tmp_path, ring_start="oldest"))
    shapes_by_gen: dict[int, set] = {}
    real_get = tr.prefetcher.get

    def spy(timeout):
        b = real_get(timeout)
        if b is not None and b.live:
            # one schema per batch by construction: every row has the batch's shape
            shapes_by_gen.setdefault(b.generation, set()).add(tuple(b.inputs["video"].shape[1:]))
        return b

    tr.prefetcher.get = spy
    try:
        with caplog.at_level(logging.WARNING, logger="trainer.adapt"):
            _until(lambda: tr.live.ready(), what="first live batch")
            while 2 not in tr.generations_trained:
                _train(tr, 1)
            _train(tr, 3)
    finally:
        tr.close()
    assert shapes_by_gen[2] == {(2, 1, 12, 12)}
    assert all(len(s) == 1 for s in shapes_by_gen.values())
    adapted = [r for r in caplog.records if "generation 2" in r.getMessage()]
    assert len(adapted) == 1 and tr.adapter.adapted >= 1


def test_trainer_reattaches_when_the_producer_is_restarted(cache, ring, tmp_path):
    name, start = ring
    first = start(rate=2000)
    tr = Trainer(TrainConfig(cache=cache, ring=name, mix=0.5, batch_size=8, checkpoint_dir=tmp_path))
    try:
        _until(lambda: tr.live.ready(), what="first live batch")
        _train(tr, 5)
        first.kill()          # crash: the ring is left behind, stale
        start(rate=2000, start_index=100000)  # a new producer replaces it
        deadline = time.monotonic() + 60
        while not (tr.live.stats.reattached >= 1 and tr.live.attached):
            assert time.monotonic() < deadline, "no re-attach within 60 s"
            _train(tr, 1)  # training goes on (from disk and queued live batches) meanwhile
        before = tr.samples_live
        while tr.samples_live == before:
            assert time.monotonic() < deadline, "no live sample after the re-attach"
            _train(tr, 1)
    finally:
        tr.close()
    assert tr.live.stats.reattached >= 1


def test_ring_loader_waits_for_a_ring_that_does_not_exist_yet(ring):
    name, start = ring
    loader = RingLoader(name, 4).start()
    try:
        assert loader.get(0.2) is None and not loader.attached
        start(rate=1000)
        _until(lambda: loader.ready(), what="a batch after the producer appeared")
        b = loader.get(1.0)
        assert b.n == 4 and b.live == 4 and b.copies == 4
        b.release()
    finally:
        loader.close()


def test_ring_dataset_workers_never_deliver_a_sample_twice_in_lossless_mode(ring):
    name, start = ring
    start(mode="lossless")
    # Two workers, each its own registered reader: every published index reaches exactly one.
    ds = RingDataset(name, start="oldest", max_samples=30, with_meta=True)
    indices = []
    for inputs, label, meta in DataLoader(ds, batch_size=None, num_workers=2):
        assert inputs["video"].shape == (2, 3, 16, 16)
        assert label == meta["index"] % 3
        indices.append(meta["index"])
    assert len(indices) == 60 and len(set(indices)) == 60


def test_ring_dataset_batches_never_mix_shapes(ring):
    name, start = ring
    start(mode="lossless", rate=100, gray_after=10)
    ds = RingDataset(name, start="oldest", max_samples=20, batch_size=5)
    shapes = []
    for inputs, labels in DataLoader(ds, batch_size=None, num_workers=0):
        assert inputs["video"].shape[0] == labels.shape[0] <= 5
        shapes.append(tuple(inputs["video"].shape[1:]))
    assert set(shapes) == {(2, 3, 16, 16), (2, 1, 12, 12)}


def test_interleaved_schemas_still_fill_whole_batches(ring):
    # Two schemas alternating sample by sample (an unknown sensor only some recordings carry):
    # the loader keeps one open batch per (schema, generation), so batches come out full and
    # never mixed, instead of one or two samples each.
    name, start = ring
    start(mode="lossless", alternate_schemas=True)
    loader = RingLoader(name, batch_size=8, start="oldest", max_wait_s=30.0).start()
    try:
        batches = []
        while len(batches) < 6:
            b = loader.get(timeout=10.0)
            assert b is not None, "no batch within 10 s"
            batches.append((b.n, b.schema.names))
            b.release()
        assert all(n == 8 for n, _ in batches), batches
        assert {names for _, names in batches} == {("video", "vec"), ("video", "vec", "imu")}
    finally:
        loader.close()


def test_a_filter_sweep_through_many_sizes_keeps_a_bounded_set_of_batch_pools(ring):
    # `mmctl filter resize=...` swept through twelve sizes while training: each size is a new
    # schema, and each schema's pool holds whole batches. The loader keeps the recent ones only,
    # and every batch still holds exactly the samples of its size.
    from protocol.ring import RingConfig, RingWriter
    from protocol.schema import SampleMeta, SampleSchema

    name, _ = ring
    sizes = list(range(4, 28, 2))  # 12 sizes
    w = RingWriter.create(RingConfig(name=name, slots=128, slot_bytes=16 << 10, mode="lossy"))
    loader = RingLoader(name, batch_size=4, start="oldest", max_wait_s=0.2)
    try:
        i = 0
        for gen, hw in enumerate(sizes, start=1):
            w.set_generation(gen)
            for _ in range(4):
                arrays = {"video": np.full((2, 3, hw, hw), hw, np.uint8),
                          "vec": np.full(8, i, np.float32)}
                w.publish(SampleSchema.from_arrays(arrays),
                          SampleMeta(label=i % 3, index=i, generation=gen, source="live"), arrays)
                i += 1
        loader.start()
        seen = []
        while len(seen) < len(sizes):
            b = loader.get(timeout=10.0)
            assert b is not None, f"no batch within 10 s after sizes {seen}"
            video = modality_views(b.schema, b.data)["video"]
            hw = video.shape[-1]
            assert b.n == 4 and bool((video == hw).all())
            seen.append(hw)
            b.release()
        assert seen == sizes
        assert len(loader._pools) <= 6 and loader._pools.evicted == len(sizes) - len(loader._pools)
    finally:
        loader.close()
        w.close()


class _RecordingPrefetcher:
    """The real prefetcher; records each batch handed to the step and waits `delay_s` first.

    The wait stands in for a slow input pipeline: the step spends at least that long per
    batch waiting for data, a lower bound the stall measurement must account for.
    """

    def __init__(self, inner, delay_s: float = 0.0):
        self.inner, self.delay_s = inner, delay_s
        self.batches: list[tuple[int, int, int]] = []  # (n, live, generation)
        self.slept_s = 0.0

    def get(self, timeout):
        if self.delay_s:
            t = time.monotonic()
            time.sleep(self.delay_s)
            self.slept_s += time.monotonic() - t
        b = self.inner.get(timeout)
        if b is not None:
            self.batches.append((b.n, b.live, b.generation))
        return b

    def close(self):
        self.inner.close()


def test_log_interval_metrics_are_computed_over_the_interval(cache, ring, tmp_path):
    name, start = ring
    start(mode="lossless")  # a live batch is always waiting once attached
    batch, accum = 4, 2
    tr = Trainer(TrainConfig(cache=cache, ring=name, mix=0.0, batch_size=batch, accum=accum,
                             checkpoint_dir=tmp_path))
    try:
        _train(tr, 8)  # disk only: the mixer's window is full of disk samples now
        tr.reset_meter()
        _until(lambda: tr.live.ready(), what="first live batch")
        tr.mixer.set_fraction(0.7)
        rec = tr.prefetcher = _RecordingPrefetcher(tr.prefetcher, delay_s=0.002)
        losses = []
        for _ in range(6):
            _train(tr, 1)
            losses.append(tr.loss)
        meter = tr._meter
        m = tr.reset_meter()
        window = tr.mixer.achieved
    finally:
        tr.close()
    n = sum(b[0] for b in rec.batches)
    n_live = sum(b[0] for b in rec.batches if b[1])
    assert m["steps"] == 6 and len(rec.batches) == 6 * accum
    assert m["samples"] == n <= 6 * accum * batch
    # the live share of what this interval trained on, not of the mixer's window (which
    # still holds the disk-only samples drawn before the interval, so it differs)
    assert n_live > 0
    assert m["live_fraction"] == round(n_live / n, 4)
    assert window < n_live / n
    assert m["generation"] == [b[2] for b in rec.batches if b[1]][-1] == 1
    assert m["loss"] == pytest.approx(sum(losses) / len(losses), abs=1e-5)
    # stall: the time steps waited for data over the time they took - at least what the
    # loader was made to wait, and never more than the whole step
    assert meter.wait_s >= rec.slept_s > 0
    assert 0 < m["stall_fraction"] <= 1
    assert m["stall_fraction"] == round(meter.wait_s / meter.step_s, 4)
    # samples/s over the interval's wall time, which contains every step's time
    assert 0 < m["samples_per_s"] <= n / meter.step_s + 0.01
