"""The filter spec as an FFmpeg filter graph, for FFmpeg's CPU filters and its CUDA filters.

One parsed `FilterSpec` (protocol/filters.py) maps to one `GraphPlan` per backend, built by
pure functions so that what runs is testable without running it:

    stage        spec key          CPU (libavfilter)                  CUDA (ffmpeg 5.1 CLI)
    deinterlace  (deinterlace=)    yadif                              yadif_cuda
    fps          fps=R             fps=R                              fps=R (timestamps only)
    crop         crop=WxH[+X+Y]    crop=w:h:x:y:exact=1               decoder -crop TxBxLxR
                                                                      (<codec>_cuvid), on the GPU
    scale        resize=WxH        scale=W:H:flags=bilinear+          scale_cuda=w=W:h=H:
                                   accurate_rnd                       interp_algo=bilinear:format=F
    format       gray / rgb        format=gray | gbrp                 hwdownload,format=F; the
                                                                      pipe's -pix_fmt gray | gbrp

Both backends have the same stages in the same order (`GraphPlan.stages`; tested), so one spec
means the same frames on both. The output pixel format is one parameter (`pix_fmt`, derived
from the spec: `gray`, else planar `gbrp`, which reads straight into (C, H, W) as
G, B, R planes); a spec key for another output format (yuv420p) only has to choose it here.

On the CUDA side scale_cuda (5.1) writes only YUV formats (yuv420p, nv12, yuv444p, p010,
p016), so the scaler writes yuv444p for RGB output (chroma upsampled on the GPU) and yuv420p
for gray, and the last step to gbrp / gray is the child's swscale on its own threads; what
crosses the pipe is already the final size.

Choice for the in-process CPU path (issue 15): keep video.py's numpy path (swscale reformat
straight to planar gbrp/gray + one memcpy per plane, its context cached per thread) and run a
libavfilter graph of this module's stages only where the spec crops (as before) or an operator
chain is set. Measured on dev-2c with 2 cores shared with other jobs (loaded: ratios only),
12 decoded 1280x720 H.264 frames, best of 3, conversion + plane copies only:
    720p -> 224x224 gbrp:   numpy 2080 frames/s, av.filter.Graph 2037 frames/s
    720p -> 1280x720 gbrp:  numpy  375 frames/s, av.filter.Graph  480 frames/s
    building a graph: 2.5 ms (per clip; the numpy path's context is per thread)
The graph wins only at source size, and a clip of 8 small frames would pay its build cost
more than once over; a graph cached per thread like the reformatter is the follow-up if
source-size output matters. Both give identical bytes with CHROMA_SITING (without it they
differed by up to 27 levels at colour edges - the bug the crop path had). That the FFmpeg CPU
graph, run by the ffmpeg 5.1 CLI, makes mmfeed's own CPU frames is
tests/test_ffmpeg_graph.py `test_ffmpeg_cli_cpu_graph_gives_mmfeeds_frames` (identical for
RGB, at most 1 level for gray).
"""
from __future__ import annotations

from dataclasses import dataclass

from protocol.filters import FilterSpec

#: swscale flags of every CPU resize; the same as video.py's INTERPOLATION.
SWS_FLAGS = "bilinear+accurate_rnd"
#: Chroma siting of the source: H.264/MPEG-2's default (co-sited horizontally, centred
#: vertically), what swscale assumes when called directly (video.py's reformat path) and what
#: gpu_video.py models. libavfilter's `scale` otherwise takes it from the frame's tags, and on
#: a libx264 clip that moved colour edges by up to 27 levels against the reformat path.
CHROMA_SITING = "in_h_chr_pos=0:in_v_chr_pos=128"


def scale_args(width: int, height: int) -> str:
    """Arguments of the CPU `scale` filter that resizes exactly as video.py's reformat does."""
    return f"{width}:{height}:flags={SWS_FLAGS}:{CHROMA_SITING}"
#: FFmpeg decoders with a `-crop` option (NVDEC through cuvid), by codec name.
CUVID_CODECS = ("h264", "hevc", "av1", "vp8", "vp9", "mpeg1video", "mpeg2video", "mpeg4", "mjpeg",
                "vc1")
#: FFmpeg filters the CUDA plan needs; an ffmpeg without one of them cannot run it.
CUDA_FILTERS = ("scale_cuda", "yadif_cuda")
STAGES = ("deinterlace", "fps", "crop", "scale", "format")


@dataclass(frozen=True)
class GraphPlan:
    """How FFmpeg runs one spec on one source size: what goes before `-i`, the `-vf` graph,
    and what each frame on the pipe is."""

    backend: str                      # "cpu" | "cuda"
    input_args: tuple[str, ...]       # decoder options before -i (hwaccel, -c:v, -crop)
    vf: str                           # the -vf filter graph
    pix_fmt: str                      # the pipe's rawvideo pixel format (gbrp | gray | ...)
    width: int
    height: int
    channels: int
    stages: tuple[tuple[str, str], ...]   # (stage, what does it) in order, for tests/status

    @property
    def frame_bytes(self) -> int:
        return self.width * self.height * self.channels

    def ffmpeg_args(self, source: str, *, ffmpeg: str = "ffmpeg", realtime: bool = False
                    ) -> list[str]:
        """The command line of an ffmpeg child writing raw frames of this plan to stdout."""
        return [ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "warning",
                *(["-re"] if realtime else []), *self.input_args, "-i", source,
                "-map", "0:v:0", "-an", "-sn", "-dn", "-vf", self.vf,
                "-f", "rawvideo", "-pix_fmt", self.pix_fmt, "pipe:1"]


def output_format(spec: FilterSpec) -> tuple[str, int]:
    """(pixel format, channels) of the frames a spec asks for: the one place an output
    pixel-format key of the spec is mapped (gray -> gray, rgb -> planar gbrp)."""
    return ("gray", 1) if spec.gray else ("gbrp", 3)


def cpu_plan(spec: FilterSpec, src_w: int, src_h: int, *, deinterlace: bool = False,
             chain: str | None = None) -> GraphPlan:
    """The spec as libavfilter CPU filters. `chain`: an operator's checked FFmpeg chain
    (protocol/ffmpeg_chain.py), run first, on the decoded frames."""
    pix_fmt, channels = output_format(spec)
    out_w, out_h = spec.output_size(src_w, src_h)
    stages: list[tuple[str, str]] = []
    if deinterlace:
        stages.append(("deinterlace", "yadif"))
    if spec.fps is not None:
        stages.append(("fps", f"fps={spec.fps:g}"))
    if spec.crop is not None:
        x, y, w, h = spec.crop_box(src_w, src_h)
        stages.append(("crop", f"crop={w}:{h}:{x}:{y}:exact=1"))
    stages.append(("scale", f"scale={scale_args(out_w, out_h)}"))
    stages.append(("format", f"format={pix_fmt}"))
    vf = ",".join(([chain] if chain else []) + [s for _, s in stages])
    return GraphPlan("cpu", (), vf, pix_fmt, out_w, out_h, channels, tuple(stages))


def cuda_plan(spec: FilterSpec, src_w: int, src_h: int, *, codec: str = "h264",
              deinterlace: bool = False, chain: str | None = None, gpu: int = 0) -> GraphPlan:
    """The spec as FFmpeg's CUDA filters on NVDEC frames (frames stay in GPU memory until the
    scaled picture is downloaded). A crop is the cuvid decoder's `-crop` (so only `codec`s in
    CUVID_CODECS can crop on the GPU; ValueError for another)."""
    pix_fmt, channels = output_format(spec)
    out_w, out_h = spec.output_size(src_w, src_h)
    input_args = ["-hwaccel", "cuda", "-hwaccel_device", str(gpu),
                  "-hwaccel_output_format", "cuda"]
    stages: list[tuple[str, str]] = []
    if deinterlace:
        stages.append(("deinterlace", "yadif_cuda"))
    if spec.fps is not None:
        stages.append(("fps", f"fps={spec.fps:g}"))
    if spec.crop is not None:
        if codec not in CUVID_CODECS:
            raise ValueError(f"crop on the GPU needs a cuvid decoder; codec {codec!r} has none "
                             f"(cuvid codecs: {', '.join(CUVID_CODECS)})")
        x, y, w, h = spec.crop_box(src_w, src_h)
        crop = f"{y}x{src_h - y - h}x{x}x{src_w - x - w}"   # top x bottom x left x right
        input_args += ["-c:v", f"{codec}_cuvid", "-crop", crop]
        stages.append(("crop", f"-crop {crop}"))
    gpu_fmt = "yuv420p" if spec.gray else "yuv444p"
    stages.append(("scale", f"scale_cuda=w={out_w}:h={out_h}:interp_algo=bilinear:"
                            f"format={gpu_fmt}"))
    stages.append(("format", f"hwdownload,format={gpu_fmt}"))
    filters = ([chain] if chain else []) + [s for name, s in stages if name != "crop"]
    return GraphPlan("cuda", tuple(input_args), ",".join(filters), pix_fmt, out_w, out_h,
                     channels, tuple(stages))


def plan(spec: FilterSpec, src_w: int, src_h: int, backend: str, **kwargs) -> GraphPlan:
    if backend == "cpu":
        kwargs.pop("codec", None)
        kwargs.pop("gpu", None)
        return cpu_plan(spec, src_w, src_h, **kwargs)
    if backend == "cuda":
        return cuda_plan(spec, src_w, src_h, **kwargs)
    raise ValueError(f"backend must be 'cpu' or 'cuda', got {backend!r}")


def stage_names(p: GraphPlan) -> tuple[str, ...]:
    return tuple(name for name, _ in p.stages)


# --- what this machine's FFmpegs can run ----------------------------------------------------


def cli_filters(ffmpeg: str = "ffmpeg") -> frozenset[str]:
    """Names of the filters the ffmpeg command line has (empty when it is missing)."""
    import subprocess

    try:
        out = subprocess.run([ffmpeg, "-hide_banner", "-filters"], capture_output=True,
                             text=True, timeout=30, close_fds=True).stdout
    except (OSError, subprocess.SubprocessError):
        return frozenset()
    names = set()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 3 and "->" in parts[2]:
            names.add(parts[1])
    return frozenset(names)


_REFUSAL: list = []


def cached_cuda_refusal() -> str | None:
    """cuda_refusal() of the default ffmpeg, asked once per process (it runs `ffmpeg
    -filters`, and the answer does not change while a daemon runs)."""
    if not _REFUSAL:
        _REFUSAL.append(cuda_refusal())
    return _REFUSAL[0]


def cuda_refusal(ffmpeg: str = "ffmpeg") -> str | None:
    """Why the CUDA plan cannot run here, or None: torch sees no CUDA GPU, or the ffmpeg
    command line lacks a CUDA filter the plan uses."""
    try:
        import torch

        if not torch.cuda.is_available():
            return "no CUDA GPU (torch.cuda.is_available() is False)"
    except ImportError:
        return "torch is not installed"
    have = cli_filters(ffmpeg)
    if not have:
        return f"no ffmpeg command line ({ffmpeg!r}) to run FFmpeg's CUDA filters"
    missing = [f for f in CUDA_FILTERS if f not in have]
    if missing:
        return f"{ffmpeg} lacks {', '.join(missing)} (`{ffmpeg} -filters`)"
    return None
