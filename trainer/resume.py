"""Which checkpoint a (possibly multi-node) job resumes from, and getting it to every rank.

Checkpoints are written once, by rank 0, into ITS node's `--checkpoint-dir`. With one node, or
a checkpoint directory on a shared file system, every rank finds the same newest file. With a
local directory per node they do not: torchrun's c10d rendezvous may make another node rank 0
at the next start, a node that joins has an empty directory, and a job resumed on more nodes
than wrote the checkpoint finds it on one node only. A rank that resumed from nothing while
rank 0 resumed from step 400 would run DDP with other weights and another step count, and
hang at the end when the ranks disagree on when to stop.

So every rank says which step its own directory holds; the newest wins; if every rank holds
it, each loads its own file (no traffic), otherwise the lowest rank holding it loads it and
broadcasts it to all ranks (an object collective: the state is pickled once and sent once).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch.distributed as dist

from . import checkpoint as ckpt
from .topology import Dist

log = logging.getLogger(__name__)


def checkpoint_step(path: Path | None) -> int:
    """The step in a `ckpt-NNNNNNNN.pt` name; -1 for none."""
    if path is None:
        return -1
    return int(path.name[len("ckpt-"):-len(".pt")])


def newest_checkpoint(directory: str | Path | None, d: Dist
                      ) -> tuple[Path | None, dict[str, Any] | None]:
    """(path, state) of the newest checkpoint any rank holds, on every rank; (None, None)
    when no rank has one. A collective under torchrun: every rank calls it, in the same order.
    `path` names the file on the rank that holds it (on other ranks it may not exist)."""
    path = ckpt.latest_checkpoint(directory) if directory is not None else None
    if not d.enabled or not dist.is_initialized():
        return (path, ckpt.load(path)) if path is not None else (None, None)
    steps: list[Any] = [None] * d.world_size
    dist.all_gather_object(steps, (checkpoint_step(path), str(path) if path else None))
    newest = max(s for s, _ in steps)
    if newest < 0:
        return None, None
    if all(s == newest for s, _ in steps):
        return path, ckpt.load(path)
    src = min(r for r, (s, _) in enumerate(steps) if s == newest)
    box = [ckpt.load(path) if d.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    held = Path(steps[src][1])
    if d.rank != src:
        log.info("rank %d: the checkpoint of step %d is not in this node's checkpoint dir "
                 "%s (newest here: %s); received it from rank %d (%s)", d.rank, newest,
                 directory, path.name if path else "none", src, held,
                 extra={"checkpoint": str(held), "step": newest, "from_rank": src})
    return held, box[0]
