"""trainer/transforms.py: built-in and user transforms on the device after the copy, per-sample
draws from one seeded generator that checkpoints resume exactly, the same for disk and live
batches, and specs that are wrong refused by name before anything runs."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _trainer_data import LiveProducer, build_cache, cleanup_ring, unique_name  # noqa: E402

from protocol.schema import ModalitySpec, SampleSchema  # noqa: E402
from trainer.datasets import CacheDataset, GroupedBatchSampler  # noqa: E402
from trainer.loop import Trainer, TrainConfig  # noqa: E402
from trainer.transforms import TransformError, build_transform  # noqa: E402

SCHEMA = SampleSchema((ModalitySpec("video", "uint8", (2, 3, 16, 16)),
                       ModalitySpec("lidar", "float32", (3, 20, 24)),
                       ModalitySpec("vec", "float32", (8,))))
MM_TRAINER = Path(sys.executable).parent / "mm-trainer"


def batch(b: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"video": torch.rand(b, 2, 3, 16, 16, generator=g),
            "lidar": torch.rand(b, 3, 20, 24, generator=g),
            "vec": torch.rand(b, 8, generator=g)}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return build_cache(tmp_path_factory.mktemp("cache") / "c", n_train=48, n_val=12)


def test_random_crop_takes_each_sample_at_its_own_drawn_offset():
    t = build_transform(["random_crop=8x12"], SCHEMA, seed=3)
    x = batch()
    out = t(x)["video"]
    ys, xs = t.last_draws["0.random_crop@video.y"], t.last_draws["0.random_crop@video.x"]
    assert out.shape == (6, 2, 3, 8, 12) and len(set(zip(ys.tolist(), xs.tolist()))) > 1
    for b, (y, xo) in enumerate(zip(ys.tolist(), xs.tolist())):  # both frames share the box
        torch.testing.assert_close(out[b], x["video"][b, :, :, y:y + 8, xo:xo + 12])
    assert torch.equal(t.evaluate(x)["video"], x["video"][..., 4:12, 2:14])  # centre crop


def test_flip_flips_exactly_the_samples_it_drew_and_leaves_other_modalities_alone():
    t = build_transform(["flip=0.5@video+lidar"], SCHEMA, seed=1)
    x = batch(16)
    out = t(x)
    for name in ("video", "lidar"):
        mask = t.last_draws[f"0.flip@{name}.flip"]
        assert 0 < int(mask.sum()) < 16
        torch.testing.assert_close(out[name][mask], x[name][mask].flip(-1))
        torch.testing.assert_close(out[name][~mask], x[name][~mask])
    assert torch.equal(out["vec"], x["vec"]) and torch.equal(t.evaluate(x)["video"], x["video"])


def test_random_resized_crop_resizes_a_drawn_box_and_evaluates_as_a_resize():
    t = build_transform(["random_resized_crop=10x10/0.5-1"], SCHEMA, seed=0)
    x = batch()
    out = t(x)["video"]
    box = t.last_draws["0.random_resized_crop@video.box"]
    assert out.shape == (6, 2, 3, 10, 10)
    area = box[:, 2] * box[:, 3] / (16 * 16)
    assert torch.all(area <= 1.0 + 1e-6) and torch.all(area >= 0.5 * 3 / 4 - 1e-6)
    whole = torch.ones(1, 2, 3, 16, 16)  # a constant image stays constant under any box
    torch.testing.assert_close(t({"video": whole})["video"], torch.ones(1, 2, 3, 10, 10))
    assert t.evaluate(x)["video"].shape == (6, 2, 3, 10, 10)


def test_normalize_uses_per_channel_statistics():
    t = build_transform(["normalize=0.5:0.25:0/0.5:0.5:2"], SCHEMA)
    x = batch()
    out = t(x)["video"]
    torch.testing.assert_close(out[:, :, 0], (x["video"][:, :, 0] - 0.5) / 0.5)
    torch.testing.assert_close(out[:, :, 2], x["video"][:, :, 2] / 2)
    assert torch.equal(build_transform(["normalise=imagenet"], SCHEMA)(x)["video"],
                       build_transform(["normalize=imagenet"], SCHEMA)(x)["video"])


def test_the_same_seed_draws_the_same_and_another_seed_draws_differently():
    specs = ["random_crop=8x8,flip", "random_resized_crop=12x12@lidar"]
    a, b, c = (build_transform(specs, SCHEMA, seed=s) for s in (5, 5, 6))
    x = batch()
    oa, ob, oc = a(x), b(x), c(x)
    assert all(torch.equal(oa[k], ob[k]) for k in oa)
    assert not torch.equal(oa["video"], oc["video"])


def test_a_user_transform_draws_from_the_trainers_generator():
    t = build_transform(["_transform_plugin:brighten", "flip"], SCHEMA, seed=2)
    x = batch()
    out = t(x)
    assert out["video"].shape == x["video"].shape and not torch.equal(out["video"], x["video"])
    shift = t.steps[0].last
    again = build_transform(["_transform_plugin:brighten", "flip"], SCHEMA, seed=2)
    again(x)
    assert torch.equal(again.steps[0].last, shift)


@pytest.mark.parametrize("specs, match", [
    (["blur=3"], "not a built-in"),
    (["random_crop=big"], "expected a size HxW"),
    (["random_crop=32x32"], r"larger than the 16x16 input"),
    (["flip@radar"], "no input 'radar'; it has lidar, vec, video"),
    (["normalize=0.5:0.5/1:1"], "2 mean values for 3 channels"),
    (["random_resized_crop=8x8/0-2"], "0 < SMIN <= SMAX <= 1"),
    (["flip@vec"], r"needs an image-like input"),
    (["_transform_plugin:not_callable"], "expected a callable"),
    (["no_such_module:f"], "cannot load f from no_such_module"),
])
def test_a_wrong_spec_is_refused_saying_what_to_write(specs, match):
    with pytest.raises(TransformError, match=match):
        build_transform(specs, SCHEMA)


def _steps(tr: Trainer, n: int) -> list[dict[str, torch.Tensor]]:
    draws = []
    for _ in range(n):
        assert tr.step_once(timeout=10.0)
        draws.append({k: v.clone() for k, v in tr.transform.last_draws.items()})
    return draws


def test_after_a_resume_the_transform_draws_equal_an_uninterrupted_runs(cache, tmp_path):
    cfg = dict(cache=cache, batch_size=8, seed=4, checkpoint_dir=tmp_path,
               transform=("random_crop=12x12,flip", "random_resized_crop=10x10@video"))
    first = Trainer(TrainConfig(**cfg))
    try:
        _steps(first, 5)
        first.save_checkpoint()
        uninterrupted = _steps(first, 4)
    finally:
        first.close()
    resumed = Trainer(TrainConfig(**cfg))
    try:
        assert resumed.step == 5
        after = _steps(resumed, 4)
    finally:
        resumed.close()
    assert len(after) == len(uninterrupted) == 4
    for u, r in zip(uninterrupted, after):
        assert u.keys() == r.keys() and all(torch.equal(u[k], r[k]) for k in u)
    fresh = Trainer(TrainConfig(**{**cfg, "checkpoint_dir": tmp_path / "other"}))
    try:  # without the checkpoint the draws at those steps differ: the test can fail
        d = _steps(fresh, 4)
    finally:
        fresh.close()
    assert any(not torch.equal(d[0][k], uninterrupted[0][k]) for k in d[0])


def test_live_and_disk_batches_both_pass_through_the_transform(cache, tmp_path):
    name = unique_name()
    producer = LiveProducer(name, rate=500).start()
    tr = Trainer(TrainConfig(cache=cache, ring=name, mix=0.5, batch_size=8,
                             checkpoint_dir=tmp_path, transform=("random_crop=8x8",)))
    seen = {True: set(), False: set()}
    real = tr._prepare

    def spy(b, train=True):
        live = bool(b.live)
        inputs, labels = real(b, train)
        seen[live].add(tuple(inputs["video"].shape[1:]))
        return inputs, labels

    tr._prepare = spy
    try:
        deadline = time.monotonic() + 60
        while not (seen[True] and seen[False]):
            assert time.monotonic() < deadline, f"saw only {seen}"
            assert tr.step_once(timeout=10.0)
    finally:
        tr.close()
        producer.stop()
        cleanup_ring(name)
    assert seen[True] == seen[False] == {(2, 3, 8, 8)}


def test_a_python_api_user_passes_the_same_transform_to_the_cache_dataset(cache):
    ds = CacheDataset(cache, "train")
    aug = build_transform(["random_crop=8x8", "normalize=0.5/0.5"], ds.example_schema, seed=0)
    ds.transform = aug
    loader = torch.utils.data.DataLoader(ds, batch_sampler=GroupedBatchSampler(ds, 8),
                                         collate_fn=ds.collate)
    inputs, labels = next(iter(loader))
    assert inputs["video"].shape == (8, 2, 3, 8, 8) and inputs["video"].dtype == torch.float32
    assert float(inputs["video"].min()) >= -1.0 and float(inputs["video"].max()) <= 1.0
    assert labels.shape == (8,)


def test_mm_trainer_refuses_a_bad_transform_before_starting(cache, tmp_path):
    p = subprocess.run([str(MM_TRAINER), "run", "--cache", str(cache), "--steps", "1",
                        "--checkpoint-dir", str(tmp_path), "--transform", "random_crop=99x99"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "--transform: random_crop=99x99@video: larger than the 16x16 input" in p.stderr


def test_under_torchrun_each_rank_resumes_its_own_transform_draws(cache, tmp_path):
    from trainer.loop import Dist

    tr = Trainer(TrainConfig(cache=cache, batch_size=8, checkpoint_dir=tmp_path,
                             transform=("flip",)))
    try:
        states = []
        for seed in (1, 2):  # what two ranks' generators held at the checkpoint
            tr.transform.generator.manual_seed(seed)
            states.append(tr._rank_rng_state())
        saved = {"transform_rng": states[0]["transform"], "rng_ranks": states}
        tr.dist = Dist(rank=1, world_size=2)
        tr._restore_transform_rng(saved)
        assert torch.equal(tr.transform.generator.get_state(), states[1]["transform"])
        tr.dist = Dist(rank=3, world_size=4)  # a rank with nothing saved derives its own
        tr._restore_transform_rng(saved)
        derived = tr.transform.generator.get_state()
        assert not any(torch.equal(derived, s["transform"]) for s in states)
        tr._restore_transform_rng(saved)
        assert torch.equal(tr.transform.generator.get_state(), derived)
    finally:
        tr.dist = Dist()
        tr.close()
