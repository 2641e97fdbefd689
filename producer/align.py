"""Timestamp alignment: for each video frame, the nearest frame of another modality.

Sensors run at their own rates (camera 10-30 Hz, LiDAR 10-20 Hz, radar ~13 Hz) and their
clocks are only roughly aligned, so a training sample pairs each video frame with the
other modality's frame nearest in time, and only when it is within a tolerance; a pairing
further off than that is reported, never silently used.

Multi-frame recordings (the choice made here): one file per frame, named
`<stem>_<frame number>.<ext>` (`lidar_0001.bin`, `lidar_0002.bin`, ...). A suffix of digits
only marks a frame, so `lidar_top.bin` stays a separate sensor. `frame_sequences()` groups
a sample's files that way (producer/dataset.py makes a group of two or more frames one
sensor). Their times come from metadata.json, in seconds on the video's presentation clock,
as one list per sensor in frame-number order, one number per file stem, or a frame rate
(with an optional start time under `timestamps.<sensor>`):

    {"timestamps": {"lidar": [0.02, 0.12, ...]}}
    {"timestamps": {"lidar_0001": 0.02, "lidar_0002": 0.12}}
    {"frame_rates": {"lidar": 10.0}}                              # frame i at i / rate
    {"frame_rates": {"lidar": 10.0}, "timestamps": {"lidar": 0.02}}  # at 0.02 + i / rate

The live producer uses the same functions for sensor files arriving in a watched folder:
`align()` sorts the other modality's times itself, so files may arrive out of order.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from protocol.errors import InputError

_FRAME = re.compile(r"^(?P<base>.+?)_(?P<num>\d+)$")
#: Offsets within tolerance + 1 ns count as within: times written in decimal seconds are not
#: exact in binary, and 0.4 - 0.35 > 0.05 must not reject a frame exactly at the tolerance.
SLACK_S = 1e-9


@dataclass(frozen=True)
class AlignmentReport:
    """How well one modality lines up with the video frames."""

    modality: str
    frames: int             # video frames
    matched: int            # video frames with a partner within the tolerance
    misaligned: int         # video frames whose nearest partner is further off
    worst_offset_s: float   # largest |partner time - frame time| over all video frames
    tolerance_s: float

    def __str__(self) -> str:
        if not self.misaligned:
            return (f"{self.modality}: all {self.frames} video frames aligned within "
                    f"{self.tolerance_s:.3f} s (worst {self.worst_offset_s:.3f} s)")
        return (f"{self.modality}: {self.misaligned} of {self.frames} video frames have no "
                f"{self.modality} frame within {self.tolerance_s:.3f} s (worst "
                f"{self.worst_offset_s:.3f} s)")


@dataclass(frozen=True)
class Alignment:
    """Per video frame: `index` of the partner frame (-1 beyond tolerance), `nearest` (always
    the nearest, -1 only when the other modality has no frames), and `offset_s` (partner
    time minus frame time). Indices refer to the other modality's times as given."""

    index: np.ndarray
    nearest: np.ndarray
    offset_s: np.ndarray
    report: AlignmentReport

    def __repr__(self) -> str:
        return f"Alignment({self.index.shape[0]} frames, {self.report})"


def _times(values: Any, name: str) -> np.ndarray:
    t = np.asarray(values, dtype=np.float64)
    if t.ndim != 1 or not np.isfinite(t).all():
        raise ValueError(f"{name} timestamps must be a 1-D array of finite seconds, got shape "
                         f"{t.shape}")
    return t


def align(frame_times: Sequence[float] | np.ndarray, other_times: Sequence[float] | np.ndarray,
          tolerance_s: float, modality: str = "other") -> Alignment:
    """Nearest `other_times` entry for every `frame_times` entry, vectorised (searchsorted).

    Ties go to the earlier frame. `other_times` need not be sorted.
    """
    if not tolerance_s >= 0:
        raise ValueError(f"tolerance_s must be >= 0, got {tolerance_s}")
    frames = _times(frame_times, "video")
    other = _times(other_times, modality)
    n = frames.size
    if other.size == 0:
        none = np.full(n, -1, np.int64)
        report = AlignmentReport(modality, n, 0, n, float("inf") if n else 0.0, tolerance_s)
        return Alignment(none, none.copy(), np.full(n, np.nan), report)
    order = np.argsort(other, kind="stable")
    sorted_t = other[order]
    right = np.clip(np.searchsorted(sorted_t, frames, side="left"), 0, sorted_t.size - 1)
    left = np.maximum(right - 1, 0)
    take_left = np.abs(frames - sorted_t[left]) <= np.abs(sorted_t[right] - frames)
    pos = np.where(take_left, left, right)
    nearest = order[pos].astype(np.int64)
    offset = other[nearest] - frames
    within = np.abs(offset) <= tolerance_s + SLACK_S
    index = np.where(within, nearest, -1)
    worst = float(np.abs(offset).max()) if n else 0.0
    report = AlignmentReport(modality, n, int(within.sum()), int(n - within.sum()), worst,
                             float(tolerance_s))
    return Alignment(index, nearest, offset, report)


def default_tolerance(other_times: Sequence[float] | np.ndarray) -> float:
    """Half the other modality's median frame period: a partner further off than that is
    closer to a neighbouring frame's slot than to this one."""
    t = np.sort(_times(other_times, "other"))
    if t.size < 2:
        return float("inf")
    return float(np.median(np.diff(t)) / 2)


def frame_sequences(files: Mapping[str, Path]) -> dict[str, list[Path]]:
    """Group `{stem: path}` files named `<base>_<digits>` into `{base: [paths in frame order]}`.

    Stems without a digits-only suffix are left out (they are single-file sensors).
    """
    groups: dict[str, list[tuple[int, Path]]] = {}
    for stem, path in files.items():
        m = _FRAME.match(stem)
        if m:
            groups.setdefault(m["base"], []).append((int(m["num"]), Path(path)))
    return {base: [p for _, p in sorted(items)] for base, items in groups.items()}


def frame_timestamps(meta: Mapping[str, Any], modality: str, frames: Sequence[Path] | int,
                     path: str | Path = "metadata.json") -> np.ndarray:
    """Seconds for each frame of `modality`, in frame order, from metadata (see module doc).

    `frames` is the frame files (per-stem timestamps are looked up by their stems) or just
    their count. Sources, first that applies: a list `timestamps.<modality>`; per-file
    `timestamps.<stem>` (when any frame has one, every frame must); `frame_rates.<modality>`,
    starting at a number `timestamps.<modality>` or 0. InputError names `path` and the
    metadata field when times are missing, not finite numbers, or fewer/more than the frames.
    """
    stems = None if isinstance(frames, int) else [Path(f).name.split(".", 1)[0] for f in frames]
    count = frames if isinstance(frames, int) else len(frames)
    if not isinstance(meta, Mapping):
        meta = {}
    stamps = meta.get("timestamps", {})
    if not isinstance(stamps, Mapping):
        raise InputError(path, "timestamps", "an object of modality -> seconds",
                         type(stamps).__name__)
    rates = meta.get("frame_rates", {})
    rate = rates.get(modality) if isinstance(rates, Mapping) else None
    field = f"timestamps.{modality}"
    values = stamps.get(modality)
    if values is not None and not (_is_seconds(values) and rate is not None):
        try:
            t = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            t = np.empty((0, 0))
        if t.ndim != 1 or not np.isfinite(t).all():
            expected = "a list of finite seconds, one per frame"
            if _is_seconds(values):
                expected += f" (a single start time needs frame_rates.{modality})"
            raise InputError(path, field, expected, repr(values)[:80])
        if t.size != count:
            raise InputError(path, field, f"{count} timestamps (one per {modality} frame)",
                             f"{t.size}")
        return t
    given = [s for s in stems if s in stamps] if stems else []
    if given:
        missing = [s for s in stems if s not in stamps]
        if missing:
            raise InputError(path, f"timestamps.{missing[0]}", f"a time for every {modality} "
                             f"frame file once any has one ({len(given)} of {count} have)",
                             "none")
        bad = next((s for s in stems if not _is_seconds(stamps[s])), None)
        if bad is not None:
            raise InputError(path, f"timestamps.{bad}", "a finite number of seconds",
                             repr(stamps[bad])[:80])
        return np.asarray([stamps[s] for s in stems], dtype=np.float64)
    if rate is not None:
        if not _is_seconds(rate) or not rate > 0:
            raise InputError(path, f"frame_rates.{modality}", "a frame rate > 0 in Hz",
                             repr(rate))
        start = float(values) if values is not None else 0.0
        return start + np.arange(count, dtype=np.float64) / float(rate)
    per_file = f"timestamps.{stems[0]} ..." if stems else "timestamps.<file stem>"
    raise InputError(path, field, f"a list of {count} times, a time per frame file "
                     f"({per_file}), or frame_rates.{modality}", "none")


def timestamp_field(meta: Mapping[str, Any], modality: str, stem: str) -> str:
    """The metadata field that gave frame `stem` of `modality` its time (for reports); the
    same precedence as frame_timestamps."""
    stamps = meta.get("timestamps") if isinstance(meta, Mapping) else None
    stamps = stamps if isinstance(stamps, Mapping) else {}
    rates = meta.get("frame_rates") if isinstance(meta, Mapping) else None
    has_rate = isinstance(rates, Mapping) and modality in rates
    if modality in stamps and not (_is_seconds(stamps[modality]) and has_rate):
        return f"timestamps.{modality}"
    if stem in stamps:
        return f"timestamps.{stem}"
    if modality in stamps:
        return f"timestamps.{modality} + frame_rates.{modality}"
    return f"frame_rates.{modality}"


def _is_seconds(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
