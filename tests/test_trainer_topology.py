"""Multi-node topology in the trainer: the live split by node, resumes across node counts.

The real several-node run (network namespaces, torchrun --nnodes 2) is tests/test_multinode.py;
these check each rule on its own, with real rings, checkpoints and gloo process groups.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from _trainer_data import LiveProducer, build_cache, cleanup_ring, unique_name  # noqa: E402

from trainer import checkpoint as ckpt  # noqa: E402
from trainer.batching import group_batches  # noqa: E402
from trainer.loop import Trainer, TrainConfig  # noqa: E402
from trainer.resume import newest_checkpoint  # noqa: E402
from trainer.topology import Dist, rescale_disk_position  # noqa: E402


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return build_cache(tmp_path_factory.mktemp("cache") / "c", n_train=60, n_val=6)


@pytest.fixture
def one_process_group(tmp_path):
    """A real gloo process group of this one process: DDP needs one to wrap the model."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_dist_reads_torchruns_node_variables():
    d = Dist.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                       "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1"})
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size, d.node) == (3, 4, 1, 2, 1)
    assert d.nodes == 2 and d.live_shard == (1, 2) and d.disk_shard == (3, 4)


def test_without_local_world_size_the_job_is_one_node():
    d = Dist.from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert d.local_world_size == 2 and d.nodes == 1 and d.live_shard == (1, 2)
    assert Dist.from_env({}) == Dist()


def test_a_malformed_torchrun_variable_is_refused_by_name():
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE='two'"):
        Dist.from_env({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "two"})
    with pytest.raises(ValueError, match="LOCAL_RANK 2 is outside 0..1"):
        Dist.from_env({"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "2",
                       "LOCAL_WORLD_SIZE": "2"})


def test_live_samples_are_split_among_the_ranks_of_the_node_not_of_the_job(
        cache, tmp_path, one_process_group):
    # Rank 3 of 4 = local rank 1 of the 2 ranks on the second node. That node's producer
    # writes that node's ring, read by its two ranks only: this rank must keep every other
    # sample (index % 2 == 1), not one in four (index % 4 == 3, the global split), or the
    # node throws away (nodes - 1) / nodes of its own live samples.
    name = unique_name()
    producer = LiveProducer(name, mode="lossless").start()  # waits for us: no sample lost
    tr = None
    try:
        tr = Trainer(TrainConfig(cache=cache, ring=name, mix=1.0, batch_size=4,
                                 ring_start="oldest", device="cpu"),
                     Dist(rank=3, world_size=4, local_rank=1, local_world_size=2, node=1))
        assert (tr.live.rank, tr.live.world_size) == (1, 2)
        deadline = time.monotonic() + 60
        while tr.live.stats.samples < 24:
            b = tr.live.get(0.5)
            if b is not None:
                b.release()
            assert time.monotonic() < deadline, f"live loader stalled: {tr.live.stats}"
        kept, skipped = tr.live.stats.samples, tr.live.stats.skipped
    finally:
        if tr is not None:
            tr.close()
        producer.stop()
        cleanup_ring(name)
    # In order, nothing lost (lossless): one kept for one left to the other local rank.
    assert abs(kept - skipped) <= 2, (kept, skipped)


def test_a_rank_alone_on_its_node_keeps_every_sample_of_its_ring(
        cache, tmp_path, one_process_group):
    name = unique_name()
    producer = LiveProducer(name, mode="lossless").start()
    tr = None
    try:
        tr = Trainer(TrainConfig(cache=cache, ring=name, mix=1.0, batch_size=4,
                                 ring_start="oldest", device="cpu"),
                     Dist(rank=1, world_size=2, local_rank=0, local_world_size=1, node=1))
        deadline = time.monotonic() + 60
        while tr.live.stats.samples < 12:
            b = tr.live.get(0.5)
            if b is not None:
                b.release()
            assert time.monotonic() < deadline, f"live loader stalled: {tr.live.stats}"
        assert tr.live.stats.skipped == 0
    finally:
        if tr is not None:
            tr.close()
        producer.stop()
        cleanup_ring(name)


def test_rescaling_the_disk_position_keeps_the_fraction_of_the_epoch():
    assert rescale_disk_position((2, 10), saved_batches=20, batches=40) == (2, 20)  # 2 -> 1 rank
    assert rescale_disk_position((2, 10), saved_batches=20, batches=10) == (2, 5)   # 2 -> 4 ranks
    assert rescale_disk_position((1, 20), saved_batches=20, batches=10) == (1, 10)  # epoch end
    assert rescale_disk_position((1, 7), saved_batches=20, batches=20) == (1, 7)


def test_a_checkpoint_of_four_ranks_resumes_on_one_at_the_same_point_of_the_epoch(cache, tmp_path):
    tr = Trainer(TrainConfig(cache=cache, batch_size=4, device="cpu"))
    try:
        groups = tr.train_reader.schema_groups()
        per_rank_of_4, mine = (len(group_batches(groups, 4, shuffle=False, seed=0, epoch=0,
                                                 rank=0, world_size=w)) for w in (4, 1))
        state = tr.state_dict()
        state.update(world_size=4, disk_position=[1, per_rank_of_4 // 2],
                     disk_batches_per_epoch=per_rank_of_4)
        tr.load_state(state)
        # half of the epoch done on 4 ranks is half of it on 1 (each rank had a quarter)
        assert tr.disk_position == (1, round(per_rank_of_4 // 2 * mine / per_rank_of_4))
        assert mine == 15 and per_rank_of_4 == 4  # 60 samples, batch 4 (guards the figures)
        saved = tr.state_dict()
        assert saved["world_size"] == 1 and saved["disk_batches_per_epoch"] == mine
    finally:
        tr.close()


def _resume_rank(rank: int, store: str, dirs: list[str], out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        path, state = newest_checkpoint(dirs[rank], Dist(rank=rank, world_size=2, local_rank=0,
                                                         local_world_size=1, node=rank))
        torch.save({"path": str(path), "step": state["step"], "w": state["w"]}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_every_rank_resumes_the_newest_checkpoint_even_when_its_node_does_not_hold_it(tmp_path):
    # Two nodes with local checkpoint dirs: node 1 holds the newest (step 8), node 0 an older
    # one (step 4): both ranks must resume step 8, rank 0 by receiving it from rank 1.
    dirs = [tmp_path / "node0", tmp_path / "node1"]
    ckpt.save(dirs[0], 4, {"step": 4, "w": torch.full((3,), 4.0)})
    ckpt.save(dirs[1], 8, {"step": 8, "w": torch.full((3,), 8.0)})
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_resume_rank, args=(r, str(tmp_path / "store"),
                                                     [str(d) for d in dirs],
                                                     str(tmp_path / "out")))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    got = [torch.load(f"{tmp_path}/out.{r}", weights_only=True) for r in range(2)]
    for g in got:
        assert g["step"] == 8 and torch.equal(g["w"], torch.full((3,), 8.0))
        assert g["path"].endswith("node1/ckpt-00000008.pt")


def test_without_any_checkpoint_a_job_starts_fresh(tmp_path):
    assert newest_checkpoint(tmp_path / "none", Dist()) == (None, None)
