"""`memcpy(dst, dst_off, src, src_off, n)`: one plain copy of `n` bytes between two buffers
with the GIL released, for hot paths that copy whole records (the disk cache's reads,
protocol/cache.py) while other threads run.

It is compiled into the ring's C helper (protocol/_seqlock.c, so that one small extension is
built, not two) but has nothing to do with the seqlock: no ordering, no sequence check. Code
that wants a plain copy imports it from here, never from `_seqlock`.
"""
from __future__ import annotations

from ._seqlock import copy as memcpy

__all__ = ["memcpy"]
