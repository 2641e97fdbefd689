"""Shape adapters: make a batch's inputs fit the shapes the model was built for.

An operator can switch the live producer to grayscale or a new size while training runs. The
model was built for the shapes it saw first; rebuilding it would throw away training, and
crashing would stop it. So each input whose per-sample shape differs from the expected one is
adapted on the device, batched:

    channels   1 -> C: repeat;  C -> 1: average;  C -> C': average, then repeat
    space      (H, W) -> (H', W'): bilinear F.interpolate (images, BEV rasters, spectrograms)
    time       T -> T': evenly spaced frame indices (clips (T, C, H, W))
    vectors    (N,) -> (N',): truncate or zero-pad

Each change is logged ONCE per (generation, input): the log says what happened without
flooding it at every step. A shape we cannot map (a different rank) raises `AdaptError`, which
the loop turns into skipping that input (zero features in the default model), never a crash.
"""
from __future__ import annotations

import logging
from typing import Mapping

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


class AdaptError(ValueError):
    """An input's shape cannot be mapped onto the expected one (different number of dims)."""


def _channels(x: torch.Tensor, c_dim: int, want: int) -> torch.Tensor:
    have = x.shape[c_dim]
    if have == want:
        return x
    if have != 1:
        x = x.mean(dim=c_dim, keepdim=True)
    if want != 1:
        reps = [1] * x.dim()
        reps[c_dim] = want
        x = x.repeat(*reps)
    return x


def _space(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """x: (N, C, H, W) float -> (N, C, h, w)."""
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    return F.interpolate(x, size=hw, mode="bilinear", align_corners=False)


def adapt_tensor(x: torch.Tensor, want: tuple[int, ...]) -> torch.Tensor:
    """Adapt a float batch `x` of shape (B, *have) to (B, *want)."""
    have = tuple(x.shape[1:])
    if have == tuple(want):
        return x
    if len(have) != len(want):
        raise AdaptError(f"shape {list(have)} has {len(have)} dims, the model expects "
                         f"{list(want)} ({len(want)} dims)")
    b = x.shape[0]
    if len(want) == 1:
        n = want[0]
        return x[:, :n] if have[0] >= n else F.pad(x, (0, n - have[0]))
    if len(want) == 2:  # (H, W): a single-channel raster
        return _space(x.unsqueeze(1), want).squeeze(1)
    if len(want) == 3:  # (C, H, W)
        return _space(_channels(x, 1, want[0]), want[1:])
    if len(want) == 4:  # (T, C, H, W)
        t_want = want[0]
        if have[0] != t_want:
            idx = torch.linspace(0, have[0] - 1, t_want, device=x.device).round().long()
            x = x.index_select(1, idx)
        x = _channels(x, 2, want[1])
        t, c = x.shape[1], x.shape[2]
        x = _space(x.reshape(b * t, c, *x.shape[-2:]), want[2:])
        return x.reshape(b, t, c, *want[2:])
    raise AdaptError(f"cannot adapt {len(have)}-dim input {list(have)} to {list(want)}")


class ShapeAdapter:
    """Per-input adaptation to the model's expected shapes, logged once per generation."""

    def __init__(self, expected: Mapping[str, tuple[int, ...]]):
        self.expected = {k: tuple(v) for k, v in expected.items()}
        self._told: set[tuple[int, str]] = set()
        self.adapted = 0  # batches in which at least one input was adapted

    def __call__(self, inputs: dict[str, torch.Tensor], generation: int) -> dict[str, torch.Tensor]:
        out = {}
        changed = False
        for name, x in inputs.items():
            want = self.expected.get(name)
            if want is None:
                self._tell(generation, name, f"input {name!r} of generation {generation} is not "
                                             f"one the model was built for; ignored")
                continue
            have = tuple(x.shape[1:])
            if have == want:
                out[name] = x
                continue
            try:
                out[name] = adapt_tensor(x, want)
            except AdaptError as e:
                self._tell(generation, name, f"generation {generation}: input {name!r}: {e}; "
                                             f"the model gets no {name!r} features")
                continue
            changed = True
            self._tell(generation, name, f"generation {generation}: input {name!r} is "
                                         f"{list(have)}, the model expects {list(want)}; adapting "
                                         f"(channel repeat/average, resize)")
        self.adapted += changed
        return out

    def _tell(self, generation: int, name: str, msg: str) -> None:
        if (generation, name) not in self._told:
            self._told.add((generation, name))
            log.warning(msg)
