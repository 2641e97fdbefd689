"""Training from a live ring filled by a real RingWriter in another process."""
from __future__ import annotations

import functools
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
from _polling import wait_for  # noqa: E402

from protocol.ring import RingReader  # noqa: E402
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


_until = functools.partial(wait_for, timeout=30.0, interval=0.01)


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


def test_trainer_counts_the_bytes_a_live_sample_copies_slot_to_batch(cache, ring, tmp_path):
    name, start = ring
    start(mode="lossless")
    tr = Trainer(TrainConfig(cache=cache, ring=name, mix=1.0, batch_size=8,
                             checkpoint_dir=tmp_path))
    try:
        _until(lambda: tr.live.ready(), what="first live batch")
        _train(tr, 5)
        with RingReader.attach(name, start="oldest") as r:
            payload = r.receive(timeout=10).schema.payload_nbytes
        # one copy of the whole payload per live sample (NOTE [one host copy])
        assert tr.copy_bytes_per_sample() == payload
        assert tr.status()["copy_bytes_per_sample"] == payload
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


def test_samples_a_lossy_ring_moved_past_a_slow_trainer_are_counted_as_lapped(ring):
    # A trainer slower than its producer loses samples on a lossy ring by design; status says
    # how many (`live_lapped`), apart from torn reads (`live_dropped`), over re-attaches too.
    from protocol.ring import RingConfig, RingWriter
    from protocol.schema import SampleMeta, SampleSchema

    name, _ = ring
    w = RingWriter.create(RingConfig(name=name, slots=4, slot_bytes=16 << 10, mode="lossy"))
    loader = RingLoader(name, batch_size=2, start="oldest", max_wait_s=0.2, depth=1).start()
    try:
        wait_for(lambda: loader.attached, 10, "the loader attached")

        def publish(i):
            arrays = {"vec": np.full(8, i, np.float32)}
            w.publish(SampleSchema.from_arrays(arrays),
                      SampleMeta(label=0, index=i, generation=1, source="live"), arrays)

        for i in range(40):  # nothing taken: the loader's pool runs dry and its reader stops
            publish(i)
        got = []
        while len(got) < 6:
            b = loader.get(timeout=10.0)
            assert b is not None, "no batch within 10 s"
            got += [int(v) for v in modality_views(b.schema, b.data)["vec"][:b.n, 0]]
            b.release()
            if len(got) < 6:
                publish(40 + len(got))
        # Nothing is published now, so nothing more can be lapped: the count is the reader's
        # own, kept apart from torn reads (loader.stats.dropped, which a copy racing the
        # first 40 writes may add to on a loaded machine).
        lapped = loader.follow.lapped
        assert lapped > 0 and lapped == loader.reader.stats().dropped
        loader.close()  # its reader is dropped: the count keeps what it lost (re-attaches)
        assert loader.follow.lapped == lapped
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


# --- unlabelled live samples (NOTE [unlabelled samples] in trainer/loop.py) --------------------


def _train_until(tr: Trainer, cond, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        tr.step_once(timeout=1.0)


def test_unlabelled_live_samples_are_counted_and_left_out_of_the_loss(cache, ring, tmp_path):
    # A media/URL source without --label publishes label -1: the trainer must neither crash
    # (cross_entropy: "Target -1 is out of bounds") nor learn from a made-up class.
    name, start = ring
    start(mode="lossless", label=-1)
    tr = Trainer(TrainConfig(cache=cache, ring=name, mix=0.5, batch_size=8, checkpoint_dir=tmp_path))
    try:
        _until(lambda: tr.live.ready(), what="first live batch")
        _train_until(tr, lambda: tr.samples_live >= 32 and tr.step >= 10, "live and disk steps")
        m = tr.reset_meter()
        st, summary = tr.status(), tr.summary()
    finally:
        tr.close()
    assert tr.samples_unlabelled == tr.samples_live >= 32 and tr.samples_bad_label == 0
    assert st["samples_unlabelled"] == summary["samples_unlabelled"] == tr.samples_unlabelled
    assert m["unlabelled"] > 0 and m["loss"] is not None and np.isfinite(m["loss"])
    assert np.isfinite(tr.loss)
    # every optimiser step had labelled (disk) samples; live-only steps made none
    assert summary["steps"] == tr.step and tr.steps_unlabelled == st["steps_unlabelled"]


def test_a_step_without_any_labelled_sample_makes_no_optimiser_step(cache, ring, tmp_path):
    name, start = ring
    start(mode="lossless", label=-1)
    tr = Trainer(TrainConfig(cache=cache, ring=name, mix=1.0, batch_size=8, checkpoint_dir=tmp_path))
    rec = tr.prefetcher = _RecordingPrefetcher(tr.prefetcher)
    live_only = 0
    try:
        _until(lambda: tr.live.ready(), what="first live batch")
        deadline = time.monotonic() + 60
        while live_only < 3:
            assert time.monotonic() < deadline, "no three live-only steps within 60 s"
            before = {k: v.clone() for k, v in tr.model.state_dict().items()}
            step, n_batches = tr.step, len(rec.batches)
            assert tr.step_once(timeout=10.0)
            if not rec.batches[n_batches][1]:
                continue  # a disk batch (the mixer falls back to disk when none is ready)
            live_only += 1
            after = tr.model.state_dict()
            assert tr.step == step  # no optimiser step: not even AdamW's weight decay ran
            assert all(torch.equal(before[k], after[k]) for k in before)
        assert tr.steps_unlabelled >= 3 and tr.samples_unlabelled >= 24
        assert 1 in tr.generations_trained and tr.last_generation == 1  # `mmctl wait 1` returns
    finally:
        tr.close()


def test_labels_outside_the_class_list_are_counted_logged_once_and_left_out(cache, ring, tmp_path,
                                                                           caplog):
    # `mmctl label 7` on a producer with no class list: label 7 of a 3-class cache.
    name, start = ring
    start(mode="lossless", label=7)
    tr = Trainer(TrainConfig(cache=cache, ring=name, mix=0.5, batch_size=8, checkpoint_dir=tmp_path))
    try:
        with caplog.at_level(logging.WARNING, logger="trainer.loop"):
            _until(lambda: tr.live.ready(), what="first live batch")
            _train_until(tr, lambda: tr.samples_live >= 32 and tr.step >= 4, "live batches")
        st = tr.status()
    finally:
        tr.close()
    assert st["samples_bad_label"] == tr.samples_live >= 32 and st["samples_unlabelled"] == 0
    said = [r.getMessage() for r in caplog.records if "label 7" in r.getMessage()]
    assert len(said) == 1 and "classes 0..2 (a, b, c)" in said[0] and "--classes" in said[0]
    assert np.isfinite(tr.loss)


# --- run and lifetime figures after a resume (NOTE [run and lifetime]) -------------------------


def test_after_a_resume_rates_are_this_runs_and_lifetime_totals_are_separate(cache, ring,
                                                                             tmp_path):
    from trainer import checkpoint as ckpt

    name, start = ring
    first = Trainer(TrainConfig(cache=cache, mix=0.0, batch_size=8, checkpoint_dir=tmp_path))
    try:
        _train(first, 2)
        path = first.save_checkpoint()
    finally:
        first.close()
    # a checkpoint of a long life: a million samples each side
    state = ckpt.load(path)
    state["counts"] = {"live": 1_000_000, "disk": 1_000_000}
    ckpt.save(tmp_path, state["step"], state)  # replaces it (atomically)

    start(mode="lossless")
    tr = Trainer(TrainConfig(cache=cache, ring=name, mix=0.5, batch_size=8, checkpoint_dir=tmp_path))
    try:
        assert tr.step == 2
        _until(lambda: tr.live.ready(), what="first live batch")
        _train(tr, 6)
        st, summary = tr.status(), tr.summary()
        saved = tr.state_dict()["counts"]
    finally:
        tr.close()
    run_samples = tr.samples_live + tr.samples_disk
    assert 0 < run_samples <= 6 * 8 and tr.samples_live > 0
    assert summary["samples_live"] == tr.samples_live and summary["samples_disk"] == tr.samples_disk
    assert summary["samples_per_s"] == round(run_samples / tr.total_step_s, 2)
    assert summary["copies_per_sample"] == st["copies_per_sample"] == 1.0
    assert st["samples_per_s"] <= run_samples / tr.total_step_s  # this run's time, not less
    assert summary["lifetime_samples_live"] == 1_000_000 + tr.samples_live
    assert summary["lifetime_samples_disk"] == 1_000_000 + tr.samples_disk
    assert st["run_steps"] == 6 and st["resumed_from_step"] == 2 and st["lifetime_steps"] == 8
    assert saved["live"] == 1_000_000 + tr.samples_live  # the next checkpoint carries them on


# --- live starvation ---------------------------------------------------------------------------


def test_a_live_source_slower_than_the_mix_asks_is_reported_as_starved(cache, ring, tmp_path,
                                                                       caplog):
    name, start = ring
    start(rate=2)  # 2 samples/s: far below half of what the trainer takes from disk, even on a loaded machine
    tr = Trainer(TrainConfig(cache=cache, ring=name, mix=0.5, batch_size=4, checkpoint_dir=tmp_path))
    try:
        _until(lambda: tr.live.ready(), what="first live batch")
        tr.reset_meter()
        with caplog.at_level(logging.WARNING, logger="trainer.loop"):
            _train_until(tr, lambda: tr._meter.samples_live >= 8, "two live batches")
            m = tr.reset_meter()
        st = tr.status()
    finally:
        tr.close()
    assert m["live_fraction_target"] == 0.5 and m["live_fraction"] < 0.4
    assert m["live_starved"] is True
    assert 0 < m["live_in_per_s"] < m["live_wanted_per_s"]
    assert m["live_note"].startswith(f"live starved: producer {m['live_in_per_s']:.1f} samples/s, "
                                     f"trainer wants {m['live_wanted_per_s']:.1f}")
    assert "mmctl mix" in m["live_note"]
    for key in ("live_in_per_s", "live_wanted_per_s", "live_starved", "live_note"):
        assert st[key] == m[key], key
    assert sum("live starved" in r.getMessage() for r in caplog.records) == 1  # said once


def test_a_live_source_that_keeps_up_is_not_reported_as_starved(cache, ring, tmp_path):
    name, start = ring
    start(mode="lossless")  # a live batch is always waiting
    tr = Trainer(TrainConfig(cache=cache, ring=name, mix=0.5, batch_size=8, checkpoint_dir=tmp_path))
    try:
        _until(lambda: tr.live.ready(), what="first live batch")
        _train(tr, 10)
        tr.reset_meter()
        _train(tr, 10)
        m = tr.reset_meter()
    finally:
        tr.close()
    assert m["live_starved"] is False and m["live_note"] is None and m["live_in_per_s"] > 0
