"""The default late-fusion model, and loading a user's model from `module:factory`.

Model contract (the default model and any user factory):

    factory(example_schema: SampleSchema, num_classes: int) -> torch.nn.Module

    - `example_schema` is the schema of the first training sample: modality names, dtypes
      and per-sample shapes (e.g. video uint8 (T, C, H, W), audio float32 (1, n_mels, frames)).
    - `forward(inputs: dict[str, Tensor]) -> Tensor` of logits (B, num_classes). Inputs are
      float32 (uint8 already scaled to [0, 1]) with shape (B, *spec.shape), on the model's
      device. A modality may be missing from a batch (a sample without it, or a live
      generation that disabled it): the model must cope (the default model uses zeros).
    - Optional attribute `expected_shapes: dict[str, tuple[int, ...]]`: the per-sample shapes
      the model needs. When present, the trainer adapts other shapes to these (grayscale,
      new size); when absent, it takes them from `example_schema`.
"""
from __future__ import annotations

import importlib

import torch
from torch import nn

from protocol.schema import SampleSchema

FEATURES = 64


def _conv2d_encoder(in_ch: int, width: int = 16) -> nn.Module:
    """Small strided conv stack -> global average pool -> FEATURES: for images, BEV rasters,
    spectrograms (anything (C, H, W))."""
    return nn.Sequential(
        nn.Conv2d(in_ch, width, 3, stride=2, padding=1), nn.GroupNorm(4, width), nn.ReLU(inplace=True),
        nn.Conv2d(width, width * 2, 3, stride=2, padding=1), nn.GroupNorm(4, width * 2),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width * 2, FEATURES), nn.ReLU(inplace=True),
    )


class ImageEncoder(nn.Module):
    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.add_channel = len(shape) == 2  # (H, W) raster
        self.net = _conv2d_encoder(1 if self.add_channel else shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.unsqueeze(1) if self.add_channel else x)


class ClipEncoder(nn.Module):
    """(T, C, H, W): the 2D encoder on every frame, then mean over time (temporal pooling).
    Cheap on a CPU and order-invariant; motion-heavy tasks plug in a 3D conv as their own model."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.net = _conv2d_encoder(shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[:2]
        f = self.net(x.reshape(b * t, *x.shape[2:]))
        return f.reshape(b, t, -1).mean(dim=1)


class VectorEncoder(nn.Module):
    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        n = 1
        for d in shape:
            n *= d
        self.net = nn.Sequential(nn.Flatten(), nn.LayerNorm(n), nn.Linear(n, 128),
                                 nn.ReLU(inplace=True), nn.Linear(128, FEATURES),
                                 nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def encoder_for(shape: tuple[int, ...]) -> nn.Module:
    if len(shape) == 4:
        return ClipEncoder(shape)
    if len(shape) in (2, 3) and min(shape[-2:]) >= 4:
        return ImageEncoder(shape)
    return VectorEncoder(shape)


class LateFusion(nn.Module):
    """One small encoder per modality, features concatenated (zeros for a missing modality),
    then a linear classifier. Modalities are sorted by name so the layout is deterministic."""

    def __init__(self, example_schema: SampleSchema, num_classes: int):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.names = sorted(example_schema.names)
        self.expected_shapes = {n: example_schema.spec(n).shape for n in self.names}
        # ModuleDict keys may not contain '.', modality names may.
        self._keys = {n: n.replace(".", "_") for n in self.names}
        self.encoders = nn.ModuleDict({self._keys[n]: encoder_for(self.expected_shapes[n])
                                       for n in self.names})
        self.head = nn.Sequential(nn.Dropout(0.1), nn.Linear(FEATURES * len(self.names), num_classes))

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        some = next(iter(inputs.values()))
        b = some.shape[0]
        feats = []
        for n in self.names:
            x = inputs.get(n)
            if x is None:
                feats.append(some.new_zeros((b, FEATURES)))
            else:
                feats.append(self.encoders[self._keys[n]](x))
        return self.head(torch.cat(feats, dim=1))


def default_model(example_schema: SampleSchema, num_classes: int) -> nn.Module:
    return LateFusion(example_schema, num_classes)


def load_factory(spec: str):
    """`package.module:function` -> the callable; errors name what was wrong."""
    if ":" not in spec:
        raise ValueError(f"--model {spec!r}: expected module:factory, e.g. mypkg.models:build")
    mod_name, _, attr = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"--model {spec!r}: cannot import module {mod_name!r}: {e}") from None
    fn = mod
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ValueError(f"--model {spec!r}: module {mod_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ValueError(f"--model {spec!r}: {attr!r} is not callable")
    return fn


def build_model(spec: str | None, example_schema: SampleSchema, num_classes: int) -> nn.Module:
    factory = default_model if not spec else load_factory(spec)
    model = factory(example_schema, num_classes)
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model {spec!r}: the factory returned {type(model).__name__}, "
                         f"expected a torch.nn.Module")
    return model


def expected_shapes(model: nn.Module, example_schema: SampleSchema) -> dict[str, tuple[int, ...]]:
    shapes = getattr(model, "expected_shapes", None)
    if shapes is None:
        shapes = {m.name: m.shape for m in example_schema.modalities}
    return {k: tuple(v) for k, v in shapes.items()}
