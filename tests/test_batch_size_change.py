"""`mmctl batch N` inside the trainer: loaders switch size at once, the epoch goes on, the
learning rate follows the rule; with the default model and with a user's model."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _trainer_data import build_cache  # noqa: E402

from protocol.cache import CacheReader  # noqa: E402
from trainer.loop import Trainer, TrainConfig  # noqa: E402
from trainer.prefetch import DiskLoader  # noqa: E402


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return build_cache(tmp_path_factory.mktemp("bs") / "c", n_train=48, n_val=6)


def test_the_disk_loader_switches_size_and_finishes_the_epoch_in_the_new_size(cache):
    with CacheReader(cache, "train") as reader:
        loader = DiskLoader(reader, 8, shuffle=False, epochs=1, depth=1).start()
        try:
            first = loader.get(10.0)
            sizes = [first.n]
            first.release()
            loader.set_batch_size(3)
            while not loader.exhausted:
                b = loader.get(1.0)
                if b is not None:
                    sizes.append(b.n)
                    b.release()
        finally:
            loader.close()
    # at most the batches read ahead (queue depth 1, one in the loader's hands) keep size 8
    assert sizes[0] == 8 and sizes[-1] <= 3 and sizes.count(8) <= 3
    assert set(sizes[sizes.index(3):]) <= {1, 2, 3}
    assert abs(sum(sizes) - 48) <= 8  # the same epoch, re-planned at the same fraction


@pytest.mark.parametrize("model", [None, "_big_activation_model:build"])
def test_a_trainer_changes_its_batch_size_between_steps_with_a_linear_lr(cache, tmp_path, model):
    tr = Trainer(TrainConfig(cache=cache, batch_size=4, model=model, checkpoint_dir=tmp_path,
                             lr=1e-3))
    try:
        assert tr.step_once(10.0) and tr.batch_size_trained == 4
        reply = tr.set_batch_size(8, "linear")
        assert reply["previous"] == 4 and reply["lr"] == pytest.approx(2e-3)
        assert all(g["lr"] == pytest.approx(2e-3) for g in tr.optimizer.param_groups)
        for _ in range(8):  # the batches read ahead first, then the new size
            assert tr.step_once(10.0)
            if tr.batch_size_trained == 8:
                break
        assert tr.batch_size_trained == 8 and tr.status()["batch_size"] == 8
        assert tr.state_dict()["batch_size"] == 8
    finally:
        tr.close()


def test_a_bad_size_or_rule_changes_nothing(cache, tmp_path):
    tr = Trainer(TrainConfig(cache=cache, batch_size=4, checkpoint_dir=tmp_path))
    try:
        for size, rule in ((0, "none"), (8, "cubic")):
            with pytest.raises(ValueError):
                tr.set_batch_size(size, rule)
        assert tr.cfg.batch_size == 4 and tr.disk.batch_size == 4
    finally:
        tr.close()
