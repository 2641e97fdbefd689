"""The media feed's decoding thread: clips of a media file or live stream, made on a thread
and handed over a small queue.

NOTE [one thread]: the producer daemon answers control and steps the engine on one thread, so
nothing there may block longer than a sample; a live network source is the exception it cannot
bound (a read blocks up to the read timeout), so its clips are decoded here.

NOTE [media generations]: a media file or stream is opened once and demuxed for video and
audio together (media_clips.py); a control change is handed to the reader (`switch`) and takes
effect at its next clip boundary, without reopening (a listen-once stream would not survive a
reopen). Each clip carries the generation it was made under and is published under it, so the
clips already decoded when the change came are still published, under the old number, and the
ring's generations never go backwards. Only a segment change on a file reopens it (to seek).
"""
from __future__ import annotations

import queue
import threading
from pathlib import Path

from protocol.stages import now_ns

from .generations import Generation
from .media_clips import ClipSettings
from .sources import Clip, MediaSource, SourceError


class ClipReader:
    """Decodes clips on a thread: a network read that blocks for seconds (up to the read
    timeout) must not keep the daemon's one loop from answering control. One reader lives as long as its
    open of the source; `switch(gen)` changes the clips it makes from the next clip boundary
    on, without reopening (a listen-once stream cannot be opened again)."""

    def __init__(self, source: MediaSource, gen: Generation, start_s: float, audio_rate: int,
                 stage=None):
        self.segment = gen.config.segment
        self._stage = stage  # protocol.stages.Stage: time to demux and decode one clip
        self.switch(gen)
        self.done = False
        self.clips = 0           # clips the source gave
        self.discard = False     # paused live stream: read on, drop every clip
        self.dropped = 0         # clips dropped so (written by the thread only)
        self._q: queue.Queue = queue.Queue(maxsize=2)
        self._stop = threading.Event()
        self._error: SourceError | None = None
        self._thread = threading.Thread(target=self._run, args=(source, start_s, audio_rate),
                                        name=f"clips-{Path(source.url).name}", daemon=True)
        self._thread.start()

    def switch(self, gen: Generation) -> None:
        # One attribute store: the decoding thread reads it whole at its next clip boundary.
        c = gen.config
        self._settings = ClipSettings(c.filter, c.clip_frames, c.segment, gen)
        self.generation = gen.number

    def _run(self, source: MediaSource, start: float, audio_rate: int) -> None:
        try:
            t0 = now_ns()
            for clip in source.clips(self._settings.spec, self._settings.frames, start,
                                     audio_rate=audio_rate, settings=lambda: self._settings):
                if self._stage is not None:
                    self._stage.since(t0)
                self.clips += 1
                if self.discard:
                    self.dropped += 1
                    if self._stop.is_set():
                        return
                    t0 = now_ns()
                    continue
                while not self._stop.is_set():
                    try:
                        self._q.put(clip, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
                t0 = now_ns()  # the wait for a free queue place is not decoding
        except SourceError as e:
            self._error = e
        except Exception as e:  # never let a decoder bug kill the thread silently
            self._error = SourceError(f"{source.url}: {type(e).__name__}: {e}")
        finally:
            self.done = True

    def get(self, timeout: float) -> Clip | None:
        try:
            return self._q.get(timeout=timeout)
        except queue.Empty:
            if self.done and self._q.empty():
                if self._error is not None:
                    raise self._error
            return None

    @property
    def error(self) -> SourceError | None:
        """The failure that ended the thread (`get` raises it once the queue is empty)."""
        return self._error

    def drain(self) -> int:
        """Drop the clips waiting in the queue; how many there were."""
        n = 0
        while True:
            try:
                self._q.get_nowait()
            except queue.Empty:
                return n
            n += 1

    def stop(self) -> None:
        self._stop.set()
