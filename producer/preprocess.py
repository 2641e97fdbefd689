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
   pool goes on with the rest (`_WorkerRuns`). `workers=0` (API only) runs in the caller's
   process, without that isolation (profiling, debugging).
4. `commit()` switches CURRENT atomically; an interrupted run leaves the previous version.
   A run killed outright leaves its scratch folder in TMPDIR; the next run removes the
   folders of runs that are gone (`sweep_scratch`, noted in the report). Cache files are
   0600 (0640 with --group / $MMFEED_GROUP), whatever the umask.

Exit status (DESIGN.md): 0 every sample cached, 3 some rejected and the rest cached, 2 usage
error (missing dataset folder, no split folders, bad --filter). With --json the last stdout
line is the summary object; the human report then goes to stderr.
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import json
import math
import mmap
import multiprocessing
import os
import re
import select
import shutil
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Callable, TextIO

import click

from protocol import leftovers
from protocol.errors import CacheError, FilterSpecError, InputError, SchemaError
from protocol.filemodes import GROUP_ENV, GroupError, group_id
from protocol.filters import FilterSpec
from protocol.names import escape_name, printable
from protocol.schema import SampleSchema
from protocol.video_store import STORES, VideoStoreError, encode_record

from .cache_writer import CacheWriter, fingerprint_files
from .dataset import SPLITS, DatasetIndex, SampleFiles, index_dataset
from .modalities._limits import ReadLimits
from .pipeline import METHODS, Pipeline, PipelineConfig, missing_inputs, sample_meta, union_inputs

# --- worker side -----------------------------------------------------------------------------

_PIPELINE: Pipeline | None = None
#: TEST HOOK (see CRASH_ENV): the sample key whose processing kills its worker, and how.
_CRASH_ON: tuple[str, str] | None = None

#: TEST HOOK, not a setting: `MMFEED_TEST_CRASH_ON=<sample key>[:exit|:segv]` makes the worker
#: that processes that sample die hard (`os._exit(1)`, or SIGSEGV sent to itself) before
#: decoding it, so the tests can prove a crashing worker costs only its own sample. Read once by
#: the parent and handed to the workers; when unset (always, outside tests) nothing is checked.
CRASH_ENV = "MMFEED_TEST_CRASH_ON"


def _crash_hook_from_env() -> tuple[str, str] | None:
    value = os.environ.get(CRASH_ENV)
    if not value:
        return None
    key, _, how = value.partition(":")
    return key, how or "segv"


def _exit_with(run_pid: int) -> None:
    """End this worker when the preprocess run that owns it dies, however it dies.

    WHY: workers are children of the forkserver, not of the run, and a ProcessPoolExecutor
    worker waits on its call queue forever. A run killed with SIGKILL (the OOM killer, kill -9)
    left its worker, the forkserver (kept alive by its children) and the resource tracker
    (which then never unlinked 5 semaphores in /dev/shm) running for good - found as orphans
    after the suite's SIGKILL test. A daemon thread waits on a pidfd of the run (no polling);
    where pidfd_open is missing it checks once a second.
    """
    def watch() -> None:
        try:
            fd = os.pidfd_open(run_pid)
        except (AttributeError, OSError):
            while True:
                time.sleep(1.0)
                try:
                    os.kill(run_pid, 0)
                except ProcessLookupError:
                    os._exit(1)
                except PermissionError:
                    pass
        select.select([fd], [], [])
        os._exit(1)

    threading.Thread(target=watch, name="mmfeed-exit-with-run", daemon=True).start()


def _init_worker(config: PipelineConfig, crash_on: tuple[str, str] | None = None,
                 run_pid: int | None = None) -> None:
    """Each worker is one process per core already: keep torch (radar FFTs), the video
    decoder and BLAS (the log-mel's filterbank product) single-threaded inside it, or the
    pool oversubscribes the cores (measured: the modality calls ran 3-7x slower in workers
    than alone before torch/decoder, and the log-mel 35x slower in CPU before BLAS;
    producer/worker_threads.py)."""
    global _PIPELINE, _CRASH_ON
    from .worker_threads import single_threaded

    if run_pid is not None:
        _exit_with(run_pid)
    single_threaded()
    _PIPELINE = Pipeline(config)
    _CRASH_ON = crash_on


def _maybe_crash(key: str) -> None:
    if _CRASH_ON is not None and key == _CRASH_ON[0]:
        if _CRASH_ON[1] == "exit":
            os._exit(1)
        os.kill(os.getpid(), signal.SIGSEGV)


def process_packed(sample: SampleFiles, pipeline: Pipeline | None = None
                   ) -> tuple[bytes | None, bytearray | dict, list[str]]:
    """One sample -> (schema encoding, packed payload, notes), or (None, error dict, notes).
    Runs in a worker (pipeline None: the worker's own) or in the caller's process."""
    notes: list[str] = []
    pipe = pipeline if pipeline is not None else _PIPELINE
    assert pipe is not None, "worker not initialised"
    try:
        arrays = pipe.process(sample, notes)
        schema = SampleSchema.from_arrays(arrays)
    except InputError as e:
        return None, e.to_dict(), notes
    except SchemaError as e:  # e.g. an input name the schema refuses: this sample, not the run
        return None, InputError(sample.dir, "inputs", "arrays the sample schema accepts",
                                str(e)).to_dict(), notes
    try:  # --video-store: the record as the cache holds it (protocol/video_store.py)
        schema, payload = encode_record(schema, arrays, pipe.config.video_store, notes)
    except VideoStoreError as e:
        notes.append(f"video store {pipe.config.video_store.store}: {e}; stored raw")
        payload = schema.pack(arrays)
    return schema.encode(), payload, notes


#: A chunk's result per sample: (schema encoding, where its payload is, notes) with the payload
#: as (offset, nbytes) in the chunk's scratch file, or the bytes themselves when the scratch
#: file could not be written; (None, error dict, notes) for a rejected sample.
Result = tuple[bytes | None, tuple[int, int] | bytes | bytearray | dict, list[str]]


def process_chunk(samples: list[SampleFiles], scratch: str) -> list[Result]:
    """Several samples in one task (one round trip through the pool per chunk, not per sample).

    WHY a scratch file: the packed payloads (~1 MB a sample) used to come back pickled through
    the pool's pipe - a pickle, 16 pipe writes of 64 KiB that each wait for the parent to
    read, an unpickle - and in the profile that send was 10% of the workers' time. Now each is
    appended to `scratch` (one write into the page cache) and only offsets travel back; the
    parent writes them into the shard from a memory map of that file.
    """
    out: list[Result] = []
    fd = None
    pos = 0
    try:
        fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError:
        fd = None  # e.g. no space in TMPDIR: fall back to returning the bytes
    try:
        for s in samples:
            _maybe_crash(s.key)
            enc, payload, notes = process_packed(s)
            if enc is not None and fd is not None:
                try:
                    n = os.pwrite(fd, payload, pos)
                    if n == len(payload):
                        payload, pos = (pos, n), pos + n
                except OSError:
                    pass  # keep the bytes: they travel back through the pipe instead
            out.append((enc, payload, notes))
    finally:
        if fd is not None:
            os.close(fd)
    return out


def _isolated_main(conn, config: PipelineConfig, crash_on, sample: SampleFiles,
                   scratch: str, run_pid: int | None = None) -> None:
    """Child process body for re-running one suspect sample alone (see `_Isolator`)."""
    _init_worker(config, crash_on, run_pid)
    conn.send(process_chunk([sample], scratch))
    conn.close()


# --- running chunks in worker processes ------------------------------------------------------

Item = tuple[int, SampleFiles, str]  # (dataset index, sample, fingerprint)


def _chunk_size(n: int, workers: int) -> int:
    """Samples per task: about 8 tasks per worker (so the last ones still balance the cores),
    at most 8 samples (bounded scratch space and memory), at least 1."""
    return max(1, min(8, math.ceil(n / (workers * 8))))


def exit_description(exitcode: int | None) -> str:
    """`worker exited with signal 11 (SIGSEGV)` / `worker exited with status 1`."""
    if exitcode is None:
        return "worker exited (status unknown)"
    if exitcode < 0:
        try:
            name = f" ({signal.Signals(-exitcode).name})"
        except ValueError:
            name = ""
        return f"worker exited with signal {-exitcode}{name}"
    return f"worker exited with status {exitcode}"


def start_worker_server() -> multiprocessing.context.BaseContext:
    """Start the forkserver the workers fork from, without waiting for it.

    WHY early: the server imports producer.preprocess (torch alone is 1-3 s on a busy 2-core
    machine) before it can fork the first worker. Started before the dataset is indexed and
    fingerprinted, that import runs while the parent does its own work instead of after.
    NOTE [forkserver]: a plain fork copies the caller's FFmpeg/BLAS thread state; after the
    caller has decoded anything (the bench, a daemon, a notebook) forked workers can die at
    their first decode. Workers fork from a clean server process instead.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["producer.preprocess"])
    from multiprocessing import forkserver

    forkserver.ensure_running()
    return ctx


class _WorkerRuns:
    """Runs chunks of samples on a process pool, in dataset order, and survives workers that
    die hard (a segfault in FFmpeg, os._exit, the OOM killer).

    WHY this shape: a dead worker breaks a ProcessPoolExecutor for good (BrokenProcessPool on
    every future in flight), and the pool cannot say which sample killed it. So every chunk
    in flight is a suspect: chunks that had finished are stored as usual, each sample of the
    others is re-run alone in a fresh process, and only the one whose process dies is rejected
    (a sample that crashed once by chance, e.g. under memory pressure, is simply cached). Then
    a new pool takes the rest. Suspects are handled before anything newer, so the cache is
    still written in dataset order.
    """

    def __init__(self, config: PipelineConfig, workers: int, scratch_dir: Path,
                 store: Callable[[Item, Result, mmap.mmap | None], None],
                 reject_crash: Callable[[Item, str], None]):
        self.config, self.workers, self.scratch_dir = config, workers, scratch_dir
        self.store, self.reject_crash = store, reject_crash
        self.crash_on = _crash_hook_from_env()
        self.seq = itertools.count()
        self.ctx = start_worker_server()
        self.pool_restarts = 0

    def _pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=self.workers, initializer=_init_worker,
                                   initargs=(self.config, self.crash_on, os.getpid()),
                                   mp_context=self.ctx)

    def _scratch(self) -> str:
        return str(self.scratch_dir / f"chunk-{next(self.seq)}.bin")

    def _store_chunk(self, items: list[Item], results: list[Result], scratch: str) -> None:
        mm = None
        try:
            if any(isinstance(r[1], tuple) for r in results):
                with open(scratch, "rb") as f:
                    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            for item, result in zip(items, results):
                self.store(item, result, mm)
        finally:
            if mm is not None:
                mm.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(scratch)

    def run(self, todo: list[Item]) -> None:
        size = _chunk_size(len(todo), self.workers)
        pending = collections.deque(todo[k:k + size] for k in range(0, len(todo), size))
        window: collections.deque[tuple[list[Item], str, Future]] = collections.deque()
        pool = self._pool()
        try:
            while pending or window:
                # at most 2 chunks per worker in flight: bounded memory and scratch space
                broken = False
                while pending and len(window) < 2 * self.workers:
                    items, scratch = pending.popleft(), self._scratch()
                    try:
                        fut = pool.submit(process_chunk, [s for _, s, _ in items], scratch)
                    except BrokenProcessPool:
                        # A worker died between two submits: the pool refuses new work before
                        # any future of it was read. The chunk goes back; recover as below.
                        pending.appendleft(items)
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(scratch)
                        broken = True
                        break
                    window.append((items, scratch, fut))
                if broken and not window:
                    pool.shutdown(wait=True, cancel_futures=True)
                    pool = self._pool()
                    self.pool_restarts += 1
                    continue
                items, scratch, fut = window.popleft()
                try:
                    results = fut.result()
                except BrokenProcessPool:
                    window.appendleft((items, scratch, fut))
                    pool.shutdown(wait=True, cancel_futures=True)
                    self._recover(window)
                    window.clear()
                    pool = self._pool()
                    self.pool_restarts += 1
                    continue
                self._store_chunk(items, results, scratch)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _recover(self, window) -> None:
        for items, scratch, fut in window:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._store_chunk(items, fut.result(), scratch)
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(scratch)
            for item in items:
                self._isolated(item)

    def _isolated(self, item: Item) -> None:
        """Re-run one suspect sample alone in a fresh process; reject it only if that dies."""
        scratch = self._scratch()
        recv, send = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=_isolated_main, daemon=True,
                                args=(send, self.config, self.crash_on, item[1], scratch,
                                      os.getpid()))
        proc.start()
        send.close()
        try:
            results = recv.recv()
        except EOFError:  # it died before answering
            results = None
        finally:
            recv.close()
            proc.join()
        if results is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(scratch)
            self.reject_crash(item, exit_description(proc.exitcode))
        else:
            self._store_chunk([item], results, scratch)


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
                   group: str | None = None, ray: str | None = None) -> dict:
    """Index, process and commit; returns the summary dict (what --json prints). The cache's
    files are 0600 (0640 and group `group` with one; protocol/filemodes.py).

    `ray`: None runs the chunks on the local process pool (`workers`); a string runs them as
    Ray tasks (producer/ray_preprocess.py) on the cluster at that address ("" = the default:
    RAY_ADDRESS, a cluster running on this machine, else a new local one). Everything else,
    and so the cache, is the same."""
    t0 = time.perf_counter()
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

        def store(item: Item, result: Result, scratch: mmap.mmap | None = None) -> None:
            i, s, fp = item
            enc, payload, sample_notes = result
            notes.extend(f"{s.key}: {n}" for n in sample_notes)
            if enc is None:
                rejected.append(_rejection(payload, s.key))
                bar.advance(rejected=1)
                return
            if isinstance(payload, tuple):  # (offset, nbytes) in the chunk's scratch file
                payload = memoryview(scratch)[payload[0]:payload[0] + payload[1]]
            try:
                w.add(s.key, fp, s.split, SampleSchema.decode(enc), sample_meta(s, index=i),
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
            for item in todo:
                store(item, process_packed(item[1], pipeline))
        elif todo:
            scratch_dir = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-"))
            try:
                runs = _WorkerRuns(config, workers, scratch_dir, store, reject_crash)
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
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None,
              metavar="[ADDRESS]",
              help="Run the pipeline as Ray tasks on the cluster at ADDRESS (HOST:PORT; alone: "
                   "RAY_ADDRESS, else a cluster on this machine, else a new local one). Dataset "
                   "and cache on a file system every node mounts at the same path. Needs "
                   "`pip install 'mmfeed[ray]'`.")
def preprocess(dataset: Path, cache: Path, splits: tuple[str, ...], workers: int,
               as_json: bool, filter_spec: FilterSpec | None, clip_frames: int,
               segment: tuple[float, float] | None, sensors, methods, read_limits,
               video_store: str, group: str | None, quiet: bool, ray_address: str | None) -> None:
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
                                 index=index, group=group, ray=ray_address)
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
