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


def _records(cache: Path) -> list[tuple]:
    """Every record of the cache in index order: (schema, meta, its bytes)."""
    import numpy as np

    from protocol.cache import CacheReader

    with CacheReader(cache) as r:
        buf = np.empty(r.max_payload_nbytes, np.uint8)
        out = []
        for i in range(len(r)):
            schema, meta = r.read_into(i, buf)
            out.append((schema, meta, buf[:schema.payload_nbytes].tobytes()))
        return out


def test_zero_and_two_workers_write_byte_identical_records(synth_dataset, tmp_path):
    # Workers write their records into shard files of their own (producer/worker_shard.py),
    # so the shards differ in layout; every record, read through the index, must not.
    one = run_preprocess(synth_dataset, tmp_path / "serial", CFG, workers=0, progress=False)
    two = run_preprocess(synth_dataset, tmp_path / "pool", CFG, workers=2, progress=False)
    assert one["processed"] == two["processed"] > 0
    a, b = _records(tmp_path / "serial"), _records(tmp_path / "pool")
    assert len(a) == len(b) == one["processed"]
    assert a == b
    version = tmp_path / "pool" / (tmp_path / "pool" / "CURRENT").read_text().strip()
    assert not list(version.glob("worker-*"))  # every worker file renamed to a shard or gone
