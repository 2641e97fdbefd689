"""Carrying a committed cache version's records into the next one without redoing them: a
mixin of `CacheWriter` (cache_writer.py).

`carry_over(key)` copies one unchanged sample's record bytes in the kernel (copy_file_range,
reflinks where the filesystem has them); `keep_if_unchanged` is `unchanged()` then
`carry_over()`, what `mm-producer preprocess` does per sample. `carry_all()` takes a whole
version over by hard-linking its shards, what `mmctl record` appends with
(producer/recorder.py). Either way nothing is decoded and the index rows keep their fields.
"""
from __future__ import annotations

import errno
import json
import os
from typing import Mapping

import numpy as np

from protocol import video_store
from protocol.cache import KEYS_FILE, PACKED_ALIGN, RECORD_ALIGN, shard_name
from protocol.errors import CacheError

_COPY_CHUNK = 8 << 20


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of `data` at `offset` (os.pwrite may write less than asked)."""
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def copy_range(src: int, src_off: int, dst: int, dst_off: int, n: int) -> None:
    """Copy n bytes between files in the kernel (copy_file_range: reflink or in-kernel copy),
    falling back to large pread/pwrite chunks where the filesystem refuses."""
    try:
        while n:
            done = os.copy_file_range(src, dst, n, src_off, dst_off)
            if done == 0:
                raise OSError(errno.EIO, "copy_file_range copied nothing (source truncated?)")
            src_off, dst_off, n = src_off + done, dst_off + done, n - done
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    while n:
        chunk = os.pread(src, min(n, _COPY_CHUNK), src_off)
        if not chunk:
            raise OSError(errno.EIO, f"short read at {src_off}: source truncated")
        pwrite_all(dst, memoryview(chunk), dst_off)
        src_off, dst_off, n = src_off + len(chunk), dst_off + len(chunk), n - len(chunk)


class CarryOver:
    """`CacheWriter`'s incremental half: what the committed version holds (`_prev`, its keys,
    its shard files) and copying its records into the version being written."""

    def _prev_keys(self) -> dict[str, tuple[int, str]]:
        """key -> (key_id, fingerprint) of the previous version; loaded on first use."""
        if not hasattr(self, "_prev_key_map"):
            self._prev_key_map: dict[str, tuple[int, str]] = {}
            if self._prev is not None:
                path = self._prev.path / KEYS_FILE
                try:
                    keys = json.loads(path.read_bytes())["keys"]
                    self._prev_key_map = {k: (i, fp) for i, (k, fp) in enumerate(keys)}
                except (OSError, ValueError, KeyError, TypeError):
                    self._prev_key_map = {}  # unreadable keys: redo everything
                idx = self._prev.index
                self._prev_order = np.argsort(idx["key_id"], kind="stable")
                self._prev_sorted_ids = idx["key_id"][self._prev_order]
        return self._prev_key_map

    def unchanged(self, key: str, fingerprint: str) -> bool:
        """True when the committed version holds `key` made from the same files (fingerprint),
        the same config and the same classes (labels index classes), and this run has not
        already written it."""
        prev = self._prev
        if prev is None or key in self._keys:
            return False
        if prev.config_hash != self.config_hash or prev.classes != self.classes:
            return False
        entry = self._prev_keys().get(key)
        return entry is not None and entry[1] == fingerprint

    def carry_over(self, key: str, labels: Mapping[int, int] | None = None) -> int:
        """Copy `key`'s record(s) from the committed version, byte for byte; returns the count.
        `labels` maps old class indices to this version's (classes renamed or added: a
        recorded part keeps its labels by class name); an index it lacks becomes -1."""
        self._check_open()
        entry = self._prev_keys().get(key)
        if entry is None:
            raise CacheError(f"{self.directory}: key {key!r} is not in the committed version")
        if key in self._keys:
            raise CacheError(f"{self.directory}: key {key!r} was already written in this run")
        old_id, fingerprint = entry
        lo, hi = np.searchsorted(self._prev_sorted_ids, [old_id, old_id + 1])
        rows = self._prev.index[self._prev_order[lo:hi]]
        key_id = self._new_key(key, fingerprint)
        prev_splits = self._prev.splits
        for r in rows:
            sid = int(r["schema_id"])
            if sid not in self._schemas:
                self._schemas[sid] = self._prev.schemas[sid].encode().decode()
            n = int(r["nbytes"])
            shard, off = self._place(n, PACKED_ALIGN if int(r["store"]) in video_store.COMPRESSED
                                     else RECORD_ALIGN)
            copy_range(self._prev_fd(int(r["shard"])), int(r["offset"]), self._fd, off, n)
            self._rows.append((
                off, n, sid, int(r["timestamp_ns"]), int(r["index"]), shard, int(r["label"]),
                int(r["generation"]), key_id, self._split_id(prev_splits[int(r["split"])]),
                bytes(r["source"]), int(r["store"]), int(r["crc32"]),
            ))
            if labels is not None and self._rows[-1][6] >= 0:
                row = list(self._rows[-1])
                row[6] = int(labels.get(row[6], -1))
                self._rows[-1] = tuple(row)
        self._carried += len(rows)
        return len(rows)

    @property
    def previous_classes(self) -> list[str] | None:
        """The committed version's class list (None without one)."""
        return self._prev.classes if self._prev is not None else None

    def previous_keys(self) -> list[str]:
        """The keys of the committed version (e.g. to carry parts no dataset sample makes)."""
        return list(self._prev_keys())

    def carry_all(self) -> int:
        """Every record of the committed version, without copying a byte: its shard files are
        hard-linked into the new version (shards are never written again once committed), its
        index rows, schemas and keys taken over; new records then go to new shards. What
        `mmctl record` appends with: a new version = the previous one + a new part. Must come
        before anything else is written. Returns the records carried."""
        self._check_open()
        prev = self._prev
        if prev is None:
            return 0
        if self._rows or self._shard_no >= 0:
            raise CacheError(f"{self.directory}: carry_all() must come before other records")
        keys = self._prev_keys()
        ids = sorted(keys.items(), key=lambda kv: kv[1][0])
        self._key_list = [[k, fp] for k, (_, fp) in ids]
        self._keys = {k: i for i, (k, _) in enumerate(self._key_list)}
        known = len(self._key_list)
        for i, shard in enumerate(prev.manifest["shards"]):
            src, dst = prev.shard_paths[i], self._vdir / shard_name(i)
            try:
                os.link(src, dst)
            except OSError:  # a filesystem without hard links: copy in the kernel
                with open(src, "rb") as fi, open(dst, "wb") as fo:
                    copy_range(fi.fileno(), 0, fo.fileno(), 0, os.fstat(fi.fileno()).st_size)
                    os.fsync(fo.fileno())
            self._shards.append({"file": shard_name(i), "nbytes": int(shard["nbytes"])})
        self._shard_no = len(self._shards) - 1
        for sid, schema in prev.schemas.items():
            self._schemas[int(sid)] = schema.encode().decode()
        splits = prev.splits
        for r in prev.index:
            key_id = int(r["key_id"])
            if key_id >= known:  # keys.json unreadable: the record keeps a key of its own
                key_id = self._new_key(f"carried/{len(self._key_list)}", "")
            self._rows.append((
                int(r["offset"]), int(r["nbytes"]), int(r["schema_id"]), int(r["timestamp_ns"]),
                int(r["index"]), int(r["shard"]), int(r["label"]), int(r["generation"]), key_id,
                self._split_id(splits[int(r["split"])]), bytes(r["source"]), int(r["store"]),
                int(r["crc32"])))
        self._carried += len(prev.index)
        return len(prev.index)

    def keep_if_unchanged(self, key: str, fingerprint: str) -> bool:
        """`unchanged()` then `carry_over()`: True when the sample needs no work this run."""
        if self.unchanged(key, fingerprint):
            self.carry_over(key)
            return True
        return False

    def _prev_fd(self, shard: int) -> int:
        fd = self._prev_fds.get(shard)
        if fd is None:
            fd = os.open(self._prev.shard_paths[shard], os.O_RDONLY | os.O_CLOEXEC)
            self._prev_fds[shard] = fd
        return fd
