"""LiDAR: point-cloud files -> float32 points (N, F) -> a bird's-eye-view raster (3, H, W).

Files read
- Headerless float32 records (`lidar*.bin`): KITTI is 4 fields (x, y, z, intensity; 16
  bytes a point), nuScenes `.pcd.bin` is 5 (x, y, z, intensity, ring; 20 bytes) and, despite
  its name, has no PCD header. The record size comes from metadata (below); without it:
  a size divisible by 16 only -> 4 fields, by 20 only -> 5 fields (noted), by both ->
  5 fields if the name ends in `.pcd.bin` (the nuScenes convention, noted), else 4 fields
  (the KITTI default: docs/dataset.md).
- PCD files (`.pcd`, or any file whose first bytes are a PCD header): ascii, binary and
  binary_compressed, see `pcd.py`.

Output columns are always x, y, z first, then intensity when the file has one, then any
other fields in file order, so `bev()` can rely on positions. In a PCD file without an
`intensity` field a packed `rgb`/`rgba` colour becomes a grey-level intensity in [0, 1]
(a packed uint32 colour cast to float is not a number anyone wants). Points with a NaN or
infinite coordinate (depth-camera pixels with no return) are dropped, and a note says so.

Metadata sub-schema (metadata.json; the entry under the file's stem wins, e.g.
`"lidar_top"`, else the entry under `"lidar"`; a dict that itself has `"fields"` is also
accepted):

    {"lidar": {"fields": 5}}                                        # count of float32 fields
    {"lidar_top": {"fields": ["x", "y", "z", "intensity", "ring"]}} # or their names

Named fields must include x, y and z. Multi-frame recordings are separate files
(`lidar_0001.bin`, ...), see `producer/align.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from protocol.errors import InputError

from . import _grid
from ._limits import ReadLimits, read_array
from ._out import fits
from .pcd import looks_like_pcd, read_pcd

KITTI_FIELDS = ("x", "y", "z", "intensity")
NUSCENES_FIELDS = ("x", "y", "z", "intensity", "ring")
_RGB_FIELDS = ("rgb", "rgba")


@dataclass(frozen=True)
class BevConfig:
    """Bird's-eye-view grid: metres per axis and cell size; shape follows from these alone.

    Rows run along x (forward), columns along y (left): H = (x1 - x0) / resolution,
    W = (y1 - y0) / resolution. Points outside any range are ignored.
    `intensity_max`: divide intensity by this; None picks 1 when a frame's intensities are
    all <= 1 (KITTI reflectance) and 255 otherwise (nuScenes stores 0..255).
    `density_saturation`: points per cell at which the density channel reaches 1.
    """

    x_range: tuple[float, float] = (-40.0, 40.0)
    y_range: tuple[float, float] = (-40.0, 40.0)
    z_range: tuple[float, float] = (-3.0, 3.0)
    resolution: float = 0.5
    intensity_max: float | None = None
    density_saturation: float = 63.0

    def __post_init__(self) -> None:
        if not self.resolution > 0:
            raise ValueError(f"BevConfig.resolution must be > 0 metres, got {self.resolution}")
        for name in ("x_range", "y_range", "z_range"):
            lo, hi = getattr(self, name)
            if not hi > lo:
                raise ValueError(f"BevConfig.{name} must be (low, high) with high > low, "
                                 f"got {(lo, hi)}")
        self.grid  # validates the shape too

    @property
    def shape(self) -> tuple[int, int, int]:
        """(channels, H, W) of `bev()`'s output for this config."""
        return (3, *self.grid.shape)

    @property
    def grid(self) -> _grid.Grid:
        h = int(round((self.x_range[1] - self.x_range[0]) / self.resolution))
        w = int(round((self.y_range[1] - self.y_range[0]) / self.resolution))
        return _grid.Grid(tuple(self.x_range), tuple(self.y_range), (h, w))


def _stem(path: Path) -> str:
    return path.name.split(".", 1)[0]


def sensor_meta(path: Path, meta: Mapping[str, Any] | None, kind: str) -> dict:
    """The metadata entry for this file: under its stem, else under `kind`, else {}."""
    if not meta:
        return {}
    for key in (_stem(path), kind):
        entry = meta.get(key)
        if isinstance(entry, Mapping):
            return dict(entry)
    if "fields" in meta or "dtype" in meta or "format" in meta:
        return dict(meta)
    return {}


def _field_names(path: Path, entry: dict, key: str) -> tuple[str, ...] | None:
    """Field names from metadata `fields` (a count or a list), or None when not given."""
    fields = entry.get("fields")
    where = f"metadata.{key}.fields"
    if fields is None:
        return None
    if isinstance(fields, bool) or not isinstance(fields, (int, list)):
        raise InputError(path, where, "a field count (int >= 3) or a list of field names",
                         repr(fields))
    if isinstance(fields, int):
        if fields < 3:
            raise InputError(path, where, "at least 3 fields (x, y, z)", str(fields))
        names = KITTI_FIELDS + tuple(f"f{i}" for i in range(4, fields))
        return names[:fields]
    if not all(isinstance(f, str) for f in fields) or not {"x", "y", "z"} <= set(fields):
        raise InputError(path, where, "a list of names that includes x, y and z", repr(fields))
    return tuple(fields)


def _fields_from_size(path: Path, nbytes: int, notes: list[str] | None) -> tuple[str, ...]:
    by16, by20 = nbytes % 16 == 0, nbytes % 20 == 0
    if by20 and (not by16 or path.name.endswith(".pcd.bin")):
        if notes is not None:
            why = "name ends in .pcd.bin" if by16 else "size divides by 20, not by 16"
            notes.append(f"{path.name}: read as 5 float32 fields (nuScenes x,y,z,intensity,ring;"
                         f" {why}); set metadata lidar.fields to override")
        return NUSCENES_FIELDS
    if by16:
        return KITTI_FIELDS
    raise InputError(path, "size", "multiple of 16 bytes (4 float32 fields)", f"{nbytes} bytes")


def _canonical(names: tuple[str, ...], columns: list[np.ndarray]) -> np.ndarray:
    """Stack columns as x, y, z, [intensity], others in file order."""
    order = ["x", "y", "z"] + (["intensity"] if "intensity" in names else [])
    order += [n for n in names if n not in order]
    by_name = dict(zip(names, columns))
    return np.stack([by_name[n] for n in order], axis=1).astype(np.float32, copy=False)


def _load_bin(path: Path, entry: dict, key: str, notes: list[str] | None,
              limits: ReadLimits | None = None) -> np.ndarray:
    raw, nbytes = read_array(path, "lidar", limits, "<f4")
    if nbytes == 0:
        raise InputError(path, "size", "at least one point (16 bytes for 4 float32 fields)",
                         "0 bytes (empty file)")
    names = _field_names(path, entry, key)
    if names is None:
        names = _fields_from_size(path, nbytes, notes)
    record = 4 * len(names)
    if nbytes % record:
        raise InputError(path, "size", f"multiple of {record} bytes ({len(names)} float32 "
                         f"fields)", f"{nbytes} bytes")
    table = raw.reshape(-1, len(names))
    return _canonical(names, [table[:, i] for i in range(len(names))])


def _grey(packed: np.ndarray) -> np.ndarray:
    """0x..RRGGBB packed colour (uint32, or float32 bits as PCL stores `rgb`) -> [0, 1]."""
    c = np.ascontiguousarray(packed).view(np.uint32)
    r, g, b = (c >> 16) & 0xFF, (c >> 8) & 0xFF, c & 0xFF
    return ((0.299 * r + 0.587 * g + 0.114 * b) / 255.0).astype(np.float32)


def _load_pcd(path: Path, notes: list[str] | None, limits: ReadLimits | None = None
              ) -> np.ndarray:
    cloud = read_pcd(path, limits)
    cols = dict(cloud.columns)
    missing = [c for c in ("x", "y", "z") if c not in cols]
    if missing:
        raise InputError(path, "header.FIELDS", "fields x, y and z",
                         " ".join(cloud.columns) or "none")
    if "intensity" not in cols:
        rgb = next((c for c in _RGB_FIELDS if c in cols), None)
        if rgb is not None and cols[rgb].itemsize == 4:
            cols["intensity"] = _grey(cols.pop(rgb))
            if notes is not None:
                notes.append(f"{path.name}: no intensity field; grey level of {rgb} used")
    names = tuple(cols)
    return _canonical(names, [cols[n].astype(np.float32) for n in names])


def load_points(path: str | Path, meta: Mapping[str, Any] | None = None,
                notes: list[str] | None = None, limits: ReadLimits | None = None
                ) -> np.ndarray:
    """Read a LiDAR file -> float32 (N, F), columns x, y, z, [intensity], others.

    InputError when the file is unreadable or empty, larger than the lidar read limit
    (`limits`, default ReadLimits(); see _limits.py), its size is not a whole number of
    records, or its PCD header or compressed payload is bad.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise InputError(path, "file", "a readable LiDAR file", e.strerror or str(e)) from None
    entry = sensor_meta(path, meta, "lidar")
    key = _stem(path) if meta and _stem(path) in meta else "lidar"
    if path.suffix.lower() == ".pcd" or looks_like_pcd(head):
        points = _load_pcd(path, notes, limits)
    else:
        points = _load_bin(path, entry, key, notes, limits)
    finite = np.isfinite(points[:, :3]).all(axis=1)
    dropped = points.shape[0] - int(finite.sum())
    if dropped:
        points = points[finite]
        if notes is not None:
            notes.append(f"{path.name}: dropped {dropped} of {finite.size} points with "
                         f"NaN/inf coordinates")
    return points


def bev(points: np.ndarray, cfg: BevConfig = BevConfig(), out: np.ndarray | None = None
        ) -> np.ndarray:
    """Points (N, >=3) -> float32 (3, H, W): max height, mean intensity, log density.

    Channel 0: highest z per cell scaled to [0, 1] over `z_range` (0 where empty).
    Channel 1: mean intensity per cell divided by `intensity_max` (0 without intensity).
    Channel 2: log(1 + n) / log(1 + density_saturation), clipped at 1.
    The shape depends only on `cfg`; points outside the ranges are ignored. Rasterised into
    `out` (and `out` returned) when it is that float32 array (modalities/_out.py).
    """
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] < 3:
        raise ValueError(f"bev: points must be (N, >=3) x, y, z[, intensity], got "
                         f"{points.shape}")
    grid = cfg.grid
    z0, z1 = cfg.z_range
    # One mask over the z range, then the grid drops x/y outliers: the columns are
    # gathered once each (boolean indexing of a strided column is the main cost here).
    z = points[:, 2]
    keep = (z >= z0) & (z < z1)
    idx, sel = grid.cell_index(points[:, 0], points[:, 1], keep)
    count = _grid.cell_count(idx, grid.cells)

    height = _grid.cell_max(idx, (z[sel] - z0) * np.float32(1.0 / (z1 - z0)), grid.cells,
                            empty=0.0)
    if points.shape[1] >= 4 and idx.size:
        inten = points[sel, 3]
        scale = cfg.intensity_max or (1.0 if float(inten.max()) <= 1.0 else 255.0)
        intensity = _grid.cell_mean(idx, inten, count) / np.float32(scale)
    else:
        intensity = np.zeros(grid.cells, dtype=np.float32)
    density = _grid.log_density(count, cfg.density_saturation)
    if fits(out, cfg.shape, np.float32):
        np.stack([height, intensity, density], out=out.reshape(3, grid.cells))
        return out
    made = np.stack([height, intensity, density]).reshape(cfg.shape)
    return made.astype(np.float32, copy=False)
