"""CacheWriter: writes one new version of the disk cache and switches to it atomically.

The format is defined (and drawn) in `protocol/cache.py`; this module only produces it.
Carrying records of the committed version over (`keep_if_unchanged`, `carry_over`,
`carry_all`) is cache_carry.py, a mixin of `CacheWriter`.

A run of `mm-producer preprocess` opens one writer, and for each dataset sample either keeps it
(`keep_if_unchanged`: same files, same config, same classes as the committed version, so its
record bytes are copied over with copy_file_range and nothing is decoded) or adds freshly made
records (`add`, with arrays or with payload bytes a worker process already packed). `commit()`
makes the new version live; anything else (an exception, a SIGKILL, leaving the `with` block
without committing) leaves the previous version as it was, and the next writer removes the
half-written directory.

    with CacheWriter(cache_dir, classes=index.classes, config_hash=hash_config(cfg)) as w:
        for s in samples:
            key, fp = f"{s.split}/{s.class_name}/{s.dir.name}", fingerprint_files(s.files.values())
            if not w.keep_if_unchanged(key, fp):
                w.add(key, fp, s.split, schema, meta, payload=packed)
        summary = w.commit()
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from protocol.cache import (
    CURRENT,
    FORMAT_VERSION,
    GENERATIONS_FILE,
    INDEX_DTYPE,
    INDEX_FILE,
    KEYS_FILE,
    LOCK,
    MAGIC,
    MANIFEST_FILE,
    PACKED_ALIGN,
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
from protocol import video_store
from protocol.errors import CacheError, CacheLocked, CacheNotFound, MmfeedError, SchemaError
from protocol.filemodes import (
    create_file,
    fsync_dir,
    file_mode,
    group_id,
    make_dir,
    secure_fd,
    write_file,
)
from protocol.schema import SOURCE_BYTES, SampleMeta, SampleSchema

from .cache_carry import CarryOver, pwrite_all
from .worker_shard import PlacedRecord, ShardTarget, is_worker_shard
from .writeback import WRITEBACK_EVERY, start_writeback



def fingerprint_files(paths: Iterable[str | Path]) -> str:
    """Names, sizes and mtimes of a sample's files, hashed: changes when any file does.

    Uses the base name, not the full path, so moving the dataset folder keeps the cache valid.
    The name's own bytes (os.fsencode): a name that is not UTF-8 must not stop the run.
    """
    h = hashlib.blake2b(digest_size=16)
    for p in sorted(Path(p) for p in paths):
        st = p.stat()
        h.update(os.fsencode(p.name) + f"\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def hash_config(config: object) -> str:
    """A stable digest of a (dataclass or JSON-able) config: a new config redoes every sample."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    enc = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.blake2b(enc.encode(), digest_size=16).hexdigest()


@dataclass(frozen=True)
class CacheSummary:
    """What a commit made: feeds preprocess's --json report."""

    directory: Path
    version: int
    records: int
    written: int        # records made by add() in this run
    carried: int        # records copied unchanged from the previous version
    removed_keys: int   # keys of the previous version that this run dropped
    bytes_written: int  # payload bytes in the new version (written + carried)
    shards: int
    counts: dict[str, int]  # records per split
    stores: dict[str, int] = dataclasses.field(default_factory=dict)  # records per video store

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["directory"] = str(self.directory)
        return d




class CacheWriter(CarryOver):
    """Writes `DIR/v<N+1>/` while `DIR/CURRENT` still names version N; `commit()` switches.

    One writer per directory at a time: an exclusive flock on `DIR/.lock`, which the kernel
    drops when the process dies, so a crashed writer never blocks the next one.

    Every file it writes is 0600 and every directory it makes 0700 whatever the umask; with
    `group` (preprocess --group / $MMFEED_GROUP) 0640 and 0750, group `group`
    (protocol/filemodes.py). A cache directory that already exists keeps its own mode.
    """

    # Class-level defaults make abort()/close safe after a half-built constructor.
    _lock_fd: int | None = None
    _fd: int | None = None
    _finished = True
    _prev_fds: dict[int, int] = {}

    def __init__(self, cache_dir: str | Path, *, classes: list[str], config_hash: str = "",
                 shard_bytes: int = 1 << 30, keep: int = 1, group: str | None = None,
                 store_settings: dict | None = None):
        if not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) for c in classes):
            raise TypeError(f"classes must be a list of str, got {classes!r}")
        if len(set(classes)) != len(classes):
            raise ValueError(f"classes must be unique, got {classes}")
        if shard_bytes < RECORD_ALIGN:
            raise ValueError(f"shard_bytes must be at least {RECORD_ALIGN}, got {shard_bytes}")
        if keep < 0:
            raise ValueError(f"keep must be >= 0, got {keep}")
        self.directory = Path(cache_dir)
        self.classes = list(classes)
        self.config_hash = str(config_hash)
        self.shard_bytes = int(shard_bytes)
        self.keep = int(keep)
        # the manifest's record of how this run stored video (video_store.StoreSettings.to_dict)
        self.store_settings = dict(store_settings or {"store": "raw"})
        self._gid = group_id(group)
        make_dir(self.directory, self._gid, exist_ok=True)
        self._lock()
        try:
            self._prev = self._load_previous()
            self._remove_leftovers()
            existing = [parse_version_name(p.name) for p in self.directory.iterdir()]
            self.version = max([n for n in existing if n is not None], default=0) + 1
            self._vdir = self.directory / version_name(self.version)
            make_dir(self._vdir, self._gid)
        except BaseException:
            self._unlock()
            raise
        self._finished = False
        self._rows: list[tuple] = []
        self._keys: dict[str, int] = {}          # key -> key_id in this version
        self._key_list: list[list[str]] = []     # [key, fingerprint]
        self._schemas: dict[int, str] = {}       # schema_id -> encoding
        self._splits: list[str] = []
        self._shards: list[dict | None] = []     # by shard number; None until finished
        self._shard_no = -1                      # the shard this writer appends to itself
        self._adopted: dict[str, int] = {}       # worker shard file -> its shard number
        self._pos = 0
        self._kicked = 0  # shard bytes up to here were handed to writeback (writeback.py)
        self.written_back = 0  # bytes whose disk write started before the commit's fsync
        self._scratch = bytearray()
        self._prev_fds = {}
        self._written = self._carried = 0
        self._generations: dict[str, dict] = {}  # generation -> what made it (generations.json)

    # --- set-up -----------------------------------------------------------------------------

    def _lock(self) -> None:
        path = self.directory / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            if os.fstat(fd).st_uid == os.geteuid():
                secure_fd(fd, file_mode(self._gid), self._gid, path)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CacheLocked(f"{self.directory}: another mm-producer preprocess is writing this "
                              f"cache (it holds {self.directory / LOCK})") from None
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd

    def _unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # closing drops the flock

    def _load_previous(self) -> CacheVersion | None:
        """The committed version to carry records from; None when absent or unusable (then
        every sample is redone, which is always correct)."""
        try:
            return open_version(self.directory)
        except MmfeedError:
            return None

    def _remove_leftovers(self) -> None:
        """Delete what a crashed writer left: versions newer than CURRENT (never committed)."""
        try:
            current = read_current(self.directory)
        except CacheNotFound:
            current = 0  # nothing was ever committed: every version dir is a leftover
        except MmfeedError:
            return  # CURRENT is damaged: delete nothing here; commit() prunes once it is rewritten
        for p in self.directory.iterdir():
            n = parse_version_name(p.name)
            if n is not None and n > current and p.is_dir():
                shutil.rmtree(p)
        tmp = self.directory / (CURRENT + ".tmp")
        if tmp.exists():
            tmp.unlink()

    # --- generations ------------------------------------------------------------------------

    def note_generation(self, generation: int, settings: Mapping) -> None:
        """Say what made the records of `generation` (filter, sensors, methods, reason, ...):
        kept in the version's generations.json with the previous version's notes."""
        self._generations[str(int(generation))] = json.loads(json.dumps(dict(settings),
                                                                        default=str))

    # --- writing ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._finished:
            raise CacheError(f"{self.directory}: this writer was already committed or aborted")

    def _new_key(self, key: str, fingerprint: str) -> int:
        self._keys[key] = len(self._key_list)
        self._key_list.append([key, fingerprint])
        return self._keys[key]

    def _split_id(self, split: str) -> int:
        try:
            return self._splits.index(split)
        except ValueError:
            self._splits.append(split)
            return len(self._splits) - 1

    def _place(self, n: int, align: int = RECORD_ALIGN) -> tuple[int, int]:
        """Where the next record of n bytes goes: the next aligned offset, or a new shard when
        it would pass shard_bytes (a record larger than a shard gets a shard of its own).
        Payload records align to pages (RECORD_ALIGN), compressed ones to PACKED_ALIGN."""
        off = align_up(self._pos, align)
        if self._fd is None or (off + n > self.shard_bytes and self._pos > 0):
            self._roll()
            off = 0
        self._pos = off + n
        return self._shard_no, off

    def _new_shard_number(self) -> int:
        """Numbers go to this writer's own shards and to adopted worker files alike, in the
        order they are first needed; the manifest lists them by number."""
        self._shards.append(None)
        return len(self._shards) - 1

    def _roll(self) -> None:
        self._finish_shard()
        self._shard_no = self._new_shard_number()
        self._fd = create_file(self._vdir / shard_name(self._shard_no), self._gid)
        self._pos = self._kicked = 0

    def _finish_shard(self) -> None:
        """Pad to a page multiple (a reader may read whole pages with O_DIRECT), fsync, close."""
        if self._fd is None:
            return
        size = align_up(self._pos)
        os.ftruncate(self._fd, size)
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        self._shards[self._shard_no] = {"file": shard_name(self._shard_no), "nbytes": size}

    @property
    def worker_target(self) -> ShardTarget:
        """Where preprocess workers write records of this version themselves
        (producer/worker_shard.py), handed back through `add_placed`."""
        return ShardTarget(str(self._vdir), self.shard_bytes, self._gid)

    def add(self, key: str, fingerprint: str, split: str, schema: SampleSchema, meta: SampleMeta,
            arrays: Mapping[str, np.ndarray] | None = None, *, payload=None) -> None:
        """Append one record of `key`. Give `arrays` (checked and packed here) or `payload`, the
        bytes of `schema.pack(arrays)` made elsewhere (a worker process), or a record that
        `video_store.encode_record` made (an nv12 schema's payload, or a compressed record:
        smaller than the schema's payload, its video blob checked here). Which store the
        record is goes into the index (`video_store.store_of_record`), with a CRC-32 for
        compressed records. A key may have several records: call add again with the same key
        and fingerprint."""
        self._check_record(key, split, schema, meta)
        if (arrays is None) == (payload is None):
            raise TypeError("give exactly one of arrays= or payload=")
        n = schema.payload_nbytes
        store, crc = video_store.RAW, 0
        if payload is not None:
            data = memoryview(payload).cast("B")
            try:
                store = video_store.store_of_record(schema, data)
            except video_store.VideoStoreError as e:
                raise SchemaError(f"{key}: payload of {data.nbytes} bytes, schema {schema!r} "
                                  f"packs to {n}: {e}") from None
            n = data.nbytes
            if store in video_store.COMPRESSED:
                crc = video_store.record_crc(data)
        else:
            if len(self._scratch) < n:
                self._scratch = bytearray(n)
            data = memoryview(self._scratch)[:n]
            schema.pack_into(arrays, data)  # checks names, dtypes, shapes
            if schema.packed:
                store = video_store.NV12_STORE
        shard, off = self._place(n, PACKED_ALIGN if store in video_store.COMPRESSED
                                 else RECORD_ALIGN)
        pwrite_all(self._fd, data, off)
        if self._pos - self._kicked >= WRITEBACK_EVERY:  # the disk writes while we go on
            if start_writeback(self._fd, self._kicked, self._pos - self._kicked):
                self.written_back += self._pos - self._kicked
            self._kicked = self._pos
        self._add_row(key, fingerprint, split, schema, meta, shard, off, n, store, crc)

    def add_placed(self, key: str, fingerprint: str, split: str, schema: SampleSchema,
                   meta: SampleMeta, placed: PlacedRecord) -> None:
        """Add a record a worker already wrote into a file of its own in this version's
        directory (`worker_target`, producer/worker_shard.py): no byte is copied here. The
        file becomes one of the version's shards at commit."""
        self._check_record(key, split, schema, meta)
        name = placed.file
        number = self._adopted.get(name)
        if number is None:
            if not is_worker_shard(name) or os.sep in name or not (self._vdir / name).is_file():
                raise CacheError(f"{self._vdir}: {name!r} is no worker shard file of this "
                                 f"version")
            number = self._adopted[name] = self._new_shard_number()
        store = int(placed.store)
        expect = schema.payload_nbytes
        if store not in video_store.COMPRESSED and placed.nbytes != expect:
            raise SchemaError(f"{key}: placed record of {placed.nbytes} bytes, schema {schema!r} "
                              f"packs to {expect}")
        self._add_row(key, fingerprint, split, schema, meta, number, int(placed.offset),
                      int(placed.nbytes), store, int(placed.crc32))

    def _check_record(self, key: str, split: str, schema: SampleSchema, meta: SampleMeta
                      ) -> None:
        self._check_open()
        if not isinstance(key, str) or not key:
            raise ValueError(f"key must be a non-empty str, got {key!r}")
        if not isinstance(split, str) or not split:
            raise ValueError(f"split must be a non-empty str, got {split!r}")
        if not isinstance(schema, SampleSchema):
            raise TypeError(f"schema must be a SampleSchema, got {type(schema).__name__}")
        if not isinstance(meta, SampleMeta):
            raise TypeError(f"meta must be a SampleMeta, got {type(meta).__name__}")
        if not -1 <= meta.label < len(self.classes):
            raise ValueError(f"{key}: label {meta.label} is outside -1..{len(self.classes) - 1} "
                             f"({len(self.classes)} classes)")

    def _add_row(self, key: str, fingerprint: str, split: str, schema: SampleSchema,
                 meta: SampleMeta, shard: int, off: int, n: int, store: int, crc: int) -> None:
        if key in self._keys:
            if self._key_list[self._keys[key]][1] != fingerprint:
                raise ValueError(f"{key}: added again with another fingerprint")
            key_id = self._keys[key]
        else:
            key_id = self._new_key(key, fingerprint)
        sid = schema.schema_id
        if sid not in self._schemas:
            self._schemas[sid] = schema.encode().decode()
        src = meta.source.encode("utf-8")[:SOURCE_BYTES]
        self._rows.append((off, n, sid, meta.timestamp_ns, meta.index, shard, meta.label,
                           meta.generation, key_id, self._split_id(split), src, store, crc))
        self._written += 1

    def _seal_adopted(self) -> None:
        """Each adopted worker file: padded to a page multiple, fsync'd and renamed to its
        shard name; worker files no record was taken from are removed."""
        for name, number in self._adopted.items():
            path = self._vdir / name
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                size = align_up(os.fstat(fd).st_size)
                os.ftruncate(fd, size)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(path, self._vdir / shard_name(number))
            self._shards[number] = {"file": shard_name(number), "nbytes": size}
        for p in self._vdir.iterdir():
            if is_worker_shard(p.name):
                p.unlink()
        if None in self._shards:
            raise CacheError(f"{self._vdir}: shard {self._shards.index(None)} was numbered "
                             f"and never written")

    # --- ending -----------------------------------------------------------------------------

    def commit(self) -> CacheSummary:
        """Make the new version durable, then live: shards, index, schemas, keys and manifest are
        fsync'd before CURRENT is replaced by rename; then versions older than `keep` go."""
        self._check_open()
        try:
            self._finish_shard()
            self._seal_adopted()
            index = np.array(self._rows, dtype=INDEX_DTYPE)
            with os.fdopen(create_file(self._vdir / INDEX_FILE, self._gid), "wb") as f:
                np.save(f, index, allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
            write_file(self._vdir / SCHEMAS_FILE,
                       json.dumps({str(k): v for k, v in self._schemas.items()}).encode(),
                       self._gid)
            write_file(self._vdir / KEYS_FILE,
                       json.dumps({"keys": self._key_list}, separators=(",", ":")).encode(),
                       self._gid)
            counts = {s: int(np.count_nonzero(index["split"] == i))
                      for i, s in enumerate(self._splits)}
            per_store = np.bincount(index["store"], minlength=len(video_store.STORES))
            stores = {name: int(c) for name, c in zip(video_store.STORES, per_store) if c}
            manifest = {
                "magic": MAGIC,
                "format_version": FORMAT_VERSION,
                "version": self.version,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "classes": self.classes,
                "splits": self._splits,
                "counts": counts,
                "records": len(index),
                "record_align": RECORD_ALIGN,
                "shards": self._shards,
                "config_hash": self.config_hash,
                "stores": stores,            # records per video store (the index says which)
                "video_store": self.store_settings,  # the settings this run encoded with
            }
            generations = self._previous_generations()
            generations.update(self._generations)
            if generations:
                write_file(self._vdir / GENERATIONS_FILE,
                           json.dumps(generations, sort_keys=True).encode(), self._gid)
            write_file(self._vdir / MANIFEST_FILE, json.dumps(manifest, indent=1).encode(),
                       self._gid)
            fsync_dir(self._vdir)
            tmp = self.directory / (CURRENT + ".tmp")
            write_file(tmp, (version_name(self.version) + "\n").encode(), self._gid)
            os.replace(tmp, self.directory / CURRENT)
            fsync_dir(self.directory)
        except BaseException:
            self.abort()
            raise
        self._finished = True
        removed = len(set(self._prev_keys()) - set(self._keys)) if self._prev else 0
        self._close_prev()
        self._prune()
        self._unlock()
        return CacheSummary(
            directory=self.directory, version=self.version, records=len(index),
            written=self._written, carried=self._carried, removed_keys=removed,
            bytes_written=int(index["nbytes"].sum()), shards=len(self._shards), counts=counts,
            stores=stores,
        )

    def _previous_generations(self) -> dict:
        """The committed version's generations.json, for the generations still in this one."""
        if self._prev is None:
            return {}
        try:
            found = json.loads((self._prev.path / GENERATIONS_FILE).read_bytes())
        except (OSError, ValueError):
            return {}
        have = {str(int(r[7])) for r in self._rows}
        return {k: v for k, v in found.items() if k in have} if isinstance(found, dict) else {}

    def _prune(self) -> None:
        """Remove committed versions older than the newest `keep` before this one. A reader that
        still has one open keeps reading it: its descriptors hold the unlinked files."""
        older = sorted(n for p in self.directory.iterdir()
                       if (n := parse_version_name(p.name)) is not None and n < self.version)
        for n in older[: max(0, len(older) - self.keep)]:
            shutil.rmtree(self.directory / version_name(n), ignore_errors=True)

    def _close_prev(self) -> None:
        for fd in self._prev_fds.values():
            os.close(fd)
        self._prev_fds = {}

    def abort(self) -> None:
        """Throw the new version away; CURRENT and the committed version are untouched."""
        if self._finished:
            return
        self._finished = True
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._close_prev()
        shutil.rmtree(self._vdir, ignore_errors=True)
        self._unlock()

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.abort()  # no-op after commit(); otherwise nothing half-done becomes visible

    def __repr__(self) -> str:
        state = "finished" if self._finished else f"{len(self._rows)} records so far"
        return f"CacheWriter({str(self.directory)!r}: version {self.version}, {state})"
