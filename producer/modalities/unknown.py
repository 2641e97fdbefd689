"""Unknown sensors: any file nobody has a decoder for still becomes a tensor, never dropped.

With metadata (the entry under the file's stem, e.g. `"imu"` for `imu.data`) the bytes are
an array of that dtype and shape:

    {"imu": {"dtype": "int16", "shape": [10, 6]}}   # any numpy dtype name; "<i2", ">f4" ok
                                                     # (little-endian unless the name says)
    {"imu": {"dtype": "float32", "shape": [-1, 6]}} # one -1: inferred from the file size
    {"imu": {"dtype": "uint8", "shape": [64], "offset": 16}}  # skip a 16-byte header

`.npy` files carry their own dtype and shape. Without either, the raw bytes become a
fixed-length vector: bytes as uint8, mean over `length` equal spans (linear interpolation
when the file is shorter than `length`), then zero mean and unit L2 norm, so a model sees
the file's byte profile at a fixed size whatever its length. Non-finite values become 0,
with a note.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from protocol.errors import InputError

from ._limits import ReadLimits, checked_size, open_checked, read_array
from ._out import fits


def _entry(path: Path, meta: Mapping[str, Any] | None) -> tuple[dict | None, str]:
    stem = path.name.split(".", 1)[0]
    if meta and isinstance(meta.get(stem), Mapping):
        return dict(meta[stem]), stem
    return None, stem


def _dtype(path: Path, value: Any, where: str) -> np.dtype:
    try:
        dt = np.dtype(value) if isinstance(value, str) else None
    except (TypeError, ValueError):
        dt = None
    if dt is None or dt.kind not in "biuf" or not isinstance(value, str):
        raise InputError(path, where, "a numeric dtype name like int16, uint8, float32, <f8",
                         repr(value))
    return dt if dt.byteorder in "<>|" else dt.newbyteorder("<")


def _shape(path: Path, value: Any, where: str, nbytes: int, itemsize: int) -> tuple[int, ...]:
    ok = (isinstance(value, list) and value
          and all(isinstance(s, int) and not isinstance(s, bool) and (s > 0 or s == -1)
                  for s in value) and value.count(-1) <= 1)
    if not ok:
        raise InputError(path, where, "a list of positive whole numbers (at most one -1)",
                         repr(value))
    known = int(np.prod([s for s in value if s != -1]))
    if -1 in value:
        if nbytes % (known * itemsize):
            raise InputError(path, "shape", f"a multiple of {known * itemsize} bytes for "
                             f"shape {value}", f"{nbytes} bytes")
        return tuple(nbytes // (known * itemsize) if s == -1 else s for s in value)
    if known * itemsize != nbytes:
        raise InputError(path, "shape", f"{known * itemsize} bytes for shape {value} of "
                         f"{itemsize}-byte values", f"{nbytes} bytes")
    return tuple(value)


def _finite(path: Path, a: np.ndarray, notes: list[str] | None,
            out: np.ndarray | None = None) -> np.ndarray:
    """`a` as float32 with non-finite values set to 0 (said in `notes`); the conversion is
    written into `out` when it fits (modalities/_out.py)."""
    if fits(out, a.shape, np.float32):
        if a is not out:
            np.copyto(out, a, casting="unsafe")
        a = out
    else:
        a = a.astype(np.float32)
    bad = ~np.isfinite(a)
    if bad.any():
        a[bad] = 0.0
        if notes is not None:
            notes.append(f"{path.name}: {int(bad.sum())} non-finite values set to 0")
    return a


#: Bytes read at a time for a byte profile: its memory does not grow with the file.
PROFILE_CHUNK = 4 << 20


def _normalise(v: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    v -= v.mean()
    norm = np.linalg.norm(v)
    if fits(out, v.shape, np.float32):
        if norm > 0:
            np.divide(v, norm, out=out, casting="same_kind")
        else:
            np.copyto(out, v, casting="same_kind")
        return out
    return (v / norm if norm > 0 else v).astype(np.float32)


def byte_profile(raw: np.ndarray, length: int, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 bytes -> float32 (length,): span means (or interpolation), zero mean, unit norm."""
    n = raw.size
    if n >= length:
        starts = (np.arange(length) * n) // length
        widths = np.diff(np.append(starts, n))
        v = np.add.reduceat(raw.astype(np.float64), starts) / widths
    else:
        v = np.interp(np.linspace(0, n - 1, length), np.arange(n), raw.astype(np.float64))
    return _normalise(v, out)


def byte_profile_of_file(f, n: int, length: int, chunk: int = PROFILE_CHUNK,
                         out: np.ndarray | None = None) -> np.ndarray:
    """`byte_profile` of the first `n` bytes of the open file `f`, read `chunk` bytes at a
    time (the whole file as float64 was 8x its size in memory). The same result: the span
    sums are sums of whole numbers, exact in float64 in any order."""
    if n < length:
        return byte_profile(np.fromfile(f, dtype=np.uint8, count=n), length, out)
    starts = (np.arange(length) * n) // length
    sums = np.zeros(length, np.float64)
    pos = 0
    while pos < n:
        buf = np.fromfile(f, dtype=np.uint8, count=min(chunk, n - pos))
        if not buf.size:
            raise OSError(f"file ended at byte {pos} of {n} (truncated while read)")
        end = pos + buf.size
        first = int(np.searchsorted(starts, pos, side="right")) - 1  # span of byte `pos`
        inner = starts[first + 1:int(np.searchsorted(starts, end, side="left"))] - pos
        idx = np.concatenate(([0], inner))
        sums[first:first + idx.size] += np.add.reduceat(buf, idx, dtype=np.float64)
        pos = end
    widths = np.diff(np.append(starts, n))
    return _normalise(sums / widths, out)


def load_unknown(path: str | Path, meta: Mapping[str, Any] | None = None, length: int = 256,
                 notes: list[str] | None = None, limits: ReadLimits | None = None,
                 out: np.ndarray | None = None) -> np.ndarray:
    """Any file -> float32: metadata's dtype/shape (or a .npy's own), else a (length,) vector;
    made in `out` when it is that float32 array (modalities/_out.py): a float32 file is read
    straight into it.

    InputError when the file is unreadable or empty, larger than the unknown-sensor read
    limit (`limits`, default ReadLimits(); _limits.py), or its size disagrees with the
    metadata's dtype and shape.
    """
    path = Path(path)
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    nbytes = checked_size(path, "unknown", limits, readable="a readable file",
                          nonempty="at least 1 byte")
    entry, stem = _entry(path, meta)
    try:
        if entry is not None:
            where = f"metadata.{stem}"
            offset = entry.get("offset", 0)
            if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset < nbytes:
                raise InputError(path, f"{where}.offset", f"a byte offset in 0 .. {nbytes - 1}",
                                 repr(offset))
            dt = _dtype(path, entry.get("dtype"), f"{where}.dtype")
            shape = _shape(path, entry.get("shape"), f"{where}.shape", nbytes - offset,
                           dt.itemsize)
            if dt == np.float32 and fits(out, shape, np.float32) \
                    and out.nbytes == nbytes - offset:
                f, _ = open_checked(path, "unknown", limits)
                with f:
                    f.seek(offset)
                    got = f.readinto(memoryview(out).cast("B"))
                if got != out.nbytes:
                    raise OSError(f"file ended at byte {offset + got} of {nbytes} "
                                  f"(truncated while read)")
                return _finite(path, out, notes, out)
            data, _ = read_array(path, "unknown", limits, dt, offset)
            return _finite(path, data.reshape(shape), notes, out)
        if path.suffix.lower() == ".npy":
            try:
                data = np.load(path, allow_pickle=False)
            except (ValueError, OSError) as e:
                raise InputError(path, "npy", "a NumPy array file without pickled objects",
                                 str(e)) from None
            if data.dtype.kind not in "biuf":
                raise InputError(path, "dtype", "a numeric array", str(data.dtype))
            return _finite(path, data, notes, out)
        f, nbytes = open_checked(path, "unknown", limits)
        with f:
            profile = byte_profile_of_file(f, nbytes, length, out=out)
    except OSError as e:
        raise InputError(path, "file", "a readable file", e.strerror or str(e)) from None
    if notes is not None:
        notes.append(f"{path.name}: no dtype/shape in metadata; {nbytes} bytes -> "
                     f"normalised byte profile of length {length}")
    return profile
