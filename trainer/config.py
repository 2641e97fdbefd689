"""What `mm-trainer run` is configured with (`TrainConfig`, one field per flag), where this
process stands under torchrun (`Dist`, trainer/topology.py, re-exported), and the counters of one log interval (`Meter`)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from .topology import Dist  # noqa: F401  (re-exported: loop.py and tests import it here)


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
