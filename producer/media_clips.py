"""One demux for a media file or live stream: video clips and the audio of the same span.

A listen-once stream (tcp/udp/rtsp) can be opened exactly once, so video and audio must come
out of the same `av.open`: `container.demux(video, audio)` hands over packets of both in
stream order, video frames are picked by pts (spec.fps) and converted straight into a clip
buffer (the same `FrameConverter` as `video.iter_frames`), and audio frames are resampled by
swresample to mono float32 at the audio config's rate into a rolling `AudioWindow`. A clip of
T frames covers [t0, t_last + one frame period); it is handed out with the audio samples of
exactly that span once the audio has caught up with its end (muxers interleave audio a little
behind or ahead of video), or once the video is MAX_AV_SKEW_S past it (the audio is late or
missing: the uncovered part is silence, never a stall).

NOTE [switching without reopening]: what a clip looks like (filter, clip length, pts window)
is read from `settings()` at every clip boundary - the first frame of a clip - and stays fixed
for that clip. A control change therefore needs no reopen: the clip in progress finishes with
the old settings, the next one starts with the new, and each clip carries the `tag` of the
settings it was made with (the daemon's Generation), so a generation starts exactly at a clip
boundary even on a stream that cannot be reopened. One exception keeps a change from waiting
on a slow clip: when the clip in progress still needs more than MAX_SWITCH_WAIT_S of source
time (a low `fps=`, 4 frames at fps=0.1 span 40 s), a change drops that partial clip (never
published half-made) and the next frame starts a clip with the new settings.
"""
from __future__ import annotations

import collections
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np

from protocol.errors import InputError
from protocol.filters import FilterSpec

from .modalities import video
from .modalities._decode_loops import demuxed
from .modalities.ffmpeg_chain_run import ChainRunner
from .modalities.frame_times import StreamGrid

#: How far (s) the video may run past a finished clip's end before the clip is handed out
#: without waiting any longer for its audio.
MAX_AV_SKEW_S = 1.5
#: Audio kept in the rolling window at most (s): bounds memory when video stalls.
MAX_AUDIO_S = 30.0
#: A jump in audio timestamps larger than this (s) re-syncs the window (gap: silence).
RESYNC_S = 0.25
#: A settings change waits for the clip in progress only when it needs at most this much
#: more source time (s); a slower clip is dropped (NOTE [switching without reopening]).
MAX_SWITCH_WAIT_S = 1.0


@dataclass(frozen=True)
class ClipSettings:
    """What the next clip looks like; `tag` is passed through to the clips made with it."""

    spec: FilterSpec
    frames: int
    window: tuple[float, float] | None = None   # pts window (s): frames before it are skipped
    tag: Any = None
    chain: str | None = None   # an operator's FFmpeg chain, run on every decoded frame first


@dataclass(frozen=True)
class StreamInfo:
    """What opening a source told about it: what a control change is checked against (a crop
    against the frame size, a segment against the duration, a clip's span against the rate).
    """

    has_audio: bool
    width: int
    height: int
    rate: float | None            # video frames/s (None: the container does not say)
    duration_s: float | None      # None: a live stream, or a file that does not say

    @classmethod
    def of(cls, container, vs) -> "StreamInfo":
        cc = vs.codec_context
        return cls(bool(container.streams.audio), int(cc.width), int(cc.height),
                   video.stream_rate(vs), video.duration_s(container, vs))


class ClipFrames:
    """A clip's video as the T frames the converter made on the clip thread (planar, C-owned
    memory), not yet in an array: the step writes them where the sample goes
    (`write_into`: a loaned ring slot's (T, C, H, W) view, producer/slot_fill.py), so a live
    clip's frames reach the ring with no clip-sized array between (docs/architecture.md "In
    place"). Reads like the uint8 array it stands for: `shape`, `dtype`, `np.asarray`.
    RGB and gray only; yuv420 clips are packed into an array on the thread as before."""

    __slots__ = ("frames", "shape")
    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, frames: list, shape: tuple[int, int, int, int]):
        # frames: per frame, its (H, W) channel views (FrameConverter.channels), made on the
        # clip thread so the step does nothing but the writes
        self.frames, self.shape = frames, shape

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape)

    def write_into(self, out: np.ndarray) -> np.ndarray:
        """Each frame's planes into `out` (T, C, H, W) uint8: one copy per plane, the write
        that `FrameConverter.into` makes. Returns `out`."""
        for k, channels in enumerate(self.frames):
            row = out[k]
            for c, rows in enumerate(channels):
                row[c] = rows
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self.write_into(np.empty(self.shape, np.uint8))
        return out if dtype is None else out.astype(dtype)

    def astype(self, dtype) -> np.ndarray:
        return np.asarray(self).astype(dtype)

    def __repr__(self) -> str:
        return f"ClipFrames({len(self.frames)} frames, shape {self.shape})"


@dataclass
class DemuxedClip:
    video: "np.ndarray | ClipFrames"  # uint8 (T, C, H, W)
    start_s: float                 # pts of the first frame
    end_s: float                   # pts of the last frame + one frame period
    audio: np.ndarray | None       # float32 mono samples of [start_s, end_s); None: no audio
    settings: ClipSettings


class AudioWindow:
    """The most recent audio as one float32 array with the pts of its first sample.

    Appends copy into a preallocated buffer; space is made by dropping what no clip needs
    any more (`drop_before`) and, when video stalls, the oldest samples beyond MAX_AUDIO_S.
    """

    def __init__(self, rate: int, keep_s: float = MAX_AUDIO_S):
        self.rate = rate
        self._buf = np.zeros(int(rate * keep_s), np.float32)
        self._off = 0              # index of the first live sample in _buf
        self._n = 0                # live samples
        self.t0: float | None = None   # pts of _buf[_off]

    @property
    def end_s(self) -> float:
        """pts just after the last sample held (-inf when empty and unsynced)."""
        return -math.inf if self.t0 is None else self.t0 + self._n / self.rate

    def sync(self, t: float | None) -> None:
        """Place the next appended samples at pts `t` (None: right after the last ones)."""
        if t is None:
            if self.t0 is None:
                self.t0 = 0.0
            return
        if self.t0 is None:
            self.t0 = t
            return
        gap = t - self.end_s
        if abs(gap) <= RESYNC_S:
            return
        if 0 < gap < MAX_AUDIO_S:   # samples missing from the stream: silence
            self.append(np.zeros(int(round(gap * self.rate)), np.float32))
        else:                       # timestamps jumped back or far ahead: start over
            self.t0, self._off, self._n = t, 0, 0

    def append(self, x: np.ndarray) -> None:
        cap = self._buf.size
        if x.size >= cap:
            self.t0 = self.end_s + (x.size - cap) / self.rate
            self._buf[:] = x[-cap:]
            self._off, self._n = 0, cap
            return
        if self._off + self._n + x.size > cap:
            over = self._n + x.size - cap
            if over > 0:   # video stalled: the oldest audio goes
                self._drop(over)
            self._buf[: self._n] = self._buf[self._off: self._off + self._n]
            self._off = 0
        end = self._off + self._n
        self._buf[end: end + x.size] = x
        self._n += x.size

    def _drop(self, k: int) -> None:
        k = min(k, self._n)
        self._off += k
        self._n -= k
        self.t0 += k / self.rate

    def drop_before(self, t: float) -> None:
        if self.t0 is not None:
            k = int((t - self.t0) * self.rate)
            if k > 0:
                self._drop(k)

    def take(self, start: float, end: float) -> np.ndarray:
        """A new array of the samples of [start, end); zeros where the window holds none."""
        out = np.zeros(max(0, int(round((end - start) * self.rate))), np.float32)
        if self.t0 is None or not out.size:
            return out
        i0 = int(round((start - self.t0) * self.rate))   # window index of out[0]
        lo, hi = max(i0, 0), min(i0 + out.size, self._n)
        if hi > lo:
            out[lo - i0: hi - i0] = self._buf[self._off + lo: self._off + hi]
        return out


def demux_clips(source: str | Path, settings: Callable[[], ClipSettings], *,
                audio_rate: int | None = None, start_s: float = 0.0,
                timeout: float | tuple[float, float] = (10.0, 5.0),
                on_open: Callable[[StreamInfo], None] | None = None) -> Iterator[DemuxedClip]:
    """Clips from one open of `source` (NOTE [switching without reopening]).

    `audio_rate`: decode the first audio stream too, resampled to mono at this rate (None:
    video only). `on_open(StreamInfo)` is called once the streams are known. A broken stream
    raises InputError naming the source; the end of the source ends the iterator after the
    last whole clip (a partial clip at the end is not a sample).
    """
    with video.open_container(source, timeout=timeout) as container:
        vs = video.first_video_stream(container, source)
        aus = container.streams.audio[0] if audio_rate and container.streams.audio else None
        if on_open is not None:
            on_open(StreamInfo.of(container, vs))
        if start_s > 0:
            container.seek(int(start_s / vs.time_base), stream=vs, backward=True)
        src_rate = video.stream_rate(vs)
        slack = 0.5 / (src_rate or 1000.0)
        frame_s = 1.0 / src_rate if src_rate else None
        window = AudioWindow(audio_rate) if aus is not None else None
        resampler = av.AudioResampler(format="flt", layout="mono", rate=audio_rate) \
            if aus is not None else None
        pending: collections.deque[DemuxedClip] = collections.deque()

        cur = settings()
        conv = video.FrameConverter(cur.spec)
        runner = ChainRunner(cur.chain) if cur.chain else None
        buf: np.ndarray | None = None     # a yuv420 clip's packed rows
        planes: list | None = None        # an RGB/gray clip's converted frames (ClipFrames)
        pshape: tuple | None = None
        k, t0, last_t = 0, 0.0, None
        grid = StreamGrid(slack)  # modalities/frame_times.py: the rule of every decode path
        n_frames = 0
        streams = (vs, aus) if aus is not None else (vs,)

        def ready(eof: bool) -> Iterator[DemuxedClip]:
            while pending:
                c = pending[0]
                if not (eof or window is None or window.end_s >= c.end_s - 1e-6
                        or (last_t is not None and last_t >= c.end_s + MAX_AV_SKEW_S)):
                    return
                pending.popleft()
                if window is not None:
                    c.audio = window.take(c.start_s, c.end_s)
                yield c
            if window is not None and last_t is not None:
                window.drop_before(t0 if k else last_t)   # what no clip will need

        try:
            with demuxed(container, *streams) as packets:
                for packet in packets:
                    if packet.stream is aus:
                        try:
                            frames = packet.decode()
                        except av.FFmpegError:
                            continue   # one bad audio packet costs its samples, not the stream
                        for f in frames:
                            window.sync(f.time)
                            for rf in resampler.resample(f):
                                window.append(rf.to_ndarray().reshape(-1))
                        yield from ready(False)
                        continue
                    if k == 0 and runner is not None and runner.chain.text != settings().chain:
                        runner = None   # a chain change, at a clip boundary (below)
                    if k == 0 and runner is None and settings().chain:
                        runner = ChainRunner(settings().chain)
                    decoded = packet.decode()
                    for frame in (runner.push(decoded) if runner is not None else decoded):
                        t = frame.time
                        lo = max(start_s, cur.window[0] if cur.window else 0.0)
                        if t is None or t < lo - slack:
                            continue
                        if k and cur.spec.fps and \
                                (cur.frames - k) / cur.spec.fps > MAX_SWITCH_WAIT_S and \
                                settings() != cur:
                            buf, planes, k = None, None, 0   # a slow clip would hold it back
                            grid.restart()
                        if not grid.due(t):
                            continue
                        if k == 0:   # a clip boundary: the only place settings change
                            new = settings()
                            if (new.chain or None) != (runner.chain.text if runner else None):
                                # Read after this packet's frames went through the chain
                                # in force then: they are not the new chain's frames. The
                                # next packet switches the chain, then this switches the rest.
                                new = cur
                            if new != cur:
                                if new.spec != cur.spec:
                                    conv = video.FrameConverter(new.spec)
                                cur = new
                                grid.restart()
                        period = 1.0 / cur.spec.fps if cur.spec.fps else 0.0
                        grid.take(t, period)
                        conv.prepare(frame)
                        shape = (cur.frames, cur.spec.channels, conv.out_h, conv.out_w)
                        if conv.yuv:   # packed NV12 rows: into an array here, as made
                            if buf is None or buf.shape[1:] != shape[1:]:   # new clip or size
                                buf, k = np.empty(shape, np.uint8), 0
                        elif planes is None or pshape != shape:
                            planes, pshape, k = [], shape, 0
                        if k == 0:
                            t0 = t
                        if conv.yuv:
                            conv.into(frame, buf[k])
                        else:  # converted here, written where the sample goes (ClipFrames)
                            planes.append(conv.channels(conv.convert(frame)))
                        k += 1
                        n_frames += 1
                        step = period or frame_s or max(t - (last_t if last_t is not None else t),
                                                        1e-3)
                        last_t = t
                        if k == cur.frames:
                            made = buf if conv.yuv else ClipFrames(planes, shape)
                            pending.append(DemuxedClip(made, t0, t + step, None, cur))
                            buf, planes, k = None, None, 0
                    yield from ready(False)
            if resampler is not None:
                for rf in resampler.resample(None):
                    window.append(rf.to_ndarray().reshape(-1))
            yield from ready(True)
        except av.FFmpegError as e:
            raise InputError(source, "media data", "a decodable video/audio stream",
                             found=f"{type(e).__name__} after {n_frames} frames: {e}") from None
