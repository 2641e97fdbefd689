"""Feeds: a source as the engine steps it. Two kinds behind one small protocol: a dataset
replay (`DatasetFeed`) and a media file or stream (`MediaFeed`). supervisor.py opens the right
one (`open_feed`) and owns the back-off after a source failure.

    feed.step(gen, pipeline, timeout, into) -> Ready(sample) | Wait(seconds) | FINISHED
                                         (SourceError: the source itself failed)

A feed owns what depends on the kind of source: the pending item and recorded-speed pacing
(dataset), the clip reader, segment reopen and watched-file alignment (media), the checks of a
change against what the source holds, and the proof of a change on a real sample. It never
sleeps and never calls into the daemon: a wait is a returned value (`Wait`), which the daemon
spends answering control. What every feed needs from the engine (a pipeline for a config, the
count of a bad sample, the ring's room for a sample size) comes in `FeedHooks`.

NOTE [proving a change]: a change that alters samples is checked in three steps before its
generation exists: argument checks (`generations.py`), then - for dataset and file sources -
one real sample made with the new config (a filter that makes samples too big for a ring slot,
or a segment no sample has, is refused here with the reason), and only then the commit and
`RingWriter.set_generation` (engine.py). The proof sample is not wasted: it is the first sample
of the new generation (`adopt`). A refused change leaves config, generation and source
position as they were. Before the proof, `check` holds the change against what the source is
(a crop against the frame size, a segment against a file's duration, a clip's span against
what the file holds, a segment against a live stream that has no timeline): what would publish
nothing, or silently something else than asked, is refused naming what the source has.

NOTE [pausing a live source]: a paused recording keeps its position (the reader thread blocks
on its full queue, nothing is read). A paused stream cannot: the sender goes on, and what it
sent would wait in socket buffers and come out as seconds of stale clips on resume. So a
paused stream's reader keeps reading and decoding and drops every clip
(`dropped_while_paused`), and resume starts at the stream's present.
"""
from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from protocol.errors import BadArgument, InputError
from protocol.schema import UNLABELLED, ModalitySpec, SampleSchema

from .clip_reader import ClipReader
from .generations import Generation, SourceFacts
from .pipeline import (Pipeline, PipelineConfig, aligned_watch_files, frame_problem,
                       schema_of)
from .sources import DatasetReplay, MediaSource, SourceError, WatchFolder

log = logging.getLogger("producer.feeds")

PROOF_TRIES = 3               # samples tried to prove a change when some are bad


# --- the protocol ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    """A made sample, with what its SampleMeta needs besides the generation's label."""

    arrays: dict
    gen: Generation           # the generation it was made under (a clip's may be older)
    own_label: int            # the sample's own class (UNLABELLED for a clip)
    timestamp_ns: int
    source: str               # SampleMeta.source: the sample's key, or file@start for a clip
    index: int


@dataclass(frozen=True)
class Wait:
    """Nothing now; step again after `seconds` (0: at once, the step itself waited)."""

    seconds: float


FINISHED = "finished"         # a recording without --loop is over (a new change replays it)


@dataclass(frozen=True)
class FeedHooks:
    """What a feed asks of the engine: never a socket, never a wait."""

    pipeline: Callable[[PipelineConfig], Pipeline]   # a pipeline for a config (its device)
    skip: Callable[[str, Exception], None]           # a bad sample: counted, said once
    fits: Callable[[Generation, int], None]          # BadArgument when no ring layout holds it
    last_schema: Callable[[], SampleSchema | None]   # of the last sample published


class Feed(Protocol):
    kind: str                 # "dataset" | "media"
    live: bool                # a stream: no timeline, pausing drops, its end is a failure
    own_labels: bool          # samples carry their own class (a dataset's class folders)
    facts_stale: bool         # the source told more about itself: facts() again

    def step(self, gen: Generation, pipeline: Pipeline, timeout: float, into: dict | None = None
             ) -> Ready | Wait | str: ...
    def facts(self, watch: WatchFolder | None, classes: tuple[str, ...]) -> SourceFacts: ...
    def check(self, gen: Generation, what: str) -> None: ...
    def check_start(self, gen: Generation, what: str) -> None: ...
    def check_segment(self, start: float, end: float) -> None: ...
    def prove(self, gen: Generation, pipeline: Pipeline, readable: bool) -> Any: ...
    def adopt(self, proof: Any, gen: Generation) -> None: ...
    def replay(self) -> None: ...
    def restart_pacing(self) -> None: ...
    def pause(self, now: float) -> None: ...
    def resume(self, now: float) -> None: ...
    def while_paused(self) -> None: ...
    def reset(self) -> None: ...
    def recover(self) -> "Feed | None": ...
    def idle_reason(self, gen: Generation, idle: float, now: float) -> str | None: ...
    def status(self) -> dict: ...
    def describe(self) -> str: ...
    def close(self) -> None: ...


def scan_watch(w: WatchFolder) -> None:
    """Pick up new files in --watch; say once which ones cannot be used and why."""
    w.scan()
    if w.newly_ignored:
        names = w.newly_ignored
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        log.warning(f"watch folder {w.directory}: ignoring {shown}: no timestamp in the "
                    f"name (expected <stem>_<timestamp>.<ext>, e.g. lidar_top_1700000000.125.bin)",
                    extra={"ignored": names[:100]})


def source_facts(stems: dict[str, set[str]], watch: WatchFolder | None,
                 classes: tuple[str, ...]) -> SourceFacts:
    """What the engine knows about its source (and watched folder) for checking commands."""
    stems = {k: set(v) for k, v in stems.items()}
    if watch is not None:
        scan_watch(watch)
        for k, v in watch.stems().items():
            stems.setdefault(k, set()).update(v)
    return SourceFacts({k: frozenset(v) for k, v in stems.items()}, tuple(classes))


def _on(config: PipelineConfig, name: str) -> bool:
    return config.enabled is None or name in config.enabled


# --- a dataset replay -----------------------------------------------------------------------


class DatasetFeed:
    """A dataset folder replayed in timestamp order, at recorded speed or as fast as the ring
    takes. Holds the next item (`_pending`, made or not, and for which generation) and the
    items a refused proof gave back (`_backlog`), so no sample is lost or repeated."""

    kind = "dataset"
    live = False
    own_labels = True

    def __init__(self, source: DatasetReplay, *, rate: str, hooks: FeedHooks):
        self.source = source
        self.rate = rate
        self.hooks = hooks
        self.facts_stale = False
        self._pending: tuple[Any, dict | None, int] | None = None  # (item, arrays, generation)
        self._backlog: collections.deque = collections.deque()
        self._pace_origin: float | None = None
        self._paused_at: float | None = None

    def step(self, gen: Generation, pipeline: Pipeline, timeout: float,
             into: dict | None = None) -> Ready | Wait | str:
        src = self.source  # `into`: views of a loaned slot to make the sample in (slot_fill.py)
        if self._pending is None:
            item = self._backlog.popleft() if self._backlog else src.next()
            if item is None:
                return FINISHED
            self._pending = (item, None, gen.number)
        item, arrays, made_for = self._pending
        wait = self._due(item.offset_s)
        if wait > 0:
            return Wait(wait)
        if arrays is None or made_for != gen.number:
            try:
                arrays = pipeline.process(item.sample, None, into)
            except InputError as e:
                self._pending = None
                src.check_alive()  # a vanished folder is the source's failure, not the sample's
                self.hooks.skip(item.sample.key, e)
                return Wait(0.0)
        self._pending = None
        seg = gen.config.segment
        ts = item.timestamp_ns + (int(seg[0] * 1e9) if seg else 0)
        return Ready(arrays, gen, item.sample.label, ts, item.sample.key, item.index)

    def _due(self, offset_s: float) -> float:
        """Recorded-speed pacing: seconds until the item is due (0: now)."""
        if self.rate != "recorded":
            return 0.0
        now = time.monotonic()
        if self._pace_origin is None:
            self._pace_origin = now - offset_s
        return max(0.0, self._pace_origin + offset_s - now)

    # --- what it is, and changes -----------------------------------------------------------

    def facts(self, watch: WatchFolder | None, classes: tuple[str, ...]) -> SourceFacts:
        own = tuple(self.source.classes) if self.source.classes else tuple(classes)
        return source_facts(self.source.stems(), watch, own)

    def check(self, gen: Generation, what: str) -> None:
        """Nothing to hold a change against before its proof (the proof reads a sample)."""

    def check_start(self, gen: Generation, what: str) -> None:
        sample = self.source.peek()
        if sample is not None:
            problem = frame_problem(sample, gen.config)
            if problem:
                raise BadArgument(f"{what}: {problem}")

    def check_segment(self, start: float, end: float) -> None:
        """Any segment may be asked of a recording; the proof finds one without samples."""

    def prove(self, gen: Generation, pipeline: Pipeline, readable: bool):
        """One real sample made under `gen` (NOTE [proving a change]): (item, arrays) to
        `adopt`, or None when the source cannot be read now. BadArgument refuses the change,
        with every item tried given back (the position is kept)."""
        if not readable:
            return None
        trial = self.hooks.pipeline(gen.config)
        # Samples only the new config cannot make (a bad video.mp4 when video is turned
        # back on): its fault or theirs? Another sample decides; if none can be made the
        # change is refused and every sample tried goes back (the position is kept).
        doubtful: list[tuple[Any, InputError]] = []
        item = None

        def refuse(message: str):
            taken = [i for i, _ in doubtful] + ([item] if item is not None else [])
            self._backlog.extendleft(reversed(taken))
            raise BadArgument(message)

        for _ in range(PROOF_TRIES):
            item = self._take_item()
            if item is None:
                break
            problem = frame_problem(item.sample, gen.config)
            if problem:
                refuse(f"{gen.reason}: refused, {problem}")
            try:
                arrays = trial.process(item.sample, None)
            except InputError as e:
                try:  # the sample's fault or the change's?
                    pipeline.process(item.sample, None)
                except InputError:
                    self.hooks.skip(item.sample.key, e)
                    item = None
                    continue
                doubtful.append((item, e))
                item = None
                continue
            need = schema_of(arrays).payload_nbytes
            try:
                self.hooks.fits(gen, need)
            except BadArgument as e:
                refuse(str(e))
            for bad, err in doubtful:  # bad under the new config: skipped as it would be
                self.hooks.skip(bad.sample.key, err)
            return item, arrays
        if doubtful:
            bad, err = doubtful[0]
            more = f" (nor {len(doubtful) - 1} more tried)" if len(doubtful) > 1 else ""
            refuse(f"{gen.reason}: refused, it cannot make sample {bad.sample.key}{more}: {err}")
        return None

    def _take_item(self):
        """The next item: the one waiting, else one given back, else the source's."""
        if self._pending is not None:
            item, self._pending = self._pending[0], None
            return item
        return self._backlog.popleft() if self._backlog else self.source.next()

    def adopt(self, proof, gen: Generation) -> None:
        """The proof sample is the new generation's first."""
        if proof is not None:
            self._pending = (proof[0], proof[1], gen.number)

    def replay(self) -> None:
        """A finished replay starts a new pass (a change needs a sample to prove it on)."""
        self.source.rewind()
        self._pending = None
        self._backlog.clear()

    def restart_pacing(self) -> None:
        self._pace_origin = None

    # --- pause, failure ------------------------------------------------------------------

    def pause(self, now: float) -> None:
        self._paused_at = now

    def resume(self, now: float) -> None:
        if self._pace_origin is not None and self._paused_at is not None:
            self._pace_origin += now - self._paused_at

    def while_paused(self) -> None:
        """A paused replay keeps its position: nothing to do."""

    def reset(self) -> None:
        """After a source failure: what was pending is read again from a fresh open."""
        self._pending = None
        self._backlog.clear()

    def recover(self) -> Feed | None:
        """None: a failed replay is opened anew by the supervisor (the folder re-indexed)."""
        return None

    # --- status ------------------------------------------------------------------------------

    def idle_reason(self, gen: Generation, idle: float, now: float) -> str | None:
        if self._pending is not None and self._pace_origin is not None:
            due = self._pace_origin + self._pending[0].offset_s - now
            if due > 0:
                return (f"replaying at recorded speed: the next sample is due in {due:.1f} s "
                        f"(--rate max replays as fast as the ring takes)")
        return None

    def status(self) -> dict:
        return {"frame_size": None, "source_duration_s": None, "dropped_while_paused": 0,
                "unaligned": {}}

    def describe(self) -> str:
        return self.source.describe()

    def close(self) -> None:
        self.source.close()


# --- a media file or stream -----------------------------------------------------------------


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


__all__ = ["FINISHED", "DatasetFeed", "Feed", "FeedHooks", "MediaFeed", "Ready", "Wait",
           "scan_watch", "source_facts"]
