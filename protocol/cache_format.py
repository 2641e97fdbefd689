"""The disk cache's on-disk format and how a version of it is opened: the one description
that the reader (cache.py, `CacheReader`) and the writer (producer/cache_writer.py) share.

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

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import video_store
from .errors import CacheCorrupt, CacheNotFound, SchemaError, VersionMismatch
from .schema import SampleSchema

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
