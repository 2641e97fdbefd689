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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from protocol.cache import CacheReader
from protocol.errors import CacheError
from protocol.schema import UNLABELLED
from protocol.stages import StageTimer, now_ns, trainer_bottleneck

from . import checkpoint as ckpt
from .adapt import ShapeAdapter
from .batching import group_batches
from .datasets import LiveDiskMixer
from .model import build_model, expected_shapes
from .prefetch import DevicePrefetcher, DiskLoader, RingLoader, WorkerDiskLoader
from .transforms import build_transform
from .nvdec import nvdec_refusal
from .windows import TiledReader, TileSpec
from .recent import RecentGenerations
from .resume import newest_checkpoint
from .topology import Dist, rescale_disk_position

log = logging.getLogger(__name__)

IGNORE_LABEL = -100          # cross_entropy's ignore_index: what unusable labels become
BAD_LABELS_LOGGED = 8        # distinct out-of-range label values logged (each once)
STARVED_BELOW = 0.8          # achieved live fraction under this share of the target ...
MAX_BATCH_SIZE = 65536
LR_RULES = ("none", "linear", "sqrt")  # how `mmctl batch N --lr-rule` scales the learning rate


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
    progress_interval: float = 10.0     # seconds between plain progress lines (trainer/progress.py)
    eval_interval: int = 0              # steps; 0 = only at the end
    checkpoint_interval: int = 0        # steps; 0 = only at exit
    keep: int = 3
    seed: int = 0
    device: str = "auto"
    ring_start: str = "newest"
    ring_group: str | None = None       # also trust a ring of this group, mode 0660 (another user's)
    resume: bool = True
    group: str | None = None            # checkpoint files 0640 of this group; else 0600
    auto_batch: bool = False            # find the largest batch_size within memory_budget
    memory_budget: int | None = None    # bytes; None: trainer/autobatch.py default_budget
    transform: tuple[str, ...] = ()     # --transform specs (trainer/transforms.py)
    tiles: str | None = None            # --tiles INPUT=HxW[/S]: patch samples (trainer/windows.py)
    # Where `mix` came from: "given" (--mix), "default" (none given), then "checkpoint" when
    # a resume restored it (never over a given one), "mmctl" after `mmctl mix`.
    mix_source: str = field(default="default", init=False)

    def __post_init__(self) -> None:
        self.cache = Path(self.cache)
        if self.checkpoint_dir is not None:
            self.checkpoint_dir = Path(self.checkpoint_dir)
        if self.mix is None:
            self.mix = 0.5 if self.ring else 0.0
            self.mix_source = "default"
        else:
            self.mix_source = "given"
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
class Meter:
    """Counters over one log interval."""

    t0: float = field(default_factory=time.monotonic)
    steps: int = 0               # optimiser steps
    steps_unlabelled: int = 0    # steps with no labelled sample: no optimiser step
    samples: int = 0
    samples_live: int = 0
    samples_unlabelled: int = 0
    samples_bad_label: int = 0
    wait_s: float = 0.0
    step_s: float = 0.0
    loss_sum: float = 0.0
    live_received: int = 0       # the ring loader's received count when the interval began
    live_misses: int = 0         # the mixer's "wanted live, none ready" count then


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
            # GPU slot rings by device copies, host rings as RingLoader (trainer/gpu_loader.py).
            from .gpu_loader import GpuRingLoader

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

    # --- state -------------------------------------------------------------------------------

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
                with net.no_sync() if (self.ddp is not None and not last) else _null():
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

    _meter: Meter = None  # type: ignore[assignment]

    def _new_meter(self) -> Meter:
        live = getattr(self, "live", None)
        mixer = getattr(self, "mixer", None)
        return Meter(live_received=live.stats.samples if live is not None else 0,
                     live_misses=mixer.live_misses if mixer is not None else 0)

    def reset_meter(self) -> dict:
        """Close the current log interval; returns its metrics (also kept for `status`).

        Every value is over the interval's steps: `loss` their mean, `samples` trained on,
        `samples_per_s` over the interval's wall time, `stall_fraction` the time steps waited
        for data over the time they took (in [0, 1]: the wait is inside the step),
        `live_fraction` the live share of the samples trained on (not the mixer's window,
        which spans other intervals and batches drawn but not yet trained on), `generation`
        the last live generation trained on, `unlabelled`/`bad_label` the samples left out of
        the loss, `steps_unlabelled` the steps that had no labelled sample. The live supply:
        `live_in_per_s` (samples/s the ring delivered, all ranks), `live_wanted_per_s` (what
        the target fraction asks at this speed), `live_starved` and `live_note` (a sentence,
        "live starved: producer 1.6 samples/s, trainer wants 5.0 ...", or null).
        """
        m, self._meter = self._meter, self._new_meter()
        if m is None or m.steps + m.steps_unlabelled == 0:
            return self.last_metrics
        elapsed = max(time.monotonic() - m.t0, 1e-9)
        samples_per_s = m.samples / elapsed
        achieved = m.samples_live / m.samples if m.samples else 0.0
        self.last_metrics = {
            "step": self.step, "steps": m.steps, "samples": m.samples,
            "loss": round(m.loss_sum / m.steps, 5) if m.steps else None,
            "samples_per_s": round(samples_per_s, 2),
            "stall_fraction": round(m.wait_s / m.step_s, 4) if m.step_s else 0.0,
            "live_fraction": round(achieved, 4),
            "live_fraction_target": self.mixer.fraction,
            "generation": self.last_generation,
            "copies_per_sample": self.copies_per_sample(),
            "unlabelled": m.samples_unlabelled, "bad_label": m.samples_bad_label,
            "steps_unlabelled": m.steps_unlabelled,
            **self._live_supply(m, elapsed, samples_per_s, achieved),
        }
        return self.last_metrics

    def _live_supply(self, m: Meter, elapsed: float, samples_per_s: float,
                     achieved: float) -> dict:
        """Whether the live side kept up with the target over the interval, and if not, the
        figures that say why (the producer's rate against what the trainer would take).

        Starved = the achieved live fraction fell below STARVED_BELOW of the target AND the
        mixer found no live batch ready when it wanted one: the ring delivers fewer samples
        than the mix asks at this training speed (not a short-lived swing of the window).
        Rates are per node: they count the node's ranks (each reads its share of the node's
        ring, NOTE [live split] in topology.py), so they compare with that node's producer."""
        target = self.mixer.fraction
        if self.live is None or target <= 0:
            self.live_starved = False
            return {"live_in_per_s": None, "live_wanted_per_s": None, "live_starved": False,
                    "live_note": None}
        w = self.dist.local_world_size
        # Rounded once, so the sentence and the fields never disagree (4.95 vs "4.9").
        live_in = round((self.live.stats.samples - m.live_received) / elapsed * w, 2)
        wanted = round(target * samples_per_s * w, 2)
        missed = self.mixer.live_misses > m.live_misses
        starved = missed and achieved < STARVED_BELOW * target
        note = None
        if starved:
            match = live_in / (samples_per_s * w) if samples_per_s > 0 else 0.0
            source = (f"producer {live_in:.1f} samples/s" if self.live.attached
                      else f"no producer on ring {self.cfg.ring} (0 samples/s)")
            note = (f"live starved: {source}, trainer wants {wanted:.1f} (live fraction "
                    f"{achieved:.2f} of target {target:.2f}); the producer must deliver "
                    f"{wanted:.1f} samples/s, or `mmctl mix {match:.2f}` matches what arrives")
        if starved != self.live_starved:
            self.live_starved = starved
            if starved:
                log.warning(note, extra={"live_in_per_s": round(live_in, 2),
                                         "live_wanted_per_s": round(wanted, 2),
                                         "live_fraction": round(achieved, 4),
                                         "live_fraction_target": target})
            else:
                log.info("live supply keeps up with the target again",
                         extra={"live_in_per_s": round(live_in, 2),
                                "live_fraction": round(achieved, 4),
                                "live_fraction_target": target})
        return {"live_in_per_s": round(live_in, 2), "live_wanted_per_s": round(wanted, 2),
                "live_starved": starved, "live_note": note}

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
                            rank=self.dist.rank, world_size=self.dist.world_size,
                            defer_video=self.disk.defer_video).start()
        pf = DevicePrefetcher(loader.get, self.device)
        correct = total = 0
        try:
            while True:
                b = pf.get(0.2)
                if b is None:
                    if loader.exhausted:
                        break
                    continue
                inputs, labels = self._prepare(b, train=False)
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
        lm = self.last_metrics
        lifetime = self.lifetime_counts()
        st = {
            "state": self.state, "step": self.step, "total_steps": self.total_steps,
            "epoch": disk_epoch, "loss": self.loss, "accuracy": self.accuracy,
            "samples_per_s": self.last_metrics.get(
                "samples_per_s", round((self.samples_live + self.samples_disk) / elapsed, 2)),
            "stall_fraction": self.last_metrics.get("stall_fraction", self.stall_fraction()),
            "stall": self.last_metrics.get("stall_fraction", self.stall_fraction()),
            "live_fraction_target": self.mixer.fraction,
            "live_fraction_source": self.cfg.mix_source,
            "live_fraction": round(self.mixer.achieved, 4),
            "live_fraction_total": round(self.mixer.achieved_total, 4),
            "live_in_per_s": lm.get("live_in_per_s"),
            "live_wanted_per_s": lm.get("live_wanted_per_s"),
            "live_starved": bool(lm.get("live_starved")), "live_note": lm.get("live_note"),
            "samples_live": self.samples_live, "samples_disk": self.samples_disk,
            "samples_unlabelled": self.samples_unlabelled,
            "samples_bad_label": self.samples_bad_label,
            "steps_unlabelled": self.steps_unlabelled,
            "run_steps": self.step - self.resumed_step,
            "resumed_from_step": self.resumed_step if self.resumed_from is not None else None,
            "lifetime_steps": self.step,
            "lifetime_samples_live": lifetime["live"], "lifetime_samples_disk": lifetime["disk"],
            "lifetime_samples_unlabelled": lifetime["unlabelled"],
            "lifetime_samples_bad_label": lifetime["bad_label"],
            "generations_seen": sorted(live.generations) if live else [],
            "generations_trained": sorted(self.generations_trained),
            "generation": self.last_generation,
            "copies_per_sample": self.copies_per_sample(),
            "ring": self.cfg.ring, "ring_attached": bool(self.live and self.live.attached),
            "ring_reattached": live.reattached if live else 0,
            "live_dropped": live.dropped if live else 0,
            "adapted_batches": self.adapter.adapted,
            "records_corrupt": self.disk.stats.corrupt,
            "checkpoint": str(self.checkpoint_path) if self.checkpoint_path else None,
            "rank": self.dist.rank, "world_size": self.dist.world_size,
            "device": str(self.device), "amp": str(self.amp_dtype).replace("torch.", "")
            if self.amp_dtype else "off",
            "batch_size": self.cfg.batch_size, "batch_size_trained": self.batch_size_trained,
            "lr": self.optimizer.param_groups[0]["lr"],
            "auto_batch": self.auto_batch.sentence() if self.auto_batch else None,
            "stages": self.stages.summary(),
        }
        st["bottleneck"] = trainer_bottleneck(st)
        return st

    def metric_values(self) -> dict:
        """What `--metrics` exports (protocol/metrics.py METRICS); None values are left out."""
        lm = self.last_metrics
        return {
            "mmfeed_trainer_steps_total": self.step,
            "mmfeed_trainer_samples_total": {"live": self.samples_live, "disk": self.samples_disk},
            "mmfeed_trainer_samples_unlabelled_total": self.samples_unlabelled,
            "mmfeed_trainer_samples_bad_label_total": self.samples_bad_label,
            "mmfeed_trainer_stall_seconds_total": self.total_wait_s,
            "mmfeed_trainer_step_seconds_total": self.total_step_s,
            "mmfeed_trainer_stall_ratio": lm.get("stall_fraction", self.stall_fraction()),
            "mmfeed_trainer_samples_per_second": lm.get("samples_per_s"),
            "mmfeed_trainer_live_fraction": self.mixer.achieved,
            "mmfeed_trainer_live_fraction_target": self.mixer.fraction,
            "mmfeed_trainer_live_starved": self.live_starved,
            "mmfeed_trainer_live_dropped_total": self.live.stats.dropped if self.live else 0,
            "mmfeed_trainer_generation": self.last_generation,
            "mmfeed_trainer_loss": self.loss,
            "mmfeed_trainer_accuracy": self.accuracy,
            "mmfeed_trainer_batch_size": self.cfg.batch_size,
        }

    def progress(self) -> dict:
        """The few figures a progress line needs (cheaper than `status()`)."""
        return {"step": self.step, "total_steps": self.total_steps,
                "epoch": self.disk_position[0], "samples": self.samples_live + self.samples_disk,
                "samples_per_s": self.last_metrics.get("samples_per_s"), "loss": self.loss,
                "accuracy": self.accuracy}

    def stall_fraction(self) -> float:
        return round(self.total_wait_s / self.total_step_s, 4) if self.total_step_s else 0.0

    def rank_counts(self) -> list[dict]:
        """What each rank trained on, one row per rank (a collective: call on all ranks).

        The other counts in `summary` are this rank's; these rows show that every rank read
        its own node's ring as its own reader (`node`, `ring_epoch`: the epoch of the producer
        it read, `live_skipped`: samples of that ring left to the node's other ranks, NOTE
        [live split] in topology.py) and that DDP kept the ranks in step (`weights_sum`, the
        sum of every parameter, is the same on every rank; `loss` is the rank's own last one).
        """
        live = self.live
        reader = getattr(live, "reader", None) if live is not None else None
        mine = {"rank": self.dist.rank, "node": self.dist.node,
                "local_rank": self.dist.local_rank, "samples_live": self.samples_live,
                "samples_disk": self.samples_disk,
                "live_skipped": live.stats.skipped if live is not None else 0,
                "ring_epoch": getattr(reader, "epoch", None), "generation": self.last_generation,
                "loss": self.loss, "weights_sum": self.weights_sum()}
        if not self.dist.enabled:
            return [mine]
        rows: list = [None] * self.dist.world_size
        dist.all_gather_object(rows, mine)
        return rows

    @torch.no_grad()
    def weights_sum(self) -> float:
        """Sum of every parameter, in float64: equal on all ranks while DDP keeps them in sync."""
        return float(sum(p.detach().double().sum().item() for p in self.model.parameters()))

    def summary(self) -> dict:
        """What the run ends with; a collective under torchrun (`rank_counts`): all ranks call it."""
        elapsed = max(self.total_step_s, 1e-9)
        lifetime = self.lifetime_counts()
        return {
            "steps": self.step, "samples_disk": self.samples_disk,
            "samples_live": self.samples_live,
            "samples_unlabelled": self.samples_unlabelled,
            "samples_bad_label": self.samples_bad_label,
            "steps_unlabelled": self.steps_unlabelled,
            "run_steps": self.step - self.resumed_step,
            "resumed_from_step": self.resumed_step if self.resumed_from is not None else None,
            "lifetime_samples_live": lifetime["live"], "lifetime_samples_disk": lifetime["disk"],
            "lifetime_samples_unlabelled": lifetime["unlabelled"],
            "lifetime_samples_bad_label": lifetime["bad_label"],
            "live_fraction_target": self.mixer.fraction,
            "live_fraction_source": self.cfg.mix_source,
            "generations": sorted(self.generations_trained),
            "accuracy": self.accuracy, "loss": self.loss,
            "samples_per_s": round((self.samples_live + self.samples_disk) / elapsed, 2),
            "stall_fraction": self.stall_fraction(),
            "live_fraction": round(self.mixer.achieved_total, 4),
            "copies_per_sample": self.copies_per_sample(),
            "records_corrupt": self.disk.stats.corrupt,
            "checkpoint": str(self.checkpoint_path) if self.checkpoint_path else None,
            "world_size": self.dist.world_size, "ranks": self.rank_counts(),
            "batch_size": self.cfg.batch_size,
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
