"""Which decoded frames a clip takes, by presentation time: the one rule of every decode path
(a recorded clip on the CPU and on NVDEC, `video.iter_frames`, a live stream's clips in
producer/media_clips.py).

Targets lie on a grid of one period, 1/fps seconds (fps from the filter, else the source's
rate); each target takes the first frame at or after it, less `slack` - half a source frame,
so a clip at the source rate takes every frame exactly once however its pts round.

* A recording (`SegmentGrid`): the grid starts at the segment's start, target k at
  start + k/fps; a frame that covers several targets (fps above the source's) fills each of
  them, so the clip keeps its time span; no target at or past the segment's end is filled.
* A stream (`StreamGrid`): the grid starts at the first frame taken; a frame fills at most one
  target, and after a gap longer than one period the grid starts again at the next frame, so a
  stall is skipped, not filled with one frame repeated.
"""
from __future__ import annotations


class SegmentGrid:
    """Targets start + k/fps for k = 0.. inside [start, end); `k` is the next one to fill."""

    __slots__ = ("start", "end", "fps", "slack", "k")

    def __init__(self, start: float, end: float, fps: float, slack: float):
        self.start, self.end, self.fps, self.slack = start, end, fps, slack
        self.k = 0

    def due(self, t: float, frames: int) -> bool:
        """Does the frame at `t` fill target k (of `frames`)? Ask again after k += 1: one
        frame may fill several."""
        k = self.k
        return k < frames and t >= self.start + k / self.fps - self.slack \
            and self.start + k / self.fps < self.end


class StreamGrid:
    """A grid anchored on the first frame taken, restarted after a gap or a new setting."""

    __slots__ = ("slack", "next_t")

    def __init__(self, slack: float):
        self.slack = slack
        self.next_t: float | None = None

    def due(self, t: float) -> bool:
        """Is the frame at `t` at or past the next target (always, right after a restart)?"""
        return self.next_t is None or t >= self.next_t - self.slack

    def take(self, t: float, period: float) -> None:
        """The frame at `t` is taken: the next target is one `period` on (0: every frame), or
        one period after `t` when `t` came after a gap longer than a period."""
        nxt = (t if self.next_t is None else self.next_t) + period
        if nxt <= t - self.slack:  # a gap longer than one period: a new grid here
            nxt = t + period
        self.next_t = nxt

    def restart(self) -> None:
        self.next_t = None
