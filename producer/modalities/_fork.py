"""Collect unreachable PyAV objects before this process forks.

WHY: a decoder opened with FFmpeg's frame threads owns a thread pool; freeing its codec
context joins those threads (`avcodec_free_context` -> `pthread_cond_destroy` on the pool's
condition variables). A forked child (a DataLoader worker, a `multiprocessing` pool) inherits
the parent's memory but none of its threads. When the parent forked while such a context was
garbage in a reference cycle (an exception's traceback holding a container, say) the child's
first garbage collection freed it and waited forever for threads it never had - seen as a
DataLoader worker hanging in `gc_collect_main -> CodecContext.__dealloc__` (py-spy), after
other work had left a cycle behind. Collecting in the parent just before the fork frees those
objects where their threads exist; the child then inherits only live ones.

Cost: one `gc.collect()` per fork in a process that imported mmfeed's decoders (milliseconds
for a few hundred thousand objects); forks are rare next to decoding.
"""
from __future__ import annotations

import gc
import os

_registered = False


def collect_before_fork() -> None:
    """Free cyclic garbage now, in the parent, where the threads it may own still run."""
    gc.collect()


def install() -> None:
    """Register `collect_before_fork` as an os.fork 'before' hook, once per process."""
    global _registered
    if not _registered:
        os.register_at_fork(before=collect_before_fork)
        _registered = True


install()
