"""`mm-producer preprocess DATASET --cache DIR --ray [ADDRESS]`: the pipeline as Ray tasks.

For datasets that one machine decodes too slowly: the same per-sample code (the chunks of
`preprocess.process_chunk`) runs as Ray tasks on a local or existing Ray cluster, and
everything else is the local run's (`preprocess.run_preprocess`): the index, the incremental
`keep_if_unchanged`, the rejection report, the commit and the exit codes. Only the place where
chunks run changes, so a cache made with `--ray` is the cache the local pool makes, record for
record and byte for byte (tests/test_ray_preprocess.py compares them).

How a run goes:
- The driver (the machine running `mm-producer preprocess`) indexes and fingerprints, and
  sends chunks of samples as tasks, at most 2 per cluster CPU in flight (bounded memory and
  scratch space), spread over the nodes (`SPREAD`).
- A task decodes its samples and writes their packed payloads to a chunk file in a scratch
  folder INSIDE the cache directory (`DIR/.ray-scratch-*`): the cache directory is on a file
  system every node mounts at the same path (NFS, Lustre, CephFS ...), as is the dataset. Only
  offsets and notes travel back through Ray.
- The driver copies each chunk's payloads into the cache's shard in dataset order (the local
  run's `store`), deletes the chunk file, and at the end commits the index atomically, once.

A task whose worker process dies (a segfault in FFmpeg, the OOM killer) fails its chunk: as in
the local pool, each sample of that chunk is re-run alone and only the one whose task dies again
is rejected (field `worker`); Ray's own retries are off so a crash is seen, not hidden.

Ray is optional (`pip install 'mmfeed[ray]'`); without it, `--ray` says so and exits 2.
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any, Callable

from .pipeline import PipelineConfig
from .preprocess_workers import (WorkerRuns, _chunk_size, _crash_hook_from_env, _init_worker,
                                 process_chunk)

#: What `--ray` without Ray installed says (exit 2).
INSTALL_HINT = ("--ray needs Ray, which is not installed in this Python environment: "
                "pip install 'mmfeed[ray]' (or pip install ray), on every node of the cluster")

SCRATCH_PREFIX = ".ray-scratch-"


class RayUnavailable(RuntimeError):
    """Ray is not installed (a usage error: exit 2, with INSTALL_HINT)."""


class RayRunError(RuntimeError):
    """The cluster cannot run this preprocess (not reachable, a node without the shared file
    system): the run stops, nothing is committed, and the message says what to fix."""


def import_ray():
    try:
        import ray
    except ImportError:
        raise RayUnavailable(INSTALL_HINT) from None
    return ray


def scratch_dir_in(cache: str | Path) -> Path:
    """A new scratch folder inside the cache directory, after removing any a crashed run left
    (the caller holds the cache's writer lock: no other run can be using one)."""
    cache = Path(cache)
    for old in cache.glob(SCRATCH_PREFIX + "*"):
        shutil.rmtree(old, ignore_errors=True)
    d = cache / f"{SCRATCH_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    d.mkdir(mode=0o700)
    return d


# --- the task (runs in a Ray worker process, on any node) -------------------------------------

_WORKER_CONFIG: str | None = None  # config_hash of the pipeline this worker process built


def _run_chunk(config: PipelineConfig, crash_on, samples: list, scratch: str
               ) -> tuple[list, str]:
    """One chunk in a Ray worker: (process_chunk's results, this node's id)."""
    global _WORKER_CONFIG
    import ray

    here = socket.gethostname()
    if not Path(scratch).parent.is_dir():
        raise RayRunError(f"node {here}: the cache directory's scratch folder "
                          f"{Path(scratch).parent} does not exist here; the cache directory must "
                          f"be on a file system every Ray node mounts at the same path")
    for s in samples:
        if not Path(s.dir).is_dir():
            raise RayRunError(f"node {here}: sample folder {s.dir} does not exist here; the "
                              f"dataset must be on a file system every Ray node mounts at the "
                              f"same path")
    key = config.config_hash()
    if _WORKER_CONFIG != key:  # once per worker process and config, as a pool initializer
        _init_worker(config, crash_on)
        _WORKER_CONFIG = key
    return process_chunk(samples, scratch), ray.get_runtime_context().get_node_id()


# --- the driver -------------------------------------------------------------------------------


class RayRuns(WorkerRuns):
    """Runs chunks as Ray tasks, in dataset order: the local pool's runner (`WorkerRuns`:
    `run(todo)` calls `store(item, result, scratch_map)` per sample in dataset order, or
    `reject_crash(item, found)` for a sample whose task died alone) with tasks for processes;
    its chunk storing (`_store_chunk`) and scratch naming are the pool's."""

    def __init__(self, config: PipelineConfig, address: str | None, scratch_dir: Path,
                 store: Callable, reject_crash: Callable):
        # Not the pool's __init__: no forkserver, no process pool.
        self.ray = ray = import_ray()
        self.config, self.scratch_dir = config, scratch_dir
        self.store, self.reject_crash = store, reject_crash
        self.crash_on = _crash_hook_from_env()
        self.seq = itertools.count()
        self.address = address
        self.pool_restarts = 0      # chunks whose worker died (re-run sample by sample)
        self.nodes: set[str] = set()
        self._owns_ray = not ray.is_initialized()  # else: a caller's own driver, left as is
        if self._owns_ray and address:
            check_reachable(address)
        try:
            if self._owns_ray:
                ray.init(address=address, log_to_driver=False, include_dashboard=False,
                         configure_logging=False)
        except Exception as e:  # ConnectionError, ValueError ...: the address is wrong
            where = f" {address}" if address else ""
            raise RayRunError(f"--ray{where}: cannot reach a Ray cluster ({type(e).__name__}: "
                              f"{e}); start one with `ray start --head`, or give its address "
                              f"(HOST:PORT)") from None
        self.cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._task = ray.remote(num_cpus=1, max_retries=0)(_run_chunk)

    def _submit(self, samples: list, strategy: str = "SPREAD"):
        scratch = self._scratch()
        ref = self._task.options(scheduling_strategy=strategy).remote(
            self.config, self.crash_on, samples, scratch)
        return scratch, ref

    def _get(self, ref) -> tuple[list | None, str | None]:
        """The chunk's results, or (None, why) when its worker process died."""
        ray = self.ray
        try:
            results, node = ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if hasattr(e, "cause") else None
            if isinstance(cause, RayRunError):
                raise RayRunError(str(cause)) from None
            raise
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                ray.exceptions.LocalRayletDiedError) as e:
            return None, _crash_description(e)
        self.nodes.add(node)
        return results, None

    def run(self, todo: list) -> None:
        size = _chunk_size(len(todo), self.cpus)
        pending = collections.deque(todo[k:k + size] for k in range(0, len(todo), size))
        window: collections.deque = collections.deque()
        try:
            while pending or window:
                while pending and len(window) < 2 * self.cpus:
                    items = pending.popleft()
                    window.append((items, *self._submit([s for _, s, _ in items])))
                items, scratch, ref = window.popleft()
                results, crashed = self._get(ref)
                if results is None:
                    self.pool_restarts += 1
                    self._discard(scratch)
                    for item in items:
                        self._isolated(item)
                    continue
                self._store_chunk(items, results, scratch)
        finally:
            for _, scratch, ref in window:  # an error stopped the run: cancel what is left
                with contextlib.suppress(Exception):
                    self.ray.cancel(ref, force=True)
                self._discard(scratch)

    def _isolated(self, item) -> None:
        """Re-run one sample of a crashed chunk alone; reject it only if its task dies too."""
        scratch, ref = self._submit([item[1]], strategy="DEFAULT")
        results, crashed = self._get(ref)
        if results is None:
            self._discard(scratch)
            self.reject_crash(item, crashed)
        else:
            self._store_chunk([item], results, scratch)

    def close(self) -> None:
        """Disconnect from the cluster (when this run connected): Ray's driver threads stop
        before the caller prints its summary."""
        if self._owns_ray and self.ray.is_initialized():
            self.ray.shutdown()

    @staticmethod
    def _discard(scratch: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(scratch)

    def summary(self) -> dict[str, Any]:
        return {"address": self.address, "cpus": self.cpus, "nodes": len(self.nodes)}


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A HOST:PORT cluster address that nothing answers on is refused at once: `ray.init`
    would retry it for minutes before giving up. Other forms (`auto`, `ray://...`) are
    Ray's to judge."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "/" in address:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise RayRunError(f"--ray {address}: no Ray cluster answers there ({e.strerror or e}); "
                          f"start one with `ray start --head --port {port}` on {host}, or give "
                          f"the address `ray start --head` printed") from None


def _crash_description(e: Exception) -> str:
    """`worker exited (Ray: <first line of Ray's message>)`: Ray does not report the signal."""
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
    return f"worker exited (Ray {type(e).__name__}: {first[:200]})"
