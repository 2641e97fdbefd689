"""One thread per worker process: torch intra-op, the video decoder and BLAS.

WHY (issue 20, measured on the 2-core machine): a preprocess worker spent ~2.5-4x the sum of
the isolated per-modality times per sample, and 0, 1 and 2 workers took the same time. torch
and the decoder were already single-threaded in the workers; numpy's OpenBLAS was not. It
starts one thread per core, and `mel_power`'s filterbank product (64 x 201 @ 201 x 101, far
too small to gain from threads) then cost 9.6 ms CPU (30 ms wall under load) instead of
0.27 ms CPU with one thread: its threads spin-wait for work and, with a pool of one process
per core, 2 workers x 2 BLAS threads fight over 2 cores. A process that already is one of N
per core wants every library single-threaded; this sets all three, at run time (threadpoolctl
reaches the BLAS that numpy loaded, whatever the environment said when it was imported).
"""
from __future__ import annotations


def single_threaded() -> None:
    """Make torch, the PyAV decoder and BLAS/OpenMP use one thread each in this process."""
    import torch
    from threadpoolctl import threadpool_limits

    from .modalities import video

    torch.set_num_threads(1)
    video.set_decode_threads(1)
    threadpool_limits(limits=1)  # numpy's BLAS and any OpenMP runtime loaded so far


def blas_thread_count() -> int:
    """The most threads any loaded BLAS (numpy's OpenBLAS, MKL, ...) uses now; 0 with none."""
    from threadpoolctl import threadpool_info

    return max((int(p.get("num_threads", 0)) for p in threadpool_info()
                if p.get("user_api") == "blas"), default=0)


def blas_threads() -> dict[str, int]:
    """Thread count per loaded thread pool (`openblas`, `openmp`, ...): for tests and status."""
    from threadpoolctl import threadpool_info

    out: dict[str, int] = {}
    for pool in threadpool_info():
        name = pool.get("internal_api", "?")
        out[name] = max(out.get(name, 0), int(pool.get("num_threads", 0)))
    return out
