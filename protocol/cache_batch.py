"""What a batch read of the disk cache hands back, and the small pieces its reads share:
`BatchMeta` (the batch's metadata as numpy columns), `RecordFailure` and `compact_rows` (a
damaged record dropped from its batch), the iovec helpers of the cold-read path, and
mincore(2) (which pages of a map are in the page cache). Used by cache.py's `CacheReader`
and its window reads (cache_windows.py)."""
from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from .cache_format import RECORD_ALIGN
from .errors import CorruptRecord
from .schema import SampleMeta

if TYPE_CHECKING:
    from .cache import CacheReader

_IOV_MAX = 1024
_PAD = bytearray(RECORD_ALIGN)  # sink for the alignment padding between coalesced records
_libc = ctypes.CDLL(None, use_errno=True)
_mincore = getattr(_libc, "mincore", None)
if _mincore is not None:
    _mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    _mincore.restype = ctypes.c_int


def _as_bytes_out(out) -> np.ndarray:
    """A writable flat uint8 view of `out`, never a copy (a copy would silently lose the data)."""
    if isinstance(out, np.ndarray):
        if not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError("out must be a writable C-contiguous array")
        return out.reshape(-1).view(np.uint8)
    arr = np.frombuffer(out, np.uint8)
    if not arr.flags.writeable:
        raise ValueError(f"out must be writable, got a read-only {type(out).__name__}")
    return arr


def _skip(iov: list, nbytes: int) -> list:
    """The iovecs left after the first `nbytes` were filled (a short read resumes here)."""
    k = 0
    while k < len(iov) and nbytes >= len(iov[k]):
        nbytes -= len(iov[k])
        k += 1
    rest = iov[k:]
    if rest and nbytes:
        rest[0] = rest[0][nbytes:]
    return rest


class RecordFailure(NamedTuple):
    """A record of a batch that could not be read: its row in the batch, its record number in
    the reader, and the CorruptRecord error (which names the sample and the shard file)."""

    row: int
    record: int
    error: CorruptRecord


class BatchMeta(Sequence):
    """The metadata of a batch read by `read_batch_into`, as numpy columns (row j = record j).

    Gathered with one fancy index per column; a `SampleMeta` is built only for `metas[j]`,
    so a loader that needs one field (`generation[0]`) pays nothing per record. `cold` counts
    the records that were not (all) in the page cache, i.e. that this batch read from disk.
    `failed` lists the rows whose record was corrupt (their bytes are undefined): the caller
    drops them (`keep_rows`) and counts them; empty on a clean batch.
    """

    __slots__ = ("label", "timestamp_ns", "generation", "index", "source", "records", "cold",
                 "failed", "deferred")

    def __init__(self, reader: "CacheReader", idx: np.ndarray, cold: int = 0,
                 failed: tuple = ()):
        self.records = idx
        self.label = reader.labels[idx]
        self.timestamp_ns = reader._timestamp[idx]
        self.generation = reader._generation[idx]
        self.index = reader._meta_index[idx]
        self.source = reader._source[idx]
        self.cold = int(cold)
        self.failed: tuple[RecordFailure, ...] = tuple(failed)
        self.deferred: tuple = ()  # (row, record, video blob) with read_batch_into(defer_video)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, j):
        if isinstance(j, slice):
            return [self[k] for k in range(*j.indices(len(self)))]
        return SampleMeta(
            label=int(self.label[j]),
            timestamp_ns=int(self.timestamp_ns[j]),
            generation=int(self.generation[j]),
            source=self.source[j].decode("utf-8", "replace"),
            index=int(self.index[j]),
        )

    def __repr__(self) -> str:
        bad = f", {len(self.failed)} corrupt" if self.failed else ""
        return f"BatchMeta({len(self)} records, {self.cold} read from disk{bad})"


def compact_rows(out2d, n: int, failed: Sequence[RecordFailure], extra=()) -> np.ndarray:
    """Drop the failed rows of a batch of `n` rows in place: each is overwritten by the last
    good row (row order does not matter in a shuffled batch). Works on numpy arrays and torch
    tensors alike; `extra` are per-row arrays (labels ...) moved the same way. Returns the
    kept rows' original positions (the new row j held row keep[j]); len(keep) is the new n."""
    keep = np.arange(n)
    bad = sorted({f.row for f in failed})
    if not bad:
        return keep
    good = np.setdiff1d(keep, bad)
    holes = [r for r in bad if r < len(good)]  # rows below the new end that need a good row
    movers = good[good >= len(good)][: len(holes)]  # good rows past the new end
    for dst, src in zip(holes, movers.tolist()):
        out2d[dst] = out2d[src]
        for a in extra:
            a[dst] = a[src]
        keep[dst] = src
    return keep[: len(good)]
