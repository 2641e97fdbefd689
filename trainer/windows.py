"""Tiles: a large input (a BEV grid, a big frame) cut into patch samples read window by window.

    mm-trainer run --cache DIR --tiles lidar=64x64            # non-overlapping 64x64 patches
    mm-trainer run --cache DIR --tiles video=112x112/56       # stride 56: overlapping patches

`TiledReader(reader, TileSpec.parse("lidar=64x64"))` stands in for the CacheReader the disk
loader reads (same surface: schema_groups, schema, read_batch_into, labels, meta, prefetch):
sample j is tile t of record r. A tile sample's tiled input has the patch's shape (..., h, w);
its other inputs and its label are its record's. Patches are read with
`CacheReader.read_window_into` (protocol/cache.py NOTE [windows]): only the patch's bytes and
the other inputs' bytes are read, never the rest of the grid, and `bytes_read` counts them
(bench/video_store.py compares it with whole records).

Tile positions: every `stride` pixels from 0 along H and W (stride = the tile's side unless
given), plus one tile flush with the far edge when the grid does not divide evenly, so every
pixel is in some tile. A record whose tiled input is smaller than a tile, or that has no such
input, is one sample as it is (its own schema, so it batches apart).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from protocol.cache import BatchMeta, CacheReader, RecordFailure
from protocol.errors import CacheError, SchemaError
from protocol.schema import ModalitySpec, SampleMeta, SampleSchema


@dataclass(frozen=True)
class TileSpec:
    """Which input to tile, the tile's size and the stride between tiles (pixels)."""

    modality: str
    height: int
    width: int
    stride_h: int
    stride_w: int

    @classmethod
    def parse(cls, text: str) -> "TileSpec":
        """`lidar=64x64`, `video=112` (square), `lidar=64x64/32` or `/32x16` (stride)."""
        m = re.fullmatch(r"([\w.-]+)=(\d+)(?:x(\d+))?(?:/(\d+)(?:x(\d+))?)?", text.strip())
        if not m:
            raise ValueError(f"--tiles {text!r}: expected INPUT=HxW[/STRIDE], e.g. lidar=64x64 "
                             f"or video=112x112/56")
        h = int(m.group(2))
        w = int(m.group(3) or h)
        sh = int(m.group(4) or h) if m.group(4) else h
        sw = int(m.group(5) or m.group(4) or w) if m.group(4) else w
        if min(h, w, sh, sw) < 1:
            raise ValueError(f"--tiles {text!r}: sizes and strides must be >= 1")
        return cls(m.group(1), h, w, sh, sw)

    def positions(self, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """(y0, x0) of every tile of a height x width grid, row-major; empty when it is smaller
        than a tile."""
        def axis(n: int, t: int, s: int) -> np.ndarray:
            if n < t:
                return np.zeros(0, np.int64)
            p = np.arange(0, n - t + 1, s, dtype=np.int64)
            return p if p[-1] == n - t else np.append(p, n - t)

        ys, xs = axis(height, self.height, self.stride_h), axis(width, self.width, self.stride_w)
        yy, xx = np.meshgrid(ys, xs, indexing="ij")
        return yy.ravel(), xx.ravel()

    def __str__(self) -> str:
        return (f"{self.modality}={self.height}x{self.width}/"
                f"{self.stride_h}x{self.stride_w}")


class TiledReader:
    """A CacheReader seen as patch samples (module docstring); no torch, fork-safe like it."""

    def __init__(self, reader: CacheReader, spec: TileSpec):
        self.reader, self.spec = reader, spec
        self.directory, self.version, self.split = reader.directory, reader.version, reader.split
        self.classes, self.splits = reader.classes, reader.splits
        self.bytes_read = 0  # bytes copied out of the cache by read_batch_into (windows + rest)
        self._tiled: dict[int, SampleSchema | None] = {}  # source schema id -> tile schema
        rec_parts, y_parts, x_parts = [], [], []
        for sid, recs in reader.schema_groups().items():
            schema = reader.schema(int(recs[0]))
            ys, xs = self._grid(schema)
            n = max(len(ys), 1)
            rec_parts.append(np.repeat(recs, n))
            y_parts.append(np.tile(ys if len(ys) else np.zeros(1, np.int64), len(recs)))
            x_parts.append(np.tile(xs if len(xs) else np.zeros(1, np.int64), len(recs)))
        order = np.argsort(np.concatenate(rec_parts) if rec_parts else np.zeros(0, np.int64),
                           kind="stable")
        self._rec = np.concatenate(rec_parts)[order] if rec_parts else np.zeros(0, np.int64)
        self._y = np.concatenate(y_parts)[order] if y_parts else np.zeros(0, np.int64)
        self._x = np.concatenate(x_parts)[order] if x_parts else np.zeros(0, np.int64)
        self.labels = reader.labels[self._rec]
        self.max_payload_nbytes = max(
            [self.schema_of_record(int(r)).payload_nbytes for r in np.unique(self._rec)],
            default=0)
        if not any(s is not None for s in self._tiled.values()):
            raise CacheError(f"--tiles {spec}: no record of {reader} has an input "
                             f"{spec.modality!r} of at least {spec.height}x{spec.width}")

    def _grid(self, schema: SampleSchema) -> tuple[np.ndarray, np.ndarray]:
        """The tile positions of a record of `schema` (and remember its tile schema)."""
        sid = schema.schema_id
        if self.spec.modality not in schema:
            self._tiled[sid] = None
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        m = schema.spec(self.spec.modality)
        if m.layout or len(m.shape) < 2:
            raise SchemaError(f"--tiles {self.spec}: input {m.name} is {m!r}; tiles cut "
                              f"dense (..., H, W) inputs (not NV12-packed ones)")
        ys, xs = self.spec.positions(*m.shape[-2:])
        if len(ys) == 0:
            self._tiled[sid] = None
            return ys, xs
        self._tiled[sid] = SampleSchema(tuple(
            ModalitySpec(x.name, x.dtype, x.shape[:-2] + (self.spec.height, self.spec.width))
            if x.name == m.name else x for x in schema.modalities))
        return ys, xs

    # --- the CacheReader surface the loaders use ---------------------------------------------

    def __len__(self) -> int:
        return len(self._rec)

    def schema_of_record(self, r: int) -> SampleSchema:
        src = self.reader.schema(r)
        tiled = self._tiled.get(src.schema_id)
        return src if tiled is None else tiled

    def schema(self, j: int) -> SampleSchema:
        return self.schema_of_record(int(self._rec[int(j)]))

    def payload_nbytes(self, j: int) -> int:
        return self.schema(j).payload_nbytes

    def meta(self, j: int) -> SampleMeta:
        return self.reader.meta(int(self._rec[int(j)]))

    def split_of(self, j: int) -> str:
        return self.reader.split_of(int(self._rec[int(j)]))

    def record_of(self, j: int) -> tuple[int, int, int]:
        """(record, y0, x0) of tile sample j."""
        return int(self._rec[j]), int(self._y[j]), int(self._x[j])

    def schema_groups(self) -> dict[int, np.ndarray]:
        """tile schema id -> tile samples of that schema (for batching by shape)."""
        records, inverse = np.unique(self._rec, return_inverse=True)
        ids = np.array([self.schema_of_record(int(r)).schema_id for r in records.tolist()],
                       dtype=np.uint64)[inverse]
        return {int(sid): np.flatnonzero(ids == sid) for sid in np.unique(ids)}

    def prefetch(self, indices) -> None:
        """No read-ahead: hinting whole records would read the bytes tiles exist to skip."""

    def read_batch_into(self, indices, out2d: np.ndarray) -> tuple[SampleSchema, BatchMeta]:
        """Tile samples `indices` (one tile schema) into rows of out2d: per sample, the
        patch window of the tiled input and each other input whole, each by
        `read_window_into` (only those bytes are read). A damaged record's tiles come back
        in `failed` like CacheReader's."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        schema = self.schema(int(idx[0]))
        if any(self.schema(int(j)).schema_id != schema.schema_id for j in idx[1:]):
            raise SchemaError("read_batch_into: tile samples of different schemas; group them "
                              "with schema_groups() first")
        recs = self._rec[idx]
        failed: list[RecordFailure] = []
        name = self.spec.modality
        tiled = self._tiled.get(self.reader.schema(int(recs[0])).schema_id) is not None
        for row, (j, r) in enumerate(zip(idx.tolist(), recs.tolist())):
            views = schema.views(out2d[row])
            try:
                for m in schema.modalities:
                    if tiled and m.name == name:
                        y0, x0 = int(self._y[j]), int(self._x[j])
                        lead = [slice(None)] * (len(m.shape) - 2)
                        window = (*lead, slice(y0, y0 + self.spec.height),
                                  slice(x0, x0 + self.spec.width))
                    else:
                        window = ()
                    self.reader.read_window_into(r, m.name, window, views[m.name])
                    self.bytes_read += m.nbytes
            except CacheError as e:  # CorruptRecord: the record's compressed video
                failed.append(RecordFailure(row, r, e))
        return schema, BatchMeta(self.reader, recs, cold=0, failed=failed)

    def close(self) -> None:
        self.reader.close()

    def __repr__(self) -> str:
        return f"TiledReader({self.reader!r}, {self.spec}: {len(self)} tile samples)"


__all__ = ["TileSpec", "TiledReader"]
