"""The disk cache: its on-disk format and `CacheReader`, which reads it at the speed of the disk.

`mm-producer preprocess` runs the same pipeline as the live producer and stores each sample's
payload (the exact bytes `SampleSchema.pack` makes, the same bytes a ring slot carries) in a
few large shard files, described by ONE memory-mappable index. Reading a sample is one memcpy
from a memory map of the shard into the caller's buffer (a pinned batch row, say): no per-sample
JSON, pickle, open() or allocation on the data path.

Layout (`DIR` is the cache directory)::

    path                          what                                     written
    ----------------------------  ---------------------------------------  -----------------------
    DIR/.lock                     flock(2) held by the one live writer     CacheWriter.__init__
    DIR/CURRENT                   "v000007\\n": the committed version      temp + fsync + rename
                                                                           + fsync(DIR), last
    DIR/vNNNNNN/                  one complete version (6 digits, rising)  by one writer run
      shard-NNNNN.bin             payloads; each record starts at a        appended, ftruncated
                                  multiple of RECORD_ALIGN (4096) so reads  to a 4096 multiple,
                                  are page aligned (O_DIRECT-friendly);     fsync'd; rolls over at
                                  zero padding between records; compressed  shard_bytes (1 GiB)
                                  (h264/hevc) records start at multiples
                                  of PACKED_ALIGN (64) instead
      index.npy                   np.save of INDEX_DTYPE rows, one per      once, at commit
                                  record, in record order (see below)
      schemas.json                {"<schema_id>": "<SampleSchema.encode()>"}  once per schema
      keys.json                   {"keys": [[key, fingerprint], ...]}:     at commit; read only
                                  index.key_id points here; lets a re-run   by the next writer
                                  skip samples whose files did not change
      manifest.json               magic, format_version, version, created,  at commit, last file
                                  classes, splits, counts, records, shards  of the version
                                  (file + nbytes), config_hash, stores
                                  (records per video store), video_store
      generations.json            {"<generation>": {filter, sensors,       at commit, when known;
                                  methods, reason, ...}}: what made the     optional (readers
                                  records of each generation (0: the       without it: None)
                                  preprocess config; recorded live parts:
                                  the producer's generations)

    INDEX_DTYPE (packed, little-endian, 129 bytes a record; format 1 had the first 124)
    field         type  meaning
    offset        <u8   byte offset of the payload in its shard (multiple of 4096)
    nbytes        <u8   payload bytes (== schema.payload_nbytes)
    schema_id     <u8   key into schemas.json (SampleSchema.schema_id, never 0)
    timestamp_ns  <i8   SampleMeta.timestamp_ns
    index         <u8   SampleMeta.index
    shard         <u4   shard-<shard>.bin
    label         <i4   SampleMeta.label: index into manifest "classes", -1 unlabelled
    generation    <u4   SampleMeta.generation
    key_id        <u4   row of keys.json: which dataset sample made this record
    split         <u2   index into manifest "splits"
    source        S64   SampleMeta.source (utf-8, NUL padded)
    store         u1    how the record holds its video (protocol/video_store.py): 0 raw, 1 h264,
                        2 hevc, 3 nv12; raw and nv12 records are schema payloads, h264/hevc ones
                        the other modalities then a compressed clip (nbytes < payload_nbytes)
    crc32         <u4   CRC-32 of the record's bytes for h264/hevc records (checked before
                        decoding), 0 for the others

Format versions: 2 (this one) added `store` and `crc32` (issue 17: compressed video); a reader
opens format 1 caches as all-raw records, and a writer carries their records into format 2.

Why this shape:
- Atomic: a version is complete before CURRENT names it, and CURRENT is swapped by rename, so
  a killed writer leaves the previous version readable; the next writer deletes the leftover.
- A reader opens the version CURRENT names and keeps its file descriptors, so a writer that
  commits (and prunes old versions) while training runs never pulls the files from under it.
- keys.json is apart from manifest.json because it grows with the dataset and only a writer
  needs it; a reader (in every DataLoader worker) parses a manifest of constant size.
"""
from __future__ import annotations

import ctypes
import json
import mmap
import os
import re
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from . import _seqlock
from . import video_store
from .errors import (CacheCorrupt, CacheError, CacheNotFound, CorruptRecord, SchemaError,
                     VersionMismatch)
from .schema import Sample, SampleMeta, SampleSchema

MAGIC = "mmfeed-cache"
FORMAT_VERSION = 2
#: Formats a reader opens (a writer always writes FORMAT_VERSION).
READABLE_FORMATS = (1, 2)
RECORD_ALIGN = 4096
#: Where compressed (h264/hevc) records start: they are decoded, never read with O_DIRECT, and
#: small enough (a few KiB for a small clip) that page alignment would waste most of a shard.
PACKED_ALIGN = 64

CURRENT = "CURRENT"
LOCK = ".lock"
INDEX_FILE = "index.npy"
SCHEMAS_FILE = "schemas.json"
KEYS_FILE = "keys.json"
MANIFEST_FILE = "manifest.json"
GENERATIONS_FILE = "generations.json"
_VERSION_RE = re.compile(r"^v(\d{6})$")

_INDEX_FIELDS_V1 = [
    ("offset", "<u8"),
    ("nbytes", "<u8"),
    ("schema_id", "<u8"),
    ("timestamp_ns", "<i8"),
    ("index", "<u8"),
    ("shard", "<u4"),
    ("label", "<i4"),
    ("generation", "<u4"),
    ("key_id", "<u4"),
    ("split", "<u2"),
    ("source", "S64"),
]
#: Format 1's index rows (read, converted to INDEX_DTYPE with store 0 = raw).
INDEX_DTYPE_V1 = np.dtype(_INDEX_FIELDS_V1)
INDEX_DTYPE = np.dtype(_INDEX_FIELDS_V1 + [("store", "u1"), ("crc32", "<u4")])
_INDEX_DTYPES = {1: INDEX_DTYPE_V1, 2: INDEX_DTYPE}

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
# GIL-released C memcpy (_seqlock.copy, one call per record: the loop does nothing else), and
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


def align_up(n: int, a: int = RECORD_ALIGN) -> int:
    return (n + a - 1) // a * a


def version_name(number: int) -> str:
    return f"v{number:06d}"


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.bin"


def parse_version_name(name: str) -> int | None:
    """`v000007` -> 7; anything else -> None (not one of ours)."""
    m = _VERSION_RE.match(name)
    return int(m.group(1)) if m else None


def read_current(directory: Path) -> int:
    """The committed version number; CacheNotFound when there is none."""
    if not directory.is_dir():
        raise CacheNotFound(directory, "the directory does not exist")
    path = directory / CURRENT
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise CacheNotFound(directory, f"no {CURRENT} file, so no committed version") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CacheCorrupt(path, f"unreadable: {e}") from None
    number = parse_version_name(text.strip())
    if number is None:
        raise CacheCorrupt(path, f"expected a version name like v000001, found {text[:40]!r}")
    return number


@dataclass
class CacheVersion:
    """One committed version, loaded and checked: what both the reader and the writer start from."""

    path: Path
    number: int
    manifest: dict
    index: np.ndarray  # INDEX_DTYPE, in memory
    schemas: dict[int, SampleSchema]
    shard_paths: list[Path]

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    @property
    def config_hash(self) -> str:
        return str(self.manifest.get("config_hash", ""))


def _read_json(path: Path) -> object:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        raise CacheCorrupt(path, "missing") from None
    except (OSError, ValueError) as e:
        raise CacheCorrupt(path, f"not readable JSON: {e}") from None


def open_version(directory: str | Path, number: int | None = None) -> CacheVersion:
    """Load and check version `number` (default: the one CURRENT names) of the cache at `directory`.

    Checks magic and format version first (another version -> VersionMismatch naming both),
    then that the index, schemas and shards agree, vectorised over all records.
    """
    directory = Path(directory)
    if number is None:
        number = read_current(directory)
    vdir = directory / version_name(number)
    if not vdir.is_dir():
        raise CacheCorrupt(vdir, f"{CURRENT} names this version but its directory is missing")

    mpath = vdir / MANIFEST_FILE
    manifest = _read_json(mpath)
    if not isinstance(manifest, dict) or manifest.get("magic") != MAGIC:
        raise CacheCorrupt(mpath, f"expected an mmfeed cache manifest (magic {MAGIC!r})")
    found = manifest.get("format_version")
    if found not in READABLE_FORMATS:
        raise VersionMismatch(f"disk cache {directory}", found, FORMAT_VERSION)
    for field, kind in (("classes", list), ("splits", list), ("shards", list), ("records", int)):
        if not isinstance(manifest.get(field), kind):
            raise CacheCorrupt(mpath, f"field {field!r}: expected a {kind.__name__}")

    ipath = vdir / INDEX_FILE
    try:
        index = np.load(ipath, allow_pickle=False)
    except FileNotFoundError:
        raise CacheCorrupt(ipath, "missing") from None
    except (OSError, ValueError, EOFError) as e:
        raise CacheCorrupt(ipath, f"not a numpy index: {e}") from None
    want = _INDEX_DTYPES[found]
    if index.dtype != want or index.ndim != 1:
        raise CacheCorrupt(ipath, f"expected a 1-d array of format {found}'s index rows, "
                                  f"found {index.dtype}")
    if found == 1:  # every format 1 record is a raw schema payload
        upgraded = np.zeros(len(index), INDEX_DTYPE)
        for name in INDEX_DTYPE_V1.names:
            upgraded[name] = index[name]
        index = upgraded
    if len(index) != manifest["records"]:
        raise CacheCorrupt(
            ipath, f"expected {manifest['records']} records (manifest), found {len(index)}"
        )

    spath = vdir / SCHEMAS_FILE
    raw = _read_json(spath)
    if not isinstance(raw, dict):
        raise CacheCorrupt(spath, "expected an object schema_id -> encoded schema")
    schemas: dict[int, SampleSchema] = {}
    for sid, enc in raw.items():
        try:
            schema = SampleSchema.decode(enc)
        except SchemaError as e:
            raise CacheCorrupt(spath, f"schema {sid}: {e}") from None
        if str(schema.schema_id) != sid:
            raise CacheCorrupt(spath, f"schema {sid}: its encoding hashes to {schema.schema_id}")
        schemas[schema.schema_id] = schema

    shard_paths, shard_sizes = [], []
    for i, entry in enumerate(manifest["shards"]):
        if not isinstance(entry, dict) or entry.get("file") != shard_name(i):
            raise CacheCorrupt(mpath, f"shards[{i}]: expected {{'file': {shard_name(i)!r}, ...}}")
        p = vdir / entry["file"]
        try:
            size = p.stat().st_size
        except OSError as e:
            raise CacheCorrupt(p, f"shard unreadable: {e}") from None
        if size < int(entry.get("nbytes", 0)):
            raise CacheCorrupt(p, f"truncated: expected {entry['nbytes']} bytes, found {size}")
        shard_paths.append(p)
        shard_sizes.append(size)

    _check_index(ipath, index, schemas, np.array(shard_sizes, np.uint64), len(manifest["splits"]),
                 len(manifest["classes"]))
    return CacheVersion(vdir, number, manifest, index, schemas, shard_paths)


def _check_index(path: Path, index: np.ndarray, schemas: dict[int, SampleSchema],
                 shard_sizes: np.ndarray, n_splits: int, n_classes: int) -> None:
    """Every record inside its shard, aligned, of its schema's size: checked once, vectorised."""
    if len(index) == 0:
        return
    if index["store"].max() >= len(video_store.STORES):
        raise CacheCorrupt(path, f"a record names video store {index['store'].max()}; known: "
                                 f"{', '.join(video_store.STORES)}")
    if index["shard"].max() >= len(shard_sizes):
        raise CacheCorrupt(path, f"a record names shard {index['shard'].max()}, "
                                 f"the manifest lists {len(shard_sizes)}")
    compressed = np.isin(index["store"], video_store.COMPRESSED)
    if np.any(index["offset"][~compressed] % RECORD_ALIGN):
        raise CacheCorrupt(path, f"a raw/nv12 record offset is not a multiple of {RECORD_ALIGN}")
    if np.any(index["offset"][compressed] % PACKED_ALIGN):
        raise CacheCorrupt(path, f"a compressed record offset is not a multiple of "
                                 f"{PACKED_ALIGN}")
    ends = index["offset"] + index["nbytes"]
    bad = np.flatnonzero(ends > shard_sizes[index["shard"]])
    if len(bad):
        raise CacheCorrupt(path, f"record {bad[0]} ends past the end of its shard")
    if index["split"].max() >= n_splits:
        raise CacheCorrupt(path, f"a record names split {index['split'].max()} of {n_splits}")
    if index["label"].max() >= n_classes or index["label"].min() < -1:
        raise CacheCorrupt(path, f"a record's label is outside -1..{n_classes - 1}")
    if index["store"].max() >= len(video_store.STORES):
        raise CacheCorrupt(path, f"a record names video store {index['store'].max()}; known: "
                                 f"{', '.join(video_store.STORES)}")
    for sid in np.unique(index["schema_id"]):
        schema = schemas.get(int(sid))
        if schema is None:
            raise CacheCorrupt(path, f"schema {int(sid)} is not in {SCHEMAS_FILE}")
        mine = index["schema_id"] == sid
        whole = mine & ~compressed
        if np.any(index["nbytes"][whole] != schema.payload_nbytes):
            raise CacheCorrupt(path, f"a raw/nv12 record of schema {int(sid)} is not "
                                     f"{schema.payload_nbytes} bytes")
        nv12 = index["store"][whole] == video_store.NV12_STORE
        if np.any(nv12 != schema.packed):
            raise CacheCorrupt(path, f"schema {int(sid)} {'has' if schema.packed else 'lacks'} "
                                     f"an nv12 layout, but a record of it is stored "
                                     f"{'raw' if schema.packed else 'nv12'}")
        packed = mine & compressed
        if np.any(packed) and (video_store.VIDEO not in schema or schema.packed or np.any(
                index["nbytes"][packed] >= schema.payload_nbytes)):
            raise CacheCorrupt(path, f"a compressed record of schema {int(sid)} is not smaller "
                                     f"than its {schema.payload_nbytes}-byte payload or the "
                                     f"schema has no plain video")


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
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0
        self._scratch = threading.local()  # per decoding thread: cold compressed record bytes

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
        decoded straight into their rows by `decode_threads` threads (NOTE [decoding records]);
        one whose bytes are damaged is listed in `BatchMeta.failed` instead of raising.
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
                _seqlock.copy(dst, j * stride, self._maps[sh], int(s_off[k]), n)
            else:
                _seqlock.copy(memoryview(out2d[j]), 0, self._maps[sh], int(s_off[k]), n)
        cold = np.flatnonzero(~resident)
        if len(cold):
            self._read_cold(out2d, rows, s_sh, s_off, cold, n)
        return len(cold)

    # NOTE [decoding records]: a batch's h264/hevc records are decoded by a small thread pool
    # (one per reader and process, made on first use), each thread taking a contiguous share of
    # the batch: PyAV releases the GIL inside libavcodec and swscale, so the threads run on all
    # cores while the training step runs. Each record's bytes come from the map when cached
    # (zero copy) or from one pread into the thread's scratch buffer after one WILLNEED round
    # for the batch's cold records; its CRC is checked, then `video_store.decode_record_into`
    # writes the other modalities and the decoded clip straight into the record's row. A record
    # that fails is a RecordFailure (the batch goes on); nothing is retried.

    def _decoder_pool(self) -> ThreadPoolExecutor:
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = ThreadPoolExecutor(self.decode_threads,
                                            thread_name_prefix="mmfeed-cache-decode")
            self._pool_pid = os.getpid()
        return self._pool

    def _decode_batch(self, recs: np.ndarray, rows: np.ndarray, out2d: np.ndarray,
                      schema: SampleSchema, defer: bool = False
                      ) -> tuple[list[RecordFailure], int, list]:
        shards, offs, sizes = self._shard[recs], self._offset[recs], self._nbytes[recs]
        resident = self._resident_records(shards, offs, sizes)
        cold = np.flatnonzero(~resident)
        for k in cold.tolist():  # one round of hints: the cold records' reads overlap
            os.posix_fadvise(self._fds[int(shards[k])], int(offs[k]), int(sizes[k]),
                             os.POSIX_FADV_WILLNEED)
        jobs = list(zip(recs.tolist(), rows.tolist(), resident.tolist()))
        if defer:  # no decoding here: the rest into the rows, the blobs back to the caller
            failed, deferred = [], []
            for rec, row, warm in jobs:
                got = self._blob_of(rec, out2d[row], schema, warm)
                if isinstance(got, CorruptRecord):
                    failed.append(RecordFailure(row, rec, got))
                else:
                    deferred.append((row, rec, got))
            return failed, len(cold), deferred

        def run(share: list) -> list[RecordFailure]:
            out = []
            for rec, row, warm in share:
                error = self._decode_one(rec, out2d[row], schema, warm)
                if error is not None:
                    out.append(RecordFailure(row, rec, error))
            return out

        threads = min(self.decode_threads, len(jobs))
        if threads <= 1:
            return run(jobs), len(cold), []
        shares = [jobs[k::threads] for k in range(threads)]
        failed = [f for part in self._decoder_pool().map(run, shares) for f in part]
        return failed, len(cold), []

    def _blob_of(self, i: int, dst: np.ndarray, schema: SampleSchema,
                 warm: bool) -> "bytes | CorruptRecord":
        """The checked video blob of compressed record i (a copy), its rest copied into dst."""
        data = self._checked_bytes(i, warm)
        if isinstance(data, CorruptRecord):
            return data
        try:
            return bytes(video_store.copy_rest_into(schema, data, dst))
        except (video_store.VideoStoreError, SchemaError) as e:
            return self._corrupt(i, str(e))

    def _checked_bytes(self, i: int, warm: bool) -> "np.ndarray | CorruptRecord":
        """Record i's bytes (the map when cached, else this thread's scratch buffer), CRC
        checked."""
        n = int(self._nbytes[i])
        if warm:
            data = self._record(i)
        else:
            buf = getattr(self._scratch, "buf", None)
            if buf is None or len(buf) < n:
                buf = self._scratch.buf = bytearray(max(n, 1 << 16))
            data = np.frombuffer(buf, np.uint8, n)
            self._pread_record(i, memoryview(buf)[:n])
        if video_store.record_crc(data) != int(self._crc[i]):
            return self._corrupt(i, f"CRC-32 {video_store.record_crc(data):#010x} of its "
                                    f"{n} bytes, the index recorded {int(self._crc[i]):#010x}")
        return data

    def _decode_one(self, i: int, dst: np.ndarray, schema: SampleSchema,
                    warm: bool) -> CorruptRecord | None:
        """Decode compressed record i into dst (a row); the error instead of raising it."""
        data = self._checked_bytes(i, warm)
        if isinstance(data, CorruptRecord):
            return data
        try:
            video_store.decode_record_into(schema, data, dst)
        except (video_store.VideoStoreError, SchemaError) as e:
            return self._corrupt(i, str(e))
        return None

    def _corrupt(self, i: int, what: str) -> CorruptRecord:
        store = video_store.STORES[int(self._store[i])]
        return CorruptRecord(self._vdir / shard_name(int(self._shard[i])), i,
                             self._source[i].decode("utf-8", "replace"), int(self._offset[i]),
                             f"{store} record: {what}")

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

    # NOTE [windows]: `read_window_into` copies a window of one modality (a crop of a BEV grid
    # or a frame, a time window of a recording) from a second map of the shard that is advised
    # MADV_RANDOM, so a page fault reads only its own page instead of the kernel's read-around
    # (which would pull up to 32 neighbouring pages of data nobody asked for); the main map
    # keeps normal readahead for whole records. When the window's pages are not all cached, the
    # missing ones are hinted with WILLNEED in coalesced ranges first, so their reads go out
    # together rather than one synchronous fault at a time. Only the window's pages are read:
    # tests/test_windows.py checks it page by page with mincore on a cold file.

    def _window_array(self, shard: int) -> np.ndarray:
        self._shard_array(shard)  # pid check, closed check
        arr = self._window_maps[shard]
        if arr is None:
            size = os.fstat(self._fds[shard]).st_size
            if size == 0:
                arr = np.zeros(0, np.uint8)
            else:
                mm = mmap.mmap(self._fds[shard], size, prot=mmap.PROT_READ)
                if hasattr(mmap, "MADV_RANDOM"):
                    mm.madvise(mmap.MADV_RANDOM)
                self._window_mmaps.append(mm)
                arr = np.frombuffer(mm, np.uint8)
            self._window_maps[shard] = arr
        return arr

    def read_window_into(self, i: int, name: str, window, out: np.ndarray | None = None
                         ) -> np.ndarray:
        """Copy `window` of modality `name` of record i into `out` (allocated when None) and
        return it, reading only the window's bytes (NOTE [windows]).

        `window`: one `slice` (step 1) or (start, stop) pair per leading dimension of the
        modality's stored shape; dimensions not given are taken whole. A packed (NV12) modality
        is windowed in its leading dimensions (time) only. The video of a compressed record is
        decoded whole and then windowed: a codec has no partial read."""
        i = self._check(i)
        schema = self.schema(i)
        spec = schema.spec(name)
        shape = spec.stored_shape
        if not isinstance(window, (tuple, list)):
            window = (window,)
        if len(window) > len(shape):
            raise ValueError(f"window has {len(window)} dimensions, {name} is {list(shape)}")
        bounds = []
        for d, w in enumerate(list(window) + [slice(None)] * (len(shape) - len(window))):
            if isinstance(w, slice):
                if w.step not in (None, 1):
                    raise ValueError(f"window dimension {d}: step {w.step}; only 1 is read")
                start, stop, _ = w.indices(shape[d])
            else:
                start, stop = int(w[0]), int(w[1])
            if not 0 <= start < stop <= shape[d]:
                raise ValueError(f"window dimension {d}: {start}:{stop} is not inside "
                                 f"0:{shape[d]} of {name} {list(shape)}")
            bounds.append((start, stop))
        if spec.layout and bounds[-1] != (0, shape[-1]):
            raise ValueError(f"{name} is packed ({spec.layout}): window its leading "
                             f"dimensions only")
        slices = tuple(slice(a, b) for a, b in bounds)
        if out is None:
            out = np.empty([b - a for a, b in bounds], spec.dtype)
        store = int(self._store[i])
        if store in video_store.COMPRESSED:
            rest, off = video_store.rest_layout(schema)
            if name == video_store.VIDEO:  # no partial decode: the clip, then the window
                full = np.empty(schema.payload_nbytes, np.uint8)
                self.read_into(i, full)
                np.copyto(out, schema.views(full)[name][slices])
                return out
            base = int(self._offset[i]) + rest.offset(name)
        else:
            base = int(self._offset[i]) + schema.offset(name)
        arr = self._window_array(int(self._shard[i]))
        src = arr[base: base + spec.nbytes].view(spec.dtype).reshape(shape)[slices]
        self._hint_window(int(self._shard[i]), arr, base, shape, spec.itemsize, bounds)
        np.copyto(out, src)
        return out

    def _hint_window(self, shard: int, arr: np.ndarray, base: int, shape, itemsize: int,
                     bounds) -> None:
        """WILLNEED for the window's pages that are not cached (coalesced ranges)."""
        if _mincore is None:
            return
        # innermost dimension not taken whole: below it runs are contiguous
        d = max((k for k, (a, b) in enumerate(bounds) if (a, b) != (0, shape[k])), default=0)
        strides = np.cumprod([1, *shape[::-1]])[::-1][1:] * itemsize  # bytes per step, per dim
        run = (bounds[d][1] - bounds[d][0]) * int(strides[d])
        starts = np.array([base + bounds[d][0] * int(strides[d])], np.int64)
        for k in range(d - 1, -1, -1):
            steps = np.arange(bounds[k][0], bounds[k][1], dtype=np.int64) * int(strides[k])
            starts = (steps[:, None] + starts[None, :]).ravel()
        page = mmap.PAGESIZE
        addr = arr.ctypes.data
        first, last = (addr + int(starts.min())) // page, (addr + int(starts.max()) + run - 1) // page
        span = last - first + 1
        if len(self._resident) < span:
            self._resident = np.empty(span, np.uint8)
        if _mincore(first * page, span * page, self._resident.ctypes.data) != 0:
            return
        p0 = (addr + starts) // page - first
        p1 = (addr + starts + run - 1) // page - first
        marks = np.zeros(span + 1, np.int64)  # +1 where a run's pages begin, -1 after they end
        np.add.at(marks, p0, 1)
        np.add.at(marks, p1 + 1, -1)
        need = np.cumsum(marks[:span]) > 0
        cold = need & ~(self._resident[:span] & 1).astype(bool)
        if not cold.any():
            return
        edges = np.flatnonzero(np.diff(np.r_[0, cold.astype(np.int8), 0]))
        fd = self._fds[shard]
        for a, b in zip(edges[0::2].tolist(), edges[1::2].tolist()):
            off = (first + a) * page - addr
            os.posix_fadvise(fd, max(off, 0), (b - a) * page, os.POSIX_FADV_WILLNEED)

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
