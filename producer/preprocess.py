"""`mm-producer preprocess`: a dataset folder -> the disk cache, through THE pipeline.

    mm-producer preprocess DATASET --cache DIR [--split S]... [--workers N] [--json]
                           [--filter SPEC] [--clip-frames N] [--segment START END]
                           [--sensor INPUT STEM]... [--method INPUT NAME]...
                           [--read-limit KIND=SIZE]... [--video-store raw|h264|hevc|nv12]
                           [--group NAME] [--quiet]
                           [--ray [ADDRESS]]   (the chunks as Ray tasks: ray_preprocess.py)

How a run goes, and why:
1. Index the folder (producer/dataset.py). Index problems (empty folder, unreadable file, bad
   metadata.json) are rejections, not crashes.
2. Open one CacheWriter. For each sample, `keep_if_unchanged(key, fingerprint)`: same files
   (names, sizes, mtimes, metadata.json included), same `config_hash()`, same classes -> its
   records are copied over without decoding. Only the rest go to the workers.
3. Worker processes (ProcessPoolExecutor, forked from a forkserver started at the very
   beginning so its imports overlap the indexing) each build the Pipeline once and take
   chunks of up to 8 samples per task. Each sample's payload is packed by `SampleSchema.pack`
   and appended to the chunk's scratch file in TMPDIR; only offsets, schema encodings and
   notes travel back through the pool (or an InputError as a dict). The parent writes the
   payloads into the shard from a memory map of that file, in dataset order, so a re-run
   makes the same cache layout; at most 2 chunks per worker are in flight (bounded memory).
   A worker that dies hard (segfault in FFmpeg, os._exit, OOM kill) breaks the pool: the
   chunks in flight are re-run one sample at a time in fresh processes, the sample whose
   process dies is rejected (field "worker", found "worker exited with signal N"), and a new
   pool goes on with the rest (preprocess_workers.py). `workers=0` (API only) runs in the caller's
   process, without that isolation (profiling, debugging).
4. `commit()` switches CURRENT atomically; an interrupted run leaves the previous version.
   A run killed outright leaves its scratch folder in TMPDIR; the next run removes the
   folders of runs that are gone (`sweep_scratch`, noted in the report). Cache files are
   0600 (0640 with --group / $MMFEED_GROUP), whatever the umask.

Exit status (docs/architecture.md, "Contracts"): 0 every sample cached, 3 some rejected and the rest cached, 2 usage
error (missing dataset folder, no split folders, bad --filter). With --json the last stdout
line is the summary object; the human report then goes to stderr.
"""
from __future__ import annotations

import contextlib
import json
import mmap
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, TextIO

import click

from protocol import leftovers
from protocol.errors import CacheError, FilterSpecError, InputError
from protocol.filemodes import GROUP_ENV, GroupError, group_id
from protocol.filters import FilterSpec
from protocol.names import escape_name, printable
from protocol.schema import SampleSchema
from protocol.video_store import STORES

from .cache_writer import CacheWriter, fingerprint_files
from .dataset import SPLITS, DatasetIndex, SampleFiles, index_dataset
from .modalities._limits import ReadLimits
from .video_route import preprocess_route
from .worker_shard import PlacedRecord
from .pipeline import (METHODS, Pipeline, PipelineConfig, missing_inputs, sample_meta,
                       union_inputs)
from .preprocess_workers import (Item, Result, WorkerRuns, process_packed,
                                 start_worker_server)

# --- progress --------------------------------------------------------------------------------


class Progress:
    """Counts, rate and ETA on stderr: a redrawn bar on a terminal, a line every `every_s`
    seconds otherwise (logs and CI keep a trace without a wall of carriage returns)."""

    def __init__(self, total: int, stream: TextIO = sys.stderr, *, enabled: bool = True,
                 every_s: float = 2.0, clock: Callable[[], float] = time.monotonic):
        self.total, self.stream, self.enabled = total, stream, enabled
        self.tty = enabled and hasattr(stream, "isatty") and stream.isatty()
        self.every_s, self.clock = every_s, clock
        self.t0 = self.last = clock()
        self.done = self.rejected = 0

    def line(self) -> str:
        el = max(self.clock() - self.t0, 1e-9)
        rate = self.done / el
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        frac = self.done / self.total if self.total else 1.0
        bar = "#" * int(frac * 24) + "-" * (24 - int(frac * 24))
        eta_s = f"{eta:4.0f}s" if eta != float("inf") else "   ?"
        return (f"preprocess [{bar}] {self.done}/{self.total} {rate:6.1f} samples/s "
                f"ETA {eta_s} rejected {self.rejected}")

    def advance(self, n: int = 1, rejected: int = 0) -> None:
        self.done += n
        self.rejected += rejected
        if not self.enabled:
            return
        now = self.clock()
        if self.tty:
            if now - self.last >= 0.1 or self.done == self.total:
                self.stream.write("\r" + self.line())
                self.stream.flush()
                self.last = now
        elif now - self.last >= self.every_s:
            self.stream.write(self.line() + "\n")
            self.stream.flush()
            self.last = now

    def finish(self) -> None:
        if self.enabled:
            self.stream.write(("\r" if self.tty else "") + self.line() + "\n")
            self.stream.flush()


# --- the run ---------------------------------------------------------------------------------


def _rejection(err: InputError | dict, key: str | None) -> dict:
    """One report entry; every text printable (InputError escapes names already)."""
    d = err.to_dict() if isinstance(err, InputError) else dict(err)
    out = {"sample": key, "file": d.get("file"), "field": d.get("field"),
           "expected": d.get("expected"), "found": d.get("found"), "message": d.get("message")}
    return {k: printable(v) if isinstance(v, str) else v for k, v in out.items()}


def _key_of(problem: InputError, root: Path) -> str | None:
    """train/circle/0003 for a problem path inside a sample folder, else None.

    Lexical (abspath), never resolve(): the problem may be a symlink loop, which resolve()
    raises on (a `video.mp4 -> video.mp4` link stopped the whole run that way); the index
    built the path from `root`, so the text is enough. Names are escaped like the keys."""
    try:
        parts = Path(os.path.abspath(problem.path)).relative_to(os.path.abspath(root)).parts
    except ValueError:
        return None
    return "/".join(escape_name(p) for p in parts[:3]) if len(parts) >= 3 else None


#: Set to 1 to have workers hand records back through scratch files for the parent to copy
#: into its shard (the path before producer/worker_shard.py): what bench/preprocess.py
#: compares against. Not a setting: the default writes each record once.
PARENT_COPY_ENV = "MMFEED_PREPROCESS_PARENT_COPY"

#: Each run's scratch folder in $TMPDIR: `mmfeed-preprocess-<pid>-<random>/`.
SCRATCH_PREFIX = "mmfeed-preprocess-"
_SCRATCH = re.compile(rf"^{SCRATCH_PREFIX}(\d+)-")


def sweep_scratch() -> list[str]:
    """Remove the scratch folders of earlier runs that were killed (SIGKILL, OOM: their
    `finally` never ran) and return a note for each; a live run's folder is kept
    (protocol/leftovers.py). The cache's own leftovers (an uncommitted version, CURRENT.tmp)
    are removed by the CacheWriter under its lock."""
    removed, _ = leftovers.sweep(tempfile.gettempdir(), _SCRATCH)
    return [f"removed {r.path} ({r.nbytes} bytes): scratch space of an earlier preprocess run "
            f"(pid {r.pid}) that was killed" for r in removed]


RECORD_PREFIX = "record/"  # keys of live parts `mmctl record` appended (producer/recorder.py)


def carry_recorded_parts(w: CacheWriter, classes: list[str], notes: list[str]) -> None:
    """Keep what `mmctl record` appended: no dataset sample makes those keys, so without this a
    re-run would drop recorded live data. Labels follow their class names when the class list
    changed (a class that is gone: unlabelled, said in the notes)."""
    before = w.previous_classes
    if before is None:
        return
    relabel = None
    if before != list(classes):
        relabel = {i: classes.index(c) for i, c in enumerate(before) if c in classes}
        gone = [c for c in before if c not in classes]
        if gone:
            notes.append(f"recorded live parts: class(es) {', '.join(gone)} are no longer in the "
                         f"dataset; their recorded samples are kept unlabelled")
    for key in w.previous_keys():
        if key.startswith(RECORD_PREFIX):
            w.carry_over(key, labels=relabel)


def run_preprocess(dataset: str | Path, cache: str | Path, config: PipelineConfig, *,
                   splits: list[str] | None = None, workers: int = 1,
                   progress: bool = True, index: DatasetIndex | None = None,
                   group: str | None = None, ray: str | None = None,
                   device: str = "cpu") -> dict:
    """Index, process and commit; returns the summary dict (what --json prints). The cache's
    files are 0600 (0640 and group `group` with one; protocol/filemodes.py).

    `ray`: None runs the chunks on the local process pool (`workers`); a string runs them as
    Ray tasks (producer/ray_preprocess.py) on the cluster at that address ("" = the default:
    RAY_ADDRESS, a cluster running on this machine, else a new local one). Everything else,
    and so the cache, is the same.

    `device`: "cuda" decodes video with NVDEC in the workers (frames converted on the GPU, then
    copied to the host for the cache); without a CUDA GPU it says why and decodes on the CPU.
    The summary's `video_decode`/`video_filters` say what ran (video_route.py)."""
    t0 = time.perf_counter()
    route = preprocess_route(device, config, ray=ray is not None)
    video_device = "cuda" if route.decoder == "nvdec" else "cpu"
    if workers > 0 and ray is None:
        start_worker_server()  # its imports overlap the indexing and fingerprinting below
    root = Path(dataset)
    if index is None:
        index = index_dataset(root, splits)
    pipeline = Pipeline(config)
    rejected = [_rejection(p, _key_of(p, root)) for p in index.problems]
    notes: list[str] = list(index.notes)
    expected = union_inputs(pipeline, index.samples)
    bar = Progress(len(index.samples) + len(index.problems), enabled=progress)
    bar.advance(len(index.problems), rejected=len(index.problems))
    reused = 0
    pool_restarts = 0
    notes.extend(sweep_scratch())
    ray_summary = None
    with CacheWriter(cache, classes=index.classes, config_hash=config.config_hash(),
                     group=group, store_settings=config.video_store.to_dict()) as w:
        todo: list[tuple[int, SampleFiles, str]] = []
        for i, s in enumerate(index.samples):
            gone = missing_inputs(pipeline, s, expected)
            if gone:
                notes.append(f"{s.key}: no {', '.join(gone)} (other samples have it); cached "
                             f"without it, the model zero-fills missing inputs")
            try:
                fp = fingerprint_files(s.all_paths)
            except OSError as e:
                rejected.append(_rejection(InputError(e.filename or s.dir, "file",
                                                      "a readable file", e.strerror), s.key))
                bar.advance(rejected=1)
                continue
            if w.keep_if_unchanged(s.key, fp):
                reused += 1
                bar.advance()
            else:
                todo.append((i, s, fp))

        schemas: dict[bytes, SampleSchema] = {}  # encoding -> schema: a dataset has a few

        def schema_from(enc: bytes) -> SampleSchema:
            """The workers send each sample's schema encoded (JSON); decoding it per sample
            cost the parent 0.27 ms a sample (pyinstrument, 480 samples), in a loop that
            must stay free of per-sample JSON. A new encoding is decoded once."""
            got = schemas.get(enc)
            if got is None:
                if len(schemas) >= 256:  # bounded: an unknown sensor whose shape never repeats
                    schemas.clear()
                got = schemas[enc] = SampleSchema.decode(enc)
            return got

        def store(item: Item, result: Result, scratch: mmap.mmap | None = None) -> None:
            i, s, fp = item
            enc, payload, sample_notes = result
            notes.extend(f"{s.key}: {n}" for n in sample_notes)
            if enc is None:
                rejected.append(_rejection(payload, s.key))
                bar.advance(rejected=1)
                return
            if isinstance(payload, PlacedRecord):  # the worker wrote it into a shard itself
                w.add_placed(s.key, fp, s.split, schema_from(enc), sample_meta(s, index=i),
                             payload)
                bar.advance()
                return
            if isinstance(payload, tuple):  # (offset, nbytes) in the chunk's scratch file
                payload = memoryview(scratch)[payload[0]:payload[0] + payload[1]]
            try:
                w.add(s.key, fp, s.split, schema_from(enc), sample_meta(s, index=i),
                      payload=payload)
            finally:
                if isinstance(payload, memoryview):
                    payload.release()  # or the scratch map cannot be closed
            bar.advance()

        def reject_crash(item: Item, found: str) -> None:
            s = item[1]
            rejected.append(_rejection(InputError(
                s.dir, "worker", "a sample the pipeline can process without crashing", found),
                s.key))
            bar.advance(rejected=1)

        if ray is not None and todo:  # the same chunks as Ray tasks; scratch on the cache's FS
            from .ray_preprocess import RayRuns, scratch_dir_in

            scratch_dir = scratch_dir_in(cache)
            # Ray's driver prints the cluster's messages ("a worker died ...") on stdout, where
            # --json promises our summary: they go to stderr, with the other diagnostics.
            with contextlib.redirect_stdout(sys.stderr):
                runs = None
                try:
                    runs = RayRuns(config, ray or None, scratch_dir, store, reject_crash)
                    runs.run(todo)
                    pool_restarts, ray_summary = runs.pool_restarts, runs.summary()
                finally:
                    if runs is not None:
                        runs.close()
                    shutil.rmtree(scratch_dir, ignore_errors=True)
        elif workers <= 0:  # in this process: no isolation (profiling, debugging)
            here = Pipeline(config, video_device=video_device)
            for item in todo:
                store(item, process_packed(item[1], here))
        elif todo:
            scratch_dir = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-"))
            try:
                runs = WorkerRuns(config, workers, scratch_dir, store, reject_crash)
                runs.video_device = video_device
                if os.environ.get(PARENT_COPY_ENV, "") in ("", "0"):
                    runs.shard_target = w.worker_target  # workers write the shards themselves
                runs.run(todo)
                pool_restarts = runs.pool_restarts
            finally:
                shutil.rmtree(scratch_dir, ignore_errors=True)
        carry_recorded_parts(w, index.classes, notes)
        w.note_generation(0, {**config.to_dict(), "reason": "mm-producer preprocess"})
        summary = w.commit()
    bar.finish()
    seconds = time.perf_counter() - t0
    processed = summary.written
    return {
        "cached": summary.records,
        "reused": reused,
        "processed": processed,
        "rejected": rejected,
        "notes": [printable(n) for n in notes],  # file names in notes may not be UTF-8
        "classes": index.classes,
        "splits": summary.counts,
        "cache": str(summary.directory),
        "version": summary.version,
        "config_hash": config.config_hash(),
        "video_store": config.video_store.store,
        "stores": summary.stores,  # records per video store (a record too noisy to compress: raw)
        "cache_bytes": summary.bytes_written,
        "seconds": round(seconds, 3),
        "samples_per_s": round((processed + reused) / seconds, 2) if seconds > 0 else None,
        "processed_per_s": round(processed / seconds, 2) if seconds > 0 else None,
        "pool_restarts": pool_restarts,
        **route.status(),
        **({"ray": ray_summary} if ray_summary is not None else {}),
    }


def format_report(summary: dict) -> str:
    """The human report: totals, then every rejected sample and every note."""
    lines = [f"cached {summary['cached']} samples ({summary['reused']} reused, "
             f"{summary['processed']} processed) in {summary['seconds']:.1f} s "
             f"-> {summary['cache']} (version {summary['version']}); classes: "
             f"{', '.join(summary['classes'])}"]
    if summary.get("video_store", "raw") != "raw":
        lines.append(f"video store {summary['video_store']}: "
                     + ", ".join(f"{n} {k}" for k, n in summary.get("stores", {}).items())
                     + f" records, {summary.get('cache_bytes', 0)} bytes")
    if summary["rejected"]:
        lines.append(f"rejected {len(summary['rejected'])} sample(s):")
        for r in summary["rejected"]:
            lines.append(f"  {r['sample'] or '-'}: {r['message']}")
    if summary["notes"]:
        lines.append(f"notes ({len(summary['notes'])}):")
        lines.extend(f"  {n}" for n in summary["notes"])
    return "\n".join(lines)


def _parse_filter(ctx, param, value: str | None) -> FilterSpec | None:
    if value is None:
        return None
    try:
        return FilterSpec.parse(value)
    except FilterSpecError as e:
        raise click.BadParameter(str(e)) from None


@click.command("preprocess")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--cache", "cache", required=True, type=click.Path(path_type=Path),
              help="Cache directory (created; a new version is committed atomically).")
@click.option("--split", "splits", multiple=True, type=click.Choice(SPLITS),
              help="Only these splits (repeatable); default: all present.")
@click.option("--workers", type=click.IntRange(min=1), default=lambda: os.cpu_count() or 1,
              show_default="all cores", help="Worker processes.")
@click.option("--json", "as_json", is_flag=True, help="Last stdout line: a JSON summary.")
@click.option("--filter", "filter_spec", callback=_parse_filter, metavar="SPEC",
              help="Video filter spec, e.g. 'resize=112x112,gray' (as `mmctl filter`).")
@click.option("--clip-frames", type=click.IntRange(min=1), default=8, show_default=True,
              help="Frames per video clip.")
@click.option("--segment", type=float, nargs=2, default=None, metavar="START END",
              help="Time segment (seconds) taken from each recording.")
@click.option("--sensor", "sensors", type=(str, str), multiple=True, metavar="INPUT STEM",
              help="Which file feeds an input, e.g. --sensor lidar lidar_front.")
@click.option("--method", "methods", type=(str, str), multiple=True, metavar="INPUT NAME",
              help=f"Processing method, e.g. --method radar points_bev "
                   f"({', '.join(METHODS['radar'])}).")
@click.option("--read-limit", "read_limits", multiple=True, metavar="KIND=SIZE",
              help="Largest lidar, radar or unknown-sensor file read (e.g. lidar=1G; "
                   "defaults lidar=256M radar=64M unknown=64M, or $MMFEED_READ_LIMITS); a "
                   "larger file is a rejected sample. See docs/dataset.md.")
@click.option("--video-store", type=click.Choice(STORES), default="raw", show_default=True,
              help="How the cache holds video: raw uint8 RGB, H.264 or HEVC (a closed GOP per "
                   "clip, decoded by the trainer's loader threads), or NV12 planes (1.5 B/pixel, "
                   "converted to RGB on the trainer's device). See docs/dataset.md.")
@click.option("--group", default=None, envvar=GROUP_ENV, metavar="NAME",
              help=f"Group that may read the cache: files 0640 and directories 0750 of that "
                   f"group (default ${GROUP_ENV}; without it 0600 and 0700).")
@click.option("--quiet", is_flag=True, help="No progress output.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="cuda: decode video with NVDEC in the workers (CPU fallback, logged, "
                   "without a CUDA GPU); the summary says what ran (video_decode).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None,
              metavar="[ADDRESS]",
              help="Run the pipeline as Ray tasks on the cluster at ADDRESS (HOST:PORT; alone: "
                   "RAY_ADDRESS, else a cluster on this machine, else a new local one). Dataset "
                   "and cache on a file system every node mounts at the same path. Needs "
                   "`pip install 'mmfeed[ray]'`.")
def preprocess(dataset: Path, cache: Path, splits: tuple[str, ...], workers: int,
               as_json: bool, filter_spec: FilterSpec | None, clip_frames: int,
               segment: tuple[float, float] | None, sensors, methods, read_limits,
               video_store: str, group: str | None, quiet: bool, ray_address: str | None,
               device: str = "cpu") -> None:
    """Preprocess DATASET (dataset/{train,val,test}/<class>/<sample>/) into the disk cache.

    Re-running only redoes samples whose files (or the settings) changed. Exit status: 0 all
    cached, 3 some samples rejected (each reported with file, field and what was expected)
    and the rest cached, 2 usage error.
    """
    try:
        group_id(group)
    except GroupError as e:
        raise click.BadParameter(str(e), param_hint="--group") from None
    if ray_address is not None:
        from .ray_preprocess import RayUnavailable, import_ray

        try:  # before any work: without Ray, say how to install it (exit 2)
            import_ray()
        except RayUnavailable as e:
            raise click.UsageError(str(e)) from None
    else:
        start_worker_server()  # imports in the background while the dataset is indexed
    index = index_dataset(dataset, list(splits) or None)
    if not index.splits and index.problems and index.problems[0].field == "splits":
        raise click.UsageError(f"{dataset}: no split folders ({', '.join(SPLITS)}); expected "
                               "DATASET/<split>/<class>/<sample>/ files")
    try:
        limits = ReadLimits.from_env()
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    try:
        limits = limits.with_settings(",".join(read_limits))
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--read-limit") from None
    try:
        config = PipelineConfig(filter=filter_spec or FilterSpec(), clip_frames=clip_frames,
                                segment=segment, sensors=dict(sensors), methods=dict(methods),
                                read_limits=limits, video_store=video_store)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    from .ray_preprocess import RayRunError

    try:
        summary = run_preprocess(dataset, cache, config, workers=workers, progress=not quiet,
                                 index=index, group=group, ray=ray_address, device=device)
    except (CacheError, GroupError) as e:  # CacheLocked: another preprocess writes it
        raise click.ClickException(str(e)) from None
    except RayRunError as e:  # the cluster cannot run it (unreachable, no shared FS): exit 1
        raise click.ClickException(str(e)) from None
    report = format_report(summary)
    if as_json:
        click.echo(report, err=True)
        click.echo(json.dumps(summary, separators=(",", ":")))
    else:
        click.echo(report)
    if summary["rejected"]:
        sys.exit(3)


__all__ = ["Progress", "format_report", "preprocess", "process_packed", "run_preprocess"]
