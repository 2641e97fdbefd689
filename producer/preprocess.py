"""`mm-producer preprocess`: a dataset folder -> the disk cache, through THE pipeline.

    mm-producer preprocess DATASET --cache DIR [--split S]... [--workers N] [--json]
                           [--filter SPEC] [--clip-frames N] [--segment START END]
                           [--sensor INPUT STEM]... [--method INPUT NAME]... [--quiet]

How a run goes, and why:
1. Index the folder (producer/dataset.py). Index problems (empty folder, unreadable file, bad
   metadata.json) are rejections, not crashes.
2. Open one CacheWriter. For each sample, `keep_if_unchanged(key, fingerprint)`: same files
   (names, sizes, mtimes, metadata.json included), same `config_hash()`, same classes -> its
   records are copied over without decoding. Only the rest go to the workers.
3. Worker processes (ProcessPoolExecutor) each build the Pipeline once, process a sample and
   return the payload already packed by `SampleSchema.pack` (bytes, not arrays: one pickle of
   one buffer), or the InputError as a dict. The parent writes in dataset order, so a re-run
   makes the same cache layout; at most 2 x workers samples are in flight (bounded memory).
4. `commit()` switches CURRENT atomically; an interrupted run leaves the previous version.

Exit status (DESIGN.md): 0 every sample cached, 3 some rejected and the rest cached, 2 usage
error (missing dataset folder, no split folders, bad --filter). With --json the last stdout
line is the summary object; the human report then goes to stderr.
"""
from __future__ import annotations

import collections
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Callable, TextIO

import click

from protocol.errors import CacheError, FilterSpecError, InputError
from protocol.filters import FilterSpec
from protocol.schema import SampleSchema

from .cache_writer import CacheWriter, fingerprint_files
from .dataset import SPLITS, DatasetIndex, SampleFiles, index_dataset
from .pipeline import METHODS, Pipeline, PipelineConfig, missing_inputs, sample_meta, union_inputs

# --- worker side -----------------------------------------------------------------------------

_PIPELINE: Pipeline | None = None


def _init_worker(config: PipelineConfig) -> None:
    """Each worker is one process per core already: keep torch (radar FFTs) and the video
    decoder single-threaded inside it, or the pool oversubscribes the cores (measured: the
    modality calls ran 3-7x slower in workers than alone before this)."""
    global _PIPELINE
    import torch

    from .modalities import video

    torch.set_num_threads(1)
    video.set_decode_threads(1)
    _PIPELINE = Pipeline(config)


def process_packed(sample: SampleFiles, pipeline: Pipeline | None = None
                   ) -> tuple[bytes | None, bytearray | dict, list[str]]:
    """One sample -> (schema encoding, packed payload, notes), or (None, error dict, notes).
    Runs in a worker (pipeline None: the worker's own) or in the caller's process."""
    notes: list[str] = []
    pipe = pipeline if pipeline is not None else _PIPELINE
    assert pipe is not None, "worker not initialised"
    try:
        arrays = pipe.process(sample, notes)
    except InputError as e:
        return None, e.to_dict(), notes
    schema = SampleSchema.from_arrays(arrays)
    return schema.encode(), schema.pack(arrays), notes


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
    d = err.to_dict() if isinstance(err, InputError) else dict(err)
    return {"sample": key, "file": d.get("file"), "field": d.get("field"),
            "expected": d.get("expected"), "found": d.get("found"), "message": d.get("message")}


def _key_of(problem: InputError, root: Path) -> str | None:
    """train/circle/0003 for a problem path inside a sample folder, else None."""
    try:
        parts = Path(problem.path).resolve().relative_to(root.resolve()).parts
    except ValueError:
        return None
    return "/".join(parts[:3]) if len(parts) >= 3 else None


def run_preprocess(dataset: str | Path, cache: str | Path, config: PipelineConfig, *,
                   splits: list[str] | None = None, workers: int = 1,
                   progress: bool = True, index: DatasetIndex | None = None) -> dict:
    """Index, process and commit; returns the summary dict (what --json prints)."""
    t0 = time.perf_counter()
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
    with CacheWriter(cache, classes=index.classes, config_hash=config.config_hash()) as w:
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

        def store(i: int, s: SampleFiles, fp: str, result) -> None:
            enc, payload, sample_notes = result
            notes.extend(f"{s.key}: {n}" for n in sample_notes)
            if enc is None:
                rejected.append(_rejection(payload, s.key))
                bar.advance(rejected=1)
                return
            w.add(s.key, fp, s.split, SampleSchema.decode(enc), sample_meta(s, index=i),
                  payload=payload)
            bar.advance()

        if workers <= 1 or len(todo) <= 1:
            for i, s, fp in todo:
                store(i, s, fp, process_packed(s, pipeline))
        else:
            # NOTE [forkserver]: a plain fork copies the caller's FFmpeg/BLAS thread state; after
            # the caller has decoded anything (the bench, a daemon, a notebook) forked workers
            # can die at their first decode. Workers fork from a clean server process instead.
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["producer.preprocess"])
            with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker,
                                     initargs=(config,), mp_context=ctx) as pool:
                window: collections.deque[tuple[int, SampleFiles, str, Future]] = \
                    collections.deque()
                pending = iter(todo)
                for item in pending:
                    window.append((*item, pool.submit(process_packed, item[1])))
                    if len(window) >= 2 * workers:
                        i, s, fp, fut = window.popleft()
                        store(i, s, fp, fut.result())
                while window:
                    i, s, fp, fut = window.popleft()
                    store(i, s, fp, fut.result())
        summary = w.commit()
    bar.finish()
    seconds = time.perf_counter() - t0
    processed = summary.written
    return {
        "cached": summary.records,
        "reused": reused,
        "processed": processed,
        "rejected": rejected,
        "notes": notes,
        "classes": index.classes,
        "splits": summary.counts,
        "cache": str(summary.directory),
        "version": summary.version,
        "config_hash": config.config_hash(),
        "seconds": round(seconds, 3),
        "samples_per_s": round((processed + reused) / seconds, 2) if seconds > 0 else None,
        "processed_per_s": round(processed / seconds, 2) if seconds > 0 else None,
    }


def format_report(summary: dict) -> str:
    """The human report: totals, then every rejected sample and every note."""
    lines = [f"cached {summary['cached']} samples ({summary['reused']} reused, "
             f"{summary['processed']} processed) in {summary['seconds']:.1f} s "
             f"-> {summary['cache']} (version {summary['version']}); classes: "
             f"{', '.join(summary['classes'])}"]
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
@click.option("--quiet", is_flag=True, help="No progress output.")
def preprocess(dataset: Path, cache: Path, splits: tuple[str, ...], workers: int,
               as_json: bool, filter_spec: FilterSpec | None, clip_frames: int,
               segment: tuple[float, float] | None, sensors, methods, quiet: bool) -> None:
    """Preprocess DATASET (dataset/{train,val,test}/<class>/<sample>/) into the disk cache.

    Re-running only redoes samples whose files (or the settings) changed. Exit status: 0 all
    cached, 3 some samples rejected (each reported with file, field and what was expected)
    and the rest cached, 2 usage error.
    """
    index = index_dataset(dataset, list(splits) or None)
    if not index.splits and index.problems and index.problems[0].field == "splits":
        raise click.UsageError(f"{dataset}: no split folders ({', '.join(SPLITS)}); expected "
                               "DATASET/<split>/<class>/<sample>/ files")
    try:
        config = PipelineConfig(filter=filter_spec or FilterSpec(), clip_frames=clip_frames,
                                segment=segment, sensors=dict(sensors), methods=dict(methods))
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    try:
        summary = run_preprocess(dataset, cache, config, workers=workers, progress=not quiet,
                                 index=index)
    except CacheError as e:  # e.g. CacheLocked: another preprocess writes this cache
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
