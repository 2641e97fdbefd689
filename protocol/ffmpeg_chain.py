"""Operator-supplied FFmpeg filter chains (`mmctl filter --ffmpeg CHAIN`), checked before use.

A chain is FFmpeg's own `-vf` syntax for a *linear* chain: `name[=args][,name[=args]...]`,
e.g. `yadif,scale=640:480,hflip` or `yadif_cuda,scale_cuda=640:480`. It reaches a process that
runs FFmpeg, so it is held to an allow-list of filters that only transform frames. Anything
that can open a file or a device or run a command - `movie`/`amovie` (open any URL),
`sendcmd`/`zmq`/`azmq` (commands from a file or a socket), `drawtext` (textfile=, fontfile=),
`subtitles`/`ass`, `lut3d`/`haldclut`/`lut1d` (LUT files), `frei0r`/`ladspa`/`lv2` (load
libraries), `dnn_*`/`sr` (model files), stats/log writers (`psnr`, `ssim`, `libvmaf`,
`vidstab*`) - is refused naming the filter, and so is any option that names a file
(`filename=`, `file=`, `textfile=`, ...) on any filter.

WHY a strict grammar and not FFmpeg's full one: the check must see the chain exactly as FFmpeg
will parse it. FFmpeg's graph syntax has quoting (`'...'`), escaping (`\\,`), link labels
(`[in]`), several chains (`;`), instance names (`scale@a`) and a leading `sws_flags=...;`. A
checker that parsed any of these differently from FFmpeg could be walked around, so none of
those characters is accepted: what is left splits on `,` and `:` the same way in both parsers,
and `ChainFilter.text` is passed on unchanged. (Expressions with a comma, `min(iw\\,640)`,
need escaping and so are refused; write the number instead.)
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import BadArgument

#: Filters that only transform frames (no file, device, network or command access).
ALLOWED = frozenset({
    # geometry and pixel format
    "scale", "crop", "pad", "format", "hflip", "vflip", "transpose", "rotate", "setsar",
    "setdar", "null", "copy",
    # deinterlacing
    "yadif", "bwdif", "w3fdif", "kerndeint",
    # frame rate / selection (timestamps only)
    "fps", "framestep", "setpts", "trim", "select", "thumbnail",
    # pixel values
    "eq", "hue", "negate", "colorlevels", "gblur", "boxblur", "unsharp", "hqdn3d", "nlmeans",
    "colorspace", "colormatrix",
    # CUDA forms (the ffmpeg child on a GPU)
    "yadif_cuda", "scale_cuda", "thumbnail_cuda", "bwdif_cuda", "hwupload_cuda", "hwupload",
    "hwdownload", "scale_npp", "transpose_npp",
})

#: Filters refused for what they can reach, with the reason the error gives.
REFUSED = {
    "movie": "opens any file or URL as a second input",
    "amovie": "opens any file or URL as a second input",
    "sendcmd": "runs filter commands read from a file or its arguments",
    "asendcmd": "runs filter commands read from a file or its arguments",
    "zmq": "takes filter commands from a network socket",
    "azmq": "takes filter commands from a network socket",
    "drawtext": "reads files (textfile=, fontfile=) and can expand commands",
    "subtitles": "opens a subtitle file",
    "ass": "opens a subtitle file",
    "lut3d": "opens a LUT file",
    "lut1d": "opens a LUT file",
    "haldclut": "reads a LUT from a second input",
    "frei0r": "loads a shared library",
    "frei0r_src": "loads a shared library",
    "ladspa": "loads a shared library",
    "lv2": "loads a shared library",
    "dnn_processing": "loads a model file",
    "dnn_detect": "loads a model file",
    "dnn_classify": "loads a model file",
    "sr": "loads a model file",
    "libvmaf": "writes a log file and loads a model file",
    "psnr": "writes a stats file",
    "ssim": "writes a stats file",
    "vidstabdetect": "writes a transforms file",
    "vidstabtransform": "reads a transforms file",
    "signature": "writes signature files",
    "ocr": "loads tesseract data files",
    "coreimage": "loads filter code",
    "opencl": "loads kernel source files",
    "program_opencl": "loads kernel source files",
    "vulkan": "loads shader source files",
    "avgblur_opencl": "loads kernel source files",
}

#: Option names that name a file or a device, refused on every filter.
FILE_OPTIONS = frozenset({
    "filename", "file", "textfile", "fontfile", "f", "stats_file", "log_path", "log_file",
    "model", "model_path", "model_filename", "path", "device", "dev", "url", "src",
    "commands", "script", "dnn_backend", "lut", "sub", "subtitles", "fontsdir",
})

MAX_CHAIN = 2000
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_KEY = re.compile(r"^[a-z_][a-z0-9_]{0,63}$")
_VALUE = re.compile(r"^[A-Za-z0-9_.+\-*/()%|<>!]{0,200}$")
_SPECIAL = {"[": "link labels", "]": "link labels", ";": "several chains", "'": "quoting",
            '"': "quoting", "\\": "escaping", "@": "instance names", "\n": "newlines",
            "\r": "newlines", "\t": "tabs", "\0": "NUL", " ": "spaces"}


class ChainError(BadArgument):
    """An operator's FFmpeg chain that is refused; the message names the filter and why."""


@dataclass(frozen=True)
class ChainFilter:
    name: str
    args: str        # as written after '=' ('' for none)
    options: tuple[tuple[str | None, str], ...]   # (key or None for positional, value)

    @property
    def text(self) -> str:
        return f"{self.name}={self.args}" if self.args else self.name

    @property
    def cuda(self) -> bool:
        return self.name.endswith(("_cuda", "_npp")) or self.name in ("hwupload", "hwdownload")


@dataclass(frozen=True)
class FfmpegChain:
    filters: tuple[ChainFilter, ...]

    @property
    def text(self) -> str:
        """The chain as FFmpeg will parse it (the checked text, unchanged)."""
        return ",".join(f.text for f in self.filters)

    @property
    def needs_cuda(self) -> bool:
        """True when a filter runs only on CUDA frames (the ffmpeg child on a GPU)."""
        return any(f.cuda for f in self.filters)

    def __str__(self) -> str:
        return self.text


def _clip(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[:n] + "..."


def chain_arg(text: str) -> str:
    """The control argument `filter --ffmpeg`: a checked chain's text, or "none" (clear)."""
    if isinstance(text, str) and text.strip().lower() in ("none", ""):
        return "none"
    return parse_chain(text).text


def parse_chain(text: str) -> FfmpegChain:
    """Check an operator's chain against the grammar and the allow-list; ChainError names the
    first filter or option refused and what is accepted instead."""
    if not isinstance(text, str):
        raise ChainError(f"ffmpeg chain: expected a string, got {type(text).__name__}")
    chain = text.strip()
    if not chain:
        raise ChainError("ffmpeg chain: empty; give filters like 'yadif,scale=640:480'")
    if len(chain) > MAX_CHAIN:
        raise ChainError(f"ffmpeg chain: {len(chain)} characters, at most {MAX_CHAIN}")
    for ch, what in _SPECIAL.items():
        if ch in chain:
            raise ChainError(f"ffmpeg chain {_clip(chain)!r}: {what} ({ch!r}) are not accepted; "
                             f"give one linear chain 'name=a:b,name2=k=v' without quotes, "
                             f"escapes, labels or ';'")
    filters = []
    for part in chain.split(","):
        name, eq, args = part.partition("=")
        name = name.strip()
        if name in REFUSED:
            raise ChainError(f"ffmpeg chain: filter {name!r} is refused: it {REFUSED[name]}; "
                             f"only filters that transform frames are accepted")
        if not _NAME.match(name):
            raise ChainError(f"ffmpeg chain {_clip(chain)!r}: {_clip(part)!r} is not a filter "
                             f"'name' or 'name=args'")
        if name not in ALLOWED:
            raise ChainError(f"ffmpeg chain: filter {name!r} is not on the allow-list of filters "
                             f"that only transform frames; accepted: {', '.join(sorted(ALLOWED))}")
        if eq and not args:
            raise ChainError(f"ffmpeg chain: filter {name!r}: '=' with no arguments")
        options = []
        for opt in (args.split(":") if args else ()):
            key, has_key, value = opt.partition("=")
            if not has_key:
                key, value = None, opt
            if key is not None and not _KEY.match(key):
                raise ChainError(f"ffmpeg chain: filter {name!r}: option name {_clip(key)!r} "
                                 f"is not a plain name")
            if key is not None and key in FILE_OPTIONS:
                raise ChainError(f"ffmpeg chain: filter {name!r}: option {key!r} is refused: "
                                 f"options that name a file or a device are never accepted")
            if "=" in value or not _VALUE.match(value):
                raise ChainError(f"ffmpeg chain: filter {name!r}: value {_clip(value)!r} has "
                                 f"characters that are not accepted (letters, digits and "
                                 f"_ . + - * / ( ) % | < > ! only)")
            options.append((key, value))
        filters.append(ChainFilter(name, args, tuple(options)))
    return FfmpegChain(tuple(filters))
