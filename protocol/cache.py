"""The disk cache's reader: `CacheReader` reads a cache at the speed of the disk.

`mm-producer preprocess` runs the same pipeline as the live producer and stores each sample's
payload (the exact bytes `SampleSchema.pack` makes, the same bytes a ring slot carries) in a
few large shard files, described by ONE memory-mappable index. Reading a sample is one memcpy
from a memory map of the shard into the caller's buffer (a pinned batch row, say): no per-sample
JSON, pickle, open() or allocation on the data path.

The format (layout, index fields, why it has this shape) is cache_format.py; its names are
re-exported here. Window reads are cache_windows.py, the compressed-record (h264/hevc) decode
path cache_compressed.py: mixins of `CacheReader`.
"""
from __future__ import annotations

import json
import mmap
import os
from pathlib import Path

import numpy as np

from . import video_store
from .memcopy import memcpy
from .errors import CacheCorrupt, CacheError, SchemaError
from .schema import Sample, SampleMeta, SampleSchema

from .cache_batch import (  # noqa: F401  (BatchMeta, RecordFailure, compact_rows: re-exported)
    _IOV_MAX,
    _PAD,
    BatchMeta,
    RecordFailure,
    _as_bytes_out,
    _mincore,
    _skip,
    compact_rows,
)
from .cache_compressed import CompressedReads
from .cache_windows import WindowReads
from .cache_format import (  # noqa: F401  (the format's names, re-exported)
    CURRENT,
    FORMAT_VERSION,
    GENERATIONS_FILE,
    INDEX_DTYPE,
    INDEX_DTYPE_V1,
    INDEX_FILE,
    KEYS_FILE,
    LOCK,
    MAGIC,
    MANIFEST_FILE,
    PACKED_ALIGN,
    READABLE_FORMATS,
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
class CacheReader(WindowReads, CompressedReads):
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
    _window_maps: list = []
    _window_mmaps: list = []

    def __init__(self, cache_dir: str | Path, split: str | None = None, *,
                 decode_threads: int | None = None):
        """`decode_threads`: threads that decode compressed (h264/hevc) records of a batch in
        parallel (PyAV releases the GIL while it decodes); default one per core, at most 8."""
        self.directory = Path(cache_dir)
        self.split = split
        self.decode_threads = (min(8, os.cpu_count() or 1) if decode_threads is None
                               else max(1, int(decode_threads)))
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
        self._store = index["store"].copy()
        self._crc = index["crc32"].copy()
        #: True when some record is h264/hevc: batches then take the decoding path.
        self.has_compressed = bool(np.isin(self._store, video_store.COMPRESSED).any())
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
        self._window_maps = [None] * len(self._fds)
        self._window_mmaps: list = []  # the MADV_RANDOM maps behind _window_maps (closed too)
        self._pid = os.getpid()
        self._resident = np.zeros(0, np.uint8)  # mincore() vector, sized on first use
        self._start_decoding()

    # --- pickling (spawn workers): same version, reopened by path ----------------------------

    def __getstate__(self) -> dict:
        return {"directory": str(self.directory), "split": self.split, "version": self.version,
                "decode_threads": self.decode_threads}

    def __setstate__(self, state: dict) -> None:
        self.directory = Path(state["directory"])
        self.split = state["split"]
        self.decode_threads = int(state.get("decode_threads", 1))
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
        """Bytes record i's payload needs in a buffer (its schema's; a compressed record is
        smaller on disk: `stored_nbytes`)."""
        return self.schema(i).payload_nbytes

    def stored_nbytes(self, i: int) -> int:
        """Bytes record i takes in its shard."""
        return int(self._nbytes[self._check(i)])

    def store(self, i: int) -> str:
        """How record i holds its video: "raw", "h264", "hevc" or "nv12" (video_store.STORES)."""
        return video_store.STORES[int(self._store[self._check(i)])]

    def store_counts(self) -> dict[str, int]:
        """Records of this reader per video store (those with at least one)."""
        counts = np.bincount(self._store, minlength=len(video_store.STORES))
        return {name: int(c) for name, c in zip(video_store.STORES, counts) if c}

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

    def generation_settings(self, generation: int) -> dict | None:
        """What made the records of `generation` (filter, sensors, methods, reason, ...) as
        the writer noted it in generations.json; None when the version does not say (read
        on first use: tools ask this, never the data path)."""
        if not hasattr(self, "_generations"):
            try:
                with open(self._vdir / GENERATIONS_FILE, "rb") as f:
                    found = json.loads(f.read())
                self._generations = found if isinstance(found, dict) else {}
            except (OSError, ValueError):
                self._generations = {}
        got = self._generations.get(str(int(generation)))
        return dict(got) if isinstance(got, dict) else None

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
            self._window_maps = [None] * len(self._fds)
            self._window_mmaps = []
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
        A compressed record is decoded into `out` (CorruptRecord when its bytes are damaged).
        """
        src = self._record(i)
        dst = _as_bytes_out(out)
        schema = self.schema(i)
        if dst.nbytes < schema.payload_nbytes:
            raise ValueError(f"out holds {dst.nbytes} bytes, record {i} needs "
                             f"{schema.payload_nbytes}")
        if int(self._store[i]) in video_store.COMPRESSED:
            error = self._decode_one(int(i), dst, schema, self._is_resident(src))
            if error is not None:
                raise error
            return schema, self.meta(i)
        n = src.nbytes
        if self._is_resident(src):
            np.copyto(dst[:n], src)
        else:
            self._pread_record(int(i), memoryview(dst)[:n])
        return schema, self.meta(i)

    def _pread_record(self, i: int, view: memoryview) -> None:
        fd, off, n = self._fds[int(self._shard[i])], int(self._offset[i]), len(view)
        done = 0
        while done < n:
            got = os.preadv(fd, [view[done:n]], off + done)
            if got == 0:
                raise CacheCorrupt(self._vdir, f"record {i}: shard ended early")
            done += got

    def read_batch_into(self, indices, out2d: np.ndarray, *, defer_video: bool = False
                        ) -> tuple[SampleSchema, "BatchMeta"]:
        """Read records `indices` into rows of `out2d` (uint8, (B, >= payload)); one schema only.

        Row j gets record indices[j]. Vectorised per batch (NOTE [batch reads]): index columns
        gathered once, records taken in (shard, offset) order, warm ones copied from the map by
        a GIL-released memcpy, cold ones hinted together and preadv'd (back-to-back ones in one
        call), no per-record Python objects: the metadata comes back as columns (`BatchMeta`;
        `metas[j]` builds a SampleMeta only when asked). Compressed (h264/hevc) records are
        decoded straight into their rows by `decode_threads` threads (NOTE [decoding records]
        in cache_compressed.py); one whose bytes are damaged is listed in `BatchMeta.failed`
        instead of raising.
        `defer_video`: compressed records get their other modalities only, and their checked
        video blobs come back in `BatchMeta.deferred` as (row, record, blob bytes), for a
        decoder on the GPU after the copy (trainer/nvdec.py); the rows' video bytes are left
        undefined until then.
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

        positions = None
        failed: list[RecordFailure] = []
        cold_count = 0
        if self.has_compressed:
            packed = np.isin(self._store[idx], video_store.COMPRESSED)
            if packed.any():
                rows = np.flatnonzero(packed)
                failed, cold_count, deferred = self._decode_batch(idx[rows], rows, out2d,
                                                                  schema, defer_video)
                positions = np.flatnonzero(~packed)
        if positions is None:
            positions = np.arange(len(idx))
            deferred = []
        if len(positions):
            cold_count += self._copy_payloads(idx[positions], positions, out2d, n)
        meta = BatchMeta(self, idx, cold=cold_count, failed=failed)
        meta.deferred = tuple(deferred)
        return schema, meta

    def _copy_payloads(self, recs: np.ndarray, positions: np.ndarray, out2d: np.ndarray,
                       n: int) -> int:
        """Payload records (raw, nv12) -> their rows: map copy when cached, else preadv.
        Returns how many were cold."""
        shards, offs = self._shard[recs], self._offset[recs]
        order = np.lexsort((offs, shards))  # file order: the kernel's readahead sees runs
        s_sh, s_off = shards[order], offs[order]
        rows = positions[order].tolist()
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
        return len(cold)

    def _resident_records(self, shards: np.ndarray, offs: np.ndarray, n) -> np.ndarray:
        """bool per record: are its first and last pages in the page cache? (two mincore calls)

        Not every page: mincore costs per page (~6 us on a 147-page record, 12% of the batch
        read, measured), and a record is read whole, by one read or one readahead window, so
        its pages come and go together. A wrong "yes" only costs speed (the map copy faults the
        missing pages in), never correctness. Also maps the batch's shards (once per process).
        """
        addrs = {sh: self._shard_array(sh).ctypes.data for sh in np.unique(shards).tolist()}
        if _mincore is None or np.all(np.asarray(n) == 0):
            return np.ones(len(offs), bool)
        if len(self._resident) < 2 * len(offs):
            self._resident = np.empty(2 * len(offs), np.uint8)
        vec = self._resident
        base = vec.ctypes.data
        page = mmap.PAGESIZE
        # n: one size, or one per record; the pages of a record's first and last bytes
        ends = (offs + np.maximum(np.broadcast_to(n, offs.shape), 1) - 1).tolist()
        for k, (sh, off, end) in enumerate(zip(shards.tolist(), offs.tolist(), ends)):
            a, z = (addrs[sh] + off) & ~(page - 1), (addrs[sh] + end) & ~(page - 1)
            if _mincore(a, 1, base + 2 * k) or _mincore(z, 1, base + 2 * k + 1):
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
        """Zero-copy, read-only arrays over the memory map (they keep the map alive); a
        compressed record is decoded into new arrays (CorruptRecord when damaged)."""
        schema = self.schema(i)
        if int(self._store[self._check(i)]) in video_store.COMPRESSED:
            out = np.empty(schema.payload_nbytes, np.uint8)
            self.read_into(i, out)
            return Sample(schema, self.meta(i), schema.views(out))
        src = self._record(i)
        return Sample(schema, self.meta(i), schema.views(src))

    # --- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Unmap and close; idempotent. Arrays from `view` keep their map alive until dropped."""
        self._arrays = []
        self._window_maps = []
        for mm in [*self._maps, *self._window_mmaps]:
            if mm is not None:
                try:
                    mm.close()
                except BufferError:  # a view() array still points into it; GC unmaps it later
                    pass
        self._maps = []
        self._window_mmaps = []
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
