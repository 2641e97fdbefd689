"""The producer daemon: one main loop that turns a source into samples in the ring and obeys
control commands between samples.

    start:  ring (new epoch; a stale one is replaced) -> control socket -> READY=1
    loop:   answer control (poll, never long) -> heartbeat/watchdog -> one sample:
            source item -> Pipeline.process -> ring.publish
    stop:   SIGTERM/SIGINT set a flag; the current sample is finished, the ring is removed,
            STOPPING=1, exit 0

NOTE [one thread]: the control server is polled from this loop, so handlers run on the same
thread as the pipeline and need no lock; the price is that a command waits for the sample in
progress (one pipeline call, tens of milliseconds). Nothing in the loop blocks longer than
that: recorded-speed pacing, lossless back-pressure, pause and source back-off all wait by
polling the control socket with a short timeout. Live network sources are the exception the
loop cannot bound (a read blocks up to the read timeout), so they are decoded on a reader
thread that hands finished clips over a small queue.

NOTE [media generations]: a media file or stream is opened once and demuxed for video and
audio together (`media_clips.py`); a control change is handed to the reader thread and takes
effect at its next clip boundary, without reopening (a listen-once stream would not survive
a reopen). Each clip carries the generation it was made under and is published under it, so
the clips already decoded when the change came are still published, under the old number,
and the ring's generations never go backwards. Only a segment change on a file reopens it
(to seek).

NOTE [proving a change]: a change that alters samples is checked in three steps before its
generation exists: argument checks (`generations.py`), then - for dataset and file sources -
one real sample made with the new config (a filter that makes samples too big for a ring slot,
or a segment no sample has, is refused here with the reason), and only then the commit and
`RingWriter.set_generation`. The proof sample is not wasted: it is the first sample of the
new generation. A refused change leaves config, generation and source position as they were.
Before the proof, `_check_fits` holds the change against what the source is (a crop against
the frame size, a segment against a file's duration, a clip's span against what the file
holds, a segment against a live stream that has no timeline): what would publish nothing, or
silently something else than asked, is refused naming what the source has.

NOTE [no dead ends]: no command leaves the daemon where only a restart gets it out. A live
stream (a URL) never "finishes": its end is a source failure, retried with back-off. A
finished recording (a file or dataset without --loop) is replayed from its start (or the
segment's) by the next change that makes a generation, so `mmctl segment 2 4` or `mmctl
filter gray` after the end gives samples again; `resume` there is refused saying so, never
answered with a state the daemon is not in.

NOTE [pausing a live source]: a paused recording keeps its position (the reader thread
blocks on its full queue, nothing is read). A paused stream cannot: the sender goes on, and
what it sent would wait in socket buffers and come out as seconds of stale clips on resume.
So a paused stream's reader keeps reading and decoding and drops every clip
(`dropped_while_paused`), and resume starts at the stream's present.

NOTE [generations across restarts]: every generation number is written to the state
directory (generation_store.py) before a sample of it is published, and a start begins one
past the larger of that file and the header of a ring a dead producer left: `mmctl wait N`
keeps its meaning across restarts of the producer on the same ring name.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from protocol import logs, notify
from protocol.control import Command, ControlServer, daemon_sockets, wire_command
from protocol.errors import (BadArgument, ControlError, InputError, RingDamaged, RingFull,
                             RingTooLarge)
from protocol.filters import FilterSpec
from protocol.heap import HeapTrimmer
from protocol.ring import DEFAULT_MAX_RING_BYTES, RingConfig, RingWriter
from protocol.schema import ModalitySpec, SampleMeta, SampleSchema, UNLABELLED

from .dataset import SampleFiles
from .generation_store import GenerationStore, default_state_dir, ring_header_generation
from .generations import Generation, Generations, SourceFacts
from .ring_sink import RingSink
from .pipeline import Pipeline, PipelineConfig
from .media_clips import ClipSettings
from .modalities import audio
from .sources import (Clip, DatasetReplay, MediaSource, SourceError, WatchFolder,
                      open_source)

log = logging.getLogger("producer.daemon")

STATUS_INTERVAL_S = 10.0      # a log line and a STATUS= line this often, never per sample
RATE_WINDOW_S = 5.0           # samples/s is measured over this window
BACKOFF_START_S = 0.25
BACKOFF_MAX_S = 10.0
IDLE_POLL_MS = 50             # control poll while paused, waiting or backing off
SCHEMAS_LOGGED = 64           # (generation, schema) pairs remembered as already logged
_PROOF_TRIES = 3              # samples tried to prove a change when some are bad
IDLE_AFTER_S = 5.0            # running with nothing published this long: status says why


class WrongState(ControlError):
    """A command that cannot apply in the daemon's present state (e.g. `resume` of a source
    that has finished); the message says what the state is and what would work."""

    code = "wrong_state"


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
    filter: str = "none"
    clip_frames: int = 8
    group: str | None = None
    log_endpoint: str | None = None
    timeouts: tuple[float, float] = (10.0, 5.0)
    splits: tuple[str, ...] | None = None
    device: str = "cpu"               # "cpu" | "auto" | "cuda": where the ring's frames live
    state_dir: Path | None = None     # generation_store.py; None: default_state_dir()
    status_interval: float = STATUS_INTERVAL_S


@dataclass
class _Counters:
    published: int = 0
    skipped: int = 0            # bad samples left out (each reported once in the log)
    source_errors: int = 0      # source failures, each followed by a back-off
    retries: int = 0            # retries since the last success (reset when data flows)
    last_error: str | None = None
    last_error_at: float | None = None
    dropped_while_paused: int = 0   # live clips read and dropped while paused (NOTE [pausing])


class ProducerDaemon:
    """`mm-producer run`: see the module docstring. `start()`, then `run()` until stopped."""

    def __init__(self, opts: RunOptions, *, out=sys.stdout, json_lines: bool = False):
        self.opts = opts
        self.out = out
        self.json_lines = json_lines
        self.counters = _Counters()
        self.state = "starting"
        self.paused = False
        self._stop = False
        self._source: DatasetReplay | MediaSource | None = None
        self._watch = WatchFolder(opts.watch) if opts.watch else None
        self._pending: tuple[Any, dict | None, int] | None = None  # (item, arrays, generation)
        self._backlog: collections.deque = collections.deque()  # items a refused proof gave back
        self._backoff = BACKOFF_START_S
        self._retry_at = 0.0
        self._rates: collections.deque[tuple[float, int]] = collections.deque()
        self._schemas: dict[tuple, SampleSchema] = {}
        self._heap = HeapTrimmer()
        self._last_published: SampleSchema | None = None
        # NOTE [schema log]: one "sample schema" line per (generation, schema id), not one
        # per change of schema: a dataset whose samples alternate between two schemas (an
        # unknown sensor with and without metadata dtype) would log every sample otherwise.
        self._schemas_logged: collections.OrderedDict[tuple[int, int], None] = \
            collections.OrderedDict()
        self._unaligned: dict[str, int] = {}   # watched stem -> clips that went without it
        self._reported: set[tuple[str, str]] = set()
        self._clip_reader: _ClipReader | None = None
        self._pace_origin: float | None = None
        self._paused_at: float | None = None
        self.ring: RingSink | None = None
        self.server: ControlServer | None = None
        self.notifier = notify.Notifier()
        self.gens: Generations | None = None
        self.pipeline: Pipeline | None = None
        self.t_start = time.monotonic()
        self._store: GenerationStore | None = None
        self._store_failed: str | None = None   # the last save error said (said once each)
        self._last_count = 0
        self._last_progress = self.t_start      # when `published` last grew
        self._frame_warned = False

    # --- start ------------------------------------------------------------------------------

    def start(self) -> None:
        opts = self.opts
        socks = daemon_sockets("producer", opts.control, opts.log_endpoint, opts.curve_dir)
        logs.setup_daemon_logging("producer", socks.logs, group=opts.group, curve=socks.logs_curve)
        if opts.curve_dir is not None and socks.control_curve is None and socks.logs_curve is None:
            log.warning("--curve-dir given but both sockets are ipc://; the keys are not used",
                        extra={"curve_dir": str(opts.curve_dir)})
        spec = FilterSpec.parse(opts.filter)  # FilterSpecError: a usage error, before anything
        base = PipelineConfig(filter=spec, clip_frames=opts.clip_frames)
        try:
            self._open_source()
            facts = self._facts()
        except SourceError as e:
            # The daemon still comes up (systemd keeps it; the stream may appear later).
            self._source_failed(e)
            facts = SourceFacts({}, tuple(opts.classes))
        self._store = GenerationStore(opts.state_dir or default_state_dir(), opts.ring)
        first = self._first_generation()
        self.gens = Generations(base, facts, opts.label, first=first)
        self._check_start_fits()
        self.ring = _open_ring(RingConfig(opts.ring, slots=opts.slots,
                                          slot_bytes=opts.slot_bytes, mode=opts.mode,
                                          group=opts.group, max_bytes=opts.max_ring_bytes),
                               opts.device)
        # Frames headed for GPU slots are decoded by NVDEC straight into GPU memory.
        self.video_device = "cuda" if self._ring_memory() == "gpu" else "cpu"
        self.pipeline = self._pipeline(base)
        self._persist(first)
        self.ring.set_generation(first)
        self.server = ControlServer(socks.control, self._commands(), group=opts.group,
                                    curve=socks.control_curve)
        if self.state == "starting":
            self.state = "running"
        self.notifier.ready(self._status_line())
        self._watchdog_every = notify.watchdog_interval()
        self._next_watchdog = time.monotonic()
        self._next_status = time.monotonic() + opts.status_interval
        if opts.label is None and not isinstance(self._source, DatasetReplay) \
                and not Path(opts.source).is_dir():
            # Said once, at start: a media/URL source has no class of its own (label -1). A
            # normal case (the trainer counts such samples and leaves them out of its loss),
            # but the operator should know how to label them.
            classes = tuple(opts.classes)
            how = (f"`mmctl label NAME` (NAME one of {', '.join(classes[:20])})" if classes else
                   "`mmctl label N` (a class index; start with --classes DATASET|LIST to use "
                   "class names)")
            log.info("source %s is unlabelled: its samples carry label -1 (unlabelled), which "
                     "the trainer counts and leaves out of its supervised loss; to label them, "
                     "start with --label NAME --classes DATASET|LIST, or run %s while it runs",
                     opts.source, how, extra={"source": opts.source, "label": None})
        stats = self.ring.stats()
        log.info("producer ready", extra={"ring": stats.name, "control": self.server.endpoint,
                                          "logs": logs.pub_endpoint(),
                                          "epoch": f"{stats.epoch:#x}", "source": opts.source})
        self._emit({"event": "ready", "ring": stats.name, "control": self.server.endpoint,
                    "logs": logs.pub_endpoint(),
                    "epoch": stats.epoch, "generation": first, "pid": os.getpid(),
                    "ring_memory": self._ring_memory()})

    def abort(self) -> None:
        """Undo a start() that failed half-way: nothing of ours is left behind."""
        if self.server is not None:
            self.server.close()
        if self.ring is not None:
            self.ring.close()
        logs.close_daemon_logging()

    def _commands(self) -> dict[str, Command]:
        return {
            "status": wire_command("status", self.on_status),
            "filter": wire_command("filter", self.on_filter),
            "sensor": wire_command("sensor", self.on_sensor),
            "method": wire_command("method", self.on_method),
            "segment": wire_command("segment", self.on_segment),
            "segment_clear": wire_command("segment_clear", self.on_segment_clear),
            "label": wire_command("label", self.on_label),
            "modalities": wire_command("modalities", self.on_modalities),
            "pause": wire_command("pause", self.on_pause),
            "resume": wire_command("resume", self.on_resume),
            "logs": logs.logs_command(),
        }

    def _facts(self) -> SourceFacts:
        stems = {k: set(v) for k, v in self._source.stems().items()} if self._source else {}
        if self._watch is not None:
            self._scan_watch()
            for k, v in self._watch.stems().items():
                stems.setdefault(k, set()).update(v)
        classes = tuple(self._source.classes) if self._source and self._source.classes \
            else tuple(self.opts.classes)
        return SourceFacts({k: frozenset(v) for k, v in stems.items()}, classes)

    def _first_generation(self) -> int:
        """One past the last generation this ring name had (NOTE [generations across
        restarts]); a damaged file is said and never trusted to go backwards."""
        last, problem = self._store.load()
        header = ring_header_generation(self.opts.ring) or 0
        first = max(last, header) + 1
        if problem:
            log.warning(f"{problem}; going on from generation {first} (one past the ring "
                        f"header's {header} where a ring was left, else 1), so numbers given "
                        f"out before this start may come again; the file is rewritten now",
                        extra={"file": str(self._store.path)})
        elif header > last:
            log.warning(f"generation file {self._store.path} says {last} but the ring left "
                        f"behind says {header}: going on from {first}",
                        extra={"file": str(self._store.path)})
        return first

    def _persist(self, generation: int) -> None:
        """Write `generation` to the state directory before any sample of it exists. A disk
        that refuses is said once per distinct error; the daemon goes on (only the promise
        across restarts is lost, and the log says so)."""
        try:
            self._store.save(generation)
            self._store_failed = None
        except OSError as e:
            said = f"{type(e).__name__}: {e.strerror or e}"
            if said != self._store_failed:
                self._store_failed = said
                log.warning(f"generation {generation} not saved to {self._store.path} ({said}): "
                            f"after a restart generation numbers may repeat; give a writable "
                            f"--state-dir (or $MMFEED_STATE_DIR)",
                            extra={"file": str(self._store.path)})

    def _open_source(self) -> None:
        self._source = open_source(self.opts.source, loop=self.opts.loop,
                                   splits=list(self.opts.splits) if self.opts.splits else None,
                                   timeouts=self.opts.timeouts)
        for p in self._source.problems:
            log.warning("sample left out of the replay: %s", p, extra={"file": p.path})

    # --- the loop ---------------------------------------------------------------------------

    def request_stop(self, *_: object) -> None:
        self._stop = True

    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def run(self) -> dict:
        """Serve until stopped; returns the exit summary."""
        try:
            while not self._stop:
                self._housekeeping()
                if self.paused:
                    self._while_paused()
                    continue
                if self.state == "finished":
                    self.server.poll(IDLE_POLL_MS)
                    continue
                if self._source is None or self.state == "source-error":
                    self._retry_source()
                    continue
                try:
                    self._step()
                except SourceError as e:
                    self._source_failed(e)
        finally:
            summary = self._shutdown()
        return summary

    def _housekeeping(self) -> None:
        now = time.monotonic()
        self.server.poll(0)
        self.ring.heartbeat()
        self._sample_rate(now)
        if self._watchdog_every is not None and now >= self._next_watchdog:
            self.notifier.watchdog()
            self._next_watchdog = now + self._watchdog_every
        self._heap.maybe(now)
        if now >= self._next_status:
            self._next_status = now + self.opts.status_interval
            line = self._status_line()
            self.notifier.status(line)
            extra = {"state": self._state_name(), "published": self.counters.published,
                     "samples_per_s": round(self._rate(), 2),
                     "generation": self.gens.current.number}
            if self._dropped_while_paused():
                extra["dropped_while_paused"] = self._dropped_while_paused()
            why = self._idle_reason()
            if why:
                extra["idle_reason"] = why
            log.info("status", extra=extra)

    def _while_paused(self) -> None:
        """Paused: answer control; a live reader keeps reading and dropping (NOTE [pausing a
        live source]), and its failure is reported now, not at resume."""
        reader = self._clip_reader
        if reader is not None and reader.error is not None and reader.done:
            self._drop_reader()
            self._source_failed(reader.error)
        self.server.poll(IDLE_POLL_MS)

    def _idle(self, seconds: float) -> None:
        """Wait up to `seconds` while answering control (the loop's only way to wait)."""
        self.server.poll(max(0, min(IDLE_POLL_MS, int(seconds * 1000))))

    # --- sources: one step -------------------------------------------------------------------

    def _step(self) -> None:
        if isinstance(self._source, DatasetReplay):
            self._step_dataset()
        else:
            self._step_media()

    def _step_dataset(self) -> None:
        src: DatasetReplay = self._source  # type: ignore[assignment]
        gen = self.gens.current
        if self._pending is None:
            item = self._backlog.popleft() if self._backlog else src.next()
            if item is None:
                self._finish()
                return
            self._pending = (item, None, gen.number)
        item, arrays, made_for = self._pending
        if not self._due(item.offset_s):
            return
        if arrays is None or made_for != gen.number:
            try:
                arrays = self.pipeline.process(item.sample, None)
            except InputError as e:
                self._pending = None
                src.check_alive()  # a vanished folder is the source's failure, not the sample's
                self._skip(item.sample.key, e)
                return
        self._pending = None
        seg = gen.config.segment
        ts = item.timestamp_ns + (int(seg[0] * 1e9) if seg else 0)
        self._publish(arrays, gen, item.sample.label, ts, item.sample.key, item.index)

    def _step_media(self) -> None:
        src: MediaSource = self._source  # type: ignore[assignment]
        reader = self._clip_reader
        gen = self.gens.current
        if reader is not None and reader.generation != gen.number:
            if src.path is not None and gen.config.segment != reader.segment:
                self._drop_reader()  # a file seeks to the new segment: the one change that reopens
                reader = None
            else:
                reader.switch(gen)  # from the next clip boundary on (NOTE in media_clips.py)
        if reader is None:
            start = gen.config.segment[0] if gen.config.segment else 0.0
            self._clip_reader = reader = _ClipReader(src, gen, start,
                                                     gen.config.audio.sample_rate)
        try:
            clip = reader.get(IDLE_POLL_MS / 1000)
        except SourceError:
            self._drop_reader()
            raise
        if clip is None:
            if reader.done:
                self._drop_reader()
                if reader.clips == 0:  # else a looping file would reopen it in a busy loop
                    raise SourceError(_no_clip(src, gen))
                if not src.loop:  # looping: the next step reopens at the start
                    self._finish()
            return
        if "audio" not in self.gens.facts.stems and src.has_audio():
            self.gens.facts = self._facts()  # a stream's audio is known once it is open
        made_for: Generation = clip.tag  # the generation in force at the clip's boundary
        if src.live and not self._frame_warned:
            self._warn_stream_frame(made_for)
        seg = made_for.config.segment
        if seg is not None and clip.start_s >= seg[1]:
            self._drop_reader()
            if not src.loop:
                self._finish()
            return
        arrays = self._live_arrays(clip, made_for)
        if arrays is None:
            return
        self._publish(arrays, made_for, UNLABELLED, clip.timestamp_ns,
                      f"{Path(src.url).name}@{clip.start_s:.2f}s", clip.index)

    def _live_arrays(self, clip: Clip, gen: Generation) -> dict[str, np.ndarray] | None:
        """The clip's video and audio (demuxed together, so a listen-once stream has both)
        plus whatever the pipeline makes of watched sensor files aligned by timestamp."""
        out: dict[str, np.ndarray] = {}
        cfg = gen.config
        if _on(cfg, "video"):
            out["video"] = clip.video
        if clip.audio is not None and _on(cfg, "audio"):
            # The clip's span, padded or cut to the configured length: the same shape and
            # meaning as the pipeline's `log_mel(file, segment=(start, end))`.
            samples = np.zeros(cfg.audio.n_samples, np.float32)
            n = min(clip.audio.size, samples.size)
            samples[:n] = clip.audio[:n]
            out["audio"] = audio.log_mel_from_samples(samples, cfg.audio)
        if self._watch is None:
            return out
        self._scan_watch()
        files = self._aligned_watch_files(clip)
        wanted = {n for n in files if _on(cfg, n)}
        if not wanted:
            return out
        sample = SampleFiles("live", "", UNLABELLED, self._watch.directory, files, {})
        config = cfg.with_changes(enabled=frozenset(wanted), segment=(clip.start_s, clip.end_s))
        try:
            out.update(self._pipeline(config).process(sample, None))
        except InputError as e:
            self._skip(f"clip@{clip.start_s:.2f}s", e)
            return None
        return out

    def _aligned_watch_files(self, clip: Clip) -> dict[str, Path]:
        from .align import align

        out = {}
        centre = np.array([clip.timestamp_ns / 1e9 + (clip.end_s - clip.start_s) / 2])
        for stem, times in self._watch.times.items():
            if times.size == 0:
                continue
            tol = max((clip.end_s - clip.start_s), 0.5)
            a = align(centre, times / 1e9, tol, stem)
            if a.index[0] >= 0:
                out[stem] = self._watch.paths[stem][a.index[0]]
            else:
                self._unaligned_clip(stem, clip, float(a.offset_s[0]), tol)
        return out

    def _unaligned_clip(self, stem: str, clip: Clip, offset_s: float, tol: float) -> None:
        """A clip goes without watched `stem` (no file near its time): counted per stem for
        `status`, said once per stem in the log (bounded by the stems the folder ever had,
        never per clip: a recorder that stopped would otherwise log every clip)."""
        first = stem not in self._unaligned
        self._unaligned[stem] = self._unaligned.get(stem, 0) + 1
        if first:
            log.warning(f"watched {stem} files are not aligned with the video: the clip at "
                        f"{clip.start_s:.2f}s has no {stem} file within {tol:g} s (nearest "
                        f"{offset_s:+.3f} s away); clips go without {stem} while no file is near "
                        f"them (counted in status unaligned.{stem}; said once)",
                        extra={"stem": stem, "offset_s": round(offset_s, 3), "tolerance_s": tol})

    def _due(self, offset_s: float) -> bool:
        """Recorded-speed pacing: True when the item is due, else wait a little (answering
        control) and return False so the loop comes back."""
        if self.opts.rate != "recorded":
            return True
        now = time.monotonic()
        if self._pace_origin is None:
            self._pace_origin = now - offset_s
        wait = self._pace_origin + offset_s - now
        if wait <= 0:
            return True
        self._idle(wait)
        return False

    # --- publishing ------------------------------------------------------------------------

    def _schema_for(self, arrays: Mapping[str, np.ndarray]) -> SampleSchema:
        # str(dtype): numpy arrays and (NVDEC video) torch CUDA tensors alike
        key = tuple((n, str(a.dtype), tuple(a.shape)) for n, a in arrays.items())
        schema = self._schemas.get(key)
        if schema is None:
            schema = SampleSchema(tuple(ModalitySpec.from_array(n, a) for n, a in arrays.items()))
            if len(self._schemas) > 256:
                self._schemas.clear()
            self._schemas[key] = schema
        return schema

    def _publish(self, arrays, gen: Generation, own_label: int, ts_ns: int, source: str,
                 index: int) -> None:
        schema = self._schema_for(arrays)
        self._last_published = schema
        said = (gen.number, schema.schema_id)
        if said not in self._schemas_logged:  # NOTE [schema log]
            self._schemas_logged[said] = None
            if len(self._schemas_logged) > SCHEMAS_LOGGED:
                self._schemas_logged.popitem(last=False)
            log.info("sample schema", extra={"generation": gen.number, "schema": repr(schema)})
        meta = SampleMeta(label=self.gens.label_index(gen, own_label), timestamp_ns=ts_ns,
                          generation=gen.number, source=source, index=index)
        while True:
            try:
                self.ring.publish(schema, meta, arrays, timeout=IDLE_POLL_MS / 1000)
                break
            except (RingTooLarge, RingDamaged) as e:
                # Beyond --max-ring-bytes (said once per schema by the ring keeper), or a
                # damaged ring that could not be replaced: counted, never a crash.
                c = self.counters
                c.skipped += 1
                c.last_error, c.last_error_at = f"{source}: {e}", time.time()
                return
            except RingFull:  # lossless and the slowest reader is behind: keep answering
                self._housekeeping()
                if self._stop:
                    return
        c = self.counters
        c.published += 1
        if c.retries:
            log.info("source recovered", extra={"after_retries": c.retries})
            c.retries = 0
            self._backoff = BACKOFF_START_S

    def _scan_watch(self) -> None:
        """Pick up new files in --watch; say once which ones cannot be used and why."""
        w = self._watch
        w.scan()
        if w.newly_ignored:
            names = w.newly_ignored
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            log.warning(f"watch folder {w.directory}: ignoring {shown}: no timestamp in the "
                        f"name (expected <stem>_<timestamp>.<ext>, e.g. lidar_top_1700000000.125.bin)",
                        extra={"ignored": names[:100]})

    def _skip(self, key: str, err: Exception) -> None:
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

    def _drop_reader(self) -> None:
        """Stop the clip reader, keeping the count of what it dropped while paused."""
        reader = self._clip_reader
        if reader is None:
            return
        self._clip_reader = None
        reader.stop()
        self.counters.dropped_while_paused += reader.dropped + (reader.drain() if reader.discard
                                                                else 0)

    def _dropped_while_paused(self) -> int:
        reader = self._clip_reader
        return self.counters.dropped_while_paused + (reader.dropped if reader else 0)

    def _warn_stream_frame(self, gen: Generation) -> None:
        """A stream's frame size is known once it is open: a --filter crop that does not fit
        (unknowable at start) is said once; `mmctl filter` changes are refused instead."""
        info = self._source.info
        if info is None:
            return
        self._frame_warned = True
        problem = gen.config.filter.frame_problem(info.width, info.height,
                                                  self._source.describe())
        if problem:
            log.warning(f"--filter {gen.config.filter}: {problem}; the crop is cut to the "
                        f"frame until `mmctl filter` sets one that fits")

    # --- source failures ---------------------------------------------------------------------

    def _source_failed(self, err: Exception) -> None:
        c = self.counters
        c.source_errors += 1
        c.last_error = str(err)
        c.last_error_at = time.time()
        self.state = "source-error"
        self._pending = None
        self._backlog.clear()
        self._drop_reader()
        self._retry_at = time.monotonic() + self._backoff
        log.warning("source failed; retrying", extra={"error": str(err),
                                                      "retry_in_s": round(self._backoff, 2),
                                                      "retries": c.retries})
        self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)

    def _retry_source(self) -> None:
        wait = self._retry_at - time.monotonic()
        if wait > 0:
            self._idle(wait)
            return
        self.counters.retries += 1
        try:
            if self._source is None or isinstance(self._source, DatasetReplay):
                self._open_source()
            else:
                self._source.check_alive()
            if self.gens is not None:
                self.gens.facts = self._facts()
            self._pace_origin = None
            self.state = "running"
            self._last_progress = time.monotonic()
        except SourceError as e:
            self._source_failed(e)

    # --- control handlers ----------------------------------------------------------------------

    def on_status(self) -> dict:
        stats = self.ring.stats()
        c = self.counters
        fill = min(stats.published, stats.slots) / stats.slots  # slots holding a sample
        info = self._source.probe() if isinstance(self._source, MediaSource) else None
        return {
            "state": self._state_name(),
            "idle_reason": self._idle_reason(),
            "generation": self.gens.current.number,
            "config": self.gens.current.summary(),
            "enabled": self.gens.enabled(),
            "source": self._source.describe() if self._source else self.opts.source,
            "published": c.published,
            "samples_per_s": round(self._rate(), 3),
            "skipped": c.skipped,
            "dropped_while_paused": self._dropped_while_paused(),
            "frame_size": [info.width, info.height] if info else None,
            "source_duration_s": round(info.duration_s, 3)
            if info and info.duration_s and not self._source.live else None,
            "source_errors": c.source_errors,
            "retries": c.retries,
            "last_error": c.last_error,
            "unaligned": dict(self._unaligned),
            "ring": stats.name,
            "mode": stats.mode,
            "epoch": stats.epoch,
            "ring_fill": round(fill, 3),
            # ring_sink.py NOTE [ring layouts]: the layout now in use and how it got there
            "slot_bytes": self.ring.slot_bytes,
            "ring_bytes": self.ring.total_bytes,
            "ring_relayouts": self.ring.relayouts,
            "ring_replaced": self.ring.replacements,
            "ring_refused": self.ring.refused,
            "readers": stats.readers,
            "dropped": stats.dropped,
            "heartbeat_age_s": round(stats.heartbeat_age_s, 3),
            "ring_memory": self._ring_memory(),
            "video_decode": "nvdec" if self.video_device == "cuda" else "cpu",
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.t_start, 1),
        }

    def _pipeline(self, config: PipelineConfig) -> Pipeline:
        return Pipeline(config, video_device=self.video_device)

    def _ring_memory(self) -> str:
        """"gpu" when samples go into CUDA IPC slots (the ring carries descriptors), else "host"."""
        return self.ring.memory

    def on_filter(self, spec: str) -> dict:
        return self._change(self.gens.propose_filter(spec))

    def on_sensor(self, input: str, stem: str) -> dict:  # noqa: A002 - the wire name
        self._refresh_facts()
        return self._change(self.gens.propose_sensor(input, stem))

    def on_method(self, input: str, name: str) -> dict:  # noqa: A002
        self._refresh_facts()
        return self._change(self.gens.propose_method(input, name))

    def on_segment(self, start: float, end: float) -> dict:
        src = self._source
        if isinstance(src, MediaSource) and src.live:
            raise BadArgument(
                f"segment {start:g}..{end:g}: refused, the source is a live stream "
                f"({src.url}): it has no timeline to cut a segment from, only the present. "
                f"A segment selects a span of a recording (a media file or a dataset replay). "
                f"On a stream, `mmctl pause`/`resume` skip time, and `mmctl filter fps=R` with "
                f"--clip-frames set how much time a sample covers")
        return self._change(self.gens.propose_segment(start, end))

    def on_segment_clear(self) -> dict:
        gen = self.gens.propose_segment_clear()
        if gen is None:  # idempotent: nothing to clear is not an error
            return {"generation": self.gens.current.number, "changed": False,
                    "segment": None}
        return self._change(gen)

    def on_label(self, name: str) -> dict:
        reply = self._change(self.gens.propose_label(name))
        if not self.gens.facts.classes and self.gens.current.label is not None:
            reply["note"] = (f"this source has no class list (--classes A,B,... or a dataset "
                             f"folder): label {name} is a class index that only the trainer "
                             f"can check")
        return reply

    def on_modalities(self, enable: list[str], disable: list[str]) -> dict:
        if not enable and not disable:
            return {"enabled": self.gens.enabled()}
        self._refresh_facts()
        return self._change(self.gens.propose_modalities(enable, disable))

    def _live(self) -> bool:
        return isinstance(self._source, MediaSource) and self._source.live

    def on_pause(self) -> dict:
        live = self._live()
        if not self.paused:
            self.paused = True
            self._paused_at = time.monotonic()
            reader = self._clip_reader
            if live and reader is not None:  # NOTE [pausing a live source]
                reader.discard = True
                self.counters.dropped_while_paused += reader.drain()
            log.info("paused", extra={"published": self.counters.published, "live": live})
        reply: dict[str, Any] = {"state": "paused"}
        if live:
            reply["note"] = ("live stream: what arrives while paused is dropped (status "
                             "dropped_while_paused); resume starts at the present")
        return reply

    def on_resume(self) -> dict:
        if not self.paused:
            if self.state == "finished":
                raise WrongState(f"resume: nothing is paused and the source has finished "
                                 f"({self._source.describe()}): there is nothing to resume. "
                                 f"A new segment or filter (`mmctl segment START END`, `mmctl "
                                 f"segment clear`, `mmctl filter SPEC`) replays it from its "
                                 f"start; start the producer with --loop to replay it forever")
            return {"state": self._state_name(), "was_paused": False}
        self.paused = False
        reader = self._clip_reader
        if reader is not None and reader.discard:
            # clips that slipped into the queue around the pause are stale too
            self.counters.dropped_while_paused += reader.drain()
            reader.discard = False
        if self._pace_origin is not None and self._paused_at is not None:
            self._pace_origin += time.monotonic() - self._paused_at
        self._last_progress = time.monotonic()  # idle_reason counts from here, not the pause
        log.info("resumed", extra={"published": self.counters.published,
                                   "state": self.state})
        reply: dict[str, Any] = {"state": self._state_name(), "was_paused": True}
        if self.state != "running":
            reply["idle_reason"] = self._idle_reason()
        return reply

    def _refresh_facts(self) -> None:
        if self._watch is not None and self._source is not None:
            self.gens.facts = self._facts()

    def _change(self, gen: Generation) -> dict:
        """Check a proposed generation against the source, prove it on a real sample, then
        commit it (NOTE [proving a change]). BadArgument leaves everything as it was. On a
        finished recording the new generation replays it (NOTE [no dead ends])."""
        finished = self.state == "finished"
        if finished and isinstance(self._source, DatasetReplay):
            self._source.rewind()  # the proof needs a sample: a new pass, from the start
            self._pending = None
            self._backlog.clear()
        self._check_fits(gen, gen.reason)
        proof = self._prove(gen)
        self.gens.commit(gen)
        self._persist(gen.number)
        self.pipeline = self._pipeline(gen.config)
        self.ring.set_generation(gen.number)
        if proof is not None:
            self._pending = (proof[0], proof[1], gen.number)
        if finished:
            self.state = "running"
            self._pace_origin = None
            self._last_progress = time.monotonic()
            log.info("replaying the finished source", extra={"generation": gen.number})
        log.info("new generation", extra={"generation": gen.number, "change": gen.reason})
        self.notifier.status(self._status_line())
        return {"generation": gen.number}

    def _check_start_fits(self) -> None:
        """--filter/--clip-frames against the source, before anything is created: a crop
        larger than a file's frames or a clip longer than the file fails the start (exit 1)
        naming the frame size or the duration."""
        src, gen = self._source, self.gens.current
        what = f"--filter {gen.config.filter} --clip-frames {gen.config.clip_frames}"
        if isinstance(src, MediaSource):
            self._check_fits(gen, what)
        elif isinstance(src, DatasetReplay) and src.peek() is not None:
            problem = self._frame_problem(src.peek(), gen.config)
            if problem:
                raise BadArgument(f"{what}: {problem}")

    def _check_fits(self, gen: Generation, what: str) -> None:
        """Refuse what this source cannot give (NOTE [proving a change]): a crop that does
        not fit the frame, a segment past a file's end, a clip longer than what the file
        holds from its start. A stream not yet opened is checked once it is."""
        src, cfg = self._source, gen.config
        if not isinstance(src, MediaSource):
            return
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

    def _frame_problem(self, sample: SampleFiles, cfg: PipelineConfig) -> str | None:
        """A crop that does not fit the frames of the video feeding `sample` (probed)."""
        if cfg.filter.crop is None or not _on(cfg, "video"):
            return None
        sensor = Pipeline(cfg).sensor_for(sample, "video")
        path = sample.files.get(sensor) if sensor is not None else None
        size = _frame_size(path) if path is not None else None
        if size is None:
            return None
        return cfg.filter.frame_problem(*size, f"{path.name} in sample {sample.key}")

    def _prove(self, gen: Generation):
        src = self._source
        if isinstance(src, DatasetReplay) and self.state in ("running", "finished"):
            trial = self._pipeline(gen.config)
            # Samples only the new config cannot make (a bad video.mp4 when video is turned
            # back on): its fault or theirs? Another sample decides; if none can be made the
            # change is refused and every sample tried goes back (the position is kept).
            doubtful: list[tuple[Any, InputError]] = []
            item = None

            def refuse(message: str):
                taken = [i for i, _ in doubtful] + ([item] if item is not None else [])
                self._backlog.extendleft(reversed(taken))
                raise BadArgument(message)

            for _ in range(_PROOF_TRIES):
                item = self._take_item()
                if item is None:
                    break
                problem = self._frame_problem(item.sample, gen.config)
                if problem:
                    refuse(f"{gen.reason}: refused, {problem}")
                try:
                    arrays = trial.process(item.sample, None)
                except InputError as e:
                    try:  # the sample's fault or the change's?
                        self.pipeline.process(item.sample, None)
                    except InputError:
                        self._skip(item.sample.key, e)
                        item = None
                        continue
                    doubtful.append((item, e))
                    item = None
                    continue
                need = self._schema_for(arrays).payload_nbytes
                try:
                    self._check_ring_fits(gen, need)
                except BadArgument as e:
                    refuse(str(e))
                for bad, err in doubtful:  # bad under the new config: skipped as it would be
                    self._skip(bad.sample.key, err)
                return item, arrays
            if doubtful:
                bad, err = doubtful[0]
                more = f" (nor {len(doubtful) - 1} more tried)" if len(doubtful) > 1 else ""
                refuse(f"{gen.reason}: refused, it cannot make sample {bad.sample.key}{more}: "
                       f"{err}")
            return None
        if isinstance(src, MediaSource) and src.path is not None and _on(gen.config, "video"):
            need = _media_payload_estimate(src, gen, self._last_schema())
            if need is not None:
                self._check_ring_fits(gen, need)
        return None

    def _take_item(self):
        """The next dataset item: the one waiting, else one given back, else the source's."""
        if self._pending is not None:
            item, self._pending = self._pending[0], None
            return item
        return self._backlog.popleft() if self._backlog else self._source.next()

    def _check_ring_fits(self, gen: Generation, need: int) -> None:
        """A change whose samples no ring layout within --max-ring-bytes holds is refused
        (a bigger one that fits moves the ring when its first sample comes)."""
        try:
            self.ring.check_fits(need, f"samples of {need} bytes")
        except RingTooLarge as e:
            raise BadArgument(f"{gen.reason}: refused, {e}") from None

    def _last_schema(self) -> SampleSchema | None:
        return self._last_published

    # --- status and shutdown -----------------------------------------------------------------

    def _sample_rate(self, now: float) -> None:
        if self.counters.published != self._last_count:
            self._last_count, self._last_progress = self.counters.published, now
        q = self._rates
        if not q or now - q[-1][0] >= 0.25:
            q.append((now, self.counters.published))
            while len(q) > 2 and now - q[0][0] > RATE_WINDOW_S:
                q.popleft()

    def _rate(self) -> float:
        """Samples/s over the last RATE_WINDOW_S seconds."""
        now = time.monotonic()
        if not self._rates:
            return 0.0
        t0, n0 = self._rates[0]
        return (self.counters.published - n0) / (now - t0) if now - t0 > 1e-3 else 0.0

    def _state_name(self) -> str:
        return "paused" if self.paused else self.state

    def _idle_reason(self) -> str | None:
        """Why nothing is being published, in words, or None while samples flow: status
        must never say "running" over a daemon that publishes nothing without saying why."""
        src, now = self._source, time.monotonic()
        if self.paused:
            if self._live():
                return ("paused (mmctl pause): the stream is still read and what arrives is "
                        "dropped (dropped_while_paused); mmctl resume starts at the present")
            return "paused (mmctl pause): the source keeps its position; mmctl resume goes on"
        if self.state == "finished":
            return (f"the source has finished ({src.describe() if src else self.opts.source}, "
                    f"no --loop): a new segment or filter replays it from its start")
        if self.state == "source-error":
            return (f"the source failed ({self.counters.last_error}); retrying in "
                    f"{max(0.0, self._retry_at - now):.1f} s")
        idle = now - self._last_progress
        if self.state != "running" or idle < IDLE_AFTER_S:
            return None
        cfg = self.gens.current.config
        if isinstance(src, MediaSource):
            info = src.info
            rate = cfg.filter.fps or (info.rate if info else None)
            span = cfg.clip_frames / rate if rate else None
            if span is not None and span >= idle / 2:
                return (f"each sample is a clip of {cfg.clip_frames} frames at {rate:g} "
                        f"frames/s: one every {span:.1f} s; the last was {idle:.0f} s ago")
            if src.live:
                return (f"no sample for {idle:.0f} s: nothing decodable arrives from "
                        f"{src.url} (it fails after the read timeout, "
                        f"{self.opts.timeouts[1]:g} s, and is then retried)")
        if self._pending is not None and self._pace_origin is not None:
            due = self._pace_origin + self._pending[0].offset_s - now
            if due > 0:
                return (f"replaying at recorded speed: the next sample is due in {due:.1f} s "
                        f"(--rate max replays as fast as the ring takes)")
        if self.opts.mode == "lossless":
            return (f"no sample for {idle:.0f} s: a lossless ring waits for its slowest "
                    f"reader; ring_fill and readers say who")
        c = self.counters
        if c.last_error_at is not None and time.time() - c.last_error_at < idle:
            return (f"no sample for {idle:.0f} s; {c.skipped} bad samples skipped so far, the "
                    f"last: {c.last_error}")
        return f"no sample for {idle:.0f} s"

    def _status_line(self) -> str:
        g = self.gens.current.number if self.gens else 0
        return (f"{self._state_name()}: generation {g}, "
                f"{self.counters.published} samples published, {self.counters.skipped} skipped")

    def _emit(self, obj: dict) -> None:
        if self.json_lines:
            print(json.dumps(obj), file=self.out, flush=True)

    def _shutdown(self) -> dict:
        self.notifier.stopping()
        if self._clip_reader is not None:
            self._clip_reader.stop()
        stats = self.ring.stats() if self.ring is not None else None
        summary = {"event": "exit", "published": self.counters.published,
                   "skipped": self.counters.skipped,
                   "source_errors": self.counters.source_errors,
                   "generation": self.gens.current.number if self.gens else 0,
                   "ring": stats.name if stats else self.opts.ring,
                   "epoch": stats.epoch if stats else None,
                   "uptime_s": round(time.monotonic() - self.t_start, 3)}
        log.info("producer stopping", extra={k: v for k, v in summary.items() if k != "event"})
        if self.server is not None:
            self.server.close()
        if self.ring is not None:
            self.ring.close()
        self.notifier.close()
        logs.close_daemon_logging()
        self._emit(summary)
        return summary


def _open_ring(config: RingConfig, device: str) -> RingSink:
    """The ring for `--device`, kept by a RingSink (grown and replaced as needed,
    ring_sink.py): "cpu" is the host ring exactly as before (torch's CUDA state is never
    touched); "auto"/"cuda" go through producer.gpu_slot_writer.open_writer, which puts frames in
    GPU slots when CUDA is there and otherwise logs once that they go through host memory."""
    if device == "cpu":
        return RingSink(config, RingWriter.create)
    if device not in ("auto", "cuda"):
        raise BadArgument(f"device {device!r}: expected 'cpu', 'auto' or 'cuda'")
    from .gpu_slot_writer import open_writer

    return RingSink(config, lambda cfg: open_writer(cfg, gpu=device))


def _on(config: PipelineConfig, name: str) -> bool:
    return config.enabled is None or name in config.enabled


def _frame_size(path: Path) -> tuple[int, int] | None:
    """(width, height) of a video file's first video stream, or None when it cannot be read
    (the proof then says what is wrong with the file)."""
    from .modalities import video

    try:
        with video.open_container(path) as c:
            cc = video.first_video_stream(c, path).codec_context
            return int(cc.width), int(cc.height)
    except InputError:
        return None


def _no_clip(src: MediaSource, gen: Generation) -> str:
    cfg = gen.config
    seg = f" from {cfg.segment[0]:g} s" if cfg.segment else ""
    return (f"{src.describe()}: not one whole clip of {cfg.clip_frames} frames"
            f"{f' at fps={cfg.filter.fps:g}' if cfg.filter.fps else ''} in it{seg}; "
            f"fewer --clip-frames, a higher fps or an earlier segment would make samples")


def _media_payload_estimate(src: MediaSource, gen: Generation,
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


class _ClipReader:
    """Decodes clips on a thread (NOTE [one thread]): a network read that blocks for seconds
    must not keep the main loop from answering control. One reader lives as long as its
    open of the source; `switch(gen)` changes the clips it makes from the next clip boundary
    on, without reopening (a listen-once stream cannot be opened again)."""

    def __init__(self, source: MediaSource, gen: Generation, start_s: float, audio_rate: int):
        self.segment = gen.config.segment
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
            for clip in source.clips(self._settings.spec, self._settings.frames, start,
                                     audio_rate=audio_rate, settings=lambda: self._settings):
                self.clips += 1
                if self.discard:
                    self.dropped += 1
                    if self._stop.is_set():
                        return
                    continue
                while not self._stop.is_set():
                    try:
                        self._q.put(clip, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
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
