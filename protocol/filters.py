"""The video filter spec: one string, parsed once, meaning the same thing everywhere.

`mmctl filter SPEC` sends it, the producer daemon validates it with `FilterSpec.parse`
before making a new generation, and the video modality applies it, on the CPU and on
the GPU alike. Grammar (comma-separated, any order, each op at most once):

    gray | grayscale          one luma channel instead of RGB
    rgb                       three channels (the default)
    resize=WxH                output size in pixels (e.g. resize=224x224)
    crop=WxH[+X+Y]            crop of the source before resizing; centred without +X+Y
    fps=R                     frame rate of the clip (frames sampled at R per second)
    pixel_format=rgb|yuv420   how the clip travels (default rgb): yuv420 keeps the codec's
                              4:2:0 planes (NV12, 1.5 bytes a pixel; no CPU RGB conversion),
                              converted to RGB on the trainer's device (issue 20); needs
                              colour (not gray) and even output sides
    none                      the default: source size, rgb, source rate

The operations are always applied as crop -> resize -> colour, whatever their order in
the string, so `str(FilterSpec.parse(s))` is a canonical form of `s`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import FilterSpecError

ACCEPTED = ("gray|grayscale, rgb, resize=WxH, crop=WxH[+X+Y], fps=R, pixel_format=rgb|yuv420, "
            "none (comma-separated)")
#: How the video modality travels (`pixel_format=`): RGB planes, or the codec's 4:2:0 planes.
PIXEL_FORMATS = ("rgb", "yuv420")
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
_CROP = re.compile(r"^(\d{1,5})x(\d{1,5})(?:\+(\d{1,5})\+(\d{1,5}))?$")
MAX_SIDE = 8192
#: Frame rates a filter may ask for. Below MIN_FPS a clip of a few frames would span hours
#: (fps=1e-300 made a producer that never published again while saying "running").
MIN_FPS, MAX_FPS = 0.01, 1000.0


def _clip(text: str, n: int = 80) -> str:
    """What an error message quotes of the user's text: a 60 KB spec is not echoed whole."""
    return text if len(text) <= n else text[:n] + "..."


@dataclass(frozen=True)
class FilterSpec:
    gray: bool = False
    width: int | None = None
    height: int | None = None
    crop: tuple[int, int, int | None, int | None] | None = None  # w, h, x, y
    fps: float | None = None
    pixel_format: str = "rgb"  # PIXEL_FORMATS; last so older positional uses keep working

    @property
    def channels(self) -> int:
        return 1 if self.gray else 3

    @classmethod
    def parse(cls, spec: str) -> "FilterSpec":
        if not isinstance(spec, str):
            raise FilterSpecError(f"filter spec must be a string, got {type(spec).__name__}")
        text = spec.strip().lower()
        if text in ("", "none"):
            return cls()
        gray: bool | None = None
        width = height = None
        crop = None
        fps = None
        pixel_format = "rgb"
        seen: set[str] = set()
        for raw in text.split(","):
            op = raw.strip()
            key, _, val = op.partition("=")
            key = {"grayscale": "gray", "grey": "gray"}.get(key, key)
            if key in seen or (key in ("gray", "rgb") and ({"gray", "rgb"} & seen)):
                raise FilterSpecError(f"filter {_clip(spec)!r}: {_clip(key)!r} given twice; accepted: {ACCEPTED}")
            seen.add(key)
            if key in ("gray", "rgb") and not val:
                gray = key == "gray"
            elif key == "resize":
                m = _SIZE.match(val)
                if not m or not all(0 < int(g) <= MAX_SIDE for g in m.groups()):
                    raise FilterSpecError(
                        f"filter {_clip(spec)!r}: resize={_clip(val)!r}: expected WxH with 1..{MAX_SIDE} pixels"
                    )
                width, height = int(m.group(1)), int(m.group(2))
            elif key == "crop":
                m = _CROP.match(val)
                if not m or not (0 < int(m.group(1)) <= MAX_SIDE and 0 < int(m.group(2)) <= MAX_SIDE):
                    raise FilterSpecError(
                        f"filter {_clip(spec)!r}: crop={_clip(val)!r}: expected WxH or WxH+X+Y in pixels"
                    )
                x = int(m.group(3)) if m.group(3) is not None else None
                y = int(m.group(4)) if m.group(4) is not None else None
                crop = (int(m.group(1)), int(m.group(2)), x, y)
            elif key == "fps":
                try:
                    fps = float(val)
                except ValueError:
                    fps = -1.0
                if not (MIN_FPS <= fps <= MAX_FPS):
                    raise FilterSpecError(
                        f"filter {_clip(spec)!r}: fps={_clip(val)!r}: expected a rate of {MIN_FPS:g} to "
                        f"{MAX_FPS:g} frames/s"
                    )
            elif key == "pixel_format":
                if val not in PIXEL_FORMATS:
                    raise FilterSpecError(f"filter {_clip(spec)!r}: pixel_format={_clip(val)!r}: "
                                          f"expected one of {', '.join(PIXEL_FORMATS)}")
                pixel_format = val
            else:
                raise FilterSpecError(f"filter {_clip(spec)!r}: unknown operation {_clip(op)!r}; accepted: {ACCEPTED}")
        if pixel_format == "yuv420":
            if gray:
                raise FilterSpecError(f"filter {_clip(spec)!r}: pixel_format=yuv420 carries colour; "
                                      f"gray is already one byte a pixel (drop one of the two)")
            # the output's sides: resize's when given, else the crop's (else the source's,
            # checked at decode time)
            key, (w, h) = (("resize", (width, height)) if width is not None else
                           ("crop", crop[:2]) if crop is not None else ("", (0, 0)))
            if w % 2 or h % 2:
                raise FilterSpecError(f"filter {_clip(spec)!r}: {key}={w}x{h}: pixel_format=yuv420 "
                                      f"needs even output sides (4:2:0 chroma covers 2x2 pixels)")
        return cls(gray=bool(gray), width=width, height=height, crop=crop, fps=fps,
                   pixel_format=pixel_format)

    def crop_box(self, src_w: int, src_h: int) -> tuple[int, int, int, int]:
        """(x, y, w, h) of the crop inside a source frame; the whole frame without a crop."""
        if self.crop is None:
            return 0, 0, src_w, src_h
        w, h, x, y = self.crop
        w, h = min(w, src_w), min(h, src_h)
        if x is None:
            x, y = (src_w - w) // 2, (src_h - h) // 2
        x = min(x, src_w - w)
        y = min(y, src_h - h)
        return x, y, w, h

    def frame_problem(self, src_w: int, src_h: int, of: str = "") -> str | None:
        """Why this filter cannot apply to src_w x src_h frames as written (a crop larger
        than the frame, or one reaching past its edge), or None; `of` names whose frames
        they are. `crop_box` would clamp such a crop silently - to the full frame for
        crop=2000x2000 on 768x432 - so the daemon asks this first and refuses the change."""
        if self.crop is None:
            return None
        w, h, x, y = self.crop
        frame = f"the {src_w}x{src_h} frame" + (f" of {of}" if of else "")
        if w > src_w or h > src_h:
            return (f"crop={w}x{h} is larger than {frame}; a crop must fit inside it (at most "
                    f"crop={src_w}x{src_h})")
        if x is not None and (x + w > src_w or y + h > src_h):
            return (f"crop={w}x{h}+{x}+{y} reaches past the edge of {frame} (x + w = {x + w}, "
                    f"y + h = {y + h}); the largest offset for this size is "
                    f"+{src_w - w}+{src_h - h}")
        return None

    def output_size(self, src_w: int, src_h: int) -> tuple[int, int]:
        """(width, height) of frames this filter makes from a src_w x src_h source."""
        if self.width is not None:
            return self.width, self.height  # type: ignore[return-value]
        _, _, w, h = self.crop_box(src_w, src_h)
        return w, h

    def __str__(self) -> str:
        parts = []
        if self.crop is not None:
            w, h, x, y = self.crop
            parts.append(f"crop={w}x{h}" + (f"+{x}+{y}" if x is not None else ""))
        if self.width is not None:
            parts.append(f"resize={self.width}x{self.height}")
        if self.gray:
            parts.append("gray")
        if self.fps is not None:
            parts.append(f"fps={self.fps:g}")
        if self.pixel_format != "rgb":  # the default stays out: existing specs keep their text
            parts.append(f"pixel_format={self.pixel_format}")
        return ",".join(parts) or "none"
