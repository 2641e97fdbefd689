"""Checkpoints written atomically and resumed exactly.

A checkpoint that is half-written when the machine loses power, or when systemd's stop timeout
SIGKILLs us, must never replace a good one. So `save()` writes `.ckpt-NNNNNNNN.pt.tmp-PID`,
fsyncs it, renames it over the final name (atomic on POSIX) and fsyncs the directory so the
rename itself is durable. Readers therefore see either the old set of files or the new one.

Resuming "with the same state" means: model and optimiser (and AMP scaler) state, the step and
epoch counters, and every RNG that decides what comes next (torch CPU and CUDA, numpy, Python's
`random`), so a resumed run draws the same dropout masks and shuffles as an uninterrupted one.
Under torchrun every rank has its own RNG streams (seeded `seed + rank`): the checkpoint keeps
each rank's state in `rng_ranks` (rank 0's also in `rng`), and `restore_rng(state, rank)` gives
every rank its own back, so ranks stay decorrelated after a resume instead of all drawing rank
0's numbers. A checkpoint without a state for that rank (written by fewer ranks, or before
`rng_ranks` existed) gets a state derived from the saved one and the rank.
Files are loaded with `weights_only=True`: a checkpoint is data, never code to unpickle.

Checkpoints hold the model's weights: they are 0600 (0640 and the group's with --group /
$MMFEED_GROUP) whatever the umask, in a directory made 0700 (0750) when it is created here
(protocol/filemodes.py). A temporary whose writer was killed before the rename
(`.ckpt-*.pt.tmp-PID` of a pid that is gone) is removed when a trainer starts
(`sweep_temporaries`, protocol/leftovers.py); a live writer's is kept.
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from protocol import leftovers
from protocol.filemodes import create_file, fsync_dir, group_id, make_dir

log = logging.getLogger(__name__)
_NAME = re.compile(r"^ckpt-(\d{8})\.pt$")
#: What `save` writes before the rename: `.ckpt-00000042.pt.tmp-<writer pid>`.
_TEMP = re.compile(r"^\.ckpt-\d{8}\.pt\.tmp-(\d+)$")


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"ckpt-{step:08d}.pt"


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp files are never listed)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def rng_state() -> dict[str, Any]:
    """Every RNG that decides the next sample or mask, as tensors and plain values only."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": np_state[0], "pos": torch.from_numpy(np_state[1].astype(np.int64)),
                  "rest": [int(np_state[2]), int(np_state[3]), float(np_state[4])]},
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["key"], n["pos"].numpy().astype(np.uint32), int(n["rest"][0]),
                         int(n["rest"][1]), float(n["rest"][2])))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_rng(state: dict[str, Any], rank: int = 0) -> str:
    """Set this rank's RNGs from a checkpoint's state dict; says how: "saved" or "derived".

    "saved": the rank's own state from `rng_ranks` (or `rng` for rank 0), exactly where it was.
    "derived": no state was saved for this rank; the saved `rng` reseeded from a hash of it and
    the rank, so the same checkpoint always gives a rank the same streams and no two ranks
    share one.
    """
    per_rank = state.get("rng_ranks") or []
    if rank < len(per_rank):
        set_rng_state(per_rank[rank])
        return "saved"
    set_rng_state(state["rng"])
    if rank == 0:
        return "saved"
    digest = hashlib.sha256(state["rng"]["torch"].numpy().tobytes()).digest()
    seeds = np.random.SeedSequence(int.from_bytes(digest, "little"),
                                   spawn_key=(rank,)).generate_state(3)
    torch.manual_seed(int(seeds[0]))  # CPU and every CUDA device
    np.random.seed(int(seeds[1]))
    random.seed(int(seeds[2]))
    return "derived"


class _KeepaliveFile:
    """A file whose every write is followed by `keepalive()`.

    torch.save writes a checkpoint as many writes (one per tensor record); a big model's save
    can outlast the unit's WatchdogSec, so the daemon's WATCHDOG=1 rides on those writes.
    """

    def __init__(self, f, keepalive: Callable[[], None]):
        self._f, self._keepalive = f, keepalive

    def write(self, data) -> int:
        n = self._f.write(data)
        self._keepalive()
        return n

    def flush(self) -> None:
        self._f.flush()


def sweep_temporaries(directory: str | Path) -> list[leftovers.Leftover]:
    """Remove the temporaries of writers that are gone (killed between write and rename);
    log each with its size; keep those of live writers. Returns what was removed."""
    removed, kept = leftovers.sweep(directory, _TEMP)
    for r in removed:
        log.info("removed the partial checkpoint %s (%d bytes): its writer, pid %d, is gone",
                 r.path, r.nbytes, r.pid,
                 extra={"removed": str(r.path), "bytes": r.nbytes, "writer_pid": r.pid})
    for k in kept:
        log.info("kept the checkpoint temporary %s: its writer, pid %d, is alive", k.path,
                 k.pid, extra={"kept": str(k.path), "writer_pid": k.pid})
    return removed


def save(directory: str | Path, step: int, state: dict[str, Any], keep: int = 3,
         keepalive: Callable[[], None] | None = None, group: str | None = None) -> Path:
    """Write `state` as the checkpoint of `step` atomically; keep the newest `keep`. Returns its path.

    `keepalive`, if given, is called after every write and after the fsync (the two things that
    take long for a big model on a slow disk); it should rate-limit itself. The file is 0600,
    or 0640 of `group` (a directory created here 0700 / 0750), whatever the umask.
    """
    d = Path(directory)
    gid = group_id(group)
    make_dir(d, gid, exist_ok=True)
    final = checkpoint_path(d, step)
    tmp = d / f".{final.name}.tmp-{os.getpid()}"
    try:
        # not exclusive: a temporary of an earlier process with our pid is stale
        with os.fdopen(create_file(tmp, gid, exclusive=False), "wb") as f:
            torch.save(state, f if keepalive is None else _KeepaliveFile(f, keepalive))
            f.flush()
            os.fsync(f.fileno())
        if keepalive is not None:
            keepalive()
        os.replace(tmp, final)
        fsync_dir(d)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if keep > 0:
        for old in list_checkpoints(d)[:-keep]:
            old.unlink(missing_ok=True)
    return final


def load(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by `save` (tensors and plain values only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # a truncated or foreign file: say which one
        raise ValueError(f"checkpoint {path} is not a readable mmfeed checkpoint: {e}") from None
