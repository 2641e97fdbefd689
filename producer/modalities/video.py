"""Video: a file or live source -> uint8 frames shaped by a FilterSpec.

Frames are decoded by PyAV with FFmpeg's own threads and converted by swscale (or, when the
spec crops, a libavfilter `crop,scale,format` graph) straight to the target size and to a
*planar* pixel format (gbrp / gray). Each plane is then one contiguous copy into its place in
one preallocated (T, C, H, W) array: no full-size numpy frame, no per-frame list to stack, no
HWC -> CHW transpose (a strided copy that costs more than the colour conversion itself).

Frame selection is by presentation time: target times `start + k / fps` (fps from the spec,
else the stream's rate), and each target takes the first frame at or after it (half a source
frame of slack, so a clip at the source rate takes every frame exactly once): frame_times.py,
the rule every decode path shares.

`device="cuda"` decodes with NVDEC and converts/resizes in torch on the GPU
(`gpu_video.py`); without a GPU it logs once and runs the CPU path.
"""
from __future__ import annotations

import logging
import math
import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np

from protocol.errors import InputError
from protocol.filters import FilterSpec
from protocol.schema import PackedArray, nv12_frame_bytes

from ..ffmpeg_graph import scale_args
from . import _fork  # noqa: F401  (collects dead decoders before a fork; see _fork.py)
from ._decode_loops import decoded_frames
from ._out import fits
from .ffmpeg_chain_run import chained
from .frame_times import SegmentGrid, StreamGrid

log = logging.getLogger(__name__)

#: swscale's scaler for every resize on the CPU path; bilinear widens its kernel when it
#: shrinks, so a 1080p -> 224 resize is filtered, not decimated.
#: NOTE [swscale gbrp bug]: FFmpeg 8.1's unscaled yuv420p -> gbrp path (the one PyAV 18's
#: wheel ships) writes wrong pixels at the end of each row when the width is not a multiple
#: of 16 (e.g. 24, 36, 120: up to 50 levels off; test_planar_conversion_is_right_at_every_width).
#: ACCURATE_RND takes the correct path; it is also what makes swscale round like the torch path.
INTERPOLATION = av.video.reformatter.Interpolation.BILINEAR | av.video.reformatter.Interpolation.ACCURATE_RND
_warned_no_cuda = False


# --- opening and validating ---------------------------------------------------------------


def _open(path, *, timeout=None, hwaccel=None):
    """av.open with every failure turned into an InputError naming the source."""
    kwargs = {}
    if timeout is not None:
        kwargs["timeout"] = timeout
    if hwaccel is not None:
        kwargs["hwaccel"] = hwaccel
    try:
        return av.open(str(path), **kwargs)
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise InputError(path, "container", "a media file or stream PyAV can open",
                         found=f"{type(e).__name__}: {e}") from None


def _video_stream(container, path):
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["no streams"]
        raise InputError(path, "video stream", "at least one video stream",
                         found=", ".join(kinds))
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # frame + slice threads
    # 0 lets FFmpeg pick one thread per core. Worker pools that already run one process per
    # core set it to 1 (set_decode_threads): N workers x N decoder threads oversubscribe.
    stream.codec_context.thread_count = _DECODE_THREADS
    return stream


_DECODE_THREADS = 0


def set_decode_threads(n: int) -> None:
    """Decoder threads per open stream in this process (0: one per core, FFmpeg's default)."""
    global _DECODE_THREADS
    _DECODE_THREADS = max(0, int(n))


def _stream_rate(stream) -> float | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            return float(rate)
    return None


def _duration_s(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def _check_segment(path, segment, duration) -> tuple[float, float]:
    if segment is None:
        return 0.0, math.inf
    try:
        start, end = float(segment[0]), float(segment[1])
    except (TypeError, ValueError, IndexError):
        raise InputError(path, "segment", "(start_s, end_s) numbers", found=repr(segment)) from None
    if not (0.0 <= start < end) or math.isnan(end):
        raise InputError(path, "segment", "0 <= start < end", found=f"({start}, {end})")
    if duration is not None and start >= duration:
        raise InputError(path, "segment", f"a start inside the file's {duration:.3f} s",
                         found=f"start {start:.3f} s")
    return start, end


# --- conversion into a preallocated plane set ----------------------------------------------


_local = threading.local()


def _thread_reformatter():
    """One VideoReformatter per thread, shared by every clip that thread converts.

    WHY: PyAV keeps the SwsContext inside the reformatter and rebuilds it only when the sizes
    or formats change; a new reformatter per clip built a new context per clip - ~1.3 ms, as
    much as converting all 8 frames of a 112x112 clip (measured, 320x240 source). Per
    thread, because a SwsContext must not be used by two threads at once. Per process too: the
    context runs its slices on its own thread pool, which a forked child does not have, so a
    child converting with its parent's context waits forever (a DataLoader worker forked after
    the parent decoded a clip did; test_video.py).
    """
    pid = os.getpid()
    if getattr(_local, "reformatter_pid", None) != pid:
        inherited = getattr(_local, "reformatter", None)
        if inherited is not None:
            # Never free the parent's context here: freeing joins slice threads this process
            # does not have, and waits forever. One small leak per fork, once.
            _inherited_from_parent.append(inherited)
        _local.reformatter = av.video.reformatter.VideoReformatter()
        _local.reformatter_pid = pid
    return _local.reformatter


_inherited_from_parent: list = []


class _Converter:
    """Writes one decoded frame into a (C, H, W) uint8 view, at the target size and format.

    Built lazily from the first frame (its size and pixel format are only known then) and
    reused: the swscale context / filter graph is made once per clip, not once per frame.
    """

    def __init__(self, spec: FilterSpec):
        self.spec = spec
        self.yuv = spec.pixel_format == "yuv420"
        self.fmt = "nv12" if self.yuv else "gray" if spec.gray else "gbrp"
        self._reformatter = None
        self._graph = None
        self._key = None
        self.out_w = self.out_h = 0

    def setup(self, frame) -> None:
        src_w, src_h = frame.width, frame.height
        self.out_w, self.out_h = self.spec.output_size(src_w, src_h)
        self._key = (src_w, src_h, frame.format.name)
        if self.spec.crop is None:
            self._reformatter = _thread_reformatter()
            self._graph = None
            return
        x, y, w, h = self.spec.crop_box(src_w, src_h)
        g = av.filter.Graph()
        src = g.add_buffer(width=src_w, height=src_h, format=frame.format,
                           time_base=frame.time_base or "1/1000")
        crop = g.add("crop", f"{w}:{h}:{x}:{y}:exact=1")
        scale = g.add("scale", scale_args(self.out_w, self.out_h))
        fmt = g.add("format", self.fmt)
        sink = g.add("buffersink")
        src.link_to(crop)
        crop.link_to(scale)
        scale.link_to(fmt)
        fmt.link_to(sink)
        g.configure()
        self._graph = g

    def prepare(self, frame) -> None:
        """(Re)build for this frame's size and format: the first frame, or a live source
        that changed resolution mid-stream."""
        if self._key != (frame.width, frame.height, frame.format.name):
            self.setup(frame)

    def convert(self, frame):
        """The frame at the target size in a planar format (a PyAV frame, C-owned memory)."""
        self.prepare(frame)
        if self._graph is None:
            if self.yuv:  # only scale: the samples keep their range (full stays full)
                rng = "JPEG" if _full_range(frame) else "MPEG"
                return self._reformatter.reformat(frame, self.out_w, self.out_h, self.fmt,
                                                  interpolation=INTERPOLATION,
                                                  src_color_range=rng, dst_color_range=rng)
            return self._reformatter.reformat(frame, self.out_w, self.out_h, self.fmt,
                                              interpolation=INTERPOLATION)
        self._graph.push(frame)
        return self._graph.pull()

    def into(self, frame, out: np.ndarray) -> None:
        """Convert `frame` and copy its planes into `out` (C, H, W): one memcpy per plane;
        for yuv420, `out` is one flat NV12 frame (luma rows, then interleaved chroma rows)."""
        self.write(self.convert(frame), out)

    def write(self, planar, out: np.ndarray) -> None:
        """Copy a frame `convert` made into `out` (see `into`); needs only the converter's
        format, so a frame converted on one thread may be written on another."""
        if self.yuv:
            h, w = self.out_h, self.out_w
            y, uv = planar.planes[0], planar.planes[1]
            out[: h * w].reshape(h, w)[:] = np.frombuffer(y, np.uint8).reshape(
                y.height, y.line_size)[:h, :w]
            ch, cw2 = (h + 1) // 2, 2 * ((w + 1) // 2)
            out[h * w:].reshape(ch, cw2)[:] = np.frombuffer(uv, np.uint8).reshape(
                uv.height, uv.line_size)[:ch, :cw2]
            return
        for c, rows in enumerate(self.channels(planar)):
            out[c] = rows

    def channels(self, planar) -> list[np.ndarray]:
        """The (H, W) uint8 views of an RGB/gray frame `convert` made, in output channel
        order (R, G, B or gray); they keep the frame's memory alive."""
        # gbrp stores planes as G, B, R; the output is R, G, B.
        out = []
        for p in ((0,) if self.fmt == "gray" else (2, 0, 1)):
            plane = planar.planes[p]
            rows = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)
            out.append(rows[:, : plane.width])
        return out


#: Codecs whose 4:2:0 chroma sits centred between luma samples (MPEG-1, JPEG); every other
#: decoder (H.264, HEVC, MPEG-2/4, VP9, AV1 as FFmpeg reports them by default) co-sites it
#: with the even luma columns ("left"). PyAV does not expose a frame's chroma_location.
_CENTRED_CHROMA = frozenset({"mjpeg", "mpeg1video", "jpeg2000", "jpegls"})


def yuv420_layout(frame, codec_name: str) -> str:
    """The schema layout of NV12 planes converted from `frame` by `_Converter` (no colour or
    range conversion, swscale only scales): matrix from the frame's colour metadata (BT.709
    when it says so, BT.601 otherwise - swscale's own default, so the rgb path agrees), range
    from the frame (a yuvj* format or a JPEG colour range: full; the samples keep their range,
    `_Converter.convert`), and the decoder's chroma siting."""
    cs = frame.colorspace
    matrix = "bt709" if int(cs if cs is not None else 2) == 1 else "bt601"
    layout = f"nv12/{matrix}/{'full' if _full_range(frame) else 'limited'}"
    return layout if codec_name in _CENTRED_CHROMA else layout + "/left"


def _full_range(frame) -> bool:
    return frame.format.name.startswith("yuvj") or int(frame.color_range or 0) == 2


def _check_even(path, spec: FilterSpec, w: int, h: int) -> None:
    if w % 2 or h % 2:
        raise InputError(path, "filter pixel_format", "even output sides for yuv420 (4:2:0 "
                         "chroma covers 2x2 pixels); add resize=WxH with even sides",
                         found=f"{w}x{h} frames")


# --- overlapping conversion with decoding ----------------------------------------------------

#: Source frames of at least this many pixels are converted on a helper thread while the
#: caller's thread decodes the next one. Below it the hand-off (~20 us) costs more than the
#: conversion it would overlap. Measured on dev-2c: 1080p 141 -> 170 frames/s (ACCURATE_RND
#: conversion 2.4 ms/frame beside a 3.7 ms/frame decode); see BENCHMARKS.md ## decode.
OVERLAP_MIN_PIXELS = 640 * 360


class _ConvertWorker:
    """One helper thread per decoding thread that runs a clip's frame writes in order.

    WHY: the decoding thread's own serial work (swscale conversion and the plane copies) was
    the bottleneck at HD sizes, not FFmpeg's decoder threads (NOTE in BENCHMARKS.md ## decode):
    while it converted frame k the decoder sat idle waiting for the next packet. swscale and
    numpy's copy release the GIL, so handing each frame to this thread lets decode of frame k+1
    run beside conversion of frame k. The queue is bounded so a fast decoder cannot pile up
    decoded frames (3 MB each at 1080p) in memory. The converter's swscale context belongs to
    the decoding thread (_thread_reformatter); only one of the two threads uses it at a time,
    because the decoding thread drains this worker before it converts anything itself.
    """

    DEPTH = 3

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._jobs: queue.Queue = queue.Queue(maxsize=self.DEPTH)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="mmfeed-video-convert", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            fn, args = job
            if self._error is None or fn is _signal:
                try:
                    fn(*args)
                except BaseException as e:  # re-raised in the decoding thread by drain()
                    self._error = e

    def submit(self, fn, *args) -> None:
        """Run fn(*args) on the helper thread after every job submitted before it."""
        self._jobs.put((fn, args))

    def drain(self, reraise: bool = True) -> None:
        """Wait until every submitted job has run; raise the first error one of them raised
        (after an error the jobs behind it are skipped: their clip is lost anyway)."""
        done = threading.Event()
        self._jobs.put((_signal, (done,)))
        done.wait()
        error, self._error = self._error, None
        if error is not None and reraise:
            raise error


def _signal(event: threading.Event) -> None:
    event.set()


def _thread_convert_worker() -> _ConvertWorker:
    w = getattr(_local, "convert_worker", None)
    # A forked child inherits the object but not its thread (a DataLoader worker forked after
    # the parent decoded a clip): submitting to it would wait forever. Start its own.
    if w is None or w.pid != os.getpid():
        w = _local.convert_worker = _ConvertWorker()
    return w


def _copy_slot(out: np.ndarray, dst: int, src: int) -> None:
    out[dst] = out[src]


# --- public API ---------------------------------------------------------------------------


def decode_clip(path: str | Path, spec: FilterSpec, frames: int,
                segment: tuple[float, float] | None = None, notes: list[str] | None = None,
                *, device: str = "cpu", times: list[float] | None = None,
                chain: str | None = None, out: np.ndarray | None = None):
    """A clip of `frames` frames of `path`, sampled at spec.fps (or the source rate) from
    `segment` = (start_s, end_s) (default: from the beginning), shaped by `spec`.

    Returns uint8 (T, C, H, W): a numpy array on the CPU path, a torch CUDA tensor when
    device="cuda" and a GPU is present. A segment with fewer than T frames repeats its last
    frame (and says so in `notes`); one with none, or an unreadable file, raises InputError.

    `times`: a list that receives the presentation time (seconds) of each of the T frames
    chosen, in clip order (a repeated frame repeats its time), so a caller aligning other
    sensors to the clip needs no second decode. Both paths fill it (frame selection is the
    same `select_frames`).

    `chain`: an operator's checked FFmpeg chain (`mmctl filter --ffmpeg`), run on every decoded
    frame before selection and the spec (ffmpeg_chain_run.py); it runs on the CPU, so a clip
    with a chain is decoded on the CPU even when device="cuda".

    `out`: a (T, C, H, W) uint8 array (a ring slot's view, producer/slot_fill.py) that the
    frames are converted straight into when it has the clip's shape; then `out` is returned.
    yuv420 planes (a PackedArray) and NVDEC frames are never written there.
    """
    dest = out
    if not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames must be a positive int, got {frames!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and spec.pixel_format == "yuv420":
        device = "cpu"  # the planes go to the trainer's device as they are: nothing to convert
    if device == "cuda" and not chain:
        if _cuda_available():
            from . import gpu_video

            return gpu_video.decode_clip_cuda(path, spec, frames, segment, notes, times=times)
        _warn_cpu_fallback()
    out = None
    conv = _Converter(spec)
    worker: _ConvertWorker | None = None
    run = _call  # where frame writes run: here, or on the helper thread beside decoding
    try:
        with _open(path) as container:
            for frame, k, first in select_frames(path, container, spec, frames, segment, notes,
                                                 times=times, chain=chain):
                if out is None:
                    conv.prepare(frame)
                    if conv.yuv:
                        _check_even(path, spec, conv.out_w, conv.out_h)
                        out = PackedArray.wrap(
                            np.empty((frames, nv12_frame_bytes(conv.out_h, conv.out_w)),
                                     np.uint8),
                            yuv420_layout(frame, container.streams.video[0].codec_context.name),
                            (frames, 3, conv.out_h, conv.out_w))
                    else:
                        shape = (frames, spec.channels, conv.out_h, conv.out_w)
                        out = dest if fits(dest, shape, np.uint8) else np.empty(shape, np.uint8)
                    if frame.width * frame.height >= OVERLAP_MIN_PIXELS:
                        worker = _thread_convert_worker()
                        run = worker.submit
                if frame is None:  # the segment ran short: repeat the last frame
                    run(_copy_slot, out, k, k - 1)
                elif k == first:
                    run(conv.into, frame, out[k])
                else:  # fps above the source rate: one frame covers several targets
                    run(_copy_slot, out, k, first)
    except BaseException:
        if worker is not None:  # never raise while the helper still writes `out`; the
            worker.drain(reraise=False)  # decoding error is the one worth reporting
        raise
    if worker is not None:
        worker.drain()
    return out


def _call(fn, *args) -> None:
    fn(*args)


def select_frames(path, container, spec: FilterSpec, frames: int, segment, notes, *,
                  times: list[float] | None = None, chain: str | None = None):
    """Yield (frame, k, first_k) for each of the `frames` target times, shared by the CPU
    and CUDA paths: `frame` fills slot k, and first_k is the slot it filled first (k > first_k
    when fps is above the source rate). Short segments end with (None, k, k) for each slot
    left; no frame at all, a broken bitstream or a cut-short file raise InputError.
    `times`, when a list, gets slot k's frame time (seconds) appended as slot k is yielded.
    `chain`: an operator's FFmpeg chain run on every decoded frame first (decode_clip).
    """
    stream = _video_stream(container, path)
    duration = _duration_s(container, stream)
    start, end = _check_segment(path, segment, duration)
    src_rate = _stream_rate(stream) or 25.0
    fps = spec.fps or src_rate
    if start > 0:
        container.seek(int(start / stream.time_base), stream=stream, backward=True)
    slack = 0.5 / src_rate
    grid = SegmentGrid(start, end, fps, slack)  # frame_times.py: the rule of every path
    last_t = None
    ran_out = False  # the demuxer ended before the segment did
    try:
        with decoded_frames(container, stream) as decoded:
            for frame in chained(decoded, chain):
                t = frame.time
                if t is None or t < start - slack:
                    continue
                if t >= end:
                    break
                last_t = t
                first = grid.k
                while grid.due(t, frames):
                    if times is not None:
                        times.append(t)
                    yield frame, grid.k, first
                    grid.k += 1
                if grid.k >= frames:
                    break
            else:
                ran_out = True
    except av.FFmpegError as e:
        raise InputError(path, "video data", "a decodable video bitstream",
                         found=f"{type(e).__name__} after {grid.k} frames: {e}") from None
    k = grid.k
    if k == 0:
        where = f" in segment {start:g}..{end:g} s" if segment is not None else ""
        raise InputError(path, "video stream", f"at least one decodable frame{where}", found="none")
    if ran_out:
        _check_not_truncated(path, stream, duration, last_t, end, src_rate)
    if k < frames:
        if notes is not None:
            notes.append(f"{Path(str(path)).name}: segment has {k} of {frames} frames at "
                         f"{fps:g} fps; repeated the last frame")
        for j in range(k, frames):
            if times is not None:
                times.append(last_t)
            yield None, j, j


def _check_not_truncated(path, stream, duration, last_t, end, src_rate) -> None:
    """A demuxer that stops early reads as a short clip; a file cut short must read as bad.

    When decoding ran out before the segment's end (or the file's declared end), the last frame
    must be within a few frame periods of where the container says the video stops.
    """
    if duration is None or last_t is None:
        return
    want = min(end, duration)
    if last_t < want - 3.0 / src_rate - 0.05:
        raise InputError(path, "video data", f"frames up to {want:.3f} s (the container's "
                         f"declared duration)", found=f"data ends at {last_t:.3f} s (truncated?)")


def iter_frames(source: str | Path, spec: FilterSpec, *, timeout: float | tuple[float, float] = (10.0, 5.0),
                start: float = 0.0, device: str = "cpu", notes: list[str] | None = None,
                chain: str | None = None) -> Iterator[tuple[float, np.ndarray]]:
    """Frames of a live or recorded source as (pts_seconds, uint8 (C, H, W)), sampled at
    spec.fps by presentation time (every frame when spec.fps is None).

    `source` is a path or any URL PyAV opens; `timeout` is av.open's (open, read) timeouts,
    so a dead stream raises instead of hanging the producer. Each yielded array is new (the
    consumer keeps it). Ends when the source ends; a broken stream raises InputError.
    """
    if device == "cuda" and not _cuda_available():
        _warn_cpu_fallback()
    with _open(source, timeout=timeout) as container:
        stream = _video_stream(container, source)
        if start > 0:
            container.seek(int(start / stream.time_base), stream=stream, backward=True)
        conv = _Converter(spec)
        period = 1.0 / spec.fps if spec.fps else 0.0
        slack = 0.5 / (_stream_rate(stream) or 1000.0)
        grid = StreamGrid(slack)  # frame_times.py: the rule of every path
        n = 0
        try:
            with decoded_frames(container, stream) as decoded:
                for frame in chained(decoded, chain):
                    t = frame.time
                    if t is None or t < start - slack or not grid.due(t):
                        continue
                    grid.take(t, period)
                    conv.prepare(frame)
                    out = np.empty((spec.channels, conv.out_h, conv.out_w), np.uint8)
                    conv.into(frame, out)
                    n += 1
                    yield t, out
        except av.FFmpegError as e:
            raise InputError(source, "video data", "a decodable video stream",
                             found=f"{type(e).__name__} after {n} frames: {e}") from None


# The same opening and conversion for producer/media_clips.py, which decodes video and audio from
# one open of a stream that cannot be opened twice (a listen-once tcp/udp/rtsp source).
open_container = _open
first_video_stream = _video_stream
stream_rate = _stream_rate
duration_s = _duration_s
FrameConverter = _Converter


# --- CUDA seam ----------------------------------------------------------------------------


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _warn_cpu_fallback() -> None:
    global _warned_no_cuda
    if not _warned_no_cuda:
        _warned_no_cuda = True
        log.warning("video: device='cuda' asked for but no CUDA GPU is available; "
                    "decoding on the CPU (said once)")
