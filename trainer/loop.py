"""The training loop: data in, optimiser steps out, metrics and checkpoints along the way.

`Trainer` owns the model, optimiser, loaders, mixer and prefetcher, and runs one step at a time
(`step_once()`), so the daemon can answer control requests and signals between steps. Everything
it knows is in `status()`; what it ends with is `summary()`.

A step: take a device batch (the time spent waiting for it is the data stall), convert inputs
to float (uint8 / 255), adapt shapes to what the model expects (`ShapeAdapter`), forward with
AMP (bf16 on GPUs that support it, off on the CPU), backward, and every `accum` micro-batches
an AdamW step. Under torchrun each rank reads its own cache shard and its own ring reader;
gradients are averaged by DDP (gloo on CPU, NCCL on GPU).

NOTE [unlabelled samples]: a live source without a label publishes label -1 (`UNLABELLED`),
a normal case, not an error. The supervised loss is the mean cross-entropy over the batch's
LABELLED samples only (labels in [0, num_classes)); unlabelled ones are counted
(`samples_unlabelled`), and labels outside the class list (a producer whose class list differs
from the cache's) are counted as `samples_bad_label` and logged once per value, both left out
of the loss. A step in which no sample was labelled (on any rank) makes no optimiser step: it
does not count in `step`, it is counted in `steps_unlabelled`, and its generations still count
as seen by training (`generation`, so `mmctl wait` returns on an unlabelled stream too).

NOTE [run and lifetime]: a resumed trainer continues the step counter and the lifetime sample
counts from its checkpoint, but every rate it reports is this run's: `samples_per_s` and
`copies_per_sample` are this run's counts over this run's time, and `samples_live`/`_disk`
are this run's; the checkpoint's totals plus this run's are `lifetime_*`.
"""
from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from protocol.cache import CacheReader
from protocol.errors import CacheError
from protocol.schema import UNLABELLED
from protocol.stages import StageTimer, now_ns

from . import checkpoint as ckpt
from .adapt import ShapeAdapter
from .config import Meter, TrainConfig  # noqa: F401  (TrainConfig: re-exported)
from .datasets import LiveDiskMixer
from .evaluate import val_accuracy
from .model import build_model, expected_shapes
from .prefetch import DevicePrefetcher, DiskLoader, RingLoader, WorkerDiskLoader
from .transforms import build_transform
from .nvdec import nvdec_refusal
from .windows import TiledReader, TileSpec
from .recent import RecentGenerations
from .resume import newest_checkpoint
from .reporting import TrainReports
from .topology import Dist
from .train_state import TrainState

log = logging.getLogger(__name__)

IGNORE_LABEL = -100          # cross_entropy's ignore_index: what unusable labels become
BAD_LABELS_LOGGED = 8        # distinct out-of-range label values logged (each once)
MAX_BATCH_SIZE = 65536
LR_RULES = ("none", "linear", "sqrt")  # how `mmctl batch N --lr-rule` scales the learning rate


class Trainer(TrainState, TrainReports):
    """See the module docstring. Checkpoint and resume: train_state.py; metrics, status and
    summary: reporting.py (both mixins of this class)."""

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
        if cfg.tiles:  # patch samples read window by window (trainer/windows.py)
            spec = TileSpec.parse(cfg.tiles)
            self.train_reader = TiledReader(self.train_reader, spec)
            if self.val_reader is not None:
                self.val_reader = TiledReader(self.val_reader, spec)
        self.classes = self.train_reader.classes
        schema = self.train_reader.schema(0).unpacked()  # NV12 video: the model sees RGB
        self.model = build_model(cfg.model, schema, len(self.classes)).to(self.device)
        # --transform: on the device after the copy (trainer/transforms.py); the adapter then
        # keeps inputs at the data's shapes and the transforms make the model's
        self.transform = (build_transform(cfg.transform, schema, device=self.device,
                                          seed=(cfg.seed + 1) * 1_000_003 + self.dist.rank)
                          if cfg.transform else None)
        self.adapter = ShapeAdapter(expected_shapes(self.model, schema) if self.transform is None
                                    else {m.name: m.shape for m in schema.modalities})
        self.auto_batch = self._auto_batch(schema) if cfg.auto_batch else None
        self.batch_size_trained: int | None = None  # rows of the last micro-batch trained
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
        # NOTE [run and lifetime]: these counters are this run's; `lifetime_base` holds the
        # resumed checkpoint's totals (state_dict saves base + run).
        self.samples_live = self.samples_disk = 0
        self.samples_unlabelled = self.samples_bad_label = 0
        self.steps_unlabelled = 0
        self.live_copies = 0
        self.live_copy_bytes = 0  # bytes of those copies (slot -> batch row): status
        self.lifetime_base = {"live": 0, "disk": 0, "unlabelled": 0, "bad_label": 0}
        self.resumed_from: Path | None = None
        self.resumed_step = 0
        self.checkpoint_mix: float | None = None
        self._bad_labels_logged: set[int] = set()
        self._unlabelled_logged = False
        self.live_starved = False
        self.generations_trained: set[int] = RecentGenerations()  # newest 256
        self.last_generation: int | None = None
        self.total_wait_s = self.total_step_s = 0.0
        self.started = time.monotonic()
        self.last_metrics: dict = {}
        self.state = "starting"
        self.stages = StageTimer("trainer")  # NOTE [cheap timing] in protocol/stages.py
        st = self.stages.stage
        self._st_wait, self._st_device = st("wait", "data"), st("to_device", "device")
        self._st_fwd, self._st_bwd = st("forward", "compute"), st("backward", "compute")
        self._st_opt = st("optimizer", "compute")
        self._meter = Meter()
        self._resume_if_any()
        self._log_mix_choice()
        self._open_sources()
        self._meter = self._new_meter()

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

    def _auto_batch(self, schema):
        """`--auto-batch`: the largest batch within the memory budget (trainer/autobatch.py);
        under torchrun every rank takes the smallest any rank found."""
        from .autobatch import MAX_BATCH, default_budget, find_batch_size

        budget = self.cfg.memory_budget or default_budget(self.device)
        # no batch larger than this rank's share of the train split: the disk side could
        # never fill it
        most = max(1, min(MAX_BATCH, -(-len(self.train_reader) // self.dist.world_size)))
        found = find_batch_size(self.model, schema, len(self.classes), self.device, budget,
                                max_batch=most)
        size = found.batch_size
        if self.dist.enabled:
            t = torch.tensor([size], dtype=torch.int64,
                             device=self.device if self.device.type == "cuda" else "cpu")
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            size = found.batch_size = int(t.item())
        self.cfg.batch_size = size
        log.info(found.sentence(), extra={"batch_size": size, "memory_budget": budget,
                                          "memory": found.memory})
        return found

    def set_batch_size(self, n: int, lr_rule: str = "none") -> dict:
        """`mmctl batch N`, at a step boundary (the daemon calls it between steps): the loaders
        start batches of n samples now (batches already read ahead keep their size); with
        lr_rule "linear" the learning rate scales by n/old, "sqrt" by its square root."""
        if not 1 <= n <= MAX_BATCH_SIZE:
            raise ValueError(f"batch size must be in 1..{MAX_BATCH_SIZE}, got {n}")
        if lr_rule not in LR_RULES:
            raise ValueError(f"lr rule {lr_rule!r}: expected one of {', '.join(LR_RULES)}")
        old = self.cfg.batch_size
        lr_old = self.optimizer.param_groups[0]["lr"]
        scale = {"none": 1.0, "linear": n / old, "sqrt": (n / old) ** 0.5}[lr_rule]
        for g in self.optimizer.param_groups:
            g["lr"] = g["lr"] * scale
        self.cfg.batch_size = n
        for loader in (self.disk, self.live):
            if loader is not None:
                loader.set_batch_size(n)
        if self.cfg.epochs is not None and self.total_steps is not None:
            # the same samples are left to train on, in batches of the new size
            self.total_steps = self.step + -(-max(0, self.total_steps - self.step) * old // n)
        lr = self.optimizer.param_groups[0]["lr"]
        log.info("batch size changed", extra={"batch_size": n, "previous": old,
                                              "lr_rule": lr_rule, "lr": lr, "previous_lr": lr_old,
                                              "step": self.step})
        return {"batch_size": n, "previous": old, "lr_rule": lr_rule, "lr": lr,
                "previous_lr": lr_old, "step": self.step, "total_steps": self.total_steps}

    def _pick_amp(self) -> torch.dtype | None:
        if self.cfg.amp == "off" or self.device.type != "cuda":
            return None
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if self.cfg.amp == "bf16":
            raise ValueError(f"--amp bf16: {torch.cuda.get_device_name(self.device)} has no bf16")
        return None

    def _nvdec(self, reader) -> bool:
        """Decode the cache's h264/hevc clips with NVDEC after the copy (trainer/nvdec.py)?"""
        if not getattr(reader, "has_compressed", False) or self.device.type != "cuda":
            return False
        why = nvdec_refusal(self.device)
        if why is not None:
            log.info("compressed video decoded by the loader threads on the CPU: %s", why)
        return why is None

    def _open_sources(self) -> None:
        cfg, d = self.cfg, self.dist
        common = dict(shuffle=True, seed=cfg.seed, rank=d.rank, world_size=d.world_size,
                      start=self.disk_position)
        if cfg.workers > 0:
            self.disk = WorkerDiskLoader(self.train_reader, cfg.batch_size, workers=cfg.workers,
                                         **common).start()
        else:
            self.disk = DiskLoader(self.train_reader, cfg.batch_size,
                                   defer_video=self._nvdec(self.train_reader), **common).start()
        self.live = None
        if cfg.ring and self.device.type == "cuda":
            # GPU slot rings by device copies, host rings as RingLoader
            # (trainer/gpu_slot_loader.py).
            from .gpu_slot_loader import GpuRingLoader

            # NOTE [live split] in topology.py: the ring is this node's, split among its ranks.
            reader, readers = d.live_shard
            self.live = GpuRingLoader(cfg.ring, cfg.batch_size, device=self.device,
                                      start=cfg.ring_start, rank=reader,
                                      world_size=readers).start()
        elif cfg.ring:
            reader, readers = d.live_shard
            self.live = RingLoader(cfg.ring, cfg.batch_size, start=cfg.ring_start,
                                   group=cfg.ring_group,
                                   rank=reader, world_size=readers).start()
        self.mixer = LiveDiskMixer(self.live, self.disk, cfg.mix or 0.0,
                                   window=max(64, 32 * cfg.batch_size))
        self.prefetcher = DevicePrefetcher(self.mixer.get, self.device)
        self.disk.stage = self.stages.stage("disk_read", "data")
        if self.live is not None:
            self.live.stage = self.stages.stage("ring_copy", "data")
        self.total_steps = cfg.steps
        if cfg.epochs is not None:
            self.total_steps = cfg.epochs * max(1, self.disk.batches_per_epoch() // cfg.accum)

    def _resume_if_any(self) -> None:
        d = self.cfg.checkpoint_dir
        if d is not None and self.dist.rank == 0:  # the only writer: its killed writes
            ckpt.sweep_temporaries(d)
        if d is None or not self.cfg.resume:
            return
        # The newest any rank's node holds, on every rank (trainer/resume.py).
        path, state = newest_checkpoint(d, self.dist)
        if path is None:
            return
        self.load_state(state)
        self.resumed_from = path
        log.info("resumed from %s at step %d", path, self.step,
                 extra={"checkpoint": str(path), "step": self.step,
                        "lifetime_samples_live": self.lifetime_base["live"],
                        "lifetime_samples_disk": self.lifetime_base["disk"]})

    def mix_note(self) -> str:
        """Which live fraction this run started with and why (the start-up log says it)."""
        cfg, saved = self.cfg, self.checkpoint_mix
        where = f" {self.resumed_from.name}" if self.resumed_from is not None else ""
        if cfg.mix_source == "given":
            overrides = (f"; it wins over {saved:g} saved in the checkpoint{where}"
                         if saved is not None and saved != cfg.mix else "")
            return f"live fraction {cfg.mix:g}: given with --mix{overrides}"
        if cfg.mix_source == "checkpoint":
            return (f"live fraction {cfg.mix:g}: restored from the checkpoint{where} "
                    f"(no --mix given; --mix F sets another)")
        why = "with --ring" if cfg.ring else "without --ring (disk only)"
        ignored = (f"; the checkpoint's {saved:g} needs a ring" if saved else "")
        return f"live fraction {cfg.mix:g}: the default {why} (no --mix given{ignored})"

    def _log_mix_choice(self) -> None:
        log.info(self.mix_note(), extra={"mix": self.cfg.mix, "mix_source": self.cfg.mix_source,
                                         "checkpoint_mix": self.checkpoint_mix})

    # --- one step ----------------------------------------------------------------------------

    def _prepare(self, batch, train: bool = True) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
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
        inputs = self.adapter(inputs, batch.generation)
        if self.transform is not None:
            inputs = self.transform(inputs) if train else self.transform.evaluate(inputs)
        return inputs, labels

    def _usable(self, labels: torch.Tensor, batch) -> tuple[torch.Tensor, int]:
        """Targets for the loss (unusable labels -> IGNORE_LABEL) and how many are usable.

        NOTE [unlabelled samples] (module docstring). Tensor ops over the batch, one sync for
        the count; the counting and logging below run only for a batch with unusable labels."""
        valid = (labels >= 0) & (labels < len(self.classes))
        n_valid = int(valid.sum())
        if n_valid == batch.n:
            return labels, n_valid
        unlabelled = int((labels == UNLABELLED).sum())
        bad = batch.n - n_valid - unlabelled
        self.samples_unlabelled += unlabelled
        self._meter.samples_unlabelled += unlabelled
        if unlabelled and not self._unlabelled_logged:
            self._unlabelled_logged = True
            log.info("%s samples without a label (label -1) arrive: they are counted as "
                     "unlabelled and left out of the supervised loss; label the source with "
                     "`mmctl label NAME` (or start the producer with --label NAME)",
                     "live" if batch.live else "disk",
                     extra={"generation": batch.generation if batch.live else None})
        if bad:
            self.samples_bad_label += bad
            self._meter.samples_bad_label += bad
            wrong = labels[~valid & (labels != UNLABELLED)]
            new = [v for v in torch.unique(wrong).tolist() if v not in self._bad_labels_logged]
            for v in new[: max(0, BAD_LABELS_LOGGED - len(self._bad_labels_logged))]:
                self._bad_labels_logged.add(v)
                log.warning("%s samples carry label %d, outside this trainer's classes 0..%d "
                            "(%s): counted as bad_label and left out of the loss; the "
                            "producer's class list must be the cache's (mm-producer run "
                            "--classes DATASET, then `mmctl label NAME`)",
                            "live" if batch.live else "disk", v, len(self.classes) - 1,
                            ", ".join(self.classes[:20]),
                            extra={"label": v, "num_classes": len(self.classes),
                                   "generation": batch.generation if batch.live else None})
        return torch.where(valid, labels, torch.full_like(labels, IGNORE_LABEL)), n_valid

    def step_once(self, timeout: float = 1.0) -> bool:
        """Train on one optimiser step's worth of batches; False when no data came in time.

        True means data was consumed; `step` grows only when some sample of the step was
        labelled (NOTE [unlabelled samples])."""
        net = self.ddp or self.model
        net.train()
        t0 = time.monotonic()
        wait = 0.0
        loss_total = 0.0
        samples = live = labelled = 0
        for k in range(self.cfg.accum):
            tw = time.monotonic()
            t_ns = now_ns()
            batch = self.prefetcher.get(timeout)
            wait += time.monotonic() - tw
            if batch is None:
                if k == 0:
                    return False
                break
            t_ns = self._st_wait.since(t_ns)
            inputs, labels = self._prepare(batch)
            t_ns = self._st_device.since(t_ns)
            targets, n_valid = self._usable(labels, batch)
            labelled += n_valid
            # Under DDP every rank runs forward and backward (the backward is a collective),
            # with a zero loss when none of its samples is labelled; alone, such a micro-batch
            # is skipped.
            if n_valid or self.ddp is not None:
                # A non-final micro-batch under DDP skips the gradient all-reduce: its forward
                # and backward run inside ONE no_sync() context, as DDP documents (the forward
                # decides whether the backward reduces; one no_sync() object cannot be entered
                # twice).
                last = k == self.cfg.accum - 1
                with net.no_sync() if (self.ddp is not None and not last) else nullcontext():
                    with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16,
                                        enabled=self.amp_dtype is not None):
                        logits = net(inputs)
                        # The mean over the labelled samples (never 0/0: NaN).
                        loss = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_LABEL,
                                               reduction="sum") / max(n_valid, 1) / self.cfg.accum
                    t_ns = self._st_fwd.since(t_ns)
                    loss.backward()
                    self._st_bwd.since(t_ns)
                loss_total += float(loss.detach())
            samples += batch.n
            self.batch_size_trained = batch.n
            if batch.live:
                live += batch.n
                self.samples_live += batch.n
                self.live_copies += batch.copies
                self.live_copy_bytes += batch.copies * batch.schema.payload_nbytes
                self.generations_trained.add(batch.generation)
                self.last_generation = batch.generation
            else:
                self.samples_disk += batch.n
                pos = getattr(batch.host, "position", None) if batch.host else None
                if pos is not None:
                    self.disk_position = pos
        if self.dist.enabled:  # every rank must agree whether this is an optimiser step
            t = torch.tensor([float(labelled)], dtype=torch.float64,
                             device=self.device if self.device.type == "cuda" else "cpu")
            dist.all_reduce(t)
            labelled = int(t.item())
        m = self._meter
        if labelled:
            t_ns = now_ns()
            self.optimizer.step()
            self._st_opt.since(t_ns)
            self.step += 1
            self.loss = loss_total
            m.steps += 1
            m.loss_sum += loss_total
        else:
            self.steps_unlabelled += 1
            m.steps_unlabelled += 1
        self.optimizer.zero_grad(set_to_none=True)
        dt = time.monotonic() - t0
        m.samples += samples
        m.samples_live += live
        m.wait_s += wait
        m.step_s += dt
        self.total_wait_s += wait
        self.total_step_s += dt
        return True

    # --- evaluation --------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, keepalive: Callable[[], None] | None = None) -> float | None:
        """Accuracy on the val split (evaluate.py: each rank its shard, summed over ranks;
        `keepalive` after every val batch), kept as `accuracy`."""
        if self.val_reader is None or len(self.val_reader) == 0:
            return None
        self.accuracy = val_accuracy(self.model, self.val_reader,
                                     lambda b: self._prepare(b, train=False), self.device,
                                     self.amp_dtype, self.cfg.batch_size, self.dist,
                                     keepalive, defer_video=self.disk.defer_video)
        return self.accuracy

    def close(self) -> None:
        """NOTE [shutdown order] in prefetch.py: threads first, then the readers they use."""
        self.prefetcher.close()
        if self.live is not None:
            self.live.close()
        self.disk.close()
        self.train_reader.close()
        if self.val_reader is not None:
            self.val_reader.close()
