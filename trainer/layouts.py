"""Unpacking packed modalities (NV12 video) into what the model sees, on the trainer's device.

A cache made with `mm-producer preprocess --video-store nv12` holds video as NV12 planes (1.5
bytes a pixel; protocol/schema.py `ModalitySpec.layout`). The batch crosses host memory and the
host-to-device copy in that form, half the bytes of RGB, and becomes uint8 RGB (B, T, 3, H, W)
here, after the copy: on the GPU when the trainer has one, on the CPU otherwise (the same code).

The conversion is protocol/yuv_torch.py (colour maths and chroma siting), shared with the
producer's NVDEC path. The store's planes carry no chroma-location tag, so their chroma is
centred ("center"), as swscale assumes for such planes (for odd sides too: the grid is
scaled, not doubled).
tests/test_layouts.py holds it to swscale's own conversion of the same planes
(protocol/video_store.nv12_to_rgb_swscale), all four matrix/range pairs, odd and even sizes,
real footage and pure noise (the worst case for chroma): at most 1 level apart, under 0.02
levels on average (measured: 0.006 at worst).
Planes decoded with `pixel_format=yuv420` keep the decoder's chroma siting (layout suffix
/left: H.264/HEVC's); tests/test_pixel_format.py holds that path to swscale's RGB of the same
decoded frames (the producer's rgb output) on a real PyAV-encoded clip: at most 1 level apart.
(producer/modalities/gpu_video.py converts NVDEC surfaces with the same code, siting "left".)
"""
from __future__ import annotations

import torch

from protocol.schema import SampleSchema, chroma_siting, parse_layout
from protocol.yuv_torch import split_uv, to_uint8, yuv420_to_rgb_float


def yuv420_to_rgb(y: torch.Tensor, u: torch.Tensor, v: torch.Tensor, matrix: str = "bt601",
                  color_range: str = "limited", siting: str = "center") -> torch.Tensor:
    """uint8 planes y (N, H, W), u and v (N, ceil(H/2), ceil(W/2)) -> uint8 RGB (N, 3, H, W)."""
    return to_uint8(yuv420_to_rgb_float(y, u, v, matrix, color_range, siting))


def nv12_to_rgb(planes: torch.Tensor, height: int, width: int, matrix: str = "bt601",
                color_range: str = "limited", siting: str = "center") -> torch.Tensor:
    """uint8 NV12 planes (..., nv12_frame_bytes(H, W)) -> uint8 RGB (..., 3, H, W), on the
    planes' device; one batched computation for every frame of every sample."""
    lead = planes.shape[:-1]
    flat = planes.reshape(-1, planes.shape[-1])
    ch, cw = (height + 1) // 2, (width + 1) // 2
    y = flat[:, : height * width].reshape(-1, height, width)
    u, v = split_uv(flat[:, height * width:].reshape(-1, ch, 2 * cw))
    rgb = yuv420_to_rgb(y, u, v, matrix, color_range, siting)
    return rgb.reshape(*lead, 3, height, width)


def unpack_inputs(schema: SampleSchema, inputs: dict[str, torch.Tensor]
                  ) -> dict[str, torch.Tensor]:
    """Batched modality views of `schema` (B, *stored_shape) -> the model's inputs: packed
    modalities unpacked (NV12 -> RGB uint8), the rest passed through untouched. A schema
    without packed modalities returns `inputs` itself (no work, no copy)."""
    if not schema.packed:
        return inputs
    out = dict(inputs)
    for m in schema.modalities:
        if m.layout and m.name in inputs:
            _, matrix, color_range = parse_layout(m.layout)
            out[m.name] = nv12_to_rgb(inputs[m.name], m.shape[-2], m.shape[-1], matrix,
                                      color_range, chroma_siting(m.layout))
    return out


__all__ = ["nv12_to_rgb", "unpack_inputs", "yuv420_to_rgb"]
