"""What a checkpoint holds of a `Trainer` and how a resume puts it back: the state dict, the
lifetime counts, the disk position (rescaled when the job resumes on another number of ranks
or with another batch size), each rank's RNG streams and the transforms' generator, and the
live mix (the command line wins over the checkpoint, NOTE [run and lifetime] in loop.py).

A mixin of `Trainer` (loop.py), apart so that the loop module reads as the step it runs; it
uses the trainer's attributes (model, optimizer, cfg, dist, readers) and adds none of its own
beyond what a resume sets.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch.distributed as dist

from . import checkpoint as ckpt
from .batching import group_batches
from .topology import rescale_disk_position

log = logging.getLogger("trainer.loop")


class TrainState:
    """Checkpoint and resume of a `Trainer` (see the module docstring)."""

    def state_dict(self) -> dict:
        return {
            "step": self.step, "disk_position": list(self.disk_position),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(), "rng": ckpt.rng_state(),
            "mix": self.mixer.fraction if hasattr(self, "mixer") else self.cfg.mix,
            "classes": list(self.classes),
            "counts": self.lifetime_counts(),
            "batch_size": self.cfg.batch_size,  # the unit of disk_position's batch index
            # what `disk_position` counts in: a resume on another world size rescales it
            "world_size": self.dist.world_size,
            "disk_batches_per_epoch": self.disk_batches_per_epoch(),
            **({"transform_rng": self.transform.state_dict()["generator"]}
               if self.transform is not None else {}),
        }

    def lifetime_counts(self) -> dict[str, int]:
        """The checkpoint's totals plus this run's (what the next checkpoint saves)."""
        b = self.lifetime_base
        return {"live": b["live"] + self.samples_live, "disk": b["disk"] + self.samples_disk,
                "unlabelled": b["unlabelled"] + self.samples_unlabelled,
                "bad_label": b["bad_label"] + self.samples_bad_label}

    def load_state(self, state: dict) -> None:
        if list(state.get("classes", self.classes)) != list(self.classes):
            raise ValueError(f"checkpoint classes {state['classes']} differ from the cache's "
                             f"{self.classes}; use another --checkpoint-dir")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.disk_position = self._disk_position_from(state)
        self.resumed_step = self.step
        self._restore_mix(state.get("mix"))
        counts = state.get("counts", {})
        self.lifetime_base = {k: int(counts.get(k, 0))
                              for k in ("live", "disk", "unlabelled", "bad_label")}
        self._restore_transform_rng(state)
        how = ckpt.restore_rng(state, self.dist.rank)
        if how == "derived":
            log.info("rank %d: no RNG state saved for this rank; derived one from rank 0's",
                     self.dist.rank)

    def disk_batches_per_epoch(self, world_size: int | None = None,
                               batch_size: int | None = None) -> int:
        """Batches per epoch of one rank's disk shard, for `world_size` ranks and batches of
        `batch_size` (defaults: this job's)."""
        return len(group_batches(self.train_reader.schema_groups(),
                                 batch_size or self.cfg.batch_size,
                                 shuffle=False, seed=0, epoch=0, rank=0,
                                 world_size=world_size or self.dist.world_size))

    def _disk_position_from(self, state: dict) -> tuple[int, int]:
        """The checkpoint's disk position, rescaled when it was written by another number of
        ranks (a job resumed on another node count: topology.rescale_disk_position)."""
        pos = tuple(int(x) for x in state["disk_position"])
        saved_world = int(state.get("world_size", self.dist.world_size))
        # ... or of another batch size (`mmctl batch`, --auto-batch): the position counts
        # batches of the saved size
        saved_bs = int(state.get("batch_size") or self.cfg.batch_size)
        if saved_world == self.dist.world_size and saved_bs == self.cfg.batch_size:
            return pos
        saved = int(state.get("disk_batches_per_epoch")
                    or self.disk_batches_per_epoch(saved_world, saved_bs))
        new = rescale_disk_position(pos, saved, self.disk_batches_per_epoch())
        log.info("resuming on %d ranks with batches of %d from a checkpoint of %d ranks with "
                 "batches of %d: disk position (epoch %d, batch %d of %d) becomes (epoch %d, "
                 "batch %d of %d)", self.dist.world_size, self.cfg.batch_size, saved_world,
                 saved_bs, pos[0], pos[1], saved, new[0], new[1],
                 self.disk_batches_per_epoch(),
                 extra={"saved_world_size": saved_world, "world_size": self.dist.world_size,
                        "saved_batch_size": saved_bs, "batch_size": self.cfg.batch_size})
        return new
    def _rank_rng_state(self) -> dict:
        """This rank's RNG states for `rng_ranks`: the global ones plus the transforms'."""
        state = ckpt.rng_state()
        if self.transform is not None:
            state["transform"] = self.transform.state_dict()["generator"]
        return state

    def _restore_transform_rng(self, state: dict) -> None:
        """The transforms' generator where this rank left it (its `rng_ranks` entry, rank 0's
        `transform_rng`); a rank without a saved one derives its own from rank 0's, so ranks
        never draw the same augmentations."""
        if self.transform is None or "transform_rng" not in state:
            return
        per_rank = state.get("rng_ranks") or []
        mine = per_rank[self.dist.rank] if self.dist.rank < len(per_rank) else None
        if mine is not None and "transform" in mine:
            self.transform.load_state_dict({"generator": mine["transform"]})
        elif self.dist.rank == 0:
            self.transform.load_state_dict({"generator": state["transform_rng"]})
        else:
            seed = int.from_bytes(state["transform_rng"].numpy().tobytes()[-8:], "little")
            self.transform.generator.manual_seed((seed + 7919 * self.dist.rank) % 2**63)

    def _restore_mix(self, saved) -> None:
        """The checkpoint's live fraction, unless --mix was given (the command line wins) or
        it cannot apply (a fraction above 0 and no ring now). `mix_note()` says which."""
        try:
            saved = float(saved) if saved is not None else None
        except (TypeError, ValueError):
            saved = None
        if saved is not None and not 0.0 <= saved <= 1.0:
            saved = None
        self.checkpoint_mix = saved
        if saved is None or self.cfg.mix_source == "given":
            return
        if saved > 0 and not self.cfg.ring:
            return  # mix_note() says why the default stays
        self.cfg.mix = saved
        self.cfg.mix_source = "checkpoint"

    def save_checkpoint(self, keepalive: Callable[[], None] | None = None) -> Path | None:
        """Rank 0 writes; every rank waits for it (a collective: call on all ranks).

        `keepalive` is called after every write of the file (see `checkpoint.save`): the
        daemon's rate-limited WATCHDOG=1, so a big model's save is not taken for a hang.
        """
        d = self.cfg.checkpoint_dir
        if d is None:
            return None
        path = None
        rngs = None
        if self.dist.enabled:  # every rank's RNG state, so each resumes its own streams
            rngs = [None] * self.dist.world_size
            dist.all_gather_object(rngs, self._rank_rng_state())
        if self.dist.rank == 0:
            state = self.state_dict()
            if rngs is not None:
                state["rng_ranks"] = rngs
            path = ckpt.save(d, self.step, state, keep=self.cfg.keep, keepalive=keepalive,
                             group=self.cfg.group)
            self.checkpoint_path = path
            log.info("checkpoint written", extra={"checkpoint": str(path), "step": self.step})
        if self.dist.enabled:
            dist.barrier()
        return path
