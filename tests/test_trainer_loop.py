"""The training loop on the disk cache: learns, checkpoints atomically, resumes exactly."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _trainer_data import CLASSES, build_cache  # noqa: E402

from trainer import checkpoint as ckpt  # noqa: E402
from trainer.loop import Trainer, TrainConfig  # noqa: E402
from trainer.model import LateFusion, build_model  # noqa: E402


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return build_cache(tmp_path_factory.mktemp("cache") / "c")


def _train(tr: Trainer, steps: int) -> None:
    while tr.step < steps:
        assert tr.step_once(timeout=10.0), "no batch from the disk loader within 10 s"


def test_training_reaches_clearly_above_chance_val_accuracy(cache, tmp_path):
    tr = Trainer(TrainConfig(cache=cache, steps=40, batch_size=16, checkpoint_dir=tmp_path))
    try:
        _train(tr, 40)
        acc = tr.evaluate()
    finally:
        tr.close()
    # Chance is 1/3 over three balanced classes.
    assert acc is not None and acc >= 0.7, f"val accuracy {acc}"


def test_resume_continues_the_step_count_with_the_saved_state(cache, tmp_path):
    cfg = dict(cache=cache, batch_size=8, checkpoint_dir=tmp_path)
    tr = Trainer(TrainConfig(steps=5, **cfg))
    try:
        _train(tr, 5)
        path = tr.save_checkpoint()
    finally:
        tr.close()
    saved = ckpt.load(path)
    tr2 = Trainer(TrainConfig(steps=8, **cfg))  # finds the checkpoint in checkpoint_dir
    try:
        assert tr2.step == 5
        for k, v in tr2.model.state_dict().items():
            assert torch.equal(v, saved["model"][k]), k
        opt = tr2.optimizer.state_dict()
        assert opt["state"].keys() == saved["optimizer"]["state"].keys()
        for i, s in opt["state"].items():
            assert torch.equal(s["exp_avg"], saved["optimizer"]["state"][i]["exp_avg"])
        # The RNG is where the checkpoint left it: the next draw is the same.
        assert torch.equal(torch.get_rng_state(), saved["rng"]["torch"])
        assert tr2.disk_position == tuple(saved["disk_position"])
        _train(tr2, 8)
        assert tr2.step == 8
    finally:
        tr2.close()


def test_checkpoint_is_written_atomically_and_only_n_are_kept(tmp_path):
    for step in range(1, 6):
        ckpt.save(tmp_path, step, {"step": step, "w": torch.ones(3) * step}, keep=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    # no temp file survives; the two newest remain and load back
    assert names == ["ckpt-00000004.pt", "ckpt-00000005.pt"]
    assert ckpt.load(ckpt.latest_checkpoint(tmp_path))["step"] == 5


def test_truncated_checkpoint_is_refused_with_its_name(tmp_path):
    p = tmp_path / "ckpt-00000001.pt"
    p.write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(ValueError, match="ckpt-00000001.pt"):
        ckpt.load(p)


def test_rng_state_round_trips_numpy_python_and_torch():
    import random

    import numpy as np

    state = ckpt.rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_default_model_gives_zero_features_for_a_missing_modality(cache):
    from protocol.cache import CacheReader

    with CacheReader(cache, "train") as r:
        schema = r.schema(0)
    m = LateFusion(schema, len(CLASSES))
    out = m({"vec": torch.randn(4, 8)})  # no video in this batch
    assert out.shape == (4, len(CLASSES))


def tiny_factory(example_schema, num_classes):
    """A user model: mean of every input, then a linear layer."""
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.names = sorted(example_schema.names)
            self.fc = torch.nn.Linear(len(self.names), num_classes)

        def forward(self, inputs):
            x = torch.stack([inputs[n].flatten(1).mean(1) for n in self.names], dim=1)
            return self.fc(x)

    return Tiny()


def test_user_model_plugs_in_as_module_factory(cache, tmp_path):
    tr = Trainer(TrainConfig(cache=cache, steps=2, batch_size=8, checkpoint_dir=tmp_path,
                             model="test_trainer_loop:tiny_factory"))
    try:
        _train(tr, 2)
        assert type(tr.model).__name__ == "Tiny"
    finally:
        tr.close()


@pytest.mark.parametrize("spec, what", [("nocolon", "module:factory"),
                                        ("no_such_module_x:f", "cannot import"),
                                        ("trainer.model:nope", "no attribute")])
def test_bad_model_spec_is_a_clear_error(spec, what, cache):
    from protocol.cache import CacheReader

    with CacheReader(cache, "train") as r:
        schema = r.schema(0)
    with pytest.raises(ValueError, match=what):
        build_model(spec, schema, 3)


def test_gradient_accumulation_takes_several_batches_per_step(cache, tmp_path):
    tr = Trainer(TrainConfig(cache=cache, steps=3, batch_size=8, accum=2, checkpoint_dir=tmp_path))
    try:
        _train(tr, 3)
        assert tr.step == 3 and tr.samples_disk == 3 * 2 * 8
    finally:
        tr.close()


class _ScribblingPrefetcher:
    """The real prefetcher, but a released host buffer is refilled at once with garbage.

    That is what the loader thread may do the moment a buffer returns to its pool; a step
    that still read the buffer (inputs or labels) after releasing it would train on garbage
    or, since cross_entropy keeps its target for backward, fail in backward.
    """

    def __init__(self, inner):
        self.inner = inner
        self.scribbled = 0

    def get(self, timeout):
        b = self.inner.get(timeout)
        if b is None or b.host is None:
            return b
        hb = b.host
        release = hb.on_release

        def scribble_then_release():
            hb.buf.fill_(0xFF)
            hb.labels.fill_(-100)
            self.scribbled += 1
            if release is not None:
                release()

        hb.on_release = scribble_then_release
        return b

    def close(self):
        self.inner.close()


def test_a_step_never_reads_its_host_buffer_after_releasing_it(cache, tmp_path):
    def run(scribble: bool) -> tuple[float, int]:
        torch.manual_seed(0)
        tr = Trainer(TrainConfig(cache=cache, steps=2, batch_size=8,
                                 checkpoint_dir=tmp_path / str(scribble)))
        if scribble:
            tr.prefetcher = _ScribblingPrefetcher(tr.prefetcher)
        try:
            _train(tr, 2)
            return tr.loss, getattr(tr.prefetcher, "scribbled", 0)
        finally:
            tr.close()

    clean_loss, _ = run(scribble=False)
    loss, scribbled = run(scribble=True)
    assert scribbled >= 2
    # Same seed, same batches: the scribbled run trained on exactly what the clean one did.
    assert loss == pytest.approx(clean_loss, rel=1e-6)


def _draws() -> tuple:
    import random

    import numpy as np

    return torch.rand(4), np.random.rand(4), random.random()


def _same(a: tuple, b: tuple) -> bool:
    import numpy as np

    return torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def _seeded_rng_state(seed: int) -> dict:
    import random

    import numpy as np

    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    return ckpt.rng_state()


def test_each_rank_resumes_its_own_saved_rng_state_not_rank_zeros():
    # Under torchrun, save_checkpoint stores every rank's RNG state in rng_ranks; on resume
    # rank 1 must continue rank 1's streams (dropout masks, augmentations), not rank 0's.
    s0, s1 = _seeded_rng_state(10), _seeded_rng_state(11)
    state = {"rng": s0, "rng_ranks": [s0, s1]}
    ckpt.set_rng_state(s1)
    rank1_expected = _draws()
    assert ckpt.restore_rng(state, rank=1) == "saved"
    assert _same(_draws(), rank1_expected)
    assert ckpt.restore_rng(state, rank=0) == "saved"
    assert not _same(_draws(), rank1_expected)


def test_a_rank_without_a_saved_rng_state_derives_its_own_from_rank_zeros():
    # A checkpoint from a one-process run (or from before rng_ranks) resumed on two ranks:
    # rank 0 gets the saved state exactly, rank 1 a state of its own, the same every time.
    s0 = _seeded_rng_state(10)
    state = {"rng": s0}
    ckpt.set_rng_state(s0)
    rank0_expected = _draws()
    assert ckpt.restore_rng(state, rank=0) == "saved"
    assert _same(_draws(), rank0_expected)
    assert ckpt.restore_rng(state, rank=1) == "derived"
    rank1 = _draws()
    ckpt.restore_rng(state, rank=1)
    assert _same(_draws(), rank1)  # deterministic: a resume is reproducible
    ckpt.restore_rng(state, rank=2)
    rank2 = _draws()
    for a, b in ((rank0_expected, rank1), (rank0_expected, rank2), (rank1, rank2)):
        # every generator differs, not only torch's
        assert not torch.equal(a[0], b[0]) and not (a[1] == b[1]).any() and a[2] != b[2]


def test_trainer_on_rank_one_resumes_rank_ones_rng_state(cache, tmp_path):
    # Trainer.load_state is where a resume picks its RNG state; exercised with rank 1 given
    # explicitly (the rank is all it reads from Dist), no process group needed.
    from trainer.loop import Dist

    tr = Trainer(TrainConfig(cache=cache, steps=1, batch_size=8, checkpoint_dir=tmp_path))
    try:
        state = tr.state_dict()
        s1 = _seeded_rng_state(11)
        state["rng_ranks"] = [state["rng"], s1]
        tr.dist = Dist(rank=1, world_size=2, local_rank=1)
        tr.load_state(state)
        got = _draws()
    finally:
        tr.close()
    ckpt.set_rng_state(s1)
    assert _same(got, _draws())


# --- mixed precision --------------------------------------------------------------------------


def test_on_the_cpu_mixed_precision_is_off_whatever_was_asked(cache, tmp_path):
    # autocast on the CPU would slow these models down; "auto" and "bf16" both mean off there
    for amp in ("auto", "bf16", "off"):
        tr = Trainer(TrainConfig(cache=cache, steps=1, batch_size=8, amp=amp, device="cpu",
                                 checkpoint_dir=tmp_path / amp))
        try:
            assert tr.amp_dtype is None
            _train(tr, 1)
        finally:
            tr.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: bf16 autocast")
def test_on_a_gpu_with_bf16_training_steps_run_under_bf16_autocast_by_default(cache, tmp_path):
    if not torch.cuda.is_bf16_supported():
        pytest.skip(f"{torch.cuda.get_device_name()} has no bf16")
    tr = Trainer(TrainConfig(cache=cache, steps=3, batch_size=8, checkpoint_dir=tmp_path))
    seen: list[torch.dtype] = []
    hook = next(m for m in tr.model.modules() if isinstance(m, torch.nn.Conv2d)
                ).register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        assert tr.amp_dtype == torch.bfloat16
        _train(tr, 3)
        assert tr.loss is not None and torch.isfinite(torch.tensor(tr.loss))
    finally:
        hook.remove()
        tr.close()
    assert seen and all(d == torch.bfloat16 for d in seen)


# --- which live fraction a resumed run uses ------------------------------------------------------


def _checkpoint_with_mix(cache: Path, directory: Path, mix: float) -> None:
    tr = Trainer(TrainConfig(cache=cache, batch_size=8, checkpoint_dir=directory))
    try:
        _train(tr, 1)
        path = tr.save_checkpoint()
    finally:
        tr.close()
    state = ckpt.load(path)
    state["mix"] = mix  # as a run at `mmctl mix 0.7` saved it
    ckpt.save(directory, state["step"], state)


def _trainer_and_log(caplog, **cfg) -> tuple[Trainer, list[str]]:
    import logging

    caplog.clear()  # only this trainer's lines (not the one that wrote the checkpoint)
    with caplog.at_level(logging.INFO, logger="trainer.loop"):
        tr = Trainer(TrainConfig(**cfg))
    return tr, [r.getMessage() for r in caplog.records if r.getMessage().startswith("live fraction")]


def test_a_mix_given_on_the_command_line_wins_over_the_checkpoints(cache, tmp_path, caplog):
    from _trainer_data import unique_name

    _checkpoint_with_mix(cache, tmp_path, 0.7)
    tr, said = _trainer_and_log(caplog, cache=cache, ring=unique_name(), mix=0.2, batch_size=8,
                                checkpoint_dir=tmp_path)
    try:
        assert tr.step == 1 and tr.mixer.fraction == 0.2 and tr.cfg.mix_source == "given"
        assert tr.status()["live_fraction_source"] == "given"
    finally:
        tr.close()
    assert said == ["live fraction 0.2: given with --mix; it wins over 0.7 saved in the "
                    "checkpoint ckpt-00000001.pt"]


def test_without_a_mix_given_the_checkpoints_is_restored_and_the_log_says_so(cache, tmp_path,
                                                                            caplog):
    from _trainer_data import unique_name

    _checkpoint_with_mix(cache, tmp_path, 0.7)
    tr, said = _trainer_and_log(caplog, cache=cache, ring=unique_name(), batch_size=8,
                                checkpoint_dir=tmp_path)
    try:
        assert tr.mixer.fraction == 0.7 and tr.status()["live_fraction_source"] == "checkpoint"
    finally:
        tr.close()
    assert said == ["live fraction 0.7: restored from the checkpoint ckpt-00000001.pt (no --mix "
                    "given; --mix F sets another)"]


def test_a_checkpoints_live_mix_is_not_restored_into_a_run_without_a_ring(cache, tmp_path, caplog):
    _checkpoint_with_mix(cache, tmp_path, 0.7)
    tr, said = _trainer_and_log(caplog, cache=cache, batch_size=8, checkpoint_dir=tmp_path)
    try:
        assert tr.mixer.fraction == 0.0 and tr.cfg.mix_source == "default"
    finally:
        tr.close()
    assert said == ["live fraction 0: the default without --ring (disk only) (no --mix given; "
                    "the checkpoint's 0.7 needs a ring)"]


def test_a_fresh_run_says_its_mix_is_the_default(cache, tmp_path, caplog):
    from _trainer_data import unique_name

    tr, said = _trainer_and_log(caplog, cache=cache, ring=unique_name(), batch_size=8,
                                checkpoint_dir=tmp_path)
    tr.close()
    assert said == ["live fraction 0.5: the default with --ring (no --mix given)"]
