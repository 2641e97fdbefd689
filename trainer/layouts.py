"""Unpacking packed modalities (NV12 video) into what the model sees, on the trainer's device.

A cache made with `mm-producer preprocess --video-store nv12` holds video as NV12 planes (1.5
bytes a pixel; protocol/schema.py `ModalitySpec.layout`). The batch crosses host memory and the
host-to-device copy in that form, half the bytes of RGB, and becomes uint8 RGB (B, T, 3, H, W)
here, after the copy: on the GPU when the trainer has one, on the CPU otherwise (the same code).

Colour maths, exact for the layout's matrix and range (Kr, Kb: BT.601 0.299/0.114, BT.709
0.2126/0.0722):
    limited: Y' = (Y - 16) * 255/219, U' = (U - 128) * 255/224 (V' likewise)
    full:    Y' = Y, U' = U - 128
    R = Y' + 2 (1 - Kr) V'      B = Y' + 2 (1 - Kb) U'
    G = Y' - 2 (1 - Kb) Kb / Kg U' - 2 (1 - Kr) Kr / Kg V'     (Kg = 1 - Kr - Kb)
Chroma is scaled from its ceil(H/2) x ceil(W/2) grid to H x W by bilinear interpolation with
centred samples (align_corners=False), edges clamped: what swscale does for planes without a
chroma-location tag, as the store's are (for odd sides too: the grid is scaled, not doubled).
tests/test_layouts.py holds it to swscale's own conversion of the same planes
(protocol/video_store.nv12_to_rgb_swscale), all four matrix/range pairs, odd and even sizes,
real footage and pure noise (the worst case for chroma): at most 1 level apart, under 0.02
levels on average (measured: 0.006 at worst).
Planes decoded with `pixel_format=yuv420` keep the decoder's chroma siting (layout suffix
/left: H.264/HEVC's); tests/test_pixel_format.py holds that path to swscale's RGB of the same
decoded frames (the producer's rgb output) on a real PyAV-encoded clip: at most 1 level apart.
(producer/modalities/gpu_video.py converts NVDEC surfaces, whose H.264 chroma is co-sited
left; the trainer cannot import the producer, and the sitings differ.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from protocol.schema import SampleSchema, chroma_siting, parse_layout

_K = {"bt601": (0.299, 0.114), "bt709": (0.2126, 0.0722)}


def _upsample_chroma(c: torch.Tensor, h: int, w: int, siting: str = "center") -> torch.Tensor:
    """(N, ceil(H/2), ceil(W/2)) chroma -> float32 (N, H, W). "center": samples centred in
    both directions (the NV12 store; module docstring). "left": H.264/HEVC's default, what a
    decoder reports and swscale follows for decoded frames: centred vertically, co-sited with
    the even luma columns horizontally (odd columns average their two neighbours)."""
    if siting == "center":
        return F.interpolate(c.float().unsqueeze(1), size=(h, w), mode="bilinear",
                             align_corners=False).squeeze(1)
    n, ch, cw = c.shape
    cv = F.interpolate(c.float().unsqueeze(1), size=(2 * ch, cw), mode="bilinear",
                       align_corners=False).squeeze(1)
    out = torch.empty((n, 2 * ch, 2 * cw), dtype=torch.float32, device=c.device)
    out[..., 0::2] = cv
    out[..., 1:-1:2] = (cv[..., :-1] + cv[..., 1:]) * 0.5
    out[..., -1] = cv[..., -1]
    return out[..., :h, :w]


def yuv420_to_rgb(y: torch.Tensor, u: torch.Tensor, v: torch.Tensor, matrix: str = "bt601",
                  color_range: str = "limited", siting: str = "center") -> torch.Tensor:
    """uint8 planes y (N, H, W), u and v (N, ceil(H/2), ceil(W/2)) -> uint8 RGB (N, 3, H, W)."""
    height, width = y.shape[-2:]
    kr, kb = _K[matrix]
    kg = 1.0 - kr - kb
    y = y.float()
    u = _upsample_chroma(u, height, width, siting) - 128.0
    v = _upsample_chroma(v, height, width, siting) - 128.0
    if color_range == "limited":
        y = (y - 16.0) * (255.0 / 219.0)
        u = u * (255.0 / 224.0)
        v = v * (255.0 / 224.0)
    rgb = torch.stack((y + 2 * (1 - kr) * v,
                       y - 2 * (1 - kb) * kb / kg * u - 2 * (1 - kr) * kr / kg * v,
                       y + 2 * (1 - kb) * u), dim=-3)
    return rgb.round_().clamp_(0, 255).to(torch.uint8)


def nv12_to_rgb(planes: torch.Tensor, height: int, width: int, matrix: str = "bt601",
                color_range: str = "limited", siting: str = "center") -> torch.Tensor:
    """uint8 NV12 planes (..., nv12_frame_bytes(H, W)) -> uint8 RGB (..., 3, H, W), on the
    planes' device; one batched computation for every frame of every sample."""
    lead = planes.shape[:-1]
    flat = planes.reshape(-1, planes.shape[-1])
    ch, cw = (height + 1) // 2, (width + 1) // 2
    y = flat[:, : height * width].reshape(-1, height, width)
    uv = flat[:, height * width:].reshape(-1, ch, cw, 2)
    rgb = yuv420_to_rgb(y, uv[..., 0], uv[..., 1], matrix, color_range, siting)
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
