"""metadata.json: read and validate a sample's optional sidecar before any modality reads it.

WHY validate here and not in each modality: a wrong type deep inside a radar loader would
surface as a numpy traceback; checked once here, the error names the file and the field
(`metadata.json: radar.shape: expected a list of 3 positive integers, found "abc"`) and the
sample is rejected before anything is decoded. The modalities then trust the types they get.

Schema (every key optional; documented for users in docs/dataset.md):

    key                         type                                   meaning
    --------------------------  -------------------------------------  --------------------------
    timestamp_ns                int in 0 .. 2^63-1                     sample start, ns (epoch)
    timestamp                   number in 0 .. 9223372036              same, in seconds (both
                                                                       must fit int64 ns: the
                                                                       cache index and the ring
                                                                       store int64; year 2262)
    timestamps.<stem>           number >= 0 or non-decreasing list     per-frame times, seconds
                                                                       (a frame sequence's list,
                                                                       one frame file's time, or
                                                                       a sequence's start with
                                                                       its frame_rates)
    frame_rates.<stem>          number > 0                             frames per second
    calibration.<stem>          object; `extrinsic` 4x4 numbers,       sensor pose / intrinsics;
                                `intrinsic` 3x3 numbers; others kept   carried, not applied
    tolerance_s                 number >= 0                            alignment tolerance of
                                                                       frame sequences, seconds
    <stem> or <kind>            object: the sensor's own section       read by its modality:
      .dtype                    unknown: numeric numpy dtype name      element type
                                (int16, <f4, uint8 ...); radar*: one
                                of complex_int16, int16, complex64,
                                float32
      .shape                    list of positive ints, at most one -1  array shape as stored
                                (inferred); radar* ADC: exactly 3
                                [chirps, samples, rx]
      .fields                   int >= 1 or list of field names        point record (lidar,
                                                                       radar point lists)
      .format                   string; radar*: "adc" or "points"      how to read the bytes
      .layout                   radar*: chirp_sample_rx,               axis order of the cube
                                chirp_rx_sample or dca1000
      .tx                       radar* dca1000: int >= 1               TDM transmitters
      .offset                   int >= 0                               header bytes to skip
      (other keys)              anything                               kept for the modality

The per-sensor keys are the ones producer/modalities/{lidar,radar,unknown}.py read (see their
docstrings); this module checks their types early, the modalities check them against the file.

A section applies to the file whose stem is its key (`lidar_top`), else to every file of
that kind (`lidar`); a frame sequence's section (`imu` for `imu_0001.data` ...) applies to
each of its frames (producer/pipeline.py). How frame times are read: producer/align.py. Any other top-level key is kept unchanged and reported in `notes`
(a typo like `frame_rate` should be visible, but never cost the sample).

Hostile files are rejected with the field named, never allowed to stop a run: JSON nested
deeper than MAX_DEPTH (Python's parser recurses, and 2,000 levels raised RecursionError out of
the whole preprocess) is refused after a bracket count over the bytes, before parsing;
integers longer than MAX_INT_DIGITS (Python refuses to convert more than 4,300 digits, and a
5,000-digit number raised ValueError) are refused naming where they are; timestamps must fit
the int64 nanoseconds that the cache index stores (2^64 passed validation and failed at
commit, after every sample had been processed).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from protocol.errors import InputError

#: Top-level keys with a fixed meaning; any other object-valued key is a sensor section.
GENERAL_KEYS = ("timestamp_ns", "timestamp", "timestamps", "frame_rates", "calibration",
                "tolerance_s")
#: What producer/modalities/radar.py reads (kept in step with its ADC_DTYPES / LAYOUTS).
RADAR_DTYPES = ("complex_int16", "int16", "complex64", "float32")
RADAR_LAYOUTS = ("chirp_sample_rx", "chirp_rx_sample", "dca1000")
RADAR_FORMATS = ("adc", "points")
MAX_BYTES = 1 << 20  # a sidecar, not a data file: refuse megabytes of JSON
#: Deepest nesting of objects/arrays accepted (calibration matrices are 3 deep).
MAX_DEPTH = 64
#: Longest integer accepted, in digits (an int64 has 19).
MAX_INT_DIGITS = 100
#: Largest timestamp_ns: the cache index and ring slots store int64 nanoseconds.
MAX_TIMESTAMP_NS = (1 << 63) - 1
#: Largest `timestamp` in seconds whose nanoseconds still fit MAX_TIMESTAMP_NS (year 2262).
MAX_TIMESTAMP_S = 9_223_372_036.0

_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


def _show(value: Any) -> str:
    """A value as the error message shows it: JSON, truncated."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def nesting_depth(raw: bytes) -> int:
    """How deep objects and arrays nest in JSON text, counted over the bytes (strings
    blanked first) without parsing: safe on any input, linear, no recursion."""
    bare = np.frombuffer(_JSON_STRING.sub(b'""', raw), dtype=np.uint8)
    if not bare.size:
        return 0
    step = ((bare == 0x5B).astype(np.int32) + (bare == 0x7B)
            - (bare == 0x5D) - (bare == 0x7D))  # [ { ] }
    return int(np.cumsum(step).max(initial=0))


class _LongInt:
    """Stands in for an integer too long to convert, so the check can say where it is."""

    def __init__(self, digits: int):
        self.digits = digits


def _parse_int(text: str) -> int | _LongInt:
    digits = len(text) - text.startswith("-")
    return _LongInt(digits) if digits > MAX_INT_DIGITS else int(text)


def _find_long_int(value: Any, where: str) -> tuple[str, _LongInt] | None:
    """The dotted field of the first _LongInt in parsed metadata (depth <= MAX_DEPTH)."""
    if isinstance(value, _LongInt):
        return where, value
    items = (value.items() if isinstance(value, dict)
             else ((f"[{i}]", v) for i, v in enumerate(value)) if isinstance(value, list) else ())
    for key, v in items:
        sub = f"{where}{key}" if key.startswith("[") else f"{where}.{key}" if where else key
        found = _find_long_int(v, sub)
        if found is not None:
            return found
    return None


class _Checker:
    """Validation of one file; every error names `path` and the dotted field."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, field: str, expected: str, value: Any) -> None:
        raise InputError(self.path, field, expected, _show(value))

    def obj(self, field: str, v: Any) -> dict:
        if not isinstance(v, dict):
            self.fail(field, "an object", v)
        return v

    def number(self, field: str, v: Any, *, positive: bool = False) -> None:
        ok = _is_number(v) and (v > 0 if positive else v >= 0)
        if not ok:
            self.fail(field, "a positive number" if positive else "a number >= 0", v)

    def matrix(self, field: str, v: Any, rows: int, cols: int) -> None:
        ok = (isinstance(v, list) and len(v) == rows
              and all(isinstance(r, list) and len(r) == cols and all(map(_is_number, r))
                      for r in v))
        if not ok:
            self.fail(field, f"a {rows}x{cols} list of lists of numbers", v)

    def per_stem(self, field: str, v: Any, check) -> None:
        for stem, item in self.obj(field, v).items():
            check(f"{field}.{stem}", item)

    # --- general keys -------------------------------------------------------------------

    def timestamps(self, field: str, v: Any) -> None:
        if _is_number(v):
            self.number(field, v)
            return
        if not (isinstance(v, list) and v and all(_is_number(t) and t >= 0 for t in v)):
            self.fail(field, "a time in seconds or a non-empty list of times >= 0", v)
        if any(b < a for a, b in zip(v, v[1:])):
            self.fail(field, "times in non-decreasing order", v)

    def calibration(self, field: str, v: Any) -> None:
        self.obj(field, v)
        if "extrinsic" in v:
            self.matrix(f"{field}.extrinsic", v["extrinsic"], 4, 4)
        if "intrinsic" in v:
            self.matrix(f"{field}.intrinsic", v["intrinsic"], 3, 3)

    # --- sensor sections ----------------------------------------------------------------

    def section(self, key: str, v: dict) -> None:
        radar = key.startswith("radar")
        if "dtype" in v:
            dt = v["dtype"]
            if radar:
                if dt not in RADAR_DTYPES:
                    self.fail(f"{key}.dtype", " or ".join(RADAR_DTYPES), dt)
            elif not (isinstance(dt, str) and _numpy_dtype(dt)):
                self.fail(f"{key}.dtype", "a numeric numpy dtype name (e.g. float32, int16, "
                          "<f8, uint8)", dt)
        if "format" in v:
            fmt = v["format"]
            if radar and fmt not in RADAR_FORMATS:
                self.fail(f"{key}.format", " or ".join(f'"{x}"' for x in RADAR_FORMATS), fmt)
            if not isinstance(fmt, str):
                self.fail(f"{key}.format", "a string", fmt)
        if "shape" in v:
            shape = v["shape"]
            if radar and v.get("format", "adc") == "adc":
                ok = (isinstance(shape, list) and len(shape) == 3
                      and all(_is_int(d) and d > 0 for d in shape))
                if not ok:
                    self.fail(f"{key}.shape", "a list of 3 positive integers "
                              "(chirps, samples, rx)", shape)
            else:
                ok = (isinstance(shape, list) and shape
                      and all(_is_int(d) and (d > 0 or d == -1) for d in shape)
                      and shape.count(-1) <= 1)
                if not ok:
                    self.fail(f"{key}.shape", "a list of positive integers (at most one -1)",
                              shape)
        if "fields" in v:
            f = v["fields"]
            ok = (_is_int(f) and f >= 1) or (
                isinstance(f, list) and f and all(isinstance(x, str) and x for x in f))
            if not ok:
                self.fail(f"{key}.fields", "a field count (int >= 1) or a list of field names", f)
        if radar and "layout" in v and v["layout"] not in RADAR_LAYOUTS:
            self.fail(f"{key}.layout", " or ".join(RADAR_LAYOUTS), v["layout"])
        for name in ("tx", "offset"):
            if name in v and not (_is_int(v[name]) and v[name] >= (1 if name == "tx" else 0)):
                self.fail(f"{key}.{name}", "an integer >= 1" if name == "tx"
                          else "an integer >= 0 (bytes)", v[name])


def _numpy_dtype(name: str) -> bool:
    try:
        dt = np.dtype(name)
    except TypeError:
        return False
    return dt.kind in "biuf" and dt.fields is None


def load_metadata(path: str | Path, notes: list[str] | None = None) -> dict:
    """Read and validate a metadata.json; returns the parsed object (unknown keys kept).

    Raises InputError(path, field, expected, found) on an unreadable file, invalid JSON
    (field `json`, with line and column), a non-object top level, or a known key of the
    wrong type. Unknown non-object top-level keys are kept and reported in `notes`.
    """
    path = Path(path)
    chk = _Checker(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise InputError(path, "file", "a readable metadata.json", e.strerror or str(e)) from None
    if len(raw) > MAX_BYTES:
        raise InputError(path, "size", f"at most {MAX_BYTES} bytes", "more")
    depth = nesting_depth(raw)
    if depth > MAX_DEPTH:
        raise InputError(path, "json", f"objects and arrays nested at most {MAX_DEPTH} deep",
                         f"nesting {depth} deep")
    long_ints = False

    def parse_int(text: str) -> int | _LongInt:
        nonlocal long_ints
        value = _parse_int(text)
        long_ints |= isinstance(value, _LongInt)
        return value

    try:
        meta = json.loads(raw, parse_int=parse_int)
    except RecursionError:  # never after the depth check; kept so no input can crash a run
        raise InputError(path, "json", f"objects and arrays nested at most {MAX_DEPTH} deep",
                         "nesting too deep to parse") from None
    except UnicodeDecodeError as e:
        raise InputError(path, "json", "UTF-8 text", f"byte {e.start} is not UTF-8") from None
    except json.JSONDecodeError as e:
        raise InputError(path, "json", "valid JSON",
                         f"{e.msg} at line {e.lineno} column {e.colno}") from None
    if long_ints:
        field, big = _find_long_int(meta, "")  # type: ignore[misc]
        raise InputError(path, field or "top level",
                         f"an integer of at most {MAX_INT_DIGITS} digits",
                         f"an integer of {big.digits} digits")
    if not isinstance(meta, dict):
        raise InputError(path, "top level", "a JSON object", type(meta).__name__)

    for key, value in meta.items():
        if key == "timestamp_ns":
            if not (_is_int(value) and 0 <= value <= MAX_TIMESTAMP_NS):
                chk.fail(key, f"an integer >= 0 and <= {MAX_TIMESTAMP_NS} (nanoseconds; "
                         f"int64, until the year 2262)", value)
        elif key == "timestamp":
            if not (_is_number(value) and 0 <= value <= MAX_TIMESTAMP_S):
                chk.fail(key, f"a number >= 0 and <= {MAX_TIMESTAMP_S:.0f} (seconds; its "
                         f"nanoseconds must fit int64: until the year 2262)", value)
        elif key == "tolerance_s":
            chk.number(key, value)
        elif key == "timestamps":
            chk.per_stem(key, value, chk.timestamps)
        elif key == "frame_rates":
            chk.per_stem(key, value, lambda f, v: chk.number(f, v, positive=True))
        elif key == "calibration":
            chk.per_stem(key, value, chk.calibration)
        elif isinstance(value, dict):
            chk.section(key, value)
        elif notes is not None:
            notes.append(f"{path.name}: unknown key {key!r} kept as is "
                         f"(known: {', '.join(GENERAL_KEYS)}, or a sensor section object)")
    return meta


def timestamp_ns(meta: dict) -> int:
    """The sample's start time in ns from validated metadata; 0 when it gives none."""
    if "timestamp_ns" in meta:
        return int(meta["timestamp_ns"])
    if "timestamp" in meta:
        return int(round(float(meta["timestamp"]) * 1e9))
    return 0
