"""A preprocess worker's own shard: the records it makes, written once, where the cache keeps them.

WHY: a worker used to write each packed record into a scratch file, and the parent then copied
it into the version's shard: every byte of the cache was written twice, and the second copy
(0.6 ms a sample of ~0.7 MB) ran in the one parent process that stores every record, on the
same two cores as the workers. Now each worker appends its records to a shard file of its
own in the new version's directory and hands back where they are (`PlacedRecord`); the parent
only adds index rows. At commit the writer pads, fsyncs and renames each adopted file to its
shard name (producer/cache_writer.py `add_placed`), and removes those no record was taken
from (a worker killed before its chunk was stored).

A file holds only what its worker wrote, in the order it wrote it. Bytes no index row names
(a chunk whose worker died before the parent stored it) are never read: records are found by
the index, and `_check_index` checks each one lies inside its shard.
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import NamedTuple

from protocol import video_store
from protocol.cache import PACKED_ALIGN, RECORD_ALIGN, align_up
from protocol.filemodes import create_file
from protocol.schema import SampleSchema

from .cache_carry import pwrite_all
from .writeback import WRITEBACK_EVERY, start_writeback

#: Worker shard files are named `worker-<pid>-<n>.part` until the commit renames them.
PREFIX = "worker-"
SUFFIX = ".part"
_ZEROS = memoryview(bytes(4096))  # schema padding (ALIGN = 64 bytes at most) in a gather write
_numbers = itertools.count()  # file numbers of this process (a worker has one WorkerShard)


class PlacedRecord(NamedTuple):
    """Where a worker wrote one record: its file (a name in the version's directory), offset
    and size, and what `CacheWriter.add` would have found out from the bytes (the store and,
    for a compressed record, its CRC-32)."""
    file: str
    offset: int
    nbytes: int
    store: int
    crc32: int


class ShardTarget(NamedTuple):
    """What a worker needs to write into the new version: its directory, the shard size at
    which a file is rolled over, and the group its files belong to (None: the user's)."""
    directory: str
    shard_bytes: int
    gid: int | None


class WorkerShard:
    """The shard files of one worker process: appended to, rolled over at `shard_bytes`."""

    def __init__(self, target: ShardTarget):
        self.target = target
        self.fd: int | None = None
        self.name = ""
        self.pos = 0
        self.kicked = 0
        self.files = 0

    def append(self, schema: SampleSchema, payload) -> PlacedRecord:
        """Write one record (raw, nv12 or compressed: `video_store.store_of_record`) at the
        next offset its store aligns to. VideoStoreError for bytes that are no record of
        `schema`; OSError (no space) is the caller's to fall back on."""
        data = memoryview(payload).cast("B")
        store = video_store.store_of_record(schema, data)
        compressed = store in video_store.COMPRESSED
        crc = video_store.record_crc(data) if compressed else 0
        n = data.nbytes
        off = self._place(n, PACKED_ALIGN if compressed else RECORD_ALIGN)
        pwrite_all(self.fd, data, off)
        return self._written(off, n, store, crc)

    def append_arrays(self, schema: SampleSchema, arrays) -> PlacedRecord | None:
        """Write a raw record straight from the pipeline's arrays (one gather write, their
        padding from a zero page) instead of packing them into a payload first: the pack was
        a second copy of every record, into fresh memory. None when an array is not what
        the schema lays out as it is (not C-contiguous, another dtype or shape, a packed
        layout): the caller packs then."""
        if schema.packed:
            return None
        parts, pos = [], 0
        for m in schema.modalities:
            a = arrays.get(m.name)
            if a is None or not a.flags.c_contiguous or a.dtype != m.dtype \
                    or a.shape != m.shape:
                return None
            gap = schema.offset(m.name) - pos
            if gap:
                parts.append(_ZEROS[:gap])
            parts.append(memoryview(a).cast("B"))
            pos += gap + a.nbytes
        off = self._place(pos, RECORD_ALIGN)
        done = os.pwritev(self.fd, parts, off)
        if done < pos:  # a short write (a signal, a full disk): the rest one part at a time
            flat = memoryview(b"".join(parts))
            pwrite_all(self.fd, flat[done:], off + done)
        return self._written(off, pos, video_store.RAW, 0)

    def _place(self, n: int, align: int) -> int:
        off = align_up(self.pos, align)
        if self.fd is None or (off + n > self.target.shard_bytes and self.pos > 0):
            self._roll()
            off = 0
        return off

    def _written(self, off: int, n: int, store: int, crc: int) -> PlacedRecord:
        self.pos = off + n
        if self.pos - self.kicked >= WRITEBACK_EVERY:  # the disk writes while we decode
            start_writeback(self.fd, self.kicked, self.pos - self.kicked)
            self.kicked = self.pos
        return PlacedRecord(self.name, off, n, store, crc)

    def _roll(self) -> None:
        self.close()
        self.name = f"{PREFIX}{os.getpid()}-{next(_numbers)}{SUFFIX}"
        self.files += 1
        self.fd = create_file(Path(self.target.directory) / self.name, self.target.gid)
        self.pos = self.kicked = 0

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


def is_worker_shard(name: str) -> bool:
    return name.startswith(PREFIX) and name.endswith(SUFFIX)
