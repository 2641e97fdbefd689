"""YUV 4:2:0 planes to RGB in torch: the one implementation the producer's NVDEC path
(producer/modalities/gpu_video.py) and the trainer's NV12 unpacking (trainer/layouts.py) share.

`protocol` has no torch (docs/CONTRACTS.md): this module imports it inside its functions, so
importing `protocol` (or this module) costs nothing without torch; only torch users call it.

Colour maths, exact for the matrix and range (Kr, Kb: BT.601 0.299/0.114, BT.709
0.2126/0.0722):
    limited: Y' = (Y - 16) * 255/219, U' = (U - 128) * 255/224 (V' likewise)
    full:    Y' = Y, U' = U - 128
    R = Y' + 2 (1 - Kr) V'      B = Y' + 2 (1 - Kb) U'
    G = Y' - 2 (1 - Kb) Kb / Kg U' - 2 (1 - Kr) Kr / Kg V'     (Kg = 1 - Kr - Kb)
Chroma siting (`upsample_chroma`): "center" (samples centred both ways: what swscale assumes
for untagged planes, as the cache's NV12 store is) or "left" (H.264/HEVC's default, what a
decoder reports: centred vertically, co-sited with the even luma columns). Each caller's
tests hold it to swscale's conversion of the same planes (tests/test_layouts.py,
tests/test_pixel_format.py, tests/test_video.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MATRICES = {"bt601": (0.299, 0.114), "bt709": (0.2126, 0.0722)}  # (Kr, Kb)
SITINGS = ("center", "left")


def upsample_chroma(c: "torch.Tensor", h: int, w: int, siting: str = "center") -> "torch.Tensor":
    """(N, ceil(H/2), ceil(W/2)) chroma -> float32 (N, H, W). "center": bilinear with centred
    samples (align_corners=False), edges clamped; for odd sides the grid is scaled, not
    doubled. "left": rows centred between luma rows (bilinear), columns co-sited with the even
    luma columns (odd columns average their two neighbours)."""
    import torch
    import torch.nn.functional as F

    if siting == "center":
        return F.interpolate(c.float().unsqueeze(1), size=(h, w), mode="bilinear",
                             align_corners=False).squeeze(1)
    if siting != "left":
        raise ValueError(f"chroma siting {siting!r}: expected one of {', '.join(SITINGS)}")
    n, ch, cw = c.shape
    cv = F.interpolate(c.float().unsqueeze(1), size=(2 * ch, cw), mode="bilinear",
                       align_corners=False).squeeze(1)
    out = torch.empty((n, 2 * ch, 2 * cw), dtype=torch.float32, device=c.device)
    out[..., 0::2] = cv
    out[..., 1:-1:2] = (cv[..., :-1] + cv[..., 1:]) * 0.5
    out[..., -1] = cv[..., -1]
    return out[..., :h, :w]


def yuv420_to_rgb_float(y: "torch.Tensor", u: "torch.Tensor", v: "torch.Tensor",
                        matrix: str = "bt601", color_range: str = "limited",
                        siting: str = "center") -> "torch.Tensor":
    """uint8 planes y (N, H, W), u and v (N, ceil(H/2), ceil(W/2)) -> float32 RGB
    (N, 3, H, W), 0..255 but neither rounded nor clamped (a caller may crop and resize
    first, then round once)."""
    import torch

    height, width = y.shape[-2:]
    kr, kb = MATRICES[matrix]
    kg = 1.0 - kr - kb
    y = y.float()
    u = upsample_chroma(u, height, width, siting) - 128.0
    v = upsample_chroma(v, height, width, siting) - 128.0
    if color_range == "limited":
        y = (y - 16.0) * (255.0 / 219.0)
        u = u * (255.0 / 224.0)
        v = v * (255.0 / 224.0)
    return torch.stack((y + 2 * (1 - kr) * v,
                        y - 2 * (1 - kb) * kb / kg * u - 2 * (1 - kr) * kr / kg * v,
                        y + 2 * (1 - kb) * u), dim=-3)


def to_uint8(rgb: "torch.Tensor") -> "torch.Tensor":
    """Float 0..255 pixels -> uint8, rounded to nearest and clamped (in place on `rgb`)."""
    import torch

    return rgb.round_().clamp_(0, 255).to(torch.uint8)


def split_uv(uv: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
    """Interleaved NV12 chroma (..., CH, 2 * CW) -> the u and v planes (..., CH, CW), views."""
    uv = uv.reshape(*uv.shape[:-1], uv.shape[-1] // 2, 2)
    return uv[..., 0], uv[..., 1]


__all__ = ["MATRICES", "SITINGS", "split_uv", "to_uint8", "upsample_chroma",
           "yuv420_to_rgb_float"]
