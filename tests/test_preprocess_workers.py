"""Preprocess workers (issue 20): each is single-threaded in every library it uses, so a pool
of one process per core does not oversubscribe the cores, and the records do not depend on
how many workers made them."""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from producer.pipeline import PipelineConfig
from producer.preprocess import run_preprocess
from producer.preprocess_workers import _init_worker, start_worker_server
from producer.worker_threads import blas_threads

CFG = PipelineConfig(filter="resize=32x32", clip_frames=4)


def _worker_state() -> tuple[dict[str, int], int]:
    import torch

    return blas_threads(), torch.get_num_threads()


def test_a_preprocess_worker_runs_blas_and_torch_with_one_thread():
    ctx = start_worker_server()
    with ProcessPoolExecutor(1, mp_context=ctx, initializer=_init_worker,
                             initargs=(CFG, None, os.getpid())) as pool:
        pools, torch_threads = pool.submit(_worker_state).result(timeout=120)
    assert "openblas" in pools or "mkl" in pools or "blis" in pools, pools
    assert all(n == 1 for n in pools.values()), pools
    assert torch_threads == 1


def _shards(cache: Path) -> dict[str, bytes]:
    version = cache / (cache / "CURRENT").read_text().strip()
    return {p.name: p.read_bytes() for p in sorted(version.glob("shard-*.bin"))}


def test_zero_and_two_workers_write_byte_identical_records(synth_dataset, tmp_path):
    one = run_preprocess(synth_dataset, tmp_path / "serial", CFG, workers=0, progress=False)
    two = run_preprocess(synth_dataset, tmp_path / "pool", CFG, workers=2, progress=False)
    assert one["processed"] == two["processed"] > 0
    a, b = _shards(tmp_path / "serial"), _shards(tmp_path / "pool")
    assert a.keys() == b.keys() and a
    assert all(a[k] == b[k] for k in a)
