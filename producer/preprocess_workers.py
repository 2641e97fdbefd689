"""`mm-producer preprocess`'s worker processes: each builds the Pipeline once and turns chunks
of samples into packed payloads in a scratch file (worker side), and `WorkerRuns` keeps a pool
of them going through worker crashes (parent side). The run itself is preprocess.py.

A worker that dies hard (segfault in FFmpeg, os._exit, OOM kill) breaks the pool: the chunks in
flight are re-run one sample at a time in fresh processes, the sample whose process dies is
rejected (field "worker", found "worker exited with signal N"), and a new pool goes on with the
rest.
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import math
import mmap
import multiprocessing
import os
import select
import signal
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Callable


from protocol.errors import InputError, SchemaError
from protocol.schema import SampleSchema
from protocol.video_store import RAW, VideoStoreError, encode_record

from .dataset import SampleFiles
from .pipeline import Pipeline, PipelineConfig, schema_of
from .worker_shard import PlacedRecord, ShardTarget, WorkerShard

# --- worker side -----------------------------------------------------------------------------

_PIPELINE: Pipeline | None = None
#: This worker's own shard files in the version being written (None: scratch files).
_SHARD: WorkerShard | None = None
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
                 run_pid: int | None = None, video_device: str = "cpu",
                 shard_target: ShardTarget | None = None) -> None:
    """Each worker is one process per core already: keep torch (radar FFTs), the video
    decoder and BLAS (the log-mel's filterbank product) single-threaded inside it, or the
    pool oversubscribes the cores (measured: the modality calls ran 3-7x slower in workers
    than alone before torch/decoder, and the log-mel 35x slower in CPU before BLAS;
    producer/worker_threads.py)."""
    global _PIPELINE, _CRASH_ON, _SHARD
    from .worker_threads import single_threaded

    if run_pid is not None:
        _exit_with(run_pid)
    single_threaded()
    _PIPELINE = Pipeline(config, video_device=video_device)
    _CRASH_ON = crash_on
    _SHARD = WorkerShard(shard_target) if shard_target is not None else None


def _maybe_crash(key: str) -> None:
    if _CRASH_ON is not None and key == _CRASH_ON[0]:
        if _CRASH_ON[1] == "exit":
            os._exit(1)
        os.kill(os.getpid(), signal.SIGSEGV)


def process_packed(sample: SampleFiles, pipeline: Pipeline | None = None
                   ) -> tuple[bytes | None, bytearray | dict, list[str]]:
    """One sample -> (schema encoding, packed payload, notes), or (None, error dict, notes).
    Runs in a worker (pipeline None: the worker's own) or in the caller's process."""
    schema, payload, notes = _process(sample, pipeline)
    return (schema.encode() if schema is not None else None), payload, notes


def _process(sample: SampleFiles, pipeline: Pipeline | None = None, *, pack: bool = True
             ) -> tuple[SampleSchema | None, bytearray | bytes | dict, list[str]]:
    """(schema, record bytes, notes); with `pack=False` a raw record is left as the
    pipeline's arrays (a dict: WorkerShard.append_arrays writes them without packing)."""
    notes: list[str] = []
    pipe = pipeline if pipeline is not None else _PIPELINE
    assert pipe is not None, "worker not initialised"
    try:
        arrays = pipe.process(sample, notes)
        if pipe.video_device == "cuda":  # NVDEC made a CUDA tensor; the cache is host bytes
            arrays = {k: v.cpu().numpy() if hasattr(v, "cpu") else v for k, v in arrays.items()}
        schema = schema_of(arrays)
    except InputError as e:
        return None, e.to_dict(), notes
    except SchemaError as e:  # e.g. an input name the schema refuses: this sample, not the run
        return None, InputError(sample.dir, "inputs", "arrays the sample schema accepts",
                                str(e)).to_dict(), notes
    if not pack and pipe.config.video_store.store_id == RAW and not schema.packed:
        return schema, arrays, notes
    try:  # --video-store: the record as the cache holds it (protocol/video_store.py)
        schema, payload = encode_record(schema, arrays, pipe.config.video_store, notes)
    except VideoStoreError as e:
        notes.append(f"video store {pipe.config.video_store.store}: {e}; stored raw")
        payload = schema.pack(arrays)
    return schema, payload, notes


#: A chunk's result per sample: (schema encoding, where its payload is, notes) with the payload
#: a PlacedRecord in the worker's own shard file (producer/worker_shard.py), (offset, nbytes)
#: in the chunk's scratch file, or the bytes themselves when neither could be written;
#: (None, error dict, notes) for a rejected sample.
Result = tuple[bytes | None, PlacedRecord | tuple[int, int] | bytes | bytearray | dict, list[str]]


def process_chunk(samples: list[SampleFiles], scratch: str) -> list[Result]:
    """Several samples in one task (one round trip through the pool per chunk, not per sample).

    WHY a scratch file: the packed payloads (~1 MB a sample) used to come back pickled through
    the pool's pipe - a pickle, 16 pipe writes of 64 KiB that each wait for the parent to
    read, an unpickle - and in the profile that send was 10% of the workers' time. Now each is
    appended to `scratch` (one write into the page cache) and only offsets travel back; the
    parent writes them into the shard from a memory map of that file.

    Where the worker has a shard of its own (`_SHARD`: a local pool writing a cache,
    producer/worker_shard.py) a record goes there instead, once, and only where it is travels
    back; the scratch file is the fallback for a record that could not be written there (a
    full disk) and the path of the Ray workers, which may not share the cache's folder.
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
            schema, payload, notes = _process(s, pack=_SHARD is None)
            enc = schema.encode() if schema is not None else None
            if enc is not None and _SHARD is not None:
                try:  # straight into the version's shards: no scratch, no copy in the parent
                    placed = _SHARD.append_arrays(schema, payload) \
                        if isinstance(payload, dict) else _SHARD.append(schema, payload)
                    if placed is not None:
                        out.append((enc, placed, notes))
                        continue
                except (OSError, VideoStoreError):
                    pass  # the scratch file (or the pipe) and the parent's checks instead
                if isinstance(payload, dict):
                    payload = schema.pack(payload)
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
                   scratch: str, run_pid: int | None = None, video_device: str = "cpu",
                   shard_target: ShardTarget | None = None) -> None:
    """Child process body for re-running one suspect sample alone (see `_Isolator`)."""
    _init_worker(config, crash_on, run_pid, video_device, shard_target)
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


class WorkerRuns:
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
        self.video_device = "cpu"   # "cuda": workers decode video with NVDEC (video_route.py)
        #: where workers write records themselves (CacheWriter.worker_target); None: scratch
        self.shard_target: ShardTarget | None = None

    def _pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=self.workers, initializer=_init_worker,
                                   initargs=(self.config, self.crash_on, os.getpid(),
                                             self.video_device, self.shard_target),
                                   mp_context=self.ctx)

    def _scratch(self) -> str:
        return str(self.scratch_dir / f"chunk-{next(self.seq)}.bin")

    def _store_chunk(self, items: list[Item], results: list[Result], scratch: str) -> None:
        mm = None
        try:
            if any(isinstance(r[1], tuple) and not isinstance(r[1], PlacedRecord)
                   for r in results):  # some payloads are in the scratch file
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
                                      os.getpid(), self.video_device, self.shard_target))
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
