"""An operator's FFmpeg chain (`mmctl filter --ffmpeg CHAIN`) run in process on decoded frames.

The chain was checked by protocol/ffmpeg_chain.py; here it is built filter by filter into a
libavfilter graph (buffer -> each filter of the chain -> buffersink) from the parsed filters,
so what runs is exactly what was checked. It runs on EVERY decoded frame, before frame
selection and before the filter spec (crop/resize/colour), so temporal filters (yadif, fps)
see the frames they expect; output frames keep their presentation times (FFmpeg sets them),
which is what selection reads. CUDA filters (`*_cuda`) cannot run here (PyAV's FFmpeg has
none of them and these frames are in host memory): they need the ffmpeg child on a GPU
(producer/ffmpeg_child.py), and `ChainNeedsCuda` says so.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from fractions import Fraction

import av

from protocol.errors import BadArgument
from protocol.ffmpeg_chain import FfmpegChain, parse_chain


class ChainNeedsCuda(BadArgument):
    """A chain with CUDA filters where frames are decoded on the CPU."""


def check_runs_on_cpu(chain: FfmpegChain, why: str | None = None) -> None:
    """ChainNeedsCuda when the chain has a CUDA filter; `why`: why video is on the CPU."""
    cuda = [f.name for f in chain.filters if f.cuda]
    if cuda:
        raise ChainNeedsCuda(
            f"ffmpeg chain: filter {cuda[0]!r} runs only on CUDA frames (the ffmpeg child on a "
            f"GPU with NVDEC); this producer decodes video on the CPU"
            f"{f' ({why})' if why else ''} - use the CPU form "
            f"({cuda[0].replace('_cuda', '').replace('_npp', '')!r}) or run on a GPU")


class ChainRunner:
    """One chain's graph, built from the first frame's size/format and rebuilt (after a
    flush) when a live source changes them."""

    def __init__(self, chain: str | FfmpegChain):
        self.chain = chain if isinstance(chain, FfmpegChain) else parse_chain(chain)
        check_runs_on_cpu(self.chain)
        self._graph = None
        self._key = None

    def _build(self, frame) -> None:
        g = av.filter.Graph()
        node = g.add_buffer(width=frame.width, height=frame.height, format=frame.format,
                            time_base=frame.time_base or "1/1000")
        for f in self.chain.filters:
            nxt = g.add(f.name, f.args or None)
            node.link_to(nxt)
            node = nxt
        sink = g.add("buffersink")
        node.link_to(sink)
        g.configure()
        self._graph = g
        self._key = (frame.width, frame.height, frame.format.name)

    def _drain(self) -> Iterator:
        while True:
            try:
                yield self._graph.pull()
            except (BlockingIOError, EOFError):
                return

    def feed(self, frames: Iterable) -> Iterator:
        """The chain's output frames for `frames`, then what it held back (a flush)."""
        yield from self.push(frames)
        yield from self.flush()

    def push(self, frames: Iterable) -> Iterator:
        """The chain's output frames for `frames` so far (no flush: a live stream goes on)."""
        for frame in frames:
            if self._key != (frame.width, frame.height, frame.format.name):
                if self._graph is not None:
                    yield from self.flush()
                self._build(frame)
            self._graph.push(frame)
            yield from self._drain()

    def flush(self) -> Iterator:
        if self._graph is None:
            return
        self._graph.push(None)
        yield from self._drain()
        self._graph, self._key = None, None


def chained(frames: Iterable, chain: str | None) -> Iterable:
    """`frames` through `chain` (unchanged when None)."""
    if not chain:
        return frames
    return ChainRunner(chain).feed(frames)


def prove_chain(chain: str | FfmpegChain, width: int = 64, height: int = 48,
                pix_fmt: str = "yuv420p") -> tuple[int, int] | None:
    """Build the chain and run one blank width x height frame through it (and a flush), so a
    chain FFmpeg itself rejects (`scale=abc`) is refused when it is proposed, not in a reader
    thread later. Returns the (width, height) it makes of such a frame (None when a rate
    filter such as fps= keeps no frame of one)."""
    runner = ChainRunner(chain)
    frame = av.VideoFrame(width, height, pix_fmt)
    for plane in frame.planes:
        plane.update(bytes(plane.buffer_size))
    frame.pts = 0
    frame.time_base = Fraction(1, 25)
    try:
        out = list(runner.feed([frame]))
    except (av.FFmpegError, ValueError) as e:
        raise BadArgument(f"ffmpeg chain {runner.chain.text!r}: FFmpeg refused it: "
                          f"{type(e).__name__}: {e}") from None
    return (out[0].width, out[0].height) if out else None
