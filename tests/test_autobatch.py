"""trainer/autobatch.py: the largest batch that fits a memory budget, measured with real
forward/backward passes (resident memory on the CPU), for the default model and a user one."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from producer.pipeline import PipelineConfig
from producer.preprocess import run_preprocess
from producer.synth import make_dataset
from protocol.cache import CacheReader
from trainer.autobatch import LOADER_BUFFERS, _status_kb, find_batch_size, parse_size
from trainer.batching import row_bytes
from trainer.model import build_model

sys.path.insert(0, str(Path(__file__).parent))
import _big_activation_model  # noqa: E402

MiB = 1 << 20
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def schema(tmp_path_factory):
    root = tmp_path_factory.mktemp("autobatch")
    dataset = make_dataset(root / "ds", per_class={"val": 1}, size=(32, 24), clip_seconds=0.5)
    cache = root / "cache"
    run_preprocess(dataset, cache, PipelineConfig(), splits=["val"], workers=0, progress=False)
    with CacheReader(cache) as r:
        return r.schema(0)


def _budget(extra_mib: int) -> int:
    return (_status_kb("VmRSS") or 0) + extra_mib * MiB


def test_the_batch_found_fits_the_budget_and_the_next_size_tried_did_not(schema):
    model = build_model(None, schema, 3)
    found = find_batch_size(model, schema, 3, CPU, _budget(96))
    assert found.memory == "rss" and found.batch_size >= 2
    within = found.baseline + found.footprints[found.batch_size]
    assert within <= found.budget
    over = [n for n, used in found.footprints.items() if found.baseline + used > found.budget]
    assert over and min(over) > found.batch_size  # it stopped because the next one was over
    # the loaders' batch buffers are part of what a batch costs on the CPU
    assert found.footprints[found.batch_size] >= LOADER_BUFFERS * row_bytes(schema) * \
        found.batch_size


def test_a_hungrier_user_model_gets_a_smaller_batch_in_the_same_budget(schema):
    budget = _budget(96)
    default = find_batch_size(build_model(None, schema, 3), schema, 3, CPU, budget)
    user = find_batch_size(_big_activation_model.build(schema, 3), schema, 3, CPU, budget)
    assert user.batch_size < default.batch_size
    assert user.baseline + user.footprints[user.batch_size] <= budget


def test_the_trial_passes_leave_the_weights_as_they_were(schema):
    model = build_model(None, schema, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    find_batch_size(model, schema, 3, CPU, _budget(64), max_batch=4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_a_budget_below_one_sample_says_so(schema):
    with pytest.raises(ValueError, match="batch of 1"):
        find_batch_size(build_model(None, schema, 3), schema, 3, CPU, _budget(-50))


def test_memory_sizes_read_as_people_write_them():
    assert parse_size("2GiB") == 2 << 30 and parse_size("512 MiB") == 512 << 20
    assert parse_size("1.5G") == 1_500_000_000 and parse_size("4096") == 4096
    with pytest.raises(ValueError, match="2GiB"):
        parse_size("lots")
