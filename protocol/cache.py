"""The disk cache's reader: `CacheReader` reads a cache at the speed of the disk.

`mm-producer preprocess` runs the same pipeline as the live producer and stores each sample's
payload (the exact bytes `SampleSchema.pack` makes, the same bytes a ring slot carries) in a
few large shard files, described by ONE memory-mappable index. Reading a sample is one memcpy
from a memory map of the shard into the caller's buffer (a pinned batch row, say): no per-sample
JSON, pickle, open() or allocation on the data path.

The format (layout, index fields, why it has this shape) is cache_format.py; its names are
re-exported here.
"""
from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .memcopy import memcpy
from .errors import CacheCorrupt, CacheError, SchemaError
from .schema import Sample, SampleMeta, SampleSchema

from .cache_format import (  # noqa: F401  (the format's names, re-exported)
    CURRENT,
    FORMAT_VERSION,
    INDEX_DTYPE,
    INDEX_FILE,
    KEYS_FILE,
    LOCK,
    MAGIC,
    MANIFEST_FILE,
    RECORD_ALIGN,
    SCHEMAS_FILE,
    CacheVersion,
    align_up,
    open_version,
    parse_version_name,
    read_current,
    shard_name,
    version_name,
)

# NOTE [one copy, two ways]: a record is copied into the caller's buffer either from the
# memory map (np.copyto) when all its pages are in the page cache, or by preadv() straight from
# the file when some are not; mincore() decides, one syscall per record. Why both: on warm data
# the map copy beats read() (measured 18 vs 14 GB/s: no per-call kernel copy overhead), but page
# faults on a map read from disk synchronously, a window at a time, so a cold pass through the
# map alone ran at 0.45x a sequential read(); preadv gets the kernel's pipelined readahead on the
# file and runs at the disk's speed. Either way the bytes are copied once, into `out`.
# Shuffled cold reads are bound by one read in flight at a time: prefetch() hints a whole batch
# with posix_fadvise(WILLNEED) so its reads overlap.
#
# NOTE [batch reads]: read_batch_into is the trainer's data path, vectorised per batch. Profiled
# on 588 KiB records (bench/loader.py), the per-record path spent ~55% in the map copy of a
# freshly mapped shard (first-touch page faults), ~20% in mincore (on PTEs not yet mapped it
# looks each page up in the page cache: ~10 us a record) and ~8% in per-record fadvise; Python
# per record mattered only on small records. A batch now: gathers its index columns with one
# fancy index each, sorts its records by (shard, offset), asks mincore once per record into one
# vector and reduces it with one numpy call, copies the resident records from the map with the
# GIL-released C memcpy (memcopy.memcpy, one call per record: the loop does nothing else), and
# reads the rest (cold) with preadv after ONE round of fadvise(WILLNEED) over all of them, so
# their disk reads overlap; cold records that lie back to back in a shard go in one preadv whose
# iovecs scatter them into their rows (the padding between them lands in a scratch page).
# Measured warm, steady state (maps populated): map copy 29.6k records/s with mincore vs 23.0k
# for pread() of the same records and 18.8k for preadv(RWF_NOWAIT): the kernel's copy_to_user is
# slower than a user-space memcpy here, so the map stays the warm path.
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


class BatchMeta(Sequence):
    """The metadata of a batch read by `read_batch_into`, as numpy columns (row j = record j).

    Gathered with one fancy index per column; a `SampleMeta` is built only for `metas[j]`,
    so a loader that needs one field (`generation[0]`) pays nothing per record. `cold` counts
    the records that were not (all) in the page cache, i.e. that this batch read from disk.
    """

    __slots__ = ("label", "timestamp_ns", "generation", "index", "source", "records", "cold")

    def __init__(self, reader: "CacheReader", idx: np.ndarray, cold: int = 0):
        self.records = idx
        self.label = reader.labels[idx]
        self.timestamp_ns = reader._timestamp[idx]
        self.generation = reader._generation[idx]
        self.index = reader._meta_index[idx]
        self.source = reader._source[idx]
        self.cold = int(cold)

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
        return f"BatchMeta({len(self)} records, {self.cold} read from disk)"


class CacheReader:
    """Random access to one split (or all) of a committed cache version; no torch.

    Opens the version CURRENT names and all its shard files at construction, then memory-maps
    each shard lazily, once per process: a forked DataLoader worker notices the pid change and
    maps afresh from the inherited descriptors; a pickled reader (spawn) reopens the same
    version by path. `read_into` is the data path; `view` is for inspection and tests.
    """

    # Class-level defaults make close() safe after a half-built constructor.
    _fds: list[int] = []
    _maps: list = []
    _arrays: list = []

    def __init__(self, cache_dir: str | Path, split: str | None = None):
        self.directory = Path(cache_dir)
        self.split = split
        self._open(open_version(self.directory))

    def _open(self, v: CacheVersion) -> None:
        self.version = v.number
        self._vdir = v.path
        self.classes: list[str] = v.classes
        self.splits: list[str] = v.splits
        index = v.index
        if self.split is not None:
            if self.split not in self.splits:
                raise CacheError(
                    f"{self.directory}: no split {self.split!r} in the cache; it has {self.splits}"
                )
            index = index[index["split"] == self.splits.index(self.split)]
        # Columns as plain arrays: the hot path indexes these, not a structured row.
        self._offset = index["offset"].astype(np.int64)
        self._nbytes = index["nbytes"].astype(np.int64)
        self._shard = index["shard"].astype(np.int64)
        self._schema_id = index["schema_id"].copy()
        self._split_id = index["split"].copy()
        self.labels: np.ndarray = index["label"].astype(np.int64)
        self._timestamp = index["timestamp_ns"].copy()
        self._generation = index["generation"].copy()
        self._meta_index = index["index"].copy()
        self._source = index["source"].copy()
        self._schemas = v.schemas
        used = [self._schemas[int(s)].payload_nbytes for s in np.unique(self._schema_id)]
        self.max_payload_nbytes: int = max(used, default=0)
        self._fds = []
        try:
            for p in v.shard_paths:
                self._fds.append(os.open(p, os.O_RDONLY | os.O_CLOEXEC))
        except OSError as e:
            self.close()
            raise CacheCorrupt(p, f"cannot open shard: {e}") from None
        self._maps = [None] * len(self._fds)
        self._arrays = [None] * len(self._fds)
        self._pid = os.getpid()
        self._resident = np.zeros(0, np.uint8)  # mincore() vector, sized on first use

    # --- pickling (spawn workers): same version, reopened by path ----------------------------

    def __getstate__(self) -> dict:
        return {"directory": str(self.directory), "split": self.split, "version": self.version}

    def __setstate__(self, state: dict) -> None:
        self.directory = Path(state["directory"])
        self.split = state["split"]
        self._open(open_version(self.directory, state["version"]))

    # --- metadata ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._offset)

    def _check(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < len(self._offset):
            raise IndexError(f"record {i} out of range: {self} has {len(self._offset)} records")
        return i

    def schema(self, i: int) -> SampleSchema:
        return self._schemas[int(self._schema_id[self._check(i)])]

    def payload_nbytes(self, i: int) -> int:
        return int(self._nbytes[self._check(i)])

    def meta(self, i: int) -> SampleMeta:
        i = self._check(i)
        return SampleMeta(
            label=int(self.labels[i]),
            timestamp_ns=int(self._timestamp[i]),
            generation=int(self._generation[i]),
            source=self._source[i].decode("utf-8", "replace"),
            index=int(self._meta_index[i]),
        )

    def split_of(self, i: int) -> str:
        return self.splits[int(self._split_id[self._check(i)])]

    def schema_groups(self) -> dict[int, np.ndarray]:
        """schema_id -> indices of this reader's records with that schema (for batching by shape)."""
        ids, inverse = np.unique(self._schema_id, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.searchsorted(inverse[order], np.arange(len(ids) + 1))
        return {int(s): order[bounds[k]: bounds[k + 1]] for k, s in enumerate(ids)}

    # --- data -------------------------------------------------------------------------------

    def _shard_array(self, shard: int) -> np.ndarray:
        if self._pid != os.getpid():
            # NOTE [fork]: the parent's maps are valid in a forked child, but each process maps
            # its own so that close() in one never touches another and page-fault accounting is
            # per worker. The descriptors are shared; mmap and pread never use their offsets.
            self._maps = [None] * len(self._fds)
            self._arrays = [None] * len(self._fds)
            self._pid = os.getpid()
        arr = self._arrays[shard]
        if arr is None:
            if not self._fds:
                raise CacheError(f"{self.directory}: reader is closed")
            size = os.fstat(self._fds[shard]).st_size
            if size == 0:  # mmap refuses empty files; an empty shard holds no records anyway
                arr = np.zeros(0, np.uint8)
            else:
                mm = mmap.mmap(self._fds[shard], size, prot=mmap.PROT_READ)
                self._maps[shard] = mm
                arr = np.frombuffer(mm, np.uint8)
            self._arrays[shard] = arr
        return arr

    def _record(self, i: int) -> np.ndarray:
        i = self._check(i)
        off, n = int(self._offset[i]), int(self._nbytes[i])
        return self._shard_array(int(self._shard[i]))[off: off + n]

    def _is_resident(self, src: np.ndarray) -> bool:
        """Are all pages of this slice of a map in the page cache? (see NOTE [one copy, two ways])"""
        if _mincore is None or src.nbytes == 0:
            return True
        start = src.ctypes.data & ~(mmap.PAGESIZE - 1)
        length = src.ctypes.data + src.nbytes - start
        pages = (length + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        if len(self._resident) < pages:
            self._resident = np.empty(pages, np.uint8)
        if _mincore(start, length, self._resident.ctypes.data) != 0:
            return True  # cannot tell: the map copy is always correct
        return bool(np.all(self._resident[:pages] & 1))

    def _advise(self, idx: np.ndarray) -> None:
        """One WILLNEED per run of records that sit in one shard (index order is file order)."""
        shards, offs = self._shard[idx], self._offset[idx]
        ends = offs + self._nbytes[idx]
        # a new run where the shard changes or the next record is not right after this one (a
        # split-filtered reader skips other splits' records: never read those)
        gap = offs[1:] - ends[:-1]
        cut = np.flatnonzero((shards[1:] != shards[:-1]) | (gap < 0) | (gap >= RECORD_ALIGN)) + 1
        for a, b in zip(np.r_[0, cut], np.r_[cut, len(idx)]):
            start = int(offs[a])
            os.posix_fadvise(self._fds[int(shards[a])], start, int(ends[b - 1]) - start,
                             os.POSIX_FADV_WILLNEED)

    def prefetch(self, indices) -> None:
        """Ask the kernel to start reading these records now (asynchronously); call it with the
        next batch while this one trains (read_batch_into hints only what it found uncached,
        when it needs it: too late to overlap with the previous batch's training)."""
        idx = np.unique(np.asarray(indices, dtype=np.int64).reshape(-1))
        if len(idx) and (idx[0] < 0 or idx[-1] >= len(self._offset)):
            raise IndexError(f"prefetch: indices outside 0..{len(self._offset) - 1}")
        if len(idx) and self._fds:
            self._advise(idx)

    def read_into(self, i: int, out) -> tuple[SampleSchema, SampleMeta]:
        """Copy record `i`'s payload into `out` with one memcpy; `schema.views(out)` are its arrays.

        `out` is any writable contiguous buffer of at least `payload_nbytes(i)` bytes: a numpy
        uint8 array, a bytearray, a pinned tensor's `.numpy()`. No intermediate bytes object.
        """
        src = self._record(i)
        dst = _as_bytes_out(out)
        n = src.nbytes
        if dst.nbytes < n:
            raise ValueError(f"out holds {dst.nbytes} bytes, record {i} needs {n}")
        if self._is_resident(src):
            np.copyto(dst[:n], src)
        else:
            fd, off, view = self._fds[int(self._shard[i])], int(self._offset[i]), memoryview(dst)
            done = 0
            while done < n:
                got = os.preadv(fd, [view[done:n]], off + done)
                if got == 0:
                    raise CacheCorrupt(self._vdir, f"record {i}: shard ended early")
                done += got
        return self.schema(i), self.meta(i)

    def read_batch_into(self, indices, out2d: np.ndarray) -> tuple[SampleSchema, "BatchMeta"]:
        """Read records `indices` into rows of `out2d` (uint8, (B, >= payload)); one schema only.

        Row j gets record indices[j]. Vectorised per batch (NOTE [batch reads]): index columns
        gathered once, records taken in (shard, offset) order, warm ones copied from the map by
        a GIL-released memcpy, cold ones hinted together and preadv'd (back-to-back ones in one
        call), no per-record Python objects: the metadata comes back as columns (`BatchMeta`;
        `metas[j]` builds a SampleMeta only when asked).
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if (not isinstance(out2d, np.ndarray) or out2d.ndim != 2 or out2d.dtype != np.uint8
                or out2d.shape[0] < len(idx)):
            raise ValueError(f"out2d must be a uint8 array (>= {len(idx)}, payload), got "
                             f"{getattr(out2d, 'dtype', type(out2d).__name__)}"
                             f"{list(getattr(out2d, 'shape', ()))}")
        if not out2d.flags.writeable or (out2d.shape[1] > 1 and out2d.strides[1] != 1):
            raise ValueError("out2d must be writable with contiguous rows")
        if len(idx) == 0:
            raise ValueError("read_batch_into needs at least one index")
        bad = np.flatnonzero((idx < 0) | (idx >= len(self._offset)))
        if len(bad):
            raise IndexError(f"record {int(idx[bad[0]])} out of range: {self} has "
                             f"{len(self._offset)} records")
        sids = self._schema_id[idx]
        if np.any(sids != sids[0]):
            raise SchemaError(f"records {idx.tolist()} have {len(np.unique(sids))} different "
                              f"schemas; group them with schema_groups() first")
        schema = self._schemas[int(sids[0])]
        n = schema.payload_nbytes
        if out2d.shape[1] < n:
            raise ValueError(f"out2d rows hold {out2d.shape[1]} bytes, schema needs {n}")
        if not self._fds:
            raise CacheError(f"{self.directory}: reader is closed")

        shards, offs = self._shard[idx], self._offset[idx]
        order = np.lexsort((offs, shards))  # file order: the kernel's readahead sees runs
        s_sh, s_off = shards[order], offs[order]
        rows = order.tolist()
        resident = self._resident_records(s_sh, s_off, n)
        dst = out2d if out2d.flags.c_contiguous else None
        stride = out2d.strides[0]
        for k in np.flatnonzero(resident).tolist():
            sh, j = int(s_sh[k]), rows[k]
            if dst is not None:
                memcpy(dst, j * stride, self._maps[sh], int(s_off[k]), n)
            else:
                memcpy(memoryview(out2d[j]), 0, self._maps[sh], int(s_off[k]), n)
        cold = np.flatnonzero(~resident)
        if len(cold):
            self._read_cold(out2d, rows, s_sh, s_off, cold, n)
        return schema, BatchMeta(self, idx, cold=len(cold))

    def _resident_records(self, shards: np.ndarray, offs: np.ndarray, n: int) -> np.ndarray:
        """bool per record: are its first and last pages in the page cache? (two mincore calls)

        Not every page: mincore costs per page (~6 us on a 147-page record, 12% of the batch
        read, measured), and a record is read whole, by one read or one readahead window, so
        its pages come and go together. A wrong "yes" only costs speed (the map copy faults the
        missing pages in), never correctness. Also maps the batch's shards (once per process).
        """
        addrs = {sh: self._shard_array(sh).ctypes.data for sh in np.unique(shards).tolist()}
        if _mincore is None or n == 0:
            return np.ones(len(offs), bool)
        if len(self._resident) < 2 * len(offs):
            self._resident = np.empty(2 * len(offs), np.uint8)
        vec = self._resident
        base = vec.ctypes.data
        page = mmap.PAGESIZE
        last = (n - 1) // page * page  # records start page aligned (RECORD_ALIGN)
        for k, (sh, off) in enumerate(zip(shards.tolist(), offs.tolist())):
            a = addrs[sh] + off
            if _mincore(a, 1, base + 2 * k) or _mincore(a + last, 1, base + 2 * k + 1):
                vec[2 * k: 2 * k + 2] = 1  # cannot tell: the map copy is always right
        v = vec[: 2 * len(offs)] & 1
        return (v[0::2] & v[1::2]).astype(bool)

    def _read_cold(self, out2d: np.ndarray, rows: list, s_sh: np.ndarray, s_off: np.ndarray,
                   cold: np.ndarray, n: int) -> None:
        """preadv the records not in the page cache, hinted together first so reads overlap."""
        c_sh, c_off = s_sh[cold], s_off[cold]
        gap = c_off[1:] - (c_off[:-1] + n)
        cut = np.flatnonzero((c_sh[1:] != c_sh[:-1]) | (gap < 0) | (gap >= RECORD_ALIGN)) + 1
        runs = list(zip(np.r_[0, cut].tolist(), np.r_[cut, len(cold)].tolist()))
        for a, b in runs:
            start = int(c_off[a])
            os.posix_fadvise(self._fds[int(c_sh[a])], start, int(c_off[b - 1]) + n - start,
                             os.POSIX_FADV_WILLNEED)
        gaps = gap.tolist()
        for a, b in runs:
            # at most IOV_MAX iovecs per call: record, pad, record, ... (2 per record - 1)
            for c in range(a, b, _IOV_MAX // 2):
                d = min(b, c + _IOV_MAX // 2)
                iov: list = []
                for k in range(c, d):
                    iov.append(memoryview(out2d[rows[int(cold[k])]])[:n])
                    if k + 1 < d and gaps[k]:
                        iov.append(memoryview(_PAD)[: gaps[k]])
                off = int(c_off[c])
                self._pread_full(self._fds[int(c_sh[c])], iov, off, int(c_off[d - 1]) + n - off)

    def _pread_full(self, fd: int, iov: list, off: int, left: int) -> None:
        while left > 0:
            got = os.preadv(fd, iov, off)
            if got == 0:
                raise CacheCorrupt(self._vdir, f"a shard ended early, {left} bytes short at "
                                               f"offset {off}")
            iov, off, left = _skip(iov, got), off + got, left - got

    def view(self, i: int) -> Sample:
        """Zero-copy, read-only arrays over the memory map (they keep the map alive)."""
        src = self._record(i)
        schema = self.schema(i)
        return Sample(schema, self.meta(i), schema.views(src))

    # --- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Unmap and close; idempotent. Arrays from `view` keep their map alive until dropped."""
        self._arrays = [None] * len(self._arrays)
        for mm in self._maps:
            if mm is not None:
                try:
                    mm.close()
                except BufferError:  # a view() array still points into it; GC unmaps it later
                    pass
        self._maps = []
        self._arrays = []
        fds, self._fds = self._fds, []
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> "CacheReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def __repr__(self) -> str:
        split = f", split={self.split!r}" if self.split else ""
        return (f"CacheReader({str(self.directory)!r}{split}: version {getattr(self, 'version', '?')}, "
                f"{len(getattr(self, '_offset', ()))} records)")
