"""Returning freed heap to the OS (protocol/heap.py): the daemons call it once a minute."""
from __future__ import annotations

import ctypes.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from protocol import heap

GLIBC = heap._malloc_trim is not None


_FRAGMENT_THEN_TRIM = """
import json
import numpy as np
from protocol import heap

def rss_anon_kib():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("RssAnon:"))

# Mid-sized buffers (below glibc's mmap threshold, so they come from the heap), each followed
# by a small one that stays alive: freeing the big ones leaves free pages in the middle of the
# heap, which free() never returns - what a daemon's heap looks like.
pairs = [(np.ones(100_000, np.uint8), np.ones(600, np.uint8)) for _ in range(2000)]
keep = [small for _, small in pairs]
del pairs                                           # frees the 2000 big ones (~200 MB)
before = rss_anon_kib()
trimmed = heap.trim()
after = rss_anon_kib()
print(json.dumps({"trimmed": trimmed, "before": before, "after": after,
                  "intact": all(int(k.sum()) == 600 for k in keep)}))
"""


@pytest.mark.skipif(not GLIBC, reason=f"malloc_trim is glibc's; this C library is "
                                      f"{ctypes.util.find_library('c')}")
def test_trim_gives_back_memory_that_was_freed_but_kept_by_the_allocator():
    # In a fresh interpreter: what the heap of the test process itself holds depends on every
    # test that ran before (its mmap threshold, its arenas), so RSS there says little.
    done = subprocess.run([sys.executable, "-c", _FRAGMENT_THEN_TRIM], capture_output=True,
                          text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert r["trimmed"] is True
    assert r["before"] - r["after"] > 50_000, r    # tens of MB back, not a few pages
    assert r["intact"]                              # live memory untouched


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
