"""`mm-trainer run --auto-batch`: the largest batch that fits a memory budget.

What is measured is what training costs: a real forward and backward pass of the model that
will train, on a batch of the cache's first schema (values do not change the memory a batch
takes; the model's weights are put back afterwards and no optimiser step is made), at batch
sizes 1, 2, 4, ... until one goes over the budget, then the size between the last one that
fit and the first that did not, predicted from the measured growth per sample and checked by
one more trial.

- On a GPU the budget is device memory: the peak `torch.cuda.max_memory_allocated` of a trial
  plus the device prefetcher's copies of the batch, against `--memory-budget` (default 90% of
  the device's memory).
- On the CPU it is the process's resident memory (RSS): the peak RSS of a trial (Linux resets
  the high-water mark through /proc/self/clear_refs; freed heap is returned before each
  trial) plus the host batch buffers the loaders keep (`LOADER_BUFFERS` batches), against
  `--memory-budget` (default half the machine's memory, or of the cgroup's limit).

`mmctl batch N` changes the size later; `--auto-batch` only picks the one training starts with.
"""
from __future__ import annotations

import logging
import re
import resource
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from protocol.heap import trim
from protocol.schema import SampleSchema

from .batching import TORCH_DTYPES, row_bytes

log = logging.getLogger(__name__)

MAX_BATCH = 4096
#: Host batches held at once on the CPU path: two loaders x (queue depth 2 + 2 in the pool).
LOADER_BUFFERS = 8
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "ki": 1024, "m": 1000**2,
          "mb": 1000**2, "mib": 1024**2, "mi": 1024**2, "g": 1000**3, "gb": 1000**3,
          "gib": 1024**3, "gi": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4,
          "ti": 1024**4}


def parse_size(text: str) -> int:
    """'2GiB', '512MiB', '1.5G', '800000000' -> bytes; ValueError says what is accepted."""
    m = _SIZE.match(str(text))
    unit = (m.group(2) or "").lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"--memory-budget {text!r}: expected a size such as 2GiB, 512MiB, "
                         f"1.5G or a number of bytes")
    n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise ValueError(f"--memory-budget {text!r}: must be more than 0 bytes")
    return n


def _proc_kb(path: str, key: str) -> int | None:
    """Bytes of a "Key:   123 kB" line of a /proc file (/proc/meminfo, /proc/self/status)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _meminfo(key: str) -> int | None:
    return _proc_kb("/proc/meminfo", key)


def _cgroup_limit() -> int | None:
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            v = f.read().strip()
        return None if v == "max" else int(v)
    except (OSError, ValueError):
        return None


def default_budget(device: torch.device) -> int:
    """90% of the GPU's memory; on the CPU half of the machine's (or the cgroup's) memory."""
    if device.type == "cuda":
        return int(0.9 * torch.cuda.get_device_properties(device).total_memory)
    total = [v for v in (_meminfo("MemTotal"), _cgroup_limit()) if v]
    return int(0.5 * min(total)) if total else 4 << 30


def _status_kb(key: str) -> int | None:
    return _proc_kb("/proc/self/status", key)


def _reset_peak_rss() -> bool:
    """Set VmHWM back to the current RSS (Linux >= 4.0); False where that is refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    hwm = _status_kb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _example_batch(schema: SampleSchema, n: int, device: torch.device) -> dict:
    """Inputs as the trainer hands them to the model: float, (n, *shape), on the device."""
    out = {}
    for m in schema.modalities:
        if TORCH_DTYPES.get(m.dtype) is None:
            continue
        out[m.name] = torch.rand((n, *m.shape), device=device)
    return out


@dataclass
class AutoBatch:
    """What `--auto-batch` found: the size, the budget, and the measured footprint per size."""

    batch_size: int
    budget: int
    memory: str                       # "cuda" (device memory) or "rss"
    baseline: int                     # bytes in use before any trial (RSS or allocated)
    footprints: dict[int, int] = field(default_factory=dict)  # batch -> bytes over baseline
    capped: bool = False              # stopped at max_batch, not at the budget

    def sentence(self) -> str:
        mib = 1024 * 1024
        used = self.baseline + self.footprints.get(self.batch_size, 0)
        what = "device memory" if self.memory == "cuda" else "resident memory (RSS)"
        cap = (", the most it tries (the train split's size per rank, at most "
               f"{MAX_BATCH})" if self.capped else "")
        return (f"auto batch size {self.batch_size}: {used / mib:.0f} MiB of {what} at that "
                f"size, within the budget of {self.budget / mib:.0f} MiB{cap}")


def find_batch_size(model: torch.nn.Module, schema: SampleSchema, num_classes: int,
                    device: torch.device, budget: int, *, max_batch: int = MAX_BATCH,
                    prepare: Callable[[dict], dict] | None = None) -> AutoBatch:
    """The largest batch size whose measured footprint fits `budget` bytes (see the module
    docstring). `prepare` maps inputs as the loop does before the model (shape adapter)."""
    cuda = device.type == "cuda"
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    was_training = model.training
    model.train()
    row = row_bytes(schema)

    def footprint(n: int) -> int:
        model.zero_grad(set_to_none=True)
        trim()
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        else:
            base = _status_kb("VmRSS") or 0
            _reset_peak_rss()
        inputs = _example_batch(schema, n, device)
        if prepare is not None:
            inputs = prepare(inputs)
        labels = torch.randint(0, max(1, num_classes), (n,), device=device)
        loss = F.cross_entropy(model(inputs).float(), labels)
        loss.backward()
        if cuda:
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - base + 2 * row * n
        else:
            peak = max(0, _peak_rss() - base) + LOADER_BUFFERS * row * n
        del inputs, labels, loss
        model.zero_grad(set_to_none=True)
        return peak

    try:
        trim()
        baseline = (torch.cuda.memory_allocated(device) if cuda
                    else (_status_kb("VmRSS") or 0))
        sizes: dict[int, int] = {}

        def fits(n: int) -> bool:
            if n not in sizes:
                try:
                    sizes[n] = footprint(n)
                except torch.cuda.OutOfMemoryError:
                    sizes[n] = budget + 1  # over by definition
            return baseline + sizes[n] <= budget

        good, bad, n = 0, None, 1
        while True:
            n = min(n, max_batch)
            if not fits(n):
                bad = n
                break
            good = n
            if n == max_batch:
                break
            n *= 2
        if good == 0:
            raise ValueError(f"--auto-batch: even a batch of 1 needs "
                             f"{(baseline + sizes[1]) / 2**20:.0f} MiB, over the budget of "
                             f"{budget / 2**20:.0f} MiB; give a larger --memory-budget")
        if bad is not None and bad - good > 1:
            # Memory grows about linearly in the batch: predict the size between, check it.
            per = max(1.0, (sizes[bad] - sizes[good]) / (bad - good))
            guess = good + int((budget - baseline - sizes[good]) / per)
            guess = max(good + 1, min(bad - 1, guess))
            if fits(guess):
                good = guess
        return AutoBatch(good, budget, "cuda" if cuda else "rss", baseline, sizes,
                         capped=bad is None)
    finally:
        model.load_state_dict(saved)
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        trim()


__all__ = ["AutoBatch", "LOADER_BUFFERS", "MAX_BATCH", "default_budget", "find_batch_size",
           "parse_size"]
