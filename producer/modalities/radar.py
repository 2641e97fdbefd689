"""Radar: a raw FMCW ADC cube -> range-Doppler or range-azimuth map; a point list -> BEV raster.

Which one a `radar*.bin` file is, and how to read it, comes from metadata.json (the entry
under the file's stem wins, e.g. `"radar_front"`, else `"radar"`):

    {"radar": {"format": "adc",                  # "adc" (raw cube) or "points"
               "dtype": "complex_int16",         # complex_int16 (I, Q interleaved int16),
                                                 # int16 (real ADC), complex64, float32 (real)
               "shape": [chirps, samples, rx],   # as stored
               "layout": "chirp_sample_rx",      # axis order as stored, or "chirp_rx_sample",
                                                 # or "dca1000" (see below)
               "tx": 2}}                         # dca1000 only: TDM transmitters
    {"radar": {"format": "points", "fields": 7}} # or a list of names; default VoD's 7

`.npy` files carry their own dtype and shape; `layout` still says which axis is which.

Layouts
- `chirp_sample_rx` / `chirp_rx_sample`: a plain C-order array with those axes.
- `dca1000`: the raw TI DCA1000 LVDS capture of an xWR16xx/18xx part (2-lane complex):
  chirps in TDM order (chirp `tx_count*loop + tx`), within a chirp each RX's samples in turn,
  and within an RX groups of four int16 `I[n], I[n+1], Q[n], Q[n+1]`. `shape` is the stored
  `[chirps, samples, rx]`; the decoded cube is `(chirps / tx, samples, tx * rx)` with virtual
  antenna `tx * rx_count + rx` (the OpenRadar convention).

Quirk: OpenRadar's example frame stores raw int16 ADC codes as *unsigned* whole numbers in a
complex128 array (0 .. 65535). A complex or uint16 cube whose parts are all whole numbers in
0 .. 65535 with some above 32767 is reinterpreted as int16 two's complement, with a note.

Point lists are float32 records. Output columns are x, y, z, rcs, velocity, then the rest in
file order; velocity is `v_r_compensated` when present (ego motion removed), else `v_r`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from protocol.errors import InputError

from . import _grid
from ._limits import ReadLimits, checked_size, read_array
from ._out import fits
from .lidar import sensor_meta

METHODS = ("range_doppler", "range_azimuth", "points_bev")
WINDOWS = ("hann", "hamming", "blackman", "none")
LAYOUTS = ("chirp_sample_rx", "chirp_rx_sample", "dca1000")
ADC_DTYPES = {"complex_int16": ("<i2", 4), "int16": ("<i2", 2),
              "complex64": ("<c8", 8), "float32": ("<f4", 4)}  # numpy dtype, bytes a sample
VOD_FIELDS = ("x", "y", "z", "rcs", "v_r", "v_r_compensated", "time")
_VELOCITY_NAMES = ("v_r_compensated", "v_r", "velocity", "doppler")


@dataclass(frozen=True)
class RadarConfig:
    """How a radar input becomes an image; `out_shape` fixes the output's H, W for every method.

    range_doppler -> (1, range, Doppler); range_azimuth -> (1, range, angle) with the angle
    FFT zero-padded to `angle_bins`; points_bev -> (3, H, W) over `x_range` x `y_range`
    metres (rows along x): max RCS scaled over `rcs_range`, mean velocity / `velocity_max`
    clipped to [-1, 1], log density saturating at `density_saturation` points.
    With `normalize`, maps are in dB relative to their peak, mapped from
    [-dynamic_range_db, 0] to [0, 1]; without it they are absolute dB.
    """

    out_shape: tuple[int, int] = (64, 64)
    window: str = "hann"
    remove_dc: bool = True
    normalize: bool = True
    dynamic_range_db: float = 60.0
    angle_bins: int = 64
    x_range: tuple[float, float] = (0.0, 100.0)
    y_range: tuple[float, float] = (-50.0, 50.0)
    rcs_range: tuple[float, float] = (-50.0, 50.0)
    velocity_max: float = 20.0
    density_saturation: float = 8.0

    def __post_init__(self) -> None:
        if self.window not in WINDOWS:
            raise ValueError(f"RadarConfig.window must be one of {', '.join(WINDOWS)}, "
                             f"got {self.window!r}")
        if len(self.out_shape) != 2 or min(self.out_shape) < 1:
            raise ValueError(f"RadarConfig.out_shape must be (H, W) >= 1, got {self.out_shape}")
        if not self.dynamic_range_db > 0 or not self.velocity_max > 0:
            raise ValueError("RadarConfig.dynamic_range_db and velocity_max must be > 0")
        _grid.Grid(tuple(self.x_range), tuple(self.y_range), tuple(self.out_shape))

    def output_shape(self, method: str) -> tuple[int, int, int]:
        if method not in METHODS:
            raise ValueError(f"radar method must be one of {', '.join(METHODS)}, got {method!r}")
        return ((3 if method == "points_bev" else 1), *self.out_shape)


# --- loading ------------------------------------------------------------------------------


def _entry(path: Path, meta: Mapping[str, Any] | None) -> tuple[dict, str]:
    entry = sensor_meta(path, meta, "radar")
    stem = path.name.split(".", 1)[0]
    return entry, (stem if meta and stem in meta else "radar")


def _unsigned_codes_to_int16(path: Path, cube: np.ndarray,
                             notes: list[str] | None) -> np.ndarray:
    """Undo the OpenRadar quirk (see module docstring); other cubes pass through."""
    if cube.dtype == np.uint16:
        parts = cube
    elif np.iscomplexobj(cube):
        parts = cube.view(cube.real.dtype)
    else:
        return cube
    if parts.size == 0 or parts.min() < 0 or parts.max() <= 32767 or parts.max() > 65535:
        return cube
    if parts.dtype.kind == "f" and not np.all(parts == np.floor(parts)):
        return cube
    signed = parts.astype(np.uint16).view(np.int16).astype(np.float32)
    if notes is not None:
        notes.append(f"{path.name}: ADC codes stored unsigned (0..65535); reinterpreted as int16")
    if cube.dtype == np.uint16:
        return signed
    return signed.reshape(*cube.shape, 2).view(np.complex64)[..., 0]


def _shape(path: Path, entry: dict, key: str) -> tuple[int, int, int]:
    shape = entry.get("shape")
    if (not isinstance(shape, list) or len(shape) != 3
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
        raise InputError(path, f"metadata.{key}.shape",
                         "[chirps, samples, rx] of positive whole numbers for a raw ADC cube",
                         repr(shape))
    return tuple(shape)


def _decode_dca1000(path: Path, raw: np.ndarray, shape: tuple[int, int, int], tx: int,
                    key: str) -> np.ndarray:
    chirps, samples, rx = shape
    if samples % 2:
        raise InputError(path, f"metadata.{key}.shape", "an even sample count for the "
                         "2-lane DCA1000 layout", str(samples))
    if chirps % tx:
        raise InputError(path, f"metadata.{key}.tx", f"a divisor of the {chirps} chirps",
                         str(tx))
    groups = raw.reshape(chirps, rx, samples // 2, 4)   # I[n], I[n+1], Q[n], Q[n+1]
    cube = np.empty((chirps, rx, samples), np.complex64)
    cube.real = groups[..., :2].reshape(chirps, rx, samples)
    cube.imag = groups[..., 2:].reshape(chirps, rx, samples)
    # chirp = tx_count * loop + tx  ->  (loops, tx * rx) virtual antennas, tx-major
    virtual = cube.reshape(chirps // tx, tx * rx, samples)
    return np.ascontiguousarray(virtual.transpose(0, 2, 1))


def load_adc(path: str | Path, meta: Mapping[str, Any] | None = None,
             notes: list[str] | None = None, limits: ReadLimits | None = None) -> np.ndarray:
    """Read a raw ADC cube -> (chirps, samples, rx): complex64 for I/Q data (`complex_int16`,
    `complex64`, a complex .npy), float32 for real-sampled ADCs (`int16`, `float32`, a real
    .npy). Real stays real on purpose: a real signal's range spectrum is symmetric, and the
    range FFT keeps only its non-negative half; cast to complex, it would show every target
    twice (once mirrored) at half the range resolution.

    InputError when the file is unreadable or empty, larger than the radar read limit
    (`limits`, default ReadLimits(); _limits.py), the metadata lacks or garbles the
    shape/dtype/layout, or the byte size disagrees with the metadata shape.
    """
    path = Path(path)
    entry, key = _entry(path, meta)
    layout = entry.get("layout", "chirp_sample_rx")
    if layout not in LAYOUTS:
        raise InputError(path, f"metadata.{key}.layout", " or ".join(LAYOUTS), repr(layout))
    if entry.get("format", "adc") != "adc":
        raise InputError(path, f"metadata.{key}.format", "adc for a raw ADC cube",
                         repr(entry.get("format")))
    nbytes = checked_size(path, "radar", limits, readable="a readable radar file",
                          nonempty="a raw ADC cube")

    if path.suffix.lower() == ".npy":
        try:
            cube = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise InputError(path, "npy", "a NumPy array file without pickled objects",
                             str(e)) from None
        if cube.ndim != 3 or layout == "dca1000":
            raise InputError(path, "shape", "a 3-D array laid out chirp_sample_rx or "
                             "chirp_rx_sample", f"{cube.shape} with layout {layout}")
        cube = _unsigned_codes_to_int16(path, cube, notes)
    else:
        dtype = entry.get("dtype", "complex_int16")
        if dtype not in ADC_DTYPES:
            raise InputError(path, f"metadata.{key}.dtype", " or ".join(ADC_DTYPES),
                             repr(dtype))
        shape = _shape(path, entry, key)
        np_dtype, per_sample = ADC_DTYPES[dtype]
        expected = int(np.prod(shape)) * per_sample
        if nbytes != expected:
            raise InputError(path, "shape", f"{expected} bytes for {dtype} shape "
                             f"{list(shape)}", f"{nbytes} bytes")
        raw, nbytes = read_array(path, "radar", limits, np_dtype)
        if raw.nbytes != expected:  # changed since it was measured
            raise InputError(path, "shape", f"{expected} bytes for {dtype} shape "
                             f"{list(shape)}", f"{nbytes} bytes")
        if layout == "dca1000":
            if dtype != "complex_int16":
                raise InputError(path, f"metadata.{key}.dtype",
                                 "complex_int16 for the dca1000 layout", repr(dtype))
            tx = entry.get("tx", 1)
            if not isinstance(tx, int) or isinstance(tx, bool) or tx < 1:
                raise InputError(path, f"metadata.{key}.tx", "a positive whole number",
                                 repr(tx))
            return _decode_dca1000(path, raw, shape, tx, key)
        cube = (raw.astype(np.float32).view(np.complex64) if dtype == "complex_int16"
                else raw).reshape(shape)
    if layout == "chirp_rx_sample":
        cube = cube.transpose(0, 2, 1)
    return np.ascontiguousarray(cube, dtype=np.complex64 if np.iscomplexobj(cube) else np.float32)


def load_points(path: str | Path, meta: Mapping[str, Any] | None = None,
                notes: list[str] | None = None, limits: ReadLimits | None = None
                ) -> np.ndarray:
    """Read a radar point list -> float32 (N, F): x, y, z, rcs, velocity, others.

    Fields from metadata (`fields`: a count or names); without it VoD's 7 fields. InputError
    for a file over the radar read limit (`limits`), as for load_adc.
    """
    path = Path(path)
    entry, key = _entry(path, meta)
    fields = entry.get("fields", VOD_FIELDS)
    where = f"metadata.{key}.fields"
    if isinstance(fields, int) and not isinstance(fields, bool):
        if fields < 3:
            raise InputError(path, where, "at least 3 fields (x, y, z)", str(fields))
        fields = VOD_FIELDS if fields == 7 else ("x", "y", "z") + tuple(
            f"f{i}" for i in range(3, fields))
    if (not isinstance(fields, (list, tuple)) or not all(isinstance(f, str) for f in fields)
            or not {"x", "y", "z"} <= {f.lower() for f in fields}):
        raise InputError(path, where, "a field count or names including x, y and z",
                         repr(fields))
    names = tuple(f.lower() for f in fields)
    record = 4 * len(names)
    try:
        raw, nbytes = read_array(path, "radar", limits, "<f4")
    except OSError as e:
        raise InputError(path, "file", "a readable radar file", e.strerror or str(e)) from None
    if nbytes == 0:
        raise InputError(path, "size", f"at least one point ({record} bytes)",
                         "0 bytes (empty file)")
    if nbytes % record:
        raise InputError(path, "size", f"multiple of {record} bytes ({len(names)} float32 "
                         f"fields)", f"{nbytes} bytes")
    table = raw.reshape(-1, len(names))
    col = {n: table[:, i] for i, n in enumerate(names)}
    velocity = next((n for n in _VELOCITY_NAMES if n in col), None)
    missing = [what for what, name in (("rcs", "rcs" if "rcs" in col else None),
                                       ("velocity", velocity)) if name is None]
    if missing and notes is not None:
        notes.append(f"{path.name}: no {' or '.join(missing)} field; filled with 0")
    zeros = np.zeros(table.shape[0], np.float32)
    order = ["x", "y", "z", "rcs", velocity]
    head = [col["x"], col["y"], col["z"], col.get("rcs", zeros),
            col[velocity] if velocity else zeros]
    rest = [col[n] for n in names if n not in order]
    points = np.stack(head + rest, axis=1).astype(np.float32, copy=False)
    finite = np.isfinite(points[:, :3]).all(axis=1)
    if not finite.all():
        if notes is not None:
            notes.append(f"{path.name}: dropped {int((~finite).sum())} points with NaN "
                         f"coordinates")
        points = points[finite]
    return points


# --- processing ---------------------------------------------------------------------------


def _window(name: str, n: int) -> np.ndarray:
    if name == "none" or n == 1:
        return np.ones(n, np.float32)
    return {"hann": np.hanning, "hamming": np.hamming, "blackman": np.blackman}[name](
        n).astype(np.float32)


def _resize(a: np.ndarray, out: tuple[int, int]) -> np.ndarray:
    """Area-average (shrink) or nearest (grow) each axis of a 2-D map to `out`."""
    for axis, n_out in enumerate(out):
        n_in = a.shape[axis]
        if n_in == n_out:
            continue
        starts = (np.arange(n_out) * n_in) // n_out
        if n_in % n_out == 0:  # whole blocks: a reshape-mean, much cheaper than reduceat
            k = n_in // n_out
            a = (a.reshape(n_out, k, -1).mean(axis=1) if axis == 0
                 else a.reshape(a.shape[0], n_out, k).mean(axis=2))
        elif n_in > n_out:
            widths = np.diff(np.append(starts, n_in)).astype(a.dtype)
            a = np.add.reduceat(a, starts, axis=axis)
            a = a / (widths[:, None] if axis == 0 else widths[None, :])
        else:
            a = np.take(a, starts, axis=axis)
    return a


def _to_image(power: np.ndarray, cfg: RadarConfig, out: np.ndarray | None = None
              ) -> np.ndarray:
    """Power map -> resized, in dB, optionally normalised -> float32 (1, H, W); computed in
    `out` (and `out` returned) when it is that array (modalities/_out.py). The same float32
    operations in the same order either way, so both give the same values."""
    power = _resize(power.astype(np.float32, copy=False), cfg.out_shape)
    if fits(out, (1, *cfg.out_shape), np.float32):
        db = out[0]
        np.add(power, np.float32(1e-12), out=db)
        np.log10(db, out=db)
        np.multiply(db, 10.0, out=db)
        if cfg.normalize:
            np.subtract(db, db.max(), out=db)
            np.divide(db, np.float32(cfg.dynamic_range_db), out=db)
            np.add(db, 1.0, out=db)
            np.clip(db, 0.0, 1.0, out=db)
        return out
    db = 10.0 * np.log10(power + np.float32(1e-12))
    if cfg.normalize:
        db = np.clip((db - db.max()) / np.float32(cfg.dynamic_range_db) + 1.0, 0.0, 1.0)
    return db.astype(np.float32, copy=False)[None]


def _check_cube(cube: np.ndarray) -> np.ndarray:
    cube = np.asarray(cube)
    if cube.ndim != 3 or 0 in cube.shape:
        raise ValueError(f"radar cube must be (chirps, samples, rx), got {cube.shape}")
    return cube


def _range_fft(cube: np.ndarray, cfg: RadarConfig) -> torch.Tensor:
    """Windowed FFT over samples; a real cube keeps the non-negative half of the spectrum."""
    real = not np.iscomplexobj(cube)
    x = torch.from_numpy(np.ascontiguousarray(cube, np.float32 if real else np.complex64))
    with torch.no_grad():
        if cfg.remove_dc:
            x = x - x.mean(dim=1, keepdim=True)
        win = torch.from_numpy(_window(cfg.window, x.shape[1]))[None, :, None]
        spec = torch.fft.fft(x * win, dim=1)
    return spec[:, : x.shape[1] // 2] if real else spec


def range_doppler(cube: np.ndarray, cfg: RadarConfig = RadarConfig(),
                  out: np.ndarray | None = None) -> np.ndarray:
    """(chirps, samples, rx) cube -> float32 (1, range, Doppler) map of `cfg.out_shape`.

    Range FFT over samples, Doppler FFT over chirps (zero velocity in the middle column
    after fftshift), both windowed; power averaged over rx (non-coherent, so antenna phase
    does not matter), then area-resized and put in dB.
    """
    cube = _check_cube(cube)
    chirps, samples = cube.shape[:2]
    real = not np.iscomplexobj(cube)
    x = torch.from_numpy(np.ascontiguousarray(cube, np.float32 if real else np.complex64))
    with torch.no_grad():
        if cfg.remove_dc:
            x = x - x.mean(dim=1, keepdim=True)
        # Windows are separable and FFTs linear: one multiply by the 2-D window, one fft2,
        # and the fftshift on the small power map rather than on the cube. torch.fft, not
        # numpy: measured 4x faster on this cube (BENCHMARKS.md "modalities").
        win = torch.from_numpy(_window(cfg.window, chirps)[:, None]
                               * _window(cfg.window, samples)[None, :])
        spec = torch.fft.fft2(x * win[:, :, None], dim=(0, 1))
        if real:
            spec = spec[:, : samples // 2]
        power = (spec.real.square() + spec.imag.square()).mean(dim=2).numpy()  # (chirps, range)
    power = np.fft.fftshift(power, axes=0)                    # zero Doppler in the middle
    return _to_image(power.T, cfg, out)


def range_azimuth(cube: np.ndarray, cfg: RadarConfig = RadarConfig(),
                  out: np.ndarray | None = None) -> np.ndarray:
    """(chirps, samples, virtual rx) cube -> float32 (1, range, angle) map.

    Angle FFT across the (virtual) antennas, zero-padded to `cfg.angle_bins` and
    fftshifted (boresight in the middle column); power averaged over chirps.
    """
    cube = _check_cube(cube)
    rng = _range_fft(cube, cfg)
    with torch.no_grad():
        ang = torch.fft.fft(rng, n=max(cfg.angle_bins, rng.shape[2]), dim=2)
        power = (ang.real.square() + ang.imag.square()).mean(dim=0).numpy()  # (range, angle)
    return _to_image(np.fft.fftshift(power, axes=1), cfg, out)


def points_bev(points: np.ndarray, cfg: RadarConfig = RadarConfig(),
               out: np.ndarray | None = None) -> np.ndarray:
    """Points (N, >=5: x, y, z, rcs, velocity) -> float32 (3, H, W): max RCS, mean velocity,
    log density, over `cfg.x_range` x `cfg.y_range` cut into `cfg.out_shape` cells."""
    points = np.asarray(points, dtype=np.float32)
    if points.ndim != 2 or points.shape[1] < 5:
        raise ValueError(f"points_bev: points must be (N, >=5) x, y, z, rcs, velocity; got "
                         f"{points.shape}")
    grid = _grid.Grid(tuple(cfg.x_range), tuple(cfg.y_range), tuple(cfg.out_shape))
    idx, sel = grid.cell_index(points[:, 0], points[:, 1])
    count = _grid.cell_count(idx, grid.cells)
    lo, hi = cfg.rcs_range
    rcs = np.clip((points[sel, 3] - lo) / (hi - lo), 0.0, 1.0)
    rcs_max = _grid.cell_max(idx, rcs, grid.cells, empty=0.0)
    velocity = np.clip(_grid.cell_mean(idx, points[sel, 4], count) / cfg.velocity_max,
                       -1.0, 1.0)
    density = _grid.log_density(count, cfg.density_saturation)
    if fits(out, (3, *cfg.out_shape), np.float32):
        np.stack([rcs_max, velocity, density], out=out.reshape(3, grid.cells))
        return out
    return np.stack([rcs_max, velocity, density]).reshape(3, *cfg.out_shape).astype(np.float32)


def process(path: str | Path, method: str, cfg: RadarConfig = RadarConfig(),
            meta: Mapping[str, Any] | None = None, notes: list[str] | None = None,
            limits: ReadLimits | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """File -> image by `method` (one of METHODS); the shape is `cfg.output_shape(method)`;
    made in `out` when it is that float32 array (modalities/_out.py).

    InputError when the file's metadata format does not fit the method (a point list
    cannot make a range-Doppler map).
    """
    path = Path(path)
    if method not in METHODS:
        raise ValueError(f"radar method must be one of {', '.join(METHODS)}, got {method!r}")
    entry, key = _entry(path, meta)
    wanted = "points" if method == "points_bev" else "adc"
    fmt = entry.get("format", wanted)
    if fmt != wanted:
        raise InputError(path, f"metadata.{key}.format", f"{wanted} for method {method}",
                         repr(fmt))
    if method == "points_bev":
        return points_bev(load_points(path, meta, notes, limits), cfg, out)
    cube = load_adc(path, meta, notes, limits)
    return (range_doppler if method == "range_doppler" else range_azimuth)(cube, cfg, out)
