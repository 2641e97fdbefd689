"""Where `mm-producer run` gets its raw input: timestamped items, never tensors.

Three kinds of source, told apart by `open_source(SRC)`:

* `DatasetReplay`  a dataset folder (`split/class/sample/*`) replayed as a live feed, in
                   timestamp order (metadata.json `timestamp_ns`/`timestamp`; sample order
                   when a sample has none), optionally looping. Items are `SampleFiles`: the
                   pipeline turns them into arrays, exactly as `preprocess` does.
* `MediaSource`    a media file or any URL PyAV opens (rtsp, udp, http, tcp, a v4l2 device).
                   One open and one demux (`media_clips.py`) give clips of T filtered frames with
                   the audio samples of the same span; the filter can change between clips
                   without reopening (a listen-once stream survives it). Sensor files from a
                   watched folder are handed to the pipeline beside the clip.
* `WatchFolder`    sensor files a recorder drops into a folder, named with their timestamp
                   (`lidar_top_1700000000.125.bin`, `radar-1700000000125000000.bin`),
                   picked up by polling and aligned with the video by timestamp.

Sources never sleep to pace themselves and never retry: they raise `SourceError` when the
source itself failed (folder gone, stream dropped, file vanished), and the daemon owns the
back-off, the pacing and the status report. A bad *sample* (one corrupt file in a dataset)
is not a source failure: the pipeline raises InputError for it and the daemon skips it.
"""
from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from protocol.errors import InputError, MmfeedError
from protocol.filters import FilterSpec

from .dataset import KINDS, SampleFiles, index_dataset, kind_of
from .media_clips import ClipSettings, StreamInfo
from .metadata import timestamp_ns

#: Interval between samples that carry no timestamp, for `--rate recorded` (seconds).
DEFAULT_PERIOD_S = 0.1
#: Open and read timeouts for network sources (seconds): a dead stream raises, never hangs.
DEFAULT_TIMEOUTS = (10.0, 5.0)
_URL = re.compile(r"^[a-z][a-z0-9+.\-]*://", re.I)


class SourceError(MmfeedError):
    """The source itself failed (not one sample): retried by the daemon with back-off."""

    code = "source_error"


# --- dataset replay -------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplayItem:
    """One dataset sample due at `offset_s` seconds after the replay started."""

    sample: SampleFiles
    timestamp_ns: int       # recorded time (metadata), or a synthetic one in sample order
    offset_s: float         # when it is due at recorded speed, from the start of the replay
    index: int              # running number over the whole replay (loops included)


class DatasetReplay:
    """A dataset folder as a feed, in timestamp order, looping when asked.

    The folder is re-indexed at the start of every pass, so samples added meanwhile join
    the next pass, and a folder that vanished raises SourceError instead of replaying a
    stale list.
    """

    kind = "dataset"

    def __init__(self, root: str | Path, *, loop: bool = False,
                 splits: list[str] | None = None):
        self.root = Path(root)
        self.loop = loop
        self.splits = splits
        self.classes: list[str] = []
        self.problems: list[InputError] = []
        self._order: list[tuple[int, SampleFiles]] = []
        self._pos = 0
        self._count = 0
        self._pass_base_s = 0.0    # offset of this pass's first sample
        self._pass_span_s = 0.0
        self._reindex()

    def _reindex(self) -> None:
        try:
            index = index_dataset(self.root, self.splits)
        except (FileNotFoundError, OSError) as e:
            raise SourceError(f"dataset {self.root}: {e}") from None
        self.classes = index.classes
        self.problems = index.problems
        if not index.samples:
            raise SourceError(f"dataset {self.root}: no usable sample"
                              + (f" ({index.problems[0]})" if index.problems else ""))
        # Timestamp order: samples with metadata timestamps by time; samples without one
        # keep their folder order, spaced DEFAULT_PERIOD_S after the previous sample.
        stamped, t = [], None
        for s in index.samples:
            ts = timestamp_ns(s.metadata) if _has_timestamp(s.metadata) else None
            stamped.append((ts, s))
        known = [ts for ts, _ in stamped if ts is not None]
        t = min(known) if known else 0
        out = []
        for ts, s in stamped:
            if ts is None:
                t += int(DEFAULT_PERIOD_S * 1e9)
                ts = t
            else:
                t = max(t, ts)
            out.append((ts, s))
        out.sort(key=lambda x: x[0])  # stable: untimed samples keep their place
        self._order = out
        self._pos = 0
        first = out[0][0]
        # One pass lasts its span plus one typical gap, so a looping replay's timestamps
        # keep the recorded spacing across the seam (and whole seconds stay whole seconds).
        gaps = np.diff([ts for ts, _ in out])
        gap = float(np.median(gaps[gaps > 0])) / 1e9 if (gaps > 0).any() else DEFAULT_PERIOD_S
        self._pass_span_s = (out[-1][0] - first) / 1e9 + gap

    def stems(self) -> dict[str, set[str]]:
        """kind -> every sensor name of that kind in the dataset (for `sensor` and
        `modalities` checks): single-file stems and frame-sequence bases (`lidar_top` for
        lidar_top_0001.bin ...), the names the pipeline's inputs and settings use."""
        out: dict[str, set[str]] = {}
        for _, s in self._order:
            for kind in KINDS:
                names = s.sensors(kind)
                if names:
                    out.setdefault(kind, set()).update(names)
        return out

    def peek(self) -> SampleFiles | None:
        """The sample `next()` returns, without consuming it (None at the end)."""
        if self._pos >= len(self._order):
            if not self.loop:
                return None
            return self._order[0][1] if self._order else None
        return self._order[self._pos][1]

    def next(self) -> ReplayItem | None:
        """The next sample, or None when a non-looping replay is over."""
        if self._pos >= len(self._order):
            if not self.loop:
                return None
            self._pass_base_s += self._pass_span_s
            self._reindex()
        ts, sample = self._order[self._pos]
        first = self._order[0][0]
        item = ReplayItem(sample, ts + int(self._pass_base_s * 1e9),
                          self._pass_base_s + (ts - first) / 1e9, self._count)
        self._pos += 1
        self._count += 1
        return item

    def rewind(self) -> None:
        """Start a new pass now, as a loop would at its seam (timestamps and indices go on
        growing): how a finished replay is replayed after a control change."""
        self._pass_base_s += self._pass_span_s
        self._reindex()

    def check_alive(self) -> None:
        """SourceError when the folder itself is gone (a failing sample then is not the
        sample's fault)."""
        if not self.root.is_dir():
            raise SourceError(f"dataset {self.root}: folder disappeared")

    def describe(self) -> str:
        return f"dataset {self.root} ({len(self._order)} samples{', looping' if self.loop else ''})"

    def close(self) -> None:
        pass


def _has_timestamp(meta: dict) -> bool:
    return "timestamp_ns" in meta or "timestamp" in meta


# --- media files and URLs -----------------------------------------------------------------


@dataclass
class Clip:
    """T consecutive frames of a media source, the audio of the same span, and that span."""

    video: np.ndarray            # uint8 (T, C, H, W), shaped by `spec`
    start_s: float               # pts of the first frame
    end_s: float                 # pts of the last frame + one frame period
    timestamp_ns: int            # wall-clock time of the first frame (for sensor alignment)
    index: int
    spec: FilterSpec
    audio: np.ndarray | None = None   # float32 mono samples of [start_s, end_s) at the
                                      # asked audio rate; None: not asked for, or no audio
    tag: Any = None                   # ClipSettings.tag of the settings it was made with


class MediaSource:
    """A media file or URL decoded by PyAV, as clips of T frames with their audio.

    `clips(spec, frames, start_s)` opens the source once and demuxes video and audio
    together (`media_clips.demux_clips`). With `settings` (a callable returning ClipSettings) the
    filter, clip length and pts window are re-read at every clip boundary, so a control
    change needs no reopen. Opening and reading are bounded by `timeouts` (open, read) so a
    dead stream raises SourceError.

    A URL is a live stream (`live`): it has no timeline to seek in, its time is "now", and
    its end is a failure (the sender stopped), which the daemon answers by reconnecting with
    back-off - never by calling the source finished. A file ends; with --loop it starts over.
    """

    kind = "media"

    def __init__(self, url: str, *, loop: bool = False,
                 timeouts: tuple[float, float] = DEFAULT_TIMEOUTS):
        self.url = url
        self.loop = loop
        self.timeouts = timeouts
        self.is_url = bool(_URL.match(url)) and not url.startswith("file:")
        self.path = None if self.is_url else Path(url.removeprefix("file:"))
        self.classes: list[str] = []
        self.problems: list[InputError] = []
        self._count = 0
        self._wall_offset_ns: int | None = None
        self.info: StreamInfo | None = None    # known once opened or probed
        self._probed: tuple[int, int] | None = None   # (mtime_ns, size) of the probed file
        if self.path is not None and not self.path.is_file():
            raise SourceError(f"media file {self.path}: not found")

    @property
    def live(self) -> bool:
        """A stream (see the class docstring), not a recording."""
        return self.is_url

    def probe(self) -> StreamInfo | None:
        """What the source is (frame size, rate, duration, audio). A file is probed (again
        only when it changed); a stream is only known once `clips()` has opened it (a probe
        would use up a listen-once server). None: not known (yet)."""
        if self.path is None:
            return self.info
        try:
            st = self.path.stat()
        except OSError:
            return self.info
        if self._probed != (st.st_mtime_ns, st.st_size):
            from .modalities import video

            try:
                with video.open_container(self.path) as c:
                    self.info = StreamInfo.of(c, video.first_video_stream(c, self.path))
            except InputError:
                return self.info
            self._probed = (st.st_mtime_ns, st.st_size)
        return self.info

    def has_audio(self) -> bool:
        """Whether the source has an audio stream (`probe`)."""
        info = self.probe()
        return bool(info and info.has_audio)

    def stems(self) -> dict[str, set[str]]:
        return {"video": {"video"}, **({"audio": {"audio"}} if self.has_audio() else {})}

    def clips(self, spec: FilterSpec, frames: int, start_s: float = 0.0, *,
              audio_rate: int | None = None,
              settings: Callable[[], ClipSettings] | None = None) -> Iterator[Clip]:
        """Clips from `start_s` on; SourceError when the source fails. `audio_rate`: give
        each clip its audio as mono samples at this rate. `settings`: re-read at each clip
        boundary (it overrides `spec` and `frames`)."""
        from .media_clips import demux_clips

        if self.path is not None and not self.path.is_file():
            raise SourceError(f"media file {self.path}: disappeared")
        if settings is None:
            fixed = ClipSettings(spec, frames)
            settings = lambda: fixed  # noqa: E731

        def opened(info: StreamInfo) -> None:
            self.info = info

        live = self.live
        if live:
            self._wall_offset_ns = None  # a new connection: its clock starts anew
        try:
            for c in demux_clips(self.url, settings, audio_rate=audio_rate, start_s=start_s,
                                 timeout=self.timeouts, on_open=opened):
                now = time.time_ns()
                if live:
                    # The wall time of pts 0. A clip is handed over after its last frame
                    # was sent, so now - end_s is that time plus a delay >= 0; the smallest
                    # seen is the best estimate. Anchoring on the first clip alone stamped a
                    # whole stream ~1 s in the future: the clips buffered while the stream
                    # was probed at connect come out in a burst, late.
                    est = now - int(c.end_s * 1e9)
                    if self._wall_offset_ns is None or est < self._wall_offset_ns:
                        self._wall_offset_ns = est
                elif self._wall_offset_ns is None:
                    self._wall_offset_ns = now - int(c.start_s * 1e9)
                clip = Clip(c.video, c.start_s, c.end_s,
                            self._wall_offset_ns + int(c.start_s * 1e9), self._count,
                            c.settings.spec, c.audio, c.settings.tag)
                self._count += 1
                yield clip
        except InputError as e:
            raise SourceError(f"{self.url}: {e}") from None
        if self.path is not None and not self.path.is_file():
            raise SourceError(f"media file {self.path}: disappeared")
        if self.live:
            raise SourceError(f"stream {self.url}: ended (the sender closed it or stopped "
                              f"sending)")

    def check_alive(self) -> None:
        if self.path is not None and not self.path.is_file():
            raise SourceError(f"media file {self.path}: disappeared")

    def describe(self) -> str:
        return f"{'stream' if self.is_url else 'media file'} {self.url}"

    def close(self) -> None:
        pass


def open_source(src: str, *, loop: bool = False, splits: list[str] | None = None,
                timeouts: tuple[float, float] = DEFAULT_TIMEOUTS) -> DatasetReplay | MediaSource:
    """A folder is a dataset; anything else a media file or URL for PyAV."""
    if not _URL.match(src) and Path(src).is_dir():
        return DatasetReplay(src, loop=loop, splits=splits)
    return MediaSource(src, loop=loop, timeouts=timeouts)


# --- watched folder -----------------------------------------------------------------------

# `<stem><_ or -><timestamp>.<ext>`: seconds with a fraction, or an integer in s/ms/us/ns.
_STAMPED = re.compile(r"^(?P<stem>[A-Za-z][A-Za-z0-9_]*?)[_\-](?P<ts>\d+(?:\.\d+)?)\.")


def parse_stamped_name(name: str) -> tuple[str, int] | None:
    """`lidar_top_1700000000.125.bin` -> ("lidar_top", 1700000000125000000); None when the
    name carries no timestamp. Integers are read by magnitude: >= 1e17 ns, >= 1e14 us,
    >= 1e11 ms, else seconds."""
    m = _STAMPED.match(name)
    if m is None:
        return None
    text = m.group("ts")
    if "." in text:  # integer arithmetic: a float has no room for ns at epoch magnitude
        whole, frac = text.split(".")
        return m.group("stem"), int(whole) * 10**9 + int((frac + "0" * 9)[:9])
    v = int(text)
    scale = 1 if v >= 10**17 else 1_000 if v >= 10**14 else 1_000_000 if v >= 10**11 else 10**9
    return m.group("stem"), v * scale


@dataclass
class WatchFolder:
    """Sensor files arriving in `directory`, kept per stem in time order (bounded).

    Polled by the daemon (`scan()` is one `os.scandir`): no inotify dependency, and a
    folder on a network mount works the same. Files whose names carry no timestamp are
    listed in `ignored` and, for the scan that first saw them, in `newly_ignored` (the daemon
    logs those) - never silently dropped.

    Memory stays bounded over days of arriving files: at most `keep` paths per stem, and the
    names remembered as seen or ignored are only those still in the folder (a recorder that
    rotates its files away does not grow this object).
    """

    directory: Path
    keep: int = 512
    times: dict[str, np.ndarray] = field(default_factory=dict)   # stem -> int64 ns, sorted
    paths: dict[str, list[Path]] = field(default_factory=dict)
    ignored: set[str] = field(default_factory=set)
    newly_ignored: list[str] = field(default_factory=list)
    _seen: set[str] = field(default_factory=set)

    def scan(self) -> int:
        """Pick up new files; returns how many were added."""
        try:
            entries = list(os.scandir(self.directory))
        except OSError as e:
            raise SourceError(f"watched folder {self.directory}: {e.strerror or e}") from None
        new: dict[str, list[tuple[int, Path]]] = {}
        self.newly_ignored = []
        present = {e.name for e in entries}
        if len(self._seen) > len(present):  # files went away: forget them (bounded memory)
            self._seen &= present
            self.ignored &= present
        for e in entries:
            if e.name in self._seen or e.name.startswith(".") or not e.is_file():
                continue
            self._seen.add(e.name)
            parsed = parse_stamped_name(e.name)
            if parsed is None:
                self.ignored.add(e.name)
                self.newly_ignored.append(e.name)
                continue
            stem, ts = parsed
            new.setdefault(stem, []).append((ts, Path(e.path)))
        for stem, items in new.items():
            old = list(zip(self.times.get(stem, np.empty(0, np.int64)).tolist(),
                           self.paths.get(stem, [])))
            merged = sorted(old + items, key=lambda x: x[0])[-self.keep:]
            self.times[stem] = np.array([t for t, _ in merged], np.int64)
            self.paths[stem] = [p for _, p in merged]
        return sum(len(v) for v in new.values())

    def stems(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for stem, paths in self.paths.items():
            if paths:
                out.setdefault(kind_of(stem, paths[-1]), set()).add(stem)
        return out
