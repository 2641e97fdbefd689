"""The producer engine: a source made into samples in the ring, one step at a time, and the
changes `mmctl` asks for. No socket, no signal, no sleep: `Producer.step_once(timeout)` makes
at most one sample and returns, saying in `wait_s` how long nothing will happen (recorded-speed
pacing, back-off, a paused or finished source), which the daemon (daemon.py) spends answering
control. The trainer has the same shape (trainer/loop.py `Trainer.step_once`).

    step:   feed.step(into=slot views, loaned at first use: slot_fill.py) -> Ready | Wait |
            FINISHED
            Ready -> pipeline.describe -> commit the slot, or RingSink.put (copy) ->
            PUBLISHED | FULL | REFUSED
    change: Generations.propose_* -> feed.check -> feed.prove -> commit, persist,
            RingSink.set_generation                             (NOTE [proving a change])

A sample the ring has no room for yet (FULL: lossless, the slowest reader is behind) is kept
and offered again by the next step, after the daemon has answered control: back-pressure never
stops the daemon from answering.

NOTE [no dead ends]: no command leaves the producer where only a restart gets it out. A live
stream never "finishes" (supervisor.py). A finished recording (a file or dataset without
--loop) is replayed from its start (or the segment's) by the next change that makes a
generation, so `mmctl segment 2 4` or `mmctl filter gray` after the end gives samples again;
`resume` there is refused saying so, never answered with a state the producer is not in.

NOTE [generations across restarts]: every generation number is written to the state directory
(generation_store.py) before a sample of it is published, and a start begins one past the
larger of that file and the header of a ring a dead producer left: `mmctl wait N` keeps its
meaning across restarts of the producer on the same ring name.
"""
from __future__ import annotations

import collections
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.errors import BadArgument, RingTooLarge
from protocol.filters import FilterSpec
from protocol.ring import DEFAULT_MAX_RING_BYTES, RingConfig
from protocol.schema import SampleSchema
from protocol.stages import StageTimer, now_ns, producer_bottleneck

from .feeds import FINISHED, Feed, FeedHooks, Ready, Wait, source_facts
from .generation_store import GenerationStore, default_state_dir, first_generation
from .generations import Generation, Generations, SourceFacts
from .pipeline import Pipeline, PipelineConfig, describe
from .ring_sink import Put, RingSink
from .slot_fill import SlotFill
from .sources import MediaSource, SourceError, WatchFolder
from .video_route import VideoRoute, route_of
from .modalities.ffmpeg_chain_run import check_runs_on_cpu, prove_chain
from protocol.ffmpeg_chain import parse_chain
from .supervisor import Supervisor, open_feed
from .watching import RunWatch, WrongState
from .worker_threads import blas_thread_count  # noqa: F401  (WrongState: re-exported)

log = logging.getLogger("producer.engine")

RATE_WINDOW_S = 5.0           # samples/s is measured over this window
IDLE_AFTER_S = 5.0            # running with nothing published this long: status says why
STATUS_INTERVAL_S = 10.0      # a log line and a STATUS= line this often, never per sample


@dataclass(frozen=True)
class RunOptions:
    """Everything `mm-producer run` was started with."""

    source: str
    ring: str
    mode: str = "lossy"
    control: str | None = None
    curve_dir: Path | None = None     # `mmctl keygen` folder: CURVE keys for tcp:// sockets
    slots: int = 8
    slot_bytes: int = 8 << 20        # a floor: the ring grows past it (ring_sink.py)
    max_ring_bytes: int = DEFAULT_MAX_RING_BYTES  # the cap on one ring layout's memory
    loop: bool = False
    rate: str = "max"                 # "recorded" | "max"
    watch: Path | None = None
    label: str | None = None
    classes: tuple[str, ...] = ()
    filter: FilterSpec = FilterSpec()  # parsed once, by `mm-producer run` (protocol/filters.py)
    clip_frames: int = 8
    group: str | None = None
    log_endpoint: str | None = None
    timeouts: tuple[float, float] = (10.0, 5.0)
    splits: tuple[str, ...] | None = None
    device: str = "cpu"               # "cpu" | "auto" | "cuda": where the ring's frames live
    state_dir: Path | None = None     # generation_store.py; None: default_state_dir()
    status_interval: float = STATUS_INTERVAL_S
    metrics: str | None = None        # HOST:PORT of the Prometheus endpoint; None: off
    record_cache: Path | None = None  # where `mmctl record start` appends (unless it says)


@dataclass
class Counters:
    published: int = 0
    skipped: int = 0            # bad samples left out (each reported once in the log)
    source_errors: int = 0      # source failures, each followed by a back-off
    retries: int = 0            # retries since the last success (reset when data flows)
    last_error: str | None = None
    last_error_at: float | None = None


class Producer:
    """See the module docstring. Built by the daemon after its sockets; `close()` at the end.
    A BadArgument or ring error from the constructor fails the start (nothing is left)."""

    def __init__(self, opts: RunOptions):
        self.opts = opts
        self.counters = Counters()
        # what `mm-producer run` left numpy's BLAS at (run.py): read once, status shows it
        self._blas_threads = blas_thread_count()
        self.stages = StageTimer("producer")  # NOTE [cheap timing] in protocol/stages.py
        self.watch = RunWatch(opts.ring, opts.record_cache)  # preview, record (watching.py)
        self.state = "starting"
        self.paused = False
        self.wait_s = 0.0
        self.t_start = time.monotonic()
        self._watch = WatchFolder(opts.watch) if opts.watch else None
        self._unpublished: tuple[Any, ...] | None = None  # a sample the full ring refused
        self._rates: collections.deque[tuple[float, int]] = collections.deque()
        self._reported: set[tuple[str, str]] = set()
        self._last_count = 0
        self._last_progress = self.t_start      # when `published` last grew
        self.video_device = "cpu"
        self.sink: RingSink | None = None
        hooks = FeedHooks(pipeline=self._pipeline, skip=self.skip, fits=self._check_ring_fits,
                          last_schema=self._last_schema)
        self.supervisor = Supervisor(
            lambda: open_feed(opts.source, loop=opts.loop, splits=opts.splits,
                              timeouts=opts.timeouts, rate=opts.rate, watch=self._watch,
                              hooks=hooks), self.counters)
        base = PipelineConfig(filter=opts.filter, clip_frames=opts.clip_frames)
        try:
            self.supervisor.open()
            facts = self._facts()
        except SourceError as e:
            # The producer still comes up (systemd keeps it; the stream may appear later).
            self._source_failed(e)
            facts = SourceFacts({}, tuple(opts.classes))
        self._store = GenerationStore(opts.state_dir or default_state_dir(), opts.ring)
        first = self.first_generation = self._first_generation()
        self.gens = Generations(base, facts, opts.label, first=first)
        self._check_start_fits()
        self.sink = RingSink.open(RingConfig(opts.ring, slots=opts.slots,
                                             slot_bytes=opts.slot_bytes, mode=opts.mode,
                                             group=opts.group, max_bytes=opts.max_ring_bytes),
                                  opts.device)
        # Frames headed for GPU slots are decoded by NVDEC straight into GPU memory.
        self.video_device = "cuda" if self.sink.memory == "gpu" else "cpu"
        self.fill = SlotFill(self.sink)  # samples made in place in ring slots
        self.pipeline = self._pipeline(base)
        self._persist(first)
        self.sink.set_generation(first)
        self.video_route()  # the media source takes it at its first open
        if self.state == "starting":
            self.state = "running"
        self._say_unlabelled()

    @property
    def feed(self) -> Feed | None:
        return self.supervisor.feed

    def _pipeline(self, config: PipelineConfig) -> Pipeline:
        return Pipeline(config, video_device=self.video_device, timer=self.stages)

    def _facts(self) -> SourceFacts:
        feed = self.feed
        if feed is not None:
            return feed.facts(self._watch, tuple(self.opts.classes))
        return source_facts({}, self._watch, tuple(self.opts.classes))

    def _say_unlabelled(self) -> None:
        """Said once, at start: a media/URL source has no class of its own (label -1). A
        normal case (the trainer counts such samples and leaves them out of its loss), but
        the operator should know how to label them."""
        opts = self.opts
        if opts.label is not None or (self.feed is not None and self.feed.own_labels) \
                or Path(opts.source).is_dir():
            return
        classes = tuple(opts.classes)
        how = (f"`mmctl label NAME` (NAME one of {', '.join(classes[:20])})" if classes else
               "`mmctl label N` (a class index; start with --classes DATASET|LIST to use "
               "class names)")
        log.info("source %s is unlabelled: its samples carry label -1 (unlabelled), which "
                 "the trainer counts and leaves out of its supervised loss; to label them, "
                 "start with --label NAME --classes DATASET|LIST, or run %s while it runs",
                 opts.source, how, extra={"source": opts.source, "label": None})

    # --- generations across restarts ---------------------------------------------------------

    def _first_generation(self) -> int:
        """One past the last generation this ring name had (NOTE [generations across restarts])."""
        return first_generation(self._store, self.opts.ring)

    def _persist(self, generation: int) -> None:
        """Write `generation` to the state directory before any sample of it exists; a disk
        that refuses is said once per error and the producer goes on (GenerationStore.keep)."""
        self._store.keep(generation)

    # --- stepping ------------------------------------------------------------------------------

    def step_once(self, timeout: float) -> bool:
        """Make and publish at most one sample, blocking at most about `timeout` seconds (a
        clip not decoded yet, a full lossless ring). True when a sample was published; False
        with `wait_s` set to how long nothing will happen (0: step again at once)."""
        self.wait_s = 0.0
        if self._unpublished is not None:  # the full ring's sample goes first, paused or not
            return self._offer(*self._unpublished, timeout=timeout)
        if self.paused:
            try:
                if self.feed is not None:
                    self.feed.while_paused()
            except SourceError as e:
                self._source_failed(e)
            self.wait_s = timeout
            return False
        if self.state == "finished":
            self.wait_s = timeout
            return False
        if self.feed is None or self.state == "source-error":
            self._retry_source()
            return False
        gen = self.gens.current
        into = self.fill.loan(gen.number, timeout)  # slot_fill.py: loaned when first used
        try:
            got = self.feed.step(gen, self.pipeline, timeout, into)
            if self.feed.facts_stale:
                self.gens.facts = self._facts()
            if got is FINISHED:
                self._finish()
                return False
            if isinstance(got, Wait):
                self.wait_s = min(got.seconds, timeout)
                return False
            return self._publish(got, timeout)
        except SourceError as e:
            self._source_failed(e)
            return False
        finally:
            self.fill.cancel()  # a loan not committed (no sample, an error) is given back

    def _publish(self, got: Ready, timeout: float) -> bool:
        gen = got.gen
        schema, meta = describe(got.arrays, generation=gen.number, index=got.index,
                                label=self.gens.label_index(gen, got.own_label),
                                timestamp=got.timestamp_ns, source=got.source)
        t0 = now_ns()
        done = self.fill.finish(schema, meta, got.arrays)
        if done is None:  # the schema's first sample, or not the loan's schema: copy
            return self._offer(schema, meta, got.arrays, gen, timeout=timeout)
        self.stages.stage("ring_write", "ring").since(t0 - self.fill.loan_ns)
        return self._published(done, schema, meta, got.arrays, gen, in_place=True)

    def _offer(self, schema, meta, arrays, gen: Generation, *, timeout: float) -> bool:
        t0 = now_ns()
        put, why = self.sink.put(schema, meta, arrays, timeout)
        if put is Put.FULL:  # lossless and the slowest reader is behind: answer control first
            self._unpublished = (schema, meta, arrays, gen)
            self.stages.stage("ring_wait", "ring").since(t0)
            return False
        self.stages.stage("ring_write", "ring").since(t0)
        self._unpublished = None
        if put is Put.PUBLISHED:
            self.fill.copied(schema, gen.number, self.gens.current.number)
        return self._published((put, why), schema, meta, arrays, gen)

    def _published(self, done: tuple[Put, str], schema, meta, arrays, gen: Generation, *,
                   in_place: bool = False) -> bool:
        put, why = done
        c = self.counters
        if put is Put.REFUSED:
            # Beyond --max-ring-bytes (said once per schema by the ring sink), or a damaged
            # ring that could not be replaced: counted, never a crash.
            c.skipped += 1
            c.last_error, c.last_error_at = f"{meta.source}: {why}", time.time()
            return False
        c.published += 1
        self.supervisor.published()
        self.watch.published(schema, meta, arrays, gen,
                             (self.sink.writer, self.fill.last_number) if in_place else None)
        return True

    def skip(self, key: str, err: Exception) -> None:
        """A bad sample is left out: counted, said once per sample and error."""
        c = self.counters
        c.skipped += 1
        c.last_error = f"{key}: {err}"
        c.last_error_at = time.time()
        # Once per sample and error: a looping replay meets the same bad file every pass.
        said = (key, str(err))
        if said not in self._reported:
            if len(self._reported) > 10_000:
                self._reported.clear()
            self._reported.add(said)
            log.warning("bad sample skipped", extra={"sample": key, "error": str(err)})

    def _finish(self) -> None:
        self.state = "finished"
        log.info("source finished: a new segment or filter replays it (NOTE [no dead ends])",
                 extra={"published": self.counters.published})

    def _source_failed(self, err: Exception) -> None:
        self.state = "source-error"
        self.supervisor.failed(err)

    def _retry_source(self) -> None:
        try:
            wait = self.supervisor.retry()
            if wait > 0:
                self.wait_s = wait
                return
            self.gens.facts = self._facts()
            self.feed.restart_pacing()
            self.state = "running"
            self._last_progress = time.monotonic()
        except SourceError as e:
            self._source_failed(e)

    def tick(self, now: float) -> None:
        """Between steps: the ring's heartbeat and the samples/s window."""
        self.sink.heartbeat()
        if self.counters.published != self._last_count:
            self._last_count, self._last_progress = self.counters.published, now
        q = self._rates
        if not q or now - q[-1][0] >= 0.25:
            q.append((now, self.counters.published))
            while len(q) > 2 and now - q[0][0] > RATE_WINDOW_S:
                q.popleft()

    # --- changes -------------------------------------------------------------------------------

    def video_route(self, config: PipelineConfig | None = None, *, tell: bool = True
                    ) -> VideoRoute:
        """What decodes and filters the source's video under `config` (default: now;
        video_route.py). `tell`: a media source is given it, to take at its next open."""
        src = getattr(self.feed, "source", None)
        route = route_of(src, self.video_device, config or self.gens.current.config,
                         self.gens.enabled())
        if tell and isinstance(src, MediaSource) and route != src.video_route:
            if src.video_route is None or route.why != src.video_route.why:
                log.info(f"video route: {route.decoder} decode, {route.filters} filters: "
                         f"{route.why}")
            src.video_route = route
        return route

    def propose_filter(self, spec: FilterSpec | None, ffmpeg: str | None) -> Generation:
        """`mmctl filter [SPEC] [--ffmpeg CHAIN]` checked: a chain with CUDA filters only where
        the ffmpeg CUDA child would run it; a new chain built and run by FFmpeg on a frame of
        the source's size (a dataset's proof sample does that for real in change())."""
        gen = self.gens.propose_filter(spec, ffmpeg, cuda_child=True)
        chain = gen.config.ffmpeg_chain
        if chain and chain != self.gens.current.config.ffmpeg_chain:
            route = self.video_route(gen.config, tell=False)
            if not route.child:
                check_runs_on_cpu(parse_chain(chain), route.why)
            src = getattr(self.feed, "source", None)
            if isinstance(src, MediaSource) or self.feed is None:
                info = getattr(src, "info", None)
                prove_chain(chain, *((info.width, info.height) if info else (640, 480)))
        return gen

    def change(self, gen: Generation) -> dict:
        """Check a proposed generation against the source, prove it on a real sample, then
        commit it (NOTE [proving a change] in feeds.py): persisted, then the ring's. A
        BadArgument leaves everything as it was. On a finished recording the new generation
        replays it (NOTE [no dead ends])."""
        feed = self.feed
        finished = self.state == "finished"
        if finished and feed is not None:
            feed.replay()  # the proof needs a sample: a new pass, from the start
        if feed is not None:
            feed.check(gen, gen.reason)
            proof = feed.prove(gen, self.pipeline, self.state in ("running", "finished"))
        else:
            proof = None
        self.gens.commit(gen)
        self._persist(gen.number)
        self.pipeline = self._pipeline(gen.config)
        self.sink.set_generation(gen.number)
        if feed is not None:
            feed.adopt(proof, gen)
        if finished:
            self.state = "running"
            feed.restart_pacing()
            self._last_progress = time.monotonic()
            log.info("replaying the finished source", extra={"generation": gen.number})
        log.info("new generation", extra={"generation": gen.number, "change": gen.reason})
        self.video_route()
        return {"generation": gen.number}

    def _check_start_fits(self) -> None:
        """--filter/--clip-frames against the source, before anything is created: a crop
        larger than a file's frames or a clip longer than the file fails the start (exit 1)
        naming the frame size or the duration."""
        gen = self.gens.current
        if self.feed is not None:
            self.feed.check_start(gen, f"--filter {gen.config.filter} --clip-frames "
                                       f"{gen.config.clip_frames}")

    def _check_ring_fits(self, gen: Generation, need: int) -> None:
        """A change whose samples no ring layout within --max-ring-bytes holds is refused
        (a bigger one that fits moves the ring when its first sample comes)."""
        try:
            self.sink.check_fits(need, f"samples of {need} bytes")
        except RingTooLarge as e:
            raise BadArgument(f"{gen.reason}: refused, {e}") from None

    def _last_schema(self) -> SampleSchema | None:
        return self.sink.last_schema if self.sink is not None else None

    def refresh_facts(self) -> None:
        """Before a command that names a stem: files may have arrived in --watch."""
        if self._watch is not None and self.feed is not None:
            self.gens.facts = self._facts()

    def segment(self, start: float, end: float) -> dict:
        if self.feed is not None:
            self.feed.check_segment(start, end)
        return self.change(self.gens.propose_segment(start, end))

    def pause(self) -> dict:
        live = self.feed is not None and self.feed.live
        if not self.paused:
            self.paused = True
            if self.feed is not None:
                self.feed.pause(time.monotonic())
            log.info("paused", extra={"published": self.counters.published, "live": live})
        reply: dict[str, Any] = {"state": "paused"}
        if live:
            reply["note"] = ("live stream: what arrives while paused is dropped (status "
                             "dropped_while_paused); resume starts at the present")
        return reply

    def resume(self) -> dict:
        if not self.paused:
            if self.state == "finished":
                raise WrongState(f"resume: nothing is paused and the source has finished "
                                 f"({self.feed.describe()}): there is nothing to resume. "
                                 f"A new segment or filter (`mmctl segment START END`, `mmctl "
                                 f"segment clear`, `mmctl filter SPEC`) replays it from its "
                                 f"start; start the producer with --loop to replay it forever")
            return {"state": self.state_name(), "was_paused": False}
        self.paused = False
        if self.feed is not None:
            self.feed.resume(time.monotonic())
        self._last_progress = time.monotonic()  # idle_reason counts from here, not the pause
        log.info("resumed", extra={"published": self.counters.published, "state": self.state})
        reply: dict[str, Any] = {"state": self.state_name(), "was_paused": True}
        if self.state != "running":
            reply["idle_reason"] = self.idle_reason()
        return reply

    # --- status --------------------------------------------------------------------------------

    def rate(self) -> float:
        """Samples/s over the last RATE_WINDOW_S seconds."""
        now = time.monotonic()
        if not self._rates:
            return 0.0
        t0, n0 = self._rates[0]
        return (self.counters.published - n0) / (now - t0) if now - t0 > 1e-3 else 0.0

    def state_name(self) -> str:
        return "paused" if self.paused else self.state

    def idle_reason(self) -> str | None:
        """Why nothing is being published, in words, or None while samples flow: status
        must never say "running" over a producer that publishes nothing without saying why."""
        feed, now = self.feed, time.monotonic()
        if self.paused:
            if feed is not None and feed.live:
                return ("paused (mmctl pause): the stream is still read and what arrives is "
                        "dropped (dropped_while_paused); mmctl resume starts at the present")
            return "paused (mmctl pause): the source keeps its position; mmctl resume goes on"
        if self.state == "finished":
            return (f"the source has finished ({feed.describe() if feed else self.opts.source}, "
                    f"no --loop): a new segment or filter replays it from its start")
        if self.state == "source-error":
            return (f"the source failed ({self.counters.last_error}); retrying in "
                    f"{max(0.0, self.supervisor.retry_at - now):.1f} s")
        idle = now - self._last_progress
        if self.state != "running" or idle < IDLE_AFTER_S:
            return None
        why = feed.idle_reason(self.gens.current, idle, now) if feed is not None else None
        if why:
            return why
        if self.opts.mode == "lossless":
            return (f"no sample for {idle:.0f} s: a lossless ring waits for its slowest "
                    f"reader; ring_fill and readers say who")
        c = self.counters
        if c.last_error_at is not None and time.time() - c.last_error_at < idle:
            return (f"no sample for {idle:.0f} s; {c.skipped} bad samples skipped so far, the "
                    f"last: {c.last_error}")
        return f"no sample for {idle:.0f} s"

    def status_line(self) -> str:
        g = self.gens.current.number if getattr(self, "gens", None) else 0
        return (f"{self.state_name()}: generation {g}, "
                f"{self.counters.published} samples published, {self.counters.skipped} skipped")

    def dropped_while_paused(self) -> int:
        return self.feed.status()["dropped_while_paused"] if self.feed is not None else 0

    def status(self) -> dict:
        """What `mmctl status` shows (docs/CONTRACTS.md fixes the fields)."""
        sink, c = self.sink, self.counters
        stats = sink.stats()
        fill = min(stats.published, stats.slots) / stats.slots  # slots holding a sample
        fs = self.feed.status() if self.feed is not None else {}
        reply = {
            "state": self.state_name(),
            "idle_reason": self.idle_reason(),
            "generation": self.gens.current.number,
            "config": self.gens.current.summary(),
            "enabled": self.gens.enabled(),
            "source": self.feed.describe() if self.feed else self.opts.source,
            "published": c.published,
            "samples_per_s": round(self.rate(), 3),
            "skipped": c.skipped,
            "dropped_while_paused": fs.get("dropped_while_paused", 0),
            "frame_size": fs.get("frame_size"),
            "source_duration_s": fs.get("source_duration_s"),
            "source_errors": c.source_errors,
            "retries": c.retries,
            "last_error": c.last_error,
            "unaligned": fs.get("unaligned", {}),
            "ring": stats.name,
            "mode": stats.mode,
            "ring_epoch": stats.epoch,
            "ring_fill": round(fill, 3),
            # ring_sink.py NOTE [ring layouts]: the layout now in use and how it got there
            "slot_bytes": sink.slot_bytes,
            "ring_bytes": sink.total_bytes,
            "ring_relayouts": sink.relayouts,
            "ring_replaced": sink.replacements,
            "ring_refused": sink.refused,
            "readers": stats.readers,
            "dropped": stats.dropped,
            "heartbeat_age_s": round(stats.heartbeat_age_s, 3),
            "ring_memory": sink.memory,
            "copies": self.fill.status(),  # slot_fill.py: bytes copied into slots
            **self.video_route().status(),
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.t_start, 1),
            "blas_threads": self._blas_threads,
            "record": self.watch.record_status(),
            "stages": self.stages.summary(),
        }
        reply["bottleneck"] = producer_bottleneck(reply)
        return reply

    def metric_values(self) -> dict:
        """What `--metrics` exports (protocol/metrics.py METRICS), read on the loop's thread."""
        c, stats = self.counters, self.sink.stats()
        return {
            "mmfeed_producer_samples_published_total": c.published,
            "mmfeed_producer_samples_skipped_total": c.skipped,
            "mmfeed_producer_samples_dropped_while_paused_total": self.dropped_while_paused(),
            "mmfeed_producer_source_errors_total": c.source_errors,
            "mmfeed_producer_generation": self.gens.current.number,
            "mmfeed_producer_generations_total":
                self.gens.current.number - self.first_generation + 1,
            "mmfeed_producer_samples_per_second": self.rate(),
            "mmfeed_producer_paused": self.paused,
            "mmfeed_producer_recording": self.watch.recorder is not None,
            "mmfeed_producer_samples_recorded_total": self.watch.recorded(),
            "mmfeed_ring_fill_ratio": min(stats.published, stats.slots) / stats.slots,
            "mmfeed_ring_readers": stats.readers,
            "mmfeed_ring_dropped": stats.dropped,
        }

    def summary(self) -> dict:
        """The exit line: counts of the whole run."""
        stats = self.sink.stats() if self.sink is not None else None
        return {"event": "exit", "published": self.counters.published,
                "skipped": self.counters.skipped,
                "source_errors": self.counters.source_errors,
                "generation": self.gens.current.number if getattr(self, "gens", None) else 0,
                "ring": stats.name if stats else self.opts.ring,
                "ring_epoch": stats.epoch if stats else None,
                "uptime_s": round(time.monotonic() - self.t_start, 3)}

    def close(self) -> None:
        """Keep a recording in progress, stop the feed's reader and remove the ring (its
        readers get ProducerGone)."""
        self.watch.close()
        if self.feed is not None:
            self.feed.close()
        if self.sink is not None:
            self.sink.close()
