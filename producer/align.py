"""Timestamp alignment: for each video frame, the nearest frame of another modality.

Sensors run at their own rates (camera 10-30 Hz, LiDAR 10-20 Hz, radar ~13 Hz) and their
clocks are only roughly aligned, so a training sample pairs each video frame with the
other modality's frame nearest in time, and only when it is within a tolerance; a pairing
further off than that is reported, never silently used.

Multi-frame recordings (the choice made here): one file per frame, named
`<stem>_<frame number>.<ext>` (`lidar_0001.bin`, `lidar_0002.bin`, ...). A suffix of digits
only marks a frame, so `lidar_top.bin` stays a separate sensor. `frame_sequences()` groups
a sample's files that way. Their times come from metadata.json, in seconds, either as one
list per modality in frame-number order or one number per file stem:

    {"timestamps": {"video": [0.0, 0.1, ...], "lidar": [0.02, 0.12, ...]}}
    {"timestamps": {"lidar_0001": 0.02, "lidar_0002": 0.12}}
    {"rates": {"lidar": 10.0}}    # fallback: frame i (in order) at i / rate seconds

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
    within = np.abs(offset) <= tolerance_s
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
    their count. InputError names `path` and the metadata field when times are missing, not
    finite numbers, or fewer/more than the frames.
    """
    stems = None if isinstance(frames, int) else [Path(f).name.split(".", 1)[0] for f in frames]
    count = frames if isinstance(frames, int) else len(frames)
    stamps = meta.get("timestamps", {}) if isinstance(meta, Mapping) else {}
    if not isinstance(stamps, Mapping):
        raise InputError(path, "timestamps", "an object of modality -> seconds",
                         type(stamps).__name__)
    field = f"timestamps.{modality}"
    if modality in stamps:
        values = stamps[modality]
        try:
            t = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            t = np.empty((0, 0))
        if t.ndim != 1 or not np.isfinite(t).all():
            raise InputError(path, field, "a list of finite seconds", repr(values)[:80])
        if t.size != count:
            raise InputError(path, field, f"{count} timestamps (one per {modality} frame)",
                             f"{t.size}")
        return t
    if stems and all(s in stamps for s in stems):
        values = [stamps[s] for s in stems]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise InputError(path, f"timestamps.{stems[0]}", "a number of seconds per frame file",
                             repr(values)[:80])
        t = np.asarray(values, dtype=np.float64)
        if not np.isfinite(t).all():
            raise InputError(path, f"timestamps.{stems[0]}", "finite seconds", "NaN or inf")
        return t
    rate = (meta.get("rates") or {}).get(modality) if isinstance(meta, Mapping) else None
    if rate is not None:
        if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not rate > 0:
            raise InputError(path, f"rates.{modality}", "a frame rate > 0 in Hz", repr(rate))
        return np.arange(count, dtype=np.float64) / float(rate)
    raise InputError(path, field, f"{count} timestamps, one per-file timestamp each, or "
                     f"rates.{modality}", "none")
