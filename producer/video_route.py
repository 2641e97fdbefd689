"""Which decoder and which filter backend a source's video actually goes through, and why.

The producer's `status` reports this per source (`video_decode`, `video_filters`,
`video_route`), so it says what runs, not what was asked: before issue 15 a live stream on a
GPU ring said `video_decode: nvdec` while PyAV decoded it on the CPU.

    decoder      "nvdec" (NVIDIA's decoder, frames in GPU memory) | "cpu" (FFmpeg's software
                 decoders through PyAV or the ffmpeg child)
    filters      "ffmpeg-cuda"  the spec as FFmpeg's CUDA filters in the supervised ffmpeg
                                child (producer/ffmpeg_child.py, ffmpeg_graph.cuda_plan)
                 "ffmpeg-cpu"   the spec (or an operator chain) as a libavfilter graph in
                                process (ffmpeg_graph.cpu_plan stages / ffmpeg_chain_run.py),
                                or the same CPU graph in the child (`child`)
                 "torch"        NVDEC frames converted and resized by torch kernels
                                (modalities/gpu_video.py)
                 "numpy"        swscale straight into planar numpy (modalities/video.py)

Rules (`choose`): CPU asked for, or no usable GPU -> cpu decode (with the reason). On a GPU:
an operator chain runs in process on the CPU (PyAV's FFmpeg has no CUDA filters), so cpu;
a dataset's clip files -> nvdec + torch, frames never leave the GPU; a media file or live
stream -> nvdec + the ffmpeg-cuda child when the ffmpeg CLI has the CUDA filters, the
source's audio is not needed (one open of a listen-once stream feeds audio and video, and the
child would be a second open) and its frame size is known, else cpu with that reason.
"""
from __future__ import annotations

from dataclasses import dataclass

from protocol.filters import FilterSpec


@dataclass(frozen=True)
class VideoRoute:
    decoder: str          # "nvdec" | "cpu"
    filters: str          # "ffmpeg-cuda" | "ffmpeg-cpu" | "torch" | "numpy"
    why: str
    child: bool = False   # frames come from the supervised ffmpeg child

    def status(self) -> dict:
        return {"video_decode": self.decoder, "video_filters": self.filters,
                "video_route": self.why}


def _cpu_filters(spec: FilterSpec, chain: str | None) -> str:
    """The in-process CPU backend a spec uses: a libavfilter graph when it crops or has an
    operator chain, else swscale into numpy (video.py _Converter)."""
    return "ffmpeg-cpu" if chain or spec.crop is not None else "numpy"


def choose(*, want_cuda: bool, media: bool, spec: FilterSpec, chain: str | None = None,
           chain_cuda: bool = False, gpu_refusal: str | None = None, child_refusal: str | None = None,
           needs_audio: bool = False, frame_size_known: bool = True) -> VideoRoute:
    """The route for one source (module doc). `media`: a media file or stream (decoded as one
    stream of clips, sources.MediaSource), not a dataset's clip files. `gpu_refusal`: why
    NVDEC cannot run here (no CUDA GPU), None when it can; `child_refusal`: why the ffmpeg
    CUDA child cannot (ffmpeg_graph.cuda_refusal), None when it can; `frame_size_known`: the
    child's plan needs the source's frame size (a stream is known once it was opened).
    `chain_cuda`: the operator chain has CUDA filters (only the child can run it; the daemon
    refuses such a chain where the child cannot serve the source)."""
    cpu = _cpu_filters(spec, chain)
    if not want_cuda:
        return VideoRoute("cpu", cpu, "video on the CPU (the ring is in host memory)")
    if gpu_refusal is not None:
        return VideoRoute("cpu", cpu, f"CPU fallback: {gpu_refusal}")
    if chain and not chain_cuda:
        return VideoRoute("cpu", "ffmpeg-cpu", "CPU: the operator's FFmpeg chain has CPU "
                          "filters, run in process on decoded frames")
    if not media:
        return VideoRoute("nvdec", "torch", "NVDEC through PyAV, spec in torch on the GPU")
    if child_refusal is not None:
        return VideoRoute("cpu", cpu, f"CPU fallback for the media source: {child_refusal}")
    if needs_audio:
        return VideoRoute("cpu", cpu, "CPU for the media source: its audio is used, and one "
                          "open of the stream feeds both (the ffmpeg child would be a second "
                          "open); disable audio (`mmctl modalities --disable audio`) for NVDEC")
    if not frame_size_known:
        return VideoRoute("cpu", cpu, "CPU until the stream's frame size is known (the "
                          "ffmpeg child's graph needs it); NVDEC from its next connection")
    return VideoRoute("nvdec", "ffmpeg-cuda", "NVDEC + FFmpeg CUDA filters in the supervised "
                      "ffmpeg child", child=True)


def route_of(source, video_device: str, config, enabled: list[str]) -> VideoRoute:
    """The route of a running producer's source (a sources.MediaSource or a dataset replay)
    under `config`; `enabled`: the inputs samples carry."""
    from .ffmpeg_graph import cached_cuda_refusal
    from .sources import MediaSource
    from protocol.ffmpeg_chain import parse_chain

    media = isinstance(source, MediaSource)
    want = video_device == "cuda"
    info = source.info if media else None
    chain = config.ffmpeg_chain
    return choose(want_cuda=want, media=media, spec=config.filter, chain=chain,
                  chain_cuda=bool(chain and parse_chain(chain).needs_cuda),
                  child_refusal=cached_cuda_refusal() if want and media else None,
                  needs_audio=bool(info and info.has_audio and "audio" in enabled),
                  frame_size_known=info is not None)


def gpu_refusal() -> str | None:
    """Why NVDEC cannot run in this process (no CUDA torch, no CUDA GPU), or None."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU (torch.cuda.is_available() is False)"
    return None


def preprocess_route(device: str, config, *, ray: bool = False) -> VideoRoute:
    """The route of `mm-producer preprocess --device DEVICE` (dataset clips: NVDEC + torch on a
    GPU, the CPU otherwise); a fallback from cuda is logged with its reason."""
    import logging

    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    refusal = None
    if device == "cuda":
        refusal = ("--ray tasks decode on the CPU (NVDEC runs in the local workers only)"
                   if ray else gpu_refusal())
    route = choose(want_cuda=device == "cuda", media=False, spec=config.filter,
                   chain=config.ffmpeg_chain, gpu_refusal=refusal)
    if device == "cuda" and route.decoder != "nvdec":
        logging.getLogger("producer.preprocess").warning(
            f"preprocess --device cuda: video decodes on the CPU: {route.why}")
    return route
