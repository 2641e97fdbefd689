"""A user transform for tests/test_transforms.py, loaded as `_transform_plugin:brighten`."""
from __future__ import annotations

import torch


def brighten(example_schema):
    """Adds a per-sample random offset to `video` drawn from the trainer's generator."""
    assert "video" in example_schema

    def transform(inputs, generator):
        v = inputs["video"]
        shift = torch.rand(v.shape[0], generator=generator, device=v.device) * 0.1
        transform.last = shift
        return {**inputs, "video": v + shift.view(-1, *([1] * (v.dim() - 1)))}

    transform.evaluate = lambda inputs: inputs
    return transform


def not_callable(example_schema):
    return 42
