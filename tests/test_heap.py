"""Returning freed heap to the OS (protocol/heap.py): the daemons call it once a minute."""
from __future__ import annotations

import ctypes.util

import numpy as np
import pytest

from protocol import heap

GLIBC = heap._malloc_trim is not None


def _rss_anon_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise AssertionError("no RssAnon in /proc/self/status")


@pytest.mark.skipif(not GLIBC, reason=f"malloc_trim is glibc's; this C library is "
                                      f"{ctypes.util.find_library('c')}")
def test_trim_gives_back_memory_that_was_freed_but_kept_by_the_allocator():
    # Mid-sized buffers (below glibc's mmap threshold, so they come from the heap), each
    # followed by a small one that stays alive: freeing the big ones leaves free pages in the
    # middle of the heap, which free() never returns - what a daemon's heap looks like.
    pairs = [(np.ones(100_000, np.uint8), np.ones(600, np.uint8)) for _ in range(2000)]
    keep = [small for _, small in pairs]
    del pairs                                           # frees the 2000 big ones (~200 MB)
    before = _rss_anon_kib()
    assert heap.trim() is True
    after = _rss_anon_kib()
    assert before - after > 50_000, (before, after)   # tens of MB back, not a few pages
    assert all(int(k.sum()) == 600 for k in keep)       # live memory untouched


def test_trimmer_trims_at_most_once_per_interval():
    t = heap.HeapTrimmer(interval_s=60.0)
    start = t._next - 60.0
    t.maybe(start + 1.0)
    assert t.trims == 0                                  # not due yet
    t.maybe(start + 60.0)
    t.maybe(start + 61.0)                                # due once, then not again for a minute
    assert t.trims == (1 if GLIBC else 0)
    t.maybe(start + 120.0)
    assert t.trims == (2 if GLIBC else 0)
