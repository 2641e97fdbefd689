"""Colour conversion and resizing of decoded YUV frames in torch, for NVDEC output on a GPU.

NVDEC hands back NV12 surfaces (a luma plane and one interleaved half-resolution chroma plane)
in GPU memory. Turning them into the FilterSpec's output in torch keeps frames on the GPU from
bitstream to model. The same functions run on CPU tensors, which is how the CPU-only test
machine checks them against swscale's output (tests/test_video.py states the tolerance).

Colour maths is BT.601 limited range, what swscale assumes for untagged SD/HD H.264 streams
(protocol/yuv_torch.py, the implementation the trainer's NV12 unpacking shares):
    R = 1.164 (Y - 16)                 + 1.596 (V - 128)
    G = 1.164 (Y - 16) - 0.392 (U - 128) - 0.813 (V - 128)
    B = 1.164 (Y - 16) + 2.017 (U - 128)
Chroma is upsampled with MPEG-2/H.264's default siting (co-sited horizontally, centred
vertically) by linear interpolation, as swscale does with ACCURATE_RND (which video.py sets):
on a real clip the two agree to within 1 level.
Gray is the luma plane expanded to full range, (Y - 16) * 255 / 219, as swscale's `gray` is.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from protocol.filters import FilterSpec
from protocol.yuv_torch import split_uv, to_uint8, yuv420_to_rgb_float

log = logging.getLogger(__name__)

_Y_SCALE = 255.0 / 219.0


def yuv420_to_rgb(y: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """uint8 planes y (N, H, W), u and v (N, H/2, W/2) -> float32 RGB (N, 3, H, W) in 0..255:
    BT.601 limited, chroma co-sited left (protocol/yuv_torch.py, shared with the trainer)."""
    return yuv420_to_rgb_float(y, u, v, "bt601", "limited", "left")


def nv12_to_rgb(y: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """NV12 planes y (N, H, W) and interleaved uv (N, H/2, W) -> float32 RGB (N, 3, H, W)."""
    return yuv420_to_rgb(y, *split_uv(uv))


def luma_to_gray(y: torch.Tensor) -> torch.Tensor:
    """uint8 luma (N, H, W) -> float32 full-range gray (N, 1, H, W)."""
    return ((y.float() - 16.0) * _Y_SCALE).unsqueeze(-3)


def apply_spec(y: torch.Tensor, chroma: tuple[torch.Tensor, ...], spec: FilterSpec) -> torch.Tensor:
    """Decoded planes -> uint8 (N, C, H, W) as `spec` says: crop -> resize -> colour.

    `chroma` is (uv,) for NV12 or (u, v) for yuv420p. Crop happens after colour conversion
    (a crop at an odd offset would split a chroma sample), which is the same picture.
    """
    src_h, src_w = y.shape[-2:]
    if spec.gray:
        img = luma_to_gray(y)
    elif len(chroma) == 1:
        img = nv12_to_rgb(y, chroma[0])
    else:
        img = yuv420_to_rgb(y, *chroma)
    x0, y0, cw, ch = spec.crop_box(src_w, src_h)
    img = img[..., y0:y0 + ch, x0:x0 + cw]
    out_w, out_h = spec.output_size(src_w, src_h)
    if (out_h, out_w) != (ch, cw):
        img = F.interpolate(img, size=(out_h, out_w), mode="bilinear", align_corners=False,
                            antialias=True)
    return to_uint8(img)


def decode_clip_cuda(path: str | Path, spec: FilterSpec, frames: int, segment=None, notes=None,
                     device: int = 0, times: list[float] | None = None) -> torch.Tensor:
    """NVDEC decode of a clip into a uint8 CUDA tensor (T, C, H, W); frames never touch host
    memory. Frame selection is video.select_frames, the CPU path's, so both paths pick the
    same frames (and fill `times` with the same presentation times). Planes are copied out of
    the decoder's surfaces (which it recycles) into one batch, then converted and resized in
    one batched call.
    """
    from av.codec.hwaccel import HWAccel

    from .video import _open, select_frames

    hw = HWAccel("cuda", device=str(device), allow_software_fallback=False, is_hw_owned=True)
    ys = uvs = None
    with _open(path, hwaccel=hw) as container:
        for frame, k, first in select_frames(path, container, spec, frames, segment, notes,
                                             times=times):
            if frame is None or k != first:
                ys[k].copy_(ys[k - 1] if frame is None else ys[first])
                uvs[k].copy_(uvs[k - 1] if frame is None else uvs[first])
                continue
            y = torch.from_dlpack(frame.planes[0])
            uv = torch.from_dlpack(frame.planes[1])
            uv = uv.reshape(uv.shape[0], -1)  # (H/2, W/2, 2) or (H/2, W) -> (H/2, W)
            if ys is None:
                ys = torch.empty((frames, *y.shape), dtype=torch.uint8, device=y.device)
                uvs = torch.empty((frames, *uv.shape), dtype=torch.uint8, device=y.device)
            ys[k].copy_(y)
            uvs[k].copy_(uv)
    return apply_spec(ys, (uvs,), spec)
