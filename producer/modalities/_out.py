"""`out=` for the modality functions: where a caller (the producer's loan path,
producer/slot_fill.py) hands in a view of a ring slot, a modality writes its result there
instead of into an array of its own, and returns that view.

A view that does not fit what the modality makes (another shape or dtype: the sample's
schema changed) is not used: the modality makes its own array and the caller sees that it
was not written in place (`result is not out`).
"""
from __future__ import annotations

import numpy as np


def fits(out: np.ndarray | None, shape: tuple[int, ...], dtype) -> bool:
    """True when `out` is a writable C-contiguous array of exactly `shape` and `dtype`."""
    return (out is not None and out.shape == tuple(shape) and out.dtype == np.dtype(dtype)
            and out.flags.c_contiguous and out.flags.writeable)
