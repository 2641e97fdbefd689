"""A user model (`--model _big_activation_model:build`) that keeps a lot of memory per sample
for backward: the default model plus a wide convolution over every video frame. What
--auto-batch must fit into a smaller batch than the default model's under the same budget."""
from __future__ import annotations

from torch import nn

from trainer.model import build_model

CHANNELS = 64


class BigActivations(nn.Module):
    def __init__(self, schema, num_classes):
        super().__init__()
        self.base = build_model(None, schema, num_classes)
        channels = next(m for m in schema.modalities if m.name == "video").shape[1]
        self.wide = nn.Sequential(nn.Conv2d(channels, CHANNELS, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(CHANNELS, num_classes))

    def forward(self, inputs):
        video = inputs["video"]
        b, t = video.shape[:2]
        wide = self.wide(video.reshape(b * t, *video.shape[2:])).reshape(b, t, -1).mean(1)
        return self.base(inputs) + wide


def build(schema, num_classes):
    return BigActivations(schema, num_classes)
