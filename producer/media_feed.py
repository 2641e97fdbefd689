"""`MediaFeed`: a media file or stream as the engine steps it (feeds.py holds the protocol and
the dataset replay). Clips come decoded ahead from the clip thread (clip_reader.py); watched
sensor files are aligned to each clip; a change is checked against what the file or stream
holds and proven on a real clip before its generation exists (NOTE [proving a change] in
feeds.py).

NOTE [pausing a live source]: a paused recording keeps its position (the reader thread blocks
on its full queue, nothing is read). A paused stream cannot: the sender goes on, and what it
sent would wait in socket buffers and come out as seconds of stale clips on resume. So a
paused stream's reader keeps reading and decoding and drops every clip
(`dropped_while_paused`), and resume starts at the stream's present.
"""
from __future__ import annotations

from pathlib import Path

from protocol.errors import BadArgument, InputError
from protocol.schema import UNLABELLED, ModalitySpec, SampleSchema

from .clip_reader import ClipReader
from .feeds import FINISHED, Feed, FeedHooks, Ready, Wait, _on, log, scan_watch, source_facts
from .generations import Generation, SourceFacts
from .pipeline import Pipeline, aligned_watch_files
from .sources import MediaSource, SourceError, WatchFolder


class MediaFeed:
    """A media file or URL: clips decoded on a thread (clip_reader.py), each made into a
    sample with the watched sensor files aligned with it. A file ends (with --loop it starts
    over); a stream (`live`) never finishes: its end is a failure, retried with back-off."""

    kind = "media"
    own_labels = False

    def __init__(self, source: MediaSource, *, watch: WatchFolder | None, hooks: FeedHooks):
        self.source = source
        self.live = source.live
        self.watch = watch
        self.hooks = hooks
        self.facts_stale = False
        self.unaligned: dict[str, int] = {}   # watched stem -> clips that went without it
        self._audio_known = False
        self._reader: ClipReader | None = None
        self._frame_warned = False
        self._dropped = 0                     # clips dropped while paused by readers gone

    def step(self, gen: Generation, pipeline: Pipeline, timeout: float,
             into: dict | None = None) -> Ready | Wait | str:
        src = self.source
        reader = self._reader
        if reader is not None and reader.generation != gen.number:
            if src.path is not None and gen.config.segment != reader.segment:
                self._drop_reader()  # a file seeks to the new segment: the one change that reopens
                reader = None
            else:
                reader.switch(gen)  # from the next clip boundary on (NOTE in media_clips.py)
        if reader is None:
            start = gen.config.segment[0] if gen.config.segment else 0.0
            timer = pipeline.timer
            self._reader = reader = ClipReader(
                src, gen, start, gen.config.audio.sample_rate,
                timer.stage("demux_decode", "source") if timer is not None else None)
        try:
            clip = reader.get(timeout)
        except SourceError:
            self._drop_reader()
            raise
        if clip is None:
            if reader.done:
                self._drop_reader()
                if reader.clips == 0:  # else a looping file would reopen it in a busy loop
                    raise SourceError(_no_clip(src, gen))
                if not src.loop:  # looping: the next step reopens at the start
                    return FINISHED
            return Wait(0.0)
        if not self._audio_known and src.has_audio():
            self.facts_stale = True  # a stream's audio is known once it is open
        made_for: Generation = clip.tag  # the generation in force at the clip's boundary
        if src.live and not self._frame_warned:
            self._warn_stream_frame(made_for)
        seg = made_for.config.segment
        if seg is not None and clip.start_s >= seg[1]:
            self._drop_reader()
            return Wait(0.0) if src.loop else FINISHED
        pipe = pipeline if made_for.number == gen.number else self.hooks.pipeline(made_for.config)
        watched: dict[str, Path] = {}
        if self.watch is not None:
            scan_watch(self.watch)
            watched, misses = aligned_watch_files(clip, self.watch.times, self.watch.paths)
            for stem, offset_s, tol in misses:
                self._unaligned_clip(stem, clip, offset_s, tol)
        try:
            arrays = pipe.process_clip(clip, watched,
                                       self.watch.directory if self.watch else None, into)
        except InputError as e:
            self.hooks.skip(f"clip@{clip.start_s:.2f}s", e)
            return Wait(0.0)
        return Ready(arrays, made_for, UNLABELLED, clip.timestamp_ns,
                     f"{Path(src.url).name}@{clip.start_s:.2f}s", clip.index)

    def _unaligned_clip(self, stem: str, clip, offset_s: float, tol: float) -> None:
        """A clip goes without watched `stem` (no file near its time): counted per stem for
        `status`, said once per stem in the log (bounded by the stems the folder ever had,
        never per clip: a recorder that stopped would otherwise log every clip)."""
        first = stem not in self.unaligned
        self.unaligned[stem] = self.unaligned.get(stem, 0) + 1
        if first:
            log.warning(f"watched {stem} files are not aligned with the video: the clip at "
                        f"{clip.start_s:.2f}s has no {stem} file within {tol:g} s (nearest "
                        f"{offset_s:+.3f} s away); clips go without {stem} while no file is near "
                        f"them (counted in status unaligned.{stem}; said once)",
                        extra={"stem": stem, "offset_s": round(offset_s, 3), "tolerance_s": tol})

    def _warn_stream_frame(self, gen: Generation) -> None:
        """A stream's frame size is known once it is open: a --filter crop that does not fit
        (unknowable at start) is said once; `mmctl filter` changes are refused instead."""
        info = self.source.info
        if info is None:
            return
        self._frame_warned = True
        problem = gen.config.filter.frame_problem(info.width, info.height,
                                                  self.source.describe())
        if problem:
            log.warning(f"--filter {gen.config.filter}: {problem}; the crop is cut to the "
                        f"frame until `mmctl filter` sets one that fits")

    def _drop_reader(self) -> None:
        """Stop the clip reader, keeping the count of what it dropped while paused."""
        reader = self._reader
        if reader is None:
            return
        self._reader = None
        reader.stop()
        self._dropped += reader.dropped + (reader.drain() if reader.discard else 0)

    # --- what it is, and changes -----------------------------------------------------------

    def facts(self, watch: WatchFolder | None, classes: tuple[str, ...]) -> SourceFacts:
        stems = self.source.stems()
        self._audio_known = "audio" in stems
        self.facts_stale = False
        return source_facts(stems, watch, classes)

    def check(self, gen: Generation, what: str) -> None:
        """Refuse what this source cannot give (NOTE [proving a change]): a crop that does
        not fit the frame, a segment past a file's end, a clip longer than what the file
        holds from its start. A stream not yet opened is checked once it is."""
        src, cfg = self.source, gen.config
        info = src.probe()
        if info is None:
            return
        where = src.describe()
        if _on(cfg, "video"):
            problem = cfg.filter.frame_problem(info.width, info.height, where)
            if problem:
                raise BadArgument(f"{what}: refused, {problem}")
        if src.live or info.duration_s is None:
            return
        dur = info.duration_s
        start = cfg.segment[0] if cfg.segment else 0.0
        if start >= dur:
            raise BadArgument(f"{what}: refused, {where} lasts {dur:.2f} s: a segment must start "
                              f"before its end (e.g. `mmctl segment 0 {dur:.2f}`)")
        rate = cfg.filter.fps or info.rate
        if rate and _on(cfg, "video"):
            span = (cfg.clip_frames - 1) / rate
            if start + span >= dur:
                raise BadArgument(
                    f"{what}: refused, a clip of {cfg.clip_frames} frames at {rate:g} frames/s "
                    f"spans {span:.2f} s but {where} has {dur - start:.2f} s from {start:g} s "
                    f"(it lasts {dur:.2f} s): no sample could be made; ask for a higher fps, "
                    f"fewer --clip-frames or an earlier segment")

    check_start = check

    def check_segment(self, start: float, end: float) -> None:
        src = self.source
        if src.live:
            raise BadArgument(
                f"segment {start:g}..{end:g}: refused, the source is a live stream "
                f"({src.url}): it has no timeline to cut a segment from, only the present. "
                f"A segment selects a span of a recording (a media file or a dataset replay). "
                f"On a stream, `mmctl pause`/`resume` skip time, and `mmctl filter fps=R` with "
                f"--clip-frames set how much time a sample covers")

    def prove(self, gen: Generation, pipeline: Pipeline, readable: bool):
        """A file's samples under `gen` are sized from its frame size (probed), not made: a
        change that no ring layout holds is refused. Nothing to adopt."""
        src = self.source
        if src.path is not None and _on(gen.config, "video"):
            need = media_payload_estimate(src, gen, self.hooks.last_schema())
            if need is not None:
                self.hooks.fits(gen, need)
        return None

    def adopt(self, proof, gen: Generation) -> None:
        """Clips switch at their next boundary (ClipReader.switch): nothing to adopt."""

    def replay(self) -> None:
        """A finished file is opened again by the next step (its reader is gone)."""

    def restart_pacing(self) -> None:
        """A media source is paced by its own clock (a file decodes as fast as it can)."""

    # --- pause, failure ------------------------------------------------------------------

    def pause(self, now: float) -> None:
        reader = self._reader
        if self.live and reader is not None:  # NOTE [pausing a live source]
            reader.discard = True
            self._dropped += reader.drain()

    def resume(self, now: float) -> None:
        reader = self._reader
        if reader is not None and reader.discard:
            # clips that slipped into the queue around the pause are stale too
            self._dropped += reader.drain()
            reader.discard = False

    def while_paused(self) -> None:
        """A live reader keeps reading and dropping (NOTE [pausing a live source]); its
        failure is reported now, not at resume."""
        reader = self._reader
        if reader is not None and reader.error is not None and reader.done:
            self._drop_reader()
            raise reader.error

    def reset(self) -> None:
        self._drop_reader()

    def recover(self) -> Feed | None:
        """A file that is still there, or a stream, is opened again by the next step."""
        self.source.check_alive()
        return self

    # --- status ------------------------------------------------------------------------------

    def dropped_while_paused(self) -> int:
        return self._dropped + (self._reader.dropped if self._reader else 0)

    def idle_reason(self, gen: Generation, idle: float, now: float) -> str | None:
        src, cfg = self.source, gen.config
        info = src.info
        rate = cfg.filter.fps or (info.rate if info else None)
        span = cfg.clip_frames / rate if rate else None
        if span is not None and span >= idle / 2:
            return (f"each sample is a clip of {cfg.clip_frames} frames at {rate:g} "
                    f"frames/s: one every {span:.1f} s; the last was {idle:.0f} s ago")
        if src.live:
            return (f"no sample for {idle:.0f} s: nothing decodable arrives from "
                    f"{src.url} (it fails after the read timeout, "
                    f"{src.timeouts[1]:g} s, and is then retried)")
        return None

    def status(self) -> dict:
        info = self.source.probe()
        return {"frame_size": [info.width, info.height] if info else None,
                "source_duration_s": round(info.duration_s, 3)
                if info and info.duration_s and not self.live else None,
                "dropped_while_paused": self.dropped_while_paused(),
                "unaligned": dict(self.unaligned)}

    def describe(self) -> str:
        return self.source.describe()

    def close(self) -> None:
        if self._reader is not None:
            self._reader.stop()
        self.source.close()


def _no_clip(src: MediaSource, gen: Generation) -> str:
    cfg = gen.config
    seg = f" from {cfg.segment[0]:g} s" if cfg.segment else ""
    return (f"{src.describe()}: not one whole clip of {cfg.clip_frames} frames"
            f"{f' at fps={cfg.filter.fps:g}' if cfg.filter.fps else ''} in it{seg}; "
            f"fewer --clip-frames, a higher fps or an earlier segment would make samples")


def media_payload_estimate(src: MediaSource, gen: Generation,
                           last: SampleSchema | None) -> int | None:
    """Payload bytes of a media-file sample under `gen`: the last schema with the video
    reshaped to what the filter makes of the file's frame size."""
    info = src.probe()
    if info is None:
        return None
    w, h = info.width, info.height
    spec = gen.config.filter
    ow, oh = spec.output_size(w, h)
    mods = [m for m in (last.modalities if last else ()) if m.name != "video"]
    mods.insert(0, ModalitySpec("video", "uint8", (gen.config.clip_frames, spec.channels, oh, ow)))
    return SampleSchema(tuple(mods)).payload_nbytes


__all__ = ["MediaFeed", "media_payload_estimate"]
