"""The training loop: data in, optimiser steps out, metrics and checkpoints along the way.

`Trainer` owns the model, optimiser, loaders, mixer and prefetcher, and runs one step at a time
(`step_once()`), so the daemon can answer control requests and signals between steps. Everything
it knows is in `status()`; what it ends with is `summary()`.

A step: take a device batch (the time spent waiting for it is the data stall), convert inputs
to float (uint8 / 255), adapt shapes to what the model expects (`ShapeAdapter`), forward with
AMP (bf16 on GPUs that support it, off on the CPU), backward, and every `accum` micro-batches
an AdamW step. Under torchrun each rank reads its own cache shard and its own ring reader;
gradients are averaged by DDP (gloo on CPU, NCCL on GPU).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from protocol.cache import CacheReader
from protocol.errors import CacheError

from . import checkpoint as ckpt
from .adapt import ShapeAdapter
from .datasets import LiveDiskMixer
from .model import build_model, expected_shapes
from .prefetch import DevicePrefetcher, DiskLoader, RingLoader, WorkerDiskLoader
from .recent import RecentGenerations

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """What `mm-trainer run` takes; every field has a command-line flag of the same name."""

    cache: Path
    ring: str | None = None
    mix: float | None = None            # live fraction; default 0.5 with a ring, else 0
    model: str | None = None            # module:factory
    checkpoint_dir: Path | None = None
    steps: int | None = None
    epochs: int | None = None           # epochs of this rank's disk shard, counted in steps
    batch_size: int = 32
    workers: int = 0                    # 0: in-process reader thread; N: DataLoader workers
    lr: float = 1e-3
    weight_decay: float = 0.01
    accum: int = 1                      # micro-batches per optimiser step
    amp: str = "auto"                   # auto | bf16 | off
    log_interval: float = 10.0          # seconds
    eval_interval: int = 0              # steps; 0 = only at the end
    checkpoint_interval: int = 0        # steps; 0 = only at exit
    keep: int = 3
    seed: int = 0
    device: str = "auto"
    ring_start: str = "newest"
    ring_group: str | None = None       # also trust a ring of this group, mode 0660 (another user's)
    resume: bool = True

    def __post_init__(self) -> None:
        self.cache = Path(self.cache)
        if self.checkpoint_dir is not None:
            self.checkpoint_dir = Path(self.checkpoint_dir)
        if self.mix is None:
            self.mix = 0.5 if self.ring else 0.0
        if not 0.0 <= self.mix <= 1.0:
            raise ValueError(f"--mix {self.mix}: expected a live fraction in [0, 1]")
        if self.mix > 0 and not self.ring:
            raise ValueError(f"--mix {self.mix}: a live fraction above 0 needs --ring NAME")
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give --steps or --epochs, not both")
        if self.ring_group is not None:
            from protocol.ring_owner import group_gid

            group_gid(self.ring_group)  # ValueError naming it when there is no such group
        for name in ("batch_size", "accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.amp not in ("auto", "bf16", "off"):
            raise ValueError(f"--amp {self.amp!r}: expected auto, bf16 or off")


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls) -> "Dist":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))


@dataclass
class Meter:
    """Counters over one log interval."""

    t0: float = field(default_factory=time.monotonic)
    steps: int = 0
    samples: int = 0
    samples_live: int = 0
    wait_s: float = 0.0
    step_s: float = 0.0
    loss_sum: float = 0.0


class Trainer:
    def __init__(self, cfg: TrainConfig, dist_info: Dist | None = None):
        self.cfg = cfg
        self.dist = dist_info or Dist()
        self.device = self._pick_device()
        if self.device.type == "cuda" and self.device.index is not None:
            # Object collectives (the RNG gather in save_checkpoint) and barrier() under NCCL
            # use the current device: make it this rank's, not every rank's cuda:0.
            torch.cuda.set_device(self.device)
        torch.manual_seed(cfg.seed + self.dist.rank)
        try:
            self.train_reader = CacheReader(cfg.cache, "train")
        except CacheError:
            raise
        if len(self.train_reader) == 0:
            raise CacheError(f"{cfg.cache}: the cache has no 'train' records")
        self.val_reader = (CacheReader(cfg.cache, "val")
                           if "val" in self.train_reader.splits else None)
        self.classes = self.train_reader.classes
        schema = self.train_reader.schema(0)
        self.model = build_model(cfg.model, schema, len(self.classes)).to(self.device)
        self.adapter = ShapeAdapter(expected_shapes(self.model, schema))
        self.ddp = None
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            # find_unused_parameters: a batch without a modality leaves that encoder unused.
            self.ddp = DDP(self.model, device_ids=ids, find_unused_parameters=True)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr,
                                           weight_decay=cfg.weight_decay)
        self.amp_dtype = self._pick_amp()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=False)  # bf16 needs none
        self.step = 0
        self.micro = 0
        self.disk_position = (0, 0)
        self.checkpoint_path: Path | None = None
        self.accuracy: float | None = None
        self.loss: float | None = None
        self.samples_live = self.samples_disk = 0
        self.live_copies = 0
        self.generations_trained: set[int] = RecentGenerations()  # newest 256
        self.last_generation: int | None = None
        self.total_wait_s = self.total_step_s = 0.0
        self.started = time.monotonic()
        self.last_metrics: dict = {}
        self.state = "starting"
        self._meter = Meter()
        self._resume_if_any()
        self._open_sources()

    # --- setup -------------------------------------------------------------------------------

    def _pick_device(self) -> torch.device:
        want = self.cfg.device
        if want == "auto":
            if torch.cuda.is_available():
                return torch.device("cuda", self.dist.local_rank % torch.cuda.device_count())
            log.info("no CUDA device: training on the CPU (pinned memory, side streams and "
                     "AMP are off)")
            return torch.device("cpu")
        return torch.device(want)

    def _pick_amp(self) -> torch.dtype | None:
        if self.cfg.amp == "off" or self.device.type != "cuda":
            return None
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if self.cfg.amp == "bf16":
            raise ValueError(f"--amp bf16: {torch.cuda.get_device_name(self.device)} has no bf16")
        return None

    def _open_sources(self) -> None:
        cfg, d = self.cfg, self.dist
        common = dict(shuffle=True, seed=cfg.seed, rank=d.rank, world_size=d.world_size,
                      start=self.disk_position)
        if cfg.workers > 0:
            self.disk = WorkerDiskLoader(self.train_reader, cfg.batch_size, workers=cfg.workers,
                                         **common).start()
        else:
            self.disk = DiskLoader(self.train_reader, cfg.batch_size, **common).start()
        self.live = None
        if cfg.ring and self.device.type == "cuda":
            # GPU slot rings by device copies, host rings as RingLoader (trainer/gpu_loader.py).
            from .gpu_loader import GpuRingLoader

            self.live = GpuRingLoader(cfg.ring, cfg.batch_size, device=self.device,
                                      start=cfg.ring_start, rank=d.rank,
                                      world_size=d.world_size).start()
        elif cfg.ring:
            self.live = RingLoader(cfg.ring, cfg.batch_size, start=cfg.ring_start,
                                   group=cfg.ring_group,
                                   rank=d.rank, world_size=d.world_size).start()
        self.mixer = LiveDiskMixer(self.live, self.disk, cfg.mix or 0.0,
                                   window=max(64, 32 * cfg.batch_size))
        self.prefetcher = DevicePrefetcher(self.mixer.get, self.device)
        self.total_steps = cfg.steps
        if cfg.epochs is not None:
            self.total_steps = cfg.epochs * max(1, self.disk.batches_per_epoch() // cfg.accum)

    def _resume_if_any(self) -> None:
        d = self.cfg.checkpoint_dir
        if d is None or not self.cfg.resume:
            return
        path = ckpt.latest_checkpoint(d)
        if path is None:
            return
        self.load_state(ckpt.load(path))
        log.info("resumed from %s at step %d", path, self.step,
                 extra={"checkpoint": str(path), "step": self.step})

    # --- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "step": self.step, "disk_position": list(self.disk_position),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(), "rng": ckpt.rng_state(),
            "mix": self.mixer.fraction if hasattr(self, "mixer") else self.cfg.mix,
            "classes": list(self.classes),
            "counts": {"live": self.samples_live, "disk": self.samples_disk},
        }

    def load_state(self, state: dict) -> None:
        if list(state.get("classes", self.classes)) != list(self.classes):
            raise ValueError(f"checkpoint classes {state['classes']} differ from the cache's "
                             f"{self.classes}; use another --checkpoint-dir")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.disk_position = tuple(int(x) for x in state["disk_position"])
        self.cfg.mix = float(state.get("mix", self.cfg.mix))
        counts = state.get("counts", {})
        self.samples_live = int(counts.get("live", 0))
        self.samples_disk = int(counts.get("disk", 0))
        how = ckpt.restore_rng(state, self.dist.rank)
        if how == "derived":
            log.info("rank %d: no RNG state saved for this rank; derived one from rank 0's",
                     self.dist.rank)

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
            dist.all_gather_object(rngs, ckpt.rng_state())
        if self.dist.rank == 0:
            state = self.state_dict()
            if rngs is not None:
                state["rng_ranks"] = rngs
            path = ckpt.save(d, self.step, state, keep=self.cfg.keep, keepalive=keepalive)
            self.checkpoint_path = path
            log.info("checkpoint written", extra={"checkpoint": str(path), "step": self.step})
        if self.dist.enabled:
            dist.barrier()
        return path

    # --- one step ----------------------------------------------------------------------------

    def _prepare(self, batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Model inputs and labels that no longer depend on the batch's host buffer.

        On the CPU the batch is a view of a pooled host buffer that the loader thread refills
        as soon as it is released, so inputs AND labels are copied out first (cross_entropy
        keeps its target for backward: a shared label view would be overwritten mid-step).
        """
        inputs = {}
        for k, v in batch.inputs.items():
            if v.dtype == torch.uint8:
                inputs[k] = v.to(torch.float32).div_(255.0)
            else:
                inputs[k] = v.to(torch.float32, copy=True)
        labels = batch.labels if batch.labels.device.type != "cpu" else batch.labels.clone()
        batch.release()
        return self.adapter(inputs, batch.generation), labels

    def step_once(self, timeout: float = 1.0) -> bool:
        """Train on one optimiser step's worth of batches; False when no data came in time."""
        net = self.ddp or self.model
        net.train()
        t0 = time.monotonic()
        wait = 0.0
        loss_total = 0.0
        samples = live = 0
        for k in range(self.cfg.accum):
            tw = time.monotonic()
            batch = self.prefetcher.get(timeout)
            wait += time.monotonic() - tw
            if batch is None:
                if k == 0:
                    return False
                break
            inputs, labels = self._prepare(batch)
            # A non-final micro-batch under DDP skips the gradient all-reduce: its forward and
            # backward run inside ONE no_sync() context, as DDP documents (the forward decides
            # whether the backward reduces; one no_sync() object cannot be entered twice).
            last = k == self.cfg.accum - 1
            with net.no_sync() if (self.ddp is not None and not last) else _null():
                with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16,
                                    enabled=self.amp_dtype is not None):
                    logits = net(inputs)
                    loss = F.cross_entropy(logits.float(), labels) / self.cfg.accum
                loss.backward()
            loss_total += float(loss.detach())
            samples += batch.n
            if batch.live:
                live += batch.n
                self.samples_live += batch.n
                self.live_copies += batch.copies
                self.generations_trained.add(batch.generation)
                self.last_generation = batch.generation
            else:
                self.samples_disk += batch.n
                pos = getattr(batch.host, "position", None) if batch.host else None
                if pos is not None:
                    self.disk_position = pos
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.loss = loss_total
        dt = time.monotonic() - t0
        m = self._meter
        m.steps += 1
        m.samples += samples
        m.samples_live += live
        m.wait_s += wait
        m.step_s += dt
        m.loss_sum += loss_total
        self.total_wait_s += wait
        self.total_step_s += dt
        return True

    _meter: Meter = None  # type: ignore[assignment]

    def reset_meter(self) -> dict:
        """Close the current log interval; returns its metrics (also kept for `status`).

        Every value is over the interval's steps: `loss` their mean, `samples` trained on,
        `samples_per_s` over the interval's wall time, `stall_fraction` the time steps waited
        for data over the time they took (in [0, 1]: the wait is inside the step),
        `live_fraction` the live share of the samples trained on (not the mixer's window,
        which spans other intervals and batches drawn but not yet trained on), `generation`
        the last live generation trained on.
        """
        m, self._meter = self._meter, Meter()
        if m is None or m.steps == 0:
            return self.last_metrics
        elapsed = max(time.monotonic() - m.t0, 1e-9)
        self.last_metrics = {
            "step": self.step, "steps": m.steps, "samples": m.samples,
            "loss": round(m.loss_sum / m.steps, 5),
            "samples_per_s": round(m.samples / elapsed, 2),
            "stall_fraction": round(m.wait_s / m.step_s, 4) if m.step_s else 0.0,
            "live_fraction": round(m.samples_live / m.samples, 4) if m.samples else 0.0,
            "live_fraction_target": self.mixer.fraction,
            "generation": self.last_generation,
            "copies_per_sample": self.copies_per_sample(),
        }
        return self.last_metrics

    def copies_per_sample(self) -> float | None:
        return round(self.live_copies / self.samples_live, 3) if self.samples_live else None

    # --- evaluation --------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, keepalive: Callable[[], None] | None = None) -> float | None:
        """Accuracy on the val split (each rank its shard, summed over ranks).

        `keepalive` is called after every val batch: a big val split takes longer than the
        unit's WatchdogSec, and the daemon's main loop sends no WATCHDOG=1 meanwhile. It is
        called only when a batch was evaluated (progress), never while waiting for one, so a
        stuck loader still starves the watchdog. The callee rate-limits (it is per batch).
        """
        if self.val_reader is None or len(self.val_reader) == 0:
            return None
        self.model.eval()
        loader = DiskLoader(self.val_reader, self.cfg.batch_size, shuffle=False, epochs=1,
                            rank=self.dist.rank, world_size=self.dist.world_size).start()
        pf = DevicePrefetcher(loader.get, self.device)
        correct = total = 0
        try:
            while True:
                b = pf.get(0.2)
                if b is None:
                    if loader.exhausted:
                        break
                    continue
                inputs, labels = self._prepare(b)
                with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16,
                                    enabled=self.amp_dtype is not None):
                    pred = self.model(inputs).argmax(dim=1)
                correct += int((pred == labels).sum())
                total += b.n
                if keepalive is not None:
                    keepalive()
        finally:
            pf.close()
            loader.close()
        t = torch.tensor([correct, total], dtype=torch.float64)
        if self.dist.enabled:
            dist.all_reduce(t)
        self.accuracy = float(t[0] / t[1]) if t[1] else None
        return self.accuracy

    # --- reporting ---------------------------------------------------------------------------

    def status(self) -> dict:
        live = self.live.stats if self.live is not None else None
        elapsed = max(time.monotonic() - self.started, 1e-9)
        disk_epoch = self.disk_position[0]
        return {
            "state": self.state, "step": self.step, "total_steps": self.total_steps,
            "epoch": disk_epoch, "loss": self.loss, "accuracy": self.accuracy,
            "samples_per_s": self.last_metrics.get(
                "samples_per_s", round((self.samples_live + self.samples_disk) / elapsed, 2)),
            "stall_fraction": self.last_metrics.get("stall_fraction", self.stall_fraction()),
            "stall": self.last_metrics.get("stall_fraction", self.stall_fraction()),
            "live_fraction_target": self.mixer.fraction,
            "live_fraction": round(self.mixer.achieved, 4),
            "live_fraction_total": round(self.mixer.achieved_total, 4),
            "samples_live": self.samples_live, "samples_disk": self.samples_disk,
            "generations_seen": sorted(live.generations) if live else [],
            "generations_trained": sorted(self.generations_trained),
            "generation": self.last_generation,
            "copies_per_sample": self.copies_per_sample(),
            "ring": self.cfg.ring, "ring_attached": bool(self.live and self.live.attached),
            "ring_reattached": live.reattached if live else 0,
            "live_dropped": live.dropped if live else 0,
            "adapted_batches": self.adapter.adapted,
            "checkpoint": str(self.checkpoint_path) if self.checkpoint_path else None,
            "rank": self.dist.rank, "world_size": self.dist.world_size,
            "device": str(self.device), "amp": str(self.amp_dtype).replace("torch.", "")
            if self.amp_dtype else "off",
        }

    def stall_fraction(self) -> float:
        return round(self.total_wait_s / self.total_step_s, 4) if self.total_step_s else 0.0

    def rank_counts(self) -> list[dict]:
        """Samples each rank trained on, live and disk (a collective: call on all ranks).

        The other counts in `summary` are this rank's; this is how rank 0's summary shows
        that every rank read the ring as its own reader and trained on what it got.
        """
        t = torch.zeros(self.dist.world_size, 2, dtype=torch.float64)
        t[self.dist.rank, 0], t[self.dist.rank, 1] = self.samples_live, self.samples_disk
        if self.dist.enabled:
            if self.device.type == "cuda":
                t = t.to(self.device)
            dist.all_reduce(t)  # each row is filled by one rank, zeros elsewhere
            t = t.cpu()
        return [{"rank": r, "samples_live": int(live), "samples_disk": int(disk)}
                for r, (live, disk) in enumerate(t.tolist())]

    def summary(self) -> dict:
        """What the run ends with; a collective under torchrun (`rank_counts`): all ranks call it."""
        elapsed = max(self.total_step_s, 1e-9)
        return {
            "steps": self.step, "samples_disk": self.samples_disk,
            "samples_live": self.samples_live,
            "generations": sorted(self.generations_trained),
            "accuracy": self.accuracy, "loss": self.loss,
            "samples_per_s": round((self.samples_live + self.samples_disk) / elapsed, 2),
            "stall_fraction": self.stall_fraction(),
            "live_fraction": round(self.mixer.achieved_total, 4),
            "copies_per_sample": self.copies_per_sample(),
            "checkpoint": str(self.checkpoint_path) if self.checkpoint_path else None,
            "world_size": self.dist.world_size, "ranks": self.rank_counts(),
        }

    def close(self) -> None:
        """NOTE [shutdown order] in prefetch.py: threads first, then the readers they use."""
        self.prefetcher.close()
        if self.live is not None:
            self.live.close()
        self.disk.close()
        self.train_reader.close()
        if self.val_reader is not None:
            self.val_reader.close()


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


def config_dict(cfg: TrainConfig) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}
