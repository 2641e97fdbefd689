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

MediaFeed and its helpers live in media_feed.py (NOTE [pausing a live source] there).
"""
from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from protocol.errors import BadArgument, InputError
from protocol.schema import SampleSchema

from .generations import Generation, SourceFacts
from .pipeline import Pipeline, PipelineConfig, frame_problem, schema_of
from .sources import DatasetReplay, WatchFolder

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


__all__ = ["FINISHED", "DatasetFeed", "Feed", "FeedHooks", "Ready", "Wait",
           "scan_watch", "source_facts"]
