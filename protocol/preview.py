"""One picture of one sample as the model gets it: every modality drawn, captioned with the
generation, filter, sensors and method that made it.

Two halves, both here because both sides use them:
- `encode_sample(arrays, info)` (the producer's `preview` reply, and `mm-producer preview` for a
  cached sample): each modality's array, thinned to fit a control reply (a clip keeps up to
  `MAX_FRAMES` frames spread over it, large planes keep every k-th pixel; the reply says what
  was thinned), as base64 of its raw bytes - JSON on the wire, never pickle.
- `render_png(sample, path)`: PIL + numpy only. A video clip is its frames side by side (gray
  or RGB as they are), a log-mel spectrogram and a radar map are heatmaps (low frequencies and
  near range at the bottom), a LiDAR bird's-eye view is its three channels as RGB (height,
  intensity, density), an unknown sensor is a plot of its values (one line per column). The
  caption is drawn above the panels and also stored in the PNG's text chunks (`Caption`,
  `Panels`), so a script can read what the picture shows.

PIL is imported only when a picture is drawn: the daemons never import it.
"""
from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

MAX_FRAMES = 4                 # frames of a clip shown
REPLY_BUDGET = 600 * 1024      # raw array bytes in one preview reply (base64 adds a third)
MIN_PANEL = 160                # a panel is scaled up (nearest) to at least this many pixels high
PANEL_MAX_W = 900
PAD = 8


@dataclass(frozen=True)
class Modality:
    """One modality of a preview: the (possibly thinned) array and what it was."""

    name: str
    dtype: str
    shape: tuple[int, ...]     # as the model gets it
    array: np.ndarray          # what was sent (thinned)
    note: str = ""             # "frames 0, 2, 5, 7 of 8; every 2nd pixel"


def _thin(name: str, a: np.ndarray, budget: int) -> tuple[np.ndarray, str]:
    notes = []
    if a.ndim == 4 and a.shape[0] > MAX_FRAMES:  # a clip (T, C, H, W): frames spread over it
        idx = np.unique(np.linspace(0, a.shape[0] - 1, MAX_FRAMES).round().astype(int))
        notes.append(f"frames {', '.join(map(str, idx))} of {a.shape[0]}")
        a = a[idx]
    step = 1
    if a.ndim == 1:
        while a[::step].nbytes > budget:
            step *= 2
        a = a[::step]
    else:
        while a[..., ::step, ::step].nbytes > budget and step < 4096:
            step *= 2
        a = a[..., ::step, ::step]
    if step > 1:
        notes.append(f"every {step}th value along the last axes")
    return np.ascontiguousarray(a), "; ".join(notes)


def encode_sample(arrays: Mapping[str, np.ndarray], info: Mapping) -> dict:
    """The JSON-able preview of one sample: `info` (generation, filter, sensors, methods, source,
    label, ...) plus `modalities`, each fitted into an equal share of REPLY_BUDGET."""
    share = max(16 * 1024, REPLY_BUDGET // max(1, len(arrays)))
    mods = []
    for name, a in arrays.items():
        a = np.asarray(a)
        sent, note = _thin(name, a, share)
        mods.append({"name": name, "dtype": str(a.dtype), "shape": list(a.shape),
                     "sent_shape": list(sent.shape), "note": note,
                     "data": base64.b64encode(sent.tobytes()).decode("ascii")})
    return {**info, "modalities": mods}


def decode_sample(reply: Mapping) -> list[Modality]:
    """The modalities of a preview reply; ValueError names one that does not add up."""
    out = []
    for m in reply.get("modalities", []):
        raw = base64.b64decode(m["data"])
        dtype, shape = np.dtype(m["dtype"]), tuple(int(x) for x in m["sent_shape"])
        if len(raw) != dtype.itemsize * math.prod(shape):
            raise ValueError(f"preview modality {m['name']!r}: {len(raw)} bytes do not make "
                             f"{m['dtype']} {shape}")
        out.append(Modality(m["name"], m["dtype"], tuple(m["shape"]),
                            np.frombuffer(raw, dtype).reshape(shape), m.get("note", "")))
    return out


def caption(info: Mapping) -> list[str]:
    """The caption's lines: what made the sample, then where it came from."""
    gen = info.get("generation")
    head = [f"generation {gen}" if gen is not None else "no generation"]
    if info.get("filter") is not None:
        head.append(f"filter {info['filter']}")
    sensors = info.get("sensors")
    if isinstance(sensors, Mapping):
        head.append("sensors " + (", ".join(f"{k}={v}" for k, v in sorted(sensors.items()))
                                  or "default"))
    methods = info.get("methods")
    if isinstance(methods, Mapping) and methods:
        head.append("method " + ", ".join(f"{k} {v}" for k, v in sorted(methods.items())))
    tail = []
    for key, what in (("source", "source"), ("label_name", "label"), ("split", "split"),
                      ("made_by", "made by")):
        if info.get(key) not in (None, ""):
            tail.append(f"{what} {info[key]}")
    if info.get("label_name") is None and info.get("label") is not None:
        tail.append("unlabelled" if info["label"] == -1 else f"label {info['label']}")
    return [", ".join(head)] + ([", ".join(tail)] if tail else [])


# --- drawing ----------------------------------------------------------------------------------

def _colormap(x: np.ndarray) -> np.ndarray:
    """(H, W) float -> (H, W, 3) uint8, dark blue -> green -> yellow (viridis-like), scaled to
    the array's own 1st..99th percentile (a log-mel's -80 dB floor does not wash it out)."""
    x = np.asarray(x, np.float64)
    finite = x[np.isfinite(x)]
    lo, hi = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
    t = np.clip((np.nan_to_num(x, nan=lo) - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    stops = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98],
                      [253, 231, 37]], np.float64)
    pos = t * (len(stops) - 1)
    i = np.minimum(pos.astype(int), len(stops) - 2)
    f = (pos - i)[..., None]
    return (stops[i] * (1 - f) + stops[i + 1] * f).astype(np.uint8)


def _norm_u8(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    lo, hi = float(np.nanmin(x)), float(np.nanmax(x))
    return (np.clip((x - lo) / (hi - lo if hi > lo else 1.0), 0, 1) * 255).astype(np.uint8)


def _image(m: Modality) -> np.ndarray | None:
    """(H, W, 3) uint8 for arrays that are pictures; None for those drawn as plots."""
    a = m.array
    if a.ndim == 4:  # a clip (T, C, H, W): frames side by side
        frames = []
        for f in a:
            f = f if a.dtype == np.uint8 else _norm_u8(f)
            rgb = np.repeat(f[:1], 3, 0) if f.shape[0] != 3 else f
            frames.append(np.moveaxis(rgb, 0, -1))
            frames.append(np.full((rgb.shape[1], 2, 3), 255, np.uint8))
        return np.concatenate(frames[:-1], axis=1)
    if a.ndim == 3 and a.shape[0] == 3:  # a bird's-eye view / points map: channels as RGB
        return np.moveaxis(np.stack([_norm_u8(c) for c in a]), 0, -1)[::-1]
    if a.ndim == 3:  # (1, H, W) spectrogram or radar map: a heatmap, row 0 at the bottom
        return _colormap(a[0])[::-1]
    if a.ndim == 2 and min(a.shape) >= 16:  # a plane of values
        return _colormap(a)[::-1]
    return None


def _plot(m: Modality, width: int, height: int) -> np.ndarray:
    """A line plot of a 1-D array, or one line per column of a 2-D one (an IMU's axes)."""
    from PIL import Image, ImageDraw

    a = np.asarray(m.array, np.float64)
    cols = a.reshape(a.shape[0], -1) if a.ndim >= 2 else a[:, None]
    img = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.rectangle([0, 0, width - 1, height - 1], outline=(180, 180, 180))
    finite = cols[np.isfinite(cols)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    span = hi - lo if hi > lo else 1.0
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
               (140, 86, 75), (227, 119, 194), (127, 127, 127)]
    n = cols.shape[0]
    xs = np.linspace(4, width - 5, n) if n > 1 else np.array([width / 2])
    for j in range(min(cols.shape[1], len(colours))):
        ys = height - 5 - (np.nan_to_num(cols[:, j], nan=lo) - lo) / span * (height - 10)
        d.line(list(zip(xs.tolist(), ys.tolist())), fill=colours[j], width=1)
    return np.asarray(img)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def render_png(modalities: list[Modality], info: Mapping, path: str | Path) -> dict:
    """Draw the preview to `path` (PNG); returns {path, width, height, caption, panels}."""
    from PIL import Image, ImageDraw
    from PIL.PngImagePlugin import PngInfo

    lines = caption(info)
    title_font, small = _font(16), _font(12)
    panels = []
    for m in modalities:
        pic = _image(m)
        if pic is None:
            pic = _plot(m, 480, 160)
        else:
            scale = max(1, math.ceil(MIN_PANEL / pic.shape[0]))
            scale = min(scale, max(1, PANEL_MAX_W // pic.shape[1]))
            pic = np.kron(pic, np.ones((scale, scale, 1), np.uint8)) if scale > 1 else pic
        if pic.shape[1] > PANEL_MAX_W:  # a long clip: keep its aspect, shrink to fit
            h = max(1, round(pic.shape[0] * PANEL_MAX_W / pic.shape[1]))
            pic = np.asarray(Image.fromarray(pic).resize((PANEL_MAX_W, h), Image.NEAREST))
        title = f"{m.name}  {m.dtype} {tuple(m.shape)}" + (f"  ({m.note})" if m.note else "")
        panels.append((m, title, pic))
    width = max([PANEL_MAX_W // 2] + [p.shape[1] + 2 * PAD for _, _, p in panels]
                + [len(line) * 8 + 2 * PAD for line in lines])
    cap_h = PAD + 22 * len(lines) + PAD
    height = cap_h + sum(18 + p.shape[0] + PAD for _, _, p in panels) + PAD
    img = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    y = PAD
    for line in lines:
        d.text((PAD, y), line, fill=(0, 0, 0), font=title_font)
        y += 22
    y = cap_h
    boxes = []
    for m, title, pic in panels:
        d.text((PAD, y), title, fill=(60, 60, 60), font=small)
        y += 18
        img.paste(Image.fromarray(pic), (PAD, y))
        boxes.append({"name": m.name, "box": [PAD, y, PAD + pic.shape[1], y + pic.shape[0]],
                      "shape": list(m.shape), "dtype": m.dtype, "note": m.note})
        y += pic.shape[0] + PAD
    meta = PngInfo()
    meta.add_text("Caption", "\n".join(lines))
    meta.add_text("Panels", json.dumps(boxes))
    path = Path(path)
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, pnginfo=meta)
    return {"path": str(path), "width": width, "height": height, "caption": lines,
            "panels": boxes}


__all__ = ["MAX_FRAMES", "Modality", "caption", "decode_sample", "encode_sample", "render_png"]
