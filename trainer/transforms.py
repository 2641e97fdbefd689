"""Transforms (augmentation, normalisation) applied on the trainer's device, after the copy.

    mm-trainer run ... --transform random_resized_crop=96x96 --transform flip \\
                       --transform normalize=imagenet --transform flip@lidar
    mm-trainer run ... --transform mypkg.aug:make          # your own: module:factory

Where: inside the training step, after the batch reached the device (the host-to-device copy,
NV12 unpacking) and the uint8 -> float [0, 1] conversion and shape adaptation, before the
model; the same for disk and live batches (they share the step). Evaluation applies each
transform's deterministic form (`evaluate`: a crop becomes a centre crop or a resize, a flip
nothing, normalisation the same).

Randomness: per sample, from ONE seeded `torch.Generator` on the device, drawn in a fixed order
(transform by transform, modality by modality, one tensor of draws per batch: no Python loop
over samples). Its state is saved in every checkpoint (`transform_rng`) and restored on resume,
so the draws after a resume are the draws an uninterrupted run makes (tests/test_transforms.py).

Built-ins (`NAME[=VALUE][@MODALITY[+MODALITY...]]`, default modality `video`; several in one
spec separated by commas; they act on the last two dims (H, W), channels at dim -3, and a
clip's frames share one draw so motion stays coherent):

    flip[=P]                   horizontal flip with probability P (0.5)
    vflip[=P]                  vertical flip with probability P (0.5)
    random_crop=HxW            a crop of H x W at a uniform position (eval: centre crop)
    random_resized_crop=HxW[/SMIN-SMAX]
                               a crop of a uniform share of the area in [SMIN, SMAX] (0.08-1)
                               and aspect ratio in [3/4, 4/3] (log-uniform), resized to H x W
                               bilinearly (eval: the whole frame resized to H x W)
    normalize=imagenet | normalize=MEAN/STD
                               (x - mean) / std per channel; MEAN/STD a number or a:b:c
                               (`normalise` is the same)

Your own: `factory(example_schema) -> transform`, where `transform(inputs, generator) ->
inputs` takes the batch dict name -> float tensor (B, ...) on the device and a torch.Generator
to draw from (use it, and only it, for reproducible resumes); an optional
`transform.evaluate(inputs) -> inputs` is used on validation batches (default: unchanged).

From your own training script, the same object works on any batch dict on any device:

    from trainer.transforms import build_transform
    aug = build_transform(["random_resized_crop=96x96", "flip", "normalize=imagenet"],
                          example_schema, device="cuda", seed=0)
    inputs = aug({k: v.to("cuda") for k, v in inputs.items()})   # draws from aug.generator
    # checkpoint aug.state_dict() next to the model's; aug.load_state_dict(s) to resume

and the datasets take it too (`CacheDataset(..., transform=aug)`, `RingDataset(...,
transform=aug)`): they apply it to the batches they yield (on the CPU there).
"""
from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from protocol.schema import SampleSchema

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_ITEM = re.compile(r"^(?P<name>[a-z_]+)(?:=(?P<value>[^@]+))?(?:@(?P<mods>[\w.+-]+))?$")


class TransformError(ValueError):
    """A transform spec or its fit to the data is wrong; the message says what to write."""


def _size(text: str, what: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)(?:x(\d+))?", text)
    if not m or int(m.group(1)) < 1:
        raise TransformError(f"{what}: expected a size HxW or N (pixels), got {text!r}")
    h = int(m.group(1))
    return h, int(m.group(2) or h)


def _numbers(text: str, what: str) -> tuple[float, ...]:
    try:
        out = tuple(float(x) for x in text.split(":"))
    except ValueError:
        raise TransformError(f"{what}: expected numbers separated by ':', got {text!r}") from None
    if not all(math.isfinite(x) for x in out):
        raise TransformError(f"{what}: numbers must be finite, got {text!r}")
    return out


# --- the built-ins: each draws its per-sample parameters, then applies them batched -----------


@dataclass
class _Op:
    name: str
    modalities: tuple[str, ...]

    def draw(self, x: torch.Tensor, g: torch.Generator) -> dict[str, torch.Tensor]:
        return {}

    def apply(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        if len(shape) < 2:
            raise TransformError(f"{self.name}@{name}: needs an image-like input (..., H, W), "
                                 f"{name} is {list(shape)}")


def _per_sample(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *([1] * (x.dim() - 1)))


@dataclass
class _Flip(_Op):
    p: float = 0.5
    dim: int = -1

    def draw(self, x, g):
        return {"flip": torch.rand(x.shape[0], generator=g, device=x.device) < self.p}

    def apply(self, x, p):
        return torch.where(_per_sample(p["flip"], x), x.flip(self.dim), x)


@dataclass
class _RandomCrop(_Op):
    size: tuple[int, int] = (0, 0)

    def check(self, name, shape):
        super().check(name, shape)
        h, w = shape[-2:]
        if self.size[0] > h or self.size[1] > w:
            raise TransformError(f"{self.name}={self.size[0]}x{self.size[1]}@{name}: larger than "
                                 f"the {h}x{w} input; give a size of at most {h}x{w}")

    def draw(self, x, g):
        h, w = x.shape[-2:]
        b = x.shape[0]
        return {"y": torch.randint(0, h - self.size[0] + 1, (b,), generator=g, device=x.device),
                "x": torch.randint(0, w - self.size[1] + 1, (b,), generator=g, device=x.device)}

    def apply(self, x, p):
        ch, cw = self.size
        ys = p["y"][:, None] + torch.arange(ch, device=x.device)  # (B, ch)
        xs = p["x"][:, None] + torch.arange(cw, device=x.device)  # (B, cw)
        flat = x.reshape(x.shape[0], -1, *x.shape[-2:])           # (B, K, H, W)
        k = flat.shape[1]
        rows = ys[:, None, :, None].expand(-1, k, -1, flat.shape[-1])
        out = flat.gather(2, rows)                                # (B, K, ch, W)
        cols = xs[:, None, None, :].expand(-1, k, ch, -1)
        out = out.gather(3, cols)                                 # (B, K, ch, cw)
        return out.reshape(*x.shape[:-2], ch, cw)

    def evaluate(self, x):
        h, w = x.shape[-2:]
        y0, x0 = (h - self.size[0]) // 2, (w - self.size[1]) // 2
        return x[..., y0: y0 + self.size[0], x0: x0 + self.size[1]]


@dataclass
class _RandomResizedCrop(_Op):
    size: tuple[int, int] = (0, 0)
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def draw(self, x, g):
        b, dev = x.shape[0], x.device
        u = torch.rand(b, 4, generator=g, device=dev)
        h, w = x.shape[-2:]
        area = (self.scale[0] + (self.scale[1] - self.scale[0]) * u[:, 0]) * (h * w)
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        ratio = torch.exp(lo + (hi - lo) * u[:, 1])
        cw = torch.sqrt(area * ratio).clamp(1, w)
        ch = torch.sqrt(area / ratio).clamp(1, h)
        x0 = (w - cw) * u[:, 2]
        y0 = (h - ch) * u[:, 3]
        return {"box": torch.stack((x0, y0, cw, ch), dim=1)}  # pixels, float

    def apply(self, x, p):
        h, w = x.shape[-2:]
        x0, y0, cw, ch = p["box"].unbind(1)
        b = x.shape[0]
        theta = torch.zeros(b, 2, 3, device=x.device, dtype=torch.float32)
        theta[:, 0, 0] = cw / w
        theta[:, 0, 2] = (2 * x0 + cw) / w - 1
        theta[:, 1, 1] = ch / h
        theta[:, 1, 2] = (2 * y0 + ch) / h - 1
        flat = x.reshape(b, -1, h, w)
        grid = F.affine_grid(theta, [b, flat.shape[1], *self.size], align_corners=False)
        src = flat if flat.is_floating_point() else flat.float()
        out = F.grid_sample(src, grid.to(src.dtype), mode="bilinear", padding_mode="border",
                            align_corners=False)
        if not flat.is_floating_point():
            out = out.round_().clamp_(0, 255).to(flat.dtype)
        return out.reshape(*x.shape[:-2], *self.size)

    def evaluate(self, x):
        flat = x.reshape(-1, 1, *x.shape[-2:]).float()
        out = F.interpolate(flat, size=self.size, mode="bilinear", align_corners=False,
                            antialias=True)
        return out.to(x.dtype).reshape(*x.shape[:-2], *self.size)


@dataclass
class _Normalize(_Op):
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    _cache: dict = field(default_factory=dict, repr=False)

    def check(self, name, shape):
        super().check(name, shape)
        c = shape[-3] if len(shape) >= 3 else 1
        for what, v in (("mean", self.mean), ("std", self.std)):
            if len(v) not in (1, c):
                raise TransformError(f"normalize@{name}: {len(v)} {what} values for {c} "
                                     f"channels; give 1 or {c}")
        if any(s == 0 for s in self.std):
            raise TransformError(f"normalize@{name}: std must not be 0")

    def _stats(self, x):
        key = (x.device, x.dtype, x.shape[-3] if x.dim() >= 3 else 1)
        if key not in self._cache:
            shape = (-1, 1, 1)
            self._cache[key] = tuple(torch.tensor(v, device=x.device, dtype=x.dtype).view(shape)
                                     for v in (self.mean, self.std))
        return self._cache[key]

    def apply(self, x, p):
        mean, std = self._stats(x)
        return (x - mean) / std

    def evaluate(self, x):
        return self.apply(x, {})


def _parse_item(item: str) -> _Op:
    m = _ITEM.match(item)
    if not m:
        raise TransformError(f"transform {item!r}: expected NAME[=VALUE][@MODALITY[+...]] "
                             f"(built-ins: {', '.join(BUILTINS)}) or module:factory")
    name, value, mods = m.group("name"), m.group("value"), m.group("mods")
    modalities = tuple(mods.split("+")) if mods else ("video",)
    if name not in BUILTINS:
        raise TransformError(f"transform {name!r}: not a built-in ({', '.join(BUILTINS)}); "
                             f"your own goes as module:factory")
    if name in ("flip", "vflip"):
        prob = 0.5 if value is None else _numbers(value, name)[0]
        if not 0.0 <= prob <= 1.0:
            raise TransformError(f"{name}={value}: a probability in [0, 1]")
        return _Flip(name, modalities, p=prob, dim=-1 if name == "flip" else -2)
    if value is None:
        raise TransformError(f"{name}: needs a value, e.g. {name}=96x96"
                             if "crop" in name else f"{name}: needs =imagenet or =MEAN/STD")
    if name == "random_crop":
        return _RandomCrop(name, modalities, size=_size(value, name))
    if name == "random_resized_crop":
        size, _, scale = value.partition("/")
        out = _RandomResizedCrop(name, modalities, size=_size(size, name))
        if scale:
            lo, sep, hi = scale.partition("-")
            s = (_numbers(lo, name)[0], _numbers(hi, name)[0]) if sep else None
            if s is None or not 0.0 < s[0] <= s[1] <= 1.0:
                raise TransformError(f"{name}={value}: scale SMIN-SMAX with 0 < SMIN <= SMAX "
                                     f"<= 1, e.g. {size}/0.35-1")
            out.scale = s
        return out
    if value == "imagenet":
        mean, std = IMAGENET
    else:
        mean_s, sep, std_s = value.partition("/")
        if not sep:
            raise TransformError(f"{name}={value}: expected imagenet or MEAN/STD, e.g. "
                                 f"0.5/0.25 or 0.485:0.456:0.406/0.229:0.224:0.225")
        mean, std = _numbers(mean_s, name), _numbers(std_s, name)
    return _Normalize("normalize", modalities, mean=tuple(mean), std=tuple(std))


BUILTINS = ("flip", "vflip", "random_crop", "random_resized_crop", "normalize", "normalise")


# --- the chain ---------------------------------------------------------------------------------


class Transform:
    """A chain of built-in ops and user transforms with its own seeded generator.

    `t(inputs)` -> transformed inputs (training; per-sample draws from `t.generator`);
    `t.evaluate(inputs)` -> the deterministic form; `t.last_draws` holds the parameters drawn by
    the last call (name -> tensor, for logs and tests); `state_dict()`/`load_state_dict()` carry
    the generator's state (the trainer puts it in checkpoints)."""

    def __init__(self, steps: Sequence[object], *, device: torch.device | str = "cpu",
                 seed: int = 0, specs: Sequence[str] = ()):
        self.steps = list(steps)
        self.specs = list(specs)
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(seed))
        self.last_draws: dict[str, torch.Tensor] = {}

    def __bool__(self) -> bool:
        return bool(self.steps)

    def __call__(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(inputs)
        draws: dict[str, torch.Tensor] = {}
        for k, step in enumerate(self.steps):
            if isinstance(step, _Op):
                for name in step.modalities:
                    x = out.get(name)
                    if x is None:
                        continue  # a batch without this modality (zero-filled by the model)
                    p = step.draw(x, self.generator)
                    draws.update({f"{k}.{step.name}@{name}.{key}": v for key, v in p.items()})
                    out[name] = step.apply(x, p)
            else:
                out = dict(step(out, self.generator))
        self.last_draws = draws
        return out

    def evaluate(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(inputs)
        for step in self.steps:
            if isinstance(step, _Op):
                for name in step.modalities:
                    if name in out:
                        out[name] = step.evaluate(out[name])
            elif hasattr(step, "evaluate"):
                out = dict(step.evaluate(out))
        return out

    def check(self, schema: SampleSchema) -> None:
        """Refuse (TransformError) an op whose modality the data lacks or cannot take."""
        shapes = {m.name: m.shape for m in schema.modalities}
        for step in self.steps:
            if isinstance(step, _Op):
                for name in step.modalities:
                    if name not in shapes:
                        raise TransformError(f"{step.name}@{name}: the data has no input "
                                             f"{name!r}; it has {', '.join(sorted(shapes))}")
                    step.check(name, shapes[name])

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "specs": list(self.specs)}

    def load_state_dict(self, state: Mapping) -> None:
        self.generator.set_state(state["generator"])

    def __repr__(self) -> str:
        return f"Transform({', '.join(self.specs) or 'none'} on {self.device})"


def load_user_transform(spec: str, example_schema: SampleSchema) -> Callable:
    """`module:factory` -> factory(example_schema), checked to be callable."""
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise TransformError(f"--transform {spec}: cannot load {attr} from {module_name}: "
                             f"{e}") from None
    t = factory(example_schema)
    if not callable(t):
        raise TransformError(f"--transform {spec}: the factory returned {type(t).__name__}, "
                             f"expected a callable transform(inputs, generator) -> inputs")
    return t


def build_transform(specs: Sequence[str], example_schema: SampleSchema, *,
                    device: torch.device | str = "cpu", seed: int = 0) -> Transform:
    """`--transform` values -> one Transform (checked against the data's example schema)."""
    steps: list[object] = []
    for spec in specs:
        spec = spec.strip()
        if _FACTORY.match(spec):
            steps.append(load_user_transform(spec, example_schema))
            continue
        steps.extend(_parse_item(item.strip()) for item in spec.split(",") if item.strip())
    t = Transform(steps, device=device, seed=seed, specs=specs)
    t.check(example_schema)
    return t


__all__ = ["BUILTINS", "IMAGENET", "Transform", "TransformError", "build_transform",
           "load_user_transform"]
