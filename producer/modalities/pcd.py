"""PCD (Point Cloud Library) files: ascii, binary and binary_compressed, v0.5-0.7 headers.

A PCD file is an ASCII header (`FIELDS`, `SIZE`, `TYPE`, `COUNT`, `WIDTH`, `HEIGHT`,
`VIEWPOINT`, `POINTS`, `DATA`, one per line, `#` comments) followed by the data:
- `ascii`: one point per line, whitespace-separated;
- `binary`: packed records, point by point (an array of structs);
- `binary_compressed`: uint32 compressed size, uint32 uncompressed size, then an LZF stream
  whose decoded bytes are laid out field by field (all x, then all y, ...), a struct of
  arrays. Bytes after the declared compressed size are ignored: PCL pads files (the Kinect
  frame in the test data carries 3901 trailing zeros) and that is not corruption.

Fields named `_` are PCL padding and are dropped. A field with COUNT k > 1 becomes k
columns `name_0 .. name_{k-1}`. Columns keep their stored dtype; callers decide how to
convert (packed `rgb`/`rgba` colour must not be cast to float as a number).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from protocol.errors import InputError

from ._limits import ReadLimits, read_bytes

DATA_KINDS = ("ascii", "binary", "binary_compressed")
_TYPES = {("F", 4): "<f4", ("F", 8): "<f8", ("F", 2): "<f2",
          ("U", 1): "<u1", ("U", 2): "<u2", ("U", 4): "<u4", ("U", 8): "<u8",
          ("I", 1): "<i1", ("I", 2): "<i2", ("I", 4): "<i4", ("I", 8): "<i8"}
_MAX_HEADER = 64 * 1024  # a header longer than this is not a PCD header
PCD_MAGIC = (b"# .PCD", b"VERSION", b"FIELDS")


def looks_like_pcd(head: bytes) -> bool:
    """True when the first bytes are a PCD header (headerless .pcd.bin files are not)."""
    return head.lstrip().startswith(PCD_MAGIC)


@dataclass
class PcdCloud:
    """A decoded PCD file: named columns of `points` values each, plus the organisation."""

    columns: dict[str, np.ndarray]
    width: int
    height: int
    data: str
    viewpoint: tuple[float, ...] = field(default=(0, 0, 0, 1, 0, 0, 0))

    @property
    def points(self) -> int:
        return self.width * self.height

    def __repr__(self) -> str:
        cols = ", ".join(f"{k}:{v.dtype}" for k, v in self.columns.items())
        return f"PcdCloud({self.width}x{self.height}, {self.data}, [{cols}])"


@dataclass(frozen=True)
class _Header:
    fields: list[str]
    sizes: list[int]
    types: list[str]
    counts: list[int]
    width: int
    height: int
    points: int
    data: str
    viewpoint: tuple[float, ...]
    data_offset: int

    def dtype(self) -> np.dtype:
        """Record dtype (binary layout); padding fields `_` keep their bytes but get a name."""
        parts = []
        for i, (name, size, typ, count) in enumerate(zip(self.fields, self.sizes, self.types,
                                                         self.counts)):
            base = _TYPES[(typ, size)]
            label = name if name != "_" else f"_pad{i}"
            parts.append((label, base, (count,)) if count > 1 else (label, base))
        return np.dtype(parts)


def _ints(path: Path, key: str, values: list[str], n: int | None) -> list[int]:
    if n is not None and len(values) != n:
        raise InputError(path, f"header.{key}", f"{n} values (one per field)", f"{len(values)}")
    try:
        out = [int(v) for v in values]
    except ValueError:
        raise InputError(path, f"header.{key}", "whole numbers", " ".join(values)) from None
    if any(v < 0 for v in out):
        raise InputError(path, f"header.{key}", "non-negative numbers", " ".join(values))
    return out


def _parse_header(path: Path, raw: bytes) -> _Header:
    entries: dict[str, list[str]] = {}
    offset = 0
    while True:
        end = raw.find(b"\n", offset, _MAX_HEADER)
        if end < 0:
            raise InputError(path, "header", "a PCD header ending in a DATA line",
                             "no DATA line in the first 64 KiB" if len(raw) >= _MAX_HEADER
                             else "end of file")
        line = raw[offset:end].decode("ascii", errors="replace").strip()
        offset = end + 1
        if not line or line.startswith("#"):
            continue
        key, *values = line.split()
        entries[key.upper()] = values
        if key.upper() == "DATA":
            break

    for key in ("FIELDS", "SIZE", "TYPE", "WIDTH", "DATA"):
        if key not in entries:
            raise InputError(path, f"header.{key}", f"a {key} line before DATA", "none")
    fields = entries["FIELDS"]
    if not fields:
        raise InputError(path, "header.FIELDS", "at least one field name", "none")
    n = len(fields)
    sizes = _ints(path, "SIZE", entries["SIZE"], n)
    types = [t.upper() for t in entries["TYPE"]]
    if len(types) != n:
        raise InputError(path, "header.TYPE", f"{n} values (one per field)", f"{len(types)}")
    for name, t, s in zip(fields, types, sizes):
        if (t, s) not in _TYPES:
            raise InputError(path, "header.TYPE", "F (size 2, 4, 8), U or I (size 1, 2, 4, 8)",
                             f"{t} with SIZE {s} for field {name!r}")
    counts = _ints(path, "COUNT", entries.get("COUNT", ["1"] * n), n)
    if any(c < 1 for c in counts):
        raise InputError(path, "header.COUNT", "counts >= 1", " ".join(map(str, counts)))
    (width,) = _ints(path, "WIDTH", entries["WIDTH"], 1)
    (height,) = _ints(path, "HEIGHT", entries.get("HEIGHT", ["1"]), 1)
    points = width * height
    if "POINTS" in entries:
        (declared,) = _ints(path, "POINTS", entries["POINTS"], 1)
        if declared != points:
            raise InputError(path, "header.POINTS", f"WIDTH x HEIGHT = {points}", str(declared))
    data = entries["DATA"][0].lower() if entries["DATA"] else ""
    if data not in DATA_KINDS:
        raise InputError(path, "header.DATA", " or ".join(DATA_KINDS), data or "nothing")
    try:
        viewpoint = tuple(float(v) for v in entries.get("VIEWPOINT", "0 0 0 1 0 0 0".split()))
    except ValueError:
        raise InputError(path, "header.VIEWPOINT", "7 numbers",
                         " ".join(entries["VIEWPOINT"])) from None
    return _Header(fields, sizes, types, counts, width, height, points, data, viewpoint, offset)


def _columns(h: _Header, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop padding, split COUNT > 1 fields into numbered columns."""
    out: dict[str, np.ndarray] = {}
    for name, count in zip(h.fields, h.counts):
        if name == "_":
            continue
        a = arrays[name]
        if count == 1:
            out[name] = a.reshape(-1)
        else:
            a = a.reshape(h.points, count)
            for k in range(count):
                out[f"{name}_{k}"] = a[:, k]
    return out


def _decode_ascii(path: Path, h: _Header, body: bytes) -> dict[str, np.ndarray]:
    width = sum(h.counts)
    text = body.decode("ascii", errors="replace")
    # float64 holds every 32-bit integer exactly, so U/I fields survive this parse. Parsed in
    # C straight into one float64 array: text.split() made a Python string per number, ~25x
    # the file's size in memory for a large cloud.
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # numpy's "unmatched data"
        try:
            values = np.fromstring(text, dtype=np.float64, sep=" ") if text.strip() \
                else np.empty(0)
        except (ValueError, DeprecationWarning) as e:
            raise InputError(path, "data", "ascii numbers separated by white space",
                             str(e)) from None
    if values.size != h.points * width:
        raise InputError(path, "data", f"{h.points} points x {width} values = "
                         f"{h.points * width} ascii numbers", f"{values.size}")
    table = values.reshape(h.points, width)
    arrays, col = {}, 0
    for name, size, typ, count in zip(h.fields, h.sizes, h.types, h.counts):
        arrays[name] = table[:, col:col + count].astype(_TYPES[(typ, size)])
        col += count
    return arrays


def _decode_binary(path: Path, h: _Header, body: memoryview) -> dict[str, np.ndarray]:
    rec = h.dtype()
    need = h.points * rec.itemsize
    if len(body) < need:
        raise InputError(path, "data", f"{need} bytes of binary records "
                         f"({h.points} x {rec.itemsize})", f"{len(body)} bytes")
    table = np.frombuffer(body, dtype=rec, count=h.points)
    return {name: table[label] for name, label in zip(h.fields, rec.names)}


def _decode_compressed(path: Path, h: _Header, body: memoryview,
                       limits: ReadLimits | None = None) -> dict[str, np.ndarray]:
    from producer import _lzf

    if len(body) < 8:
        raise InputError(path, "compressed size", "8 bytes of sizes after the header",
                         f"{len(body)} bytes")
    packed, unpacked = np.frombuffer(body, dtype="<u4", count=2).tolist()
    rec = h.dtype()
    need = h.points * rec.itemsize
    if unpacked != need:
        raise InputError(path, "uncompressed size", f"{need} bytes ({h.points} points x "
                         f"{rec.itemsize} bytes)", f"{unpacked}")
    if packed > len(body) - 8:
        raise InputError(path, "compressed size", f"at most the {len(body) - 8} bytes present",
                         f"{packed}")
    # What it unpacks to counts against the limit too: a small file can claim 4 GiB.
    try:
        (limits or ReadLimits()).check(path, "lidar", unpacked)
    except InputError as e:
        raise InputError(path, "uncompressed size", e.expected, e.found) from None
    try:
        raw = _lzf.decompress(body[8:8 + packed], unpacked)
    except ValueError as e:
        raise InputError(path, "data", "a valid LZF stream", str(e)) from None
    # Field by field: each field's values for every point are contiguous.
    arrays, off = {}, 0
    for name, size, typ, count in zip(h.fields, h.sizes, h.types, h.counts):
        n = h.points * count
        arrays[name] = np.frombuffer(raw, dtype=_TYPES[(typ, size)], count=n, offset=off)
        off += n * size
    return arrays


def read_pcd(path: str | Path, limits: ReadLimits | None = None) -> PcdCloud:
    """Decode a PCD file into columns; InputError names the header field or data problem,
    or the lidar read limit (`limits`, default ReadLimits()) the file is over."""
    path = Path(path)
    try:
        raw = read_bytes(path, "lidar", limits)
    except OSError as e:
        raise InputError(path, "file", "a readable PCD file", e.strerror or str(e)) from None
    if not raw:
        raise InputError(path, "size", "a PCD header and data", "0 bytes (empty file)")
    h = _parse_header(path, raw)
    body = memoryview(raw)[h.data_offset:]
    if h.data == "ascii":
        arrays = _decode_ascii(path, h, bytes(body))
    elif h.data == "binary":
        arrays = _decode_binary(path, h, body)
    else:
        arrays = _decode_compressed(path, h, body, limits)
    return PcdCloud(_columns(h, arrays), h.width, h.height, h.data, h.viewpoint)
