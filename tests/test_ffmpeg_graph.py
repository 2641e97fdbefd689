"""The filter spec as FFmpeg graphs (producer/ffmpeg_graph.py): every key maps, both backends
have the same shape, and FFmpeg's CPU graph makes mmfeed's own CPU frames."""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from producer import ffmpeg_graph as fg
from producer.modalities import video
from producer.synth import _frames, write_video
from protocol.filters import FilterSpec

SPECS = ["none", "gray", "resize=224x160", "crop=320x240", "crop=320x240+16+8",
         "fps=5", "crop=200x100+10+20,resize=64x48,gray,fps=2.5"]


@pytest.mark.parametrize("text", SPECS)
def test_the_same_spec_gives_graphs_of_the_same_shape_on_both_backends(text):
    spec = FilterSpec.parse(text)
    cpu = fg.cpu_plan(spec, 640, 480, deinterlace=True)
    cuda = fg.cuda_plan(spec, 640, 480, deinterlace=True)
    assert fg.stage_names(cpu) == fg.stage_names(cuda)
    assert (cpu.width, cpu.height, cpu.channels, cpu.pix_fmt) == \
        (cuda.width, cuda.height, cuda.channels, cuda.pix_fmt)
    assert fg.stage_names(cpu)[-2:] == ("scale", "format")


def test_every_spec_key_maps_to_its_filter_on_the_cpu():
    spec = FilterSpec.parse("crop=200x100+10+20,resize=64x48,gray,fps=2.5")
    p = fg.cpu_plan(spec, 640, 480, deinterlace=True)
    assert p.vf == ("yadif,fps=2.5,crop=200:100:10:20:exact=1,"
                    "scale=64:48:flags=bilinear+accurate_rnd:in_h_chr_pos=0:in_v_chr_pos=128,format=gray")
    assert (p.width, p.height, p.channels, p.input_args) == (64, 48, 1, ())


def test_every_spec_key_maps_to_a_cuda_filter_or_the_nvdec_decoder():
    spec = FilterSpec.parse("crop=200x100+10+20,resize=64x48,fps=2.5")
    p = fg.cuda_plan(spec, 640, 480, deinterlace=True, codec="hevc", gpu=1)
    assert p.vf == ("yadif_cuda,fps=2.5,scale_cuda=w=64:h=48:interp_algo=bilinear:"
                    "format=yuv444p,hwdownload,format=yuv444p")
    # crop in the decoder: top x bottom x left x right of the 640x480 source
    assert p.input_args == ("-hwaccel", "cuda", "-hwaccel_device", "1",
                            "-hwaccel_output_format", "cuda", "-c:v", "hevc_cuvid",
                            "-crop", "20x360x10x430")
    assert p.pix_fmt == "gbrp" and p.frame_bytes == 64 * 48 * 3


def test_a_centred_crop_and_no_resize_keep_the_crop_size():
    p = fg.cpu_plan(FilterSpec.parse("crop=320x240"), 640, 480)
    assert "crop=320:240:160:120:exact=1" in p.vf
    assert (p.width, p.height) == (320, 240)


def test_gray_output_is_one_plane_on_both_backends():
    spec = FilterSpec.parse("gray")
    for p in (fg.cpu_plan(spec, 64, 48), fg.cuda_plan(spec, 64, 48)):
        assert (p.pix_fmt, p.channels, p.frame_bytes) == ("gray", 1, 64 * 48)


def test_a_cuda_crop_on_a_codec_without_cuvid_is_refused_naming_it():
    with pytest.raises(ValueError, match="'prores'"):
        fg.cuda_plan(FilterSpec.parse("crop=10x10"), 64, 48, codec="prores")


def test_an_operator_chain_runs_before_the_spec():
    p = fg.cpu_plan(FilterSpec.parse("resize=32x32"), 64, 48, chain="hflip")
    assert p.vf.startswith("hflip,scale=32:32")


def test_ffmpeg_args_read_one_video_stream_into_a_raw_pipe():
    args = fg.cpu_plan(FilterSpec.parse("gray"), 64, 48).ffmpeg_args("in.mp4")
    assert args[args.index("-i") + 1] == "in.mp4"
    assert args[-5:] == ["-f", "rawvideo", "-pix_fmt", "gray", "pipe:1"]
    assert "-nostdin" in args and "-an" in args


def test_without_a_cuda_gpu_the_cuda_plan_is_refused_with_the_reason():
    reason = fg.cuda_refusal()
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        pytest.skip("a CUDA GPU is present: the refusal is the GPU checklist's case")
    assert reason is not None and "CUDA" in reason


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="no ffmpeg command line")
def test_this_ffmpeg_lists_the_cpu_filters_the_cpu_plan_uses():
    have = fg.cli_filters()
    assert {"yadif", "fps", "crop", "scale", "format"} <= have


# --- one spec, the same frames --------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_720p(tmp_path_factory):
    """A real H.264 clip at 1280x720 (PyAV/libx264), 12 frames at 10 fps."""
    path = tmp_path_factory.mktemp("ffg") / "hd.mp4"
    write_video(path, _frames(1, np.random.default_rng(3), (1280, 720), 12))
    return path


def _cli_frames(path, plan) -> np.ndarray:
    out = subprocess.run(plan.ffmpeg_args(str(path)), capture_output=True, timeout=120,
                         close_fds=True, check=True).stdout
    n = len(out) // plan.frame_bytes
    frames = np.frombuffer(out, np.uint8)[: n * plan.frame_bytes].reshape(
        n, plan.channels, plan.height, plan.width)
    return frames[:, [2, 0, 1]] if plan.pix_fmt == "gbrp" else frames  # G,B,R -> R,G,B


#: Tolerance of "the same frames": FFmpeg 5.1's swscale (the CLI) against FFmpeg 8.1's (the
#: PyAV wheel) with the same flags and chroma siting; measured identical for RGB and at most
#: 1 level (mean 0.007) for gray on this clip.
MAX_LEVELS, MAX_MEAN = 1, 0.05


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="no ffmpeg command line")
@pytest.mark.parametrize("text", ["resize=224x224", "crop=640x360+100+50,resize=320x180,gray",
                                  "crop=400x300"])
def test_ffmpeg_cli_cpu_graph_gives_mmfeeds_frames(clip_720p, text):
    spec = FilterSpec.parse(text)
    ours = video.decode_clip(clip_720p, spec, 12)
    theirs = _cli_frames(clip_720p, fg.cpu_plan(spec, 1280, 720))
    assert theirs.shape == ours.shape
    diff = np.abs(theirs.astype(np.int16) - ours.astype(np.int16))
    assert diff.max() <= MAX_LEVELS and diff.mean() <= MAX_MEAN, (diff.max(), diff.mean())


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="no ffmpeg command line")
def test_ffmpeg_cli_fps_selection_picks_mmfeeds_frames(clip_720p):
    spec = FilterSpec.parse("resize=64x36,fps=5")
    ours = video.decode_clip(clip_720p, spec, 6)
    theirs = _cli_frames(clip_720p, fg.cpu_plan(spec, 1280, 720))[:6]
    diff = np.abs(theirs.astype(np.int16) - ours.astype(np.int16))
    assert diff.max() <= MAX_LEVELS, diff.max()


def test_a_crop_of_the_whole_frame_gives_the_uncropped_frames(clip_720p):
    """The crop path (a libavfilter graph) and the plain path (swscale reformat) site chroma
    alike; the graph took the siting from the frame's tags and moved colour edges by up to 27
    levels before ffmpeg_graph.CHROMA_SITING."""
    whole = video.decode_clip(clip_720p, FilterSpec.parse("crop=1280x720"), 3)
    plain = video.decode_clip(clip_720p, FilterSpec(), 3)
    assert np.array_equal(whole, plain)


# --- on a GPU (docs/gpu.md checklist step 8) -------------------------------------------------

_CUDA_WHY = fg.cuda_refusal()


@pytest.mark.skipif(_CUDA_WHY is not None, reason=f"FFmpeg CUDA filters cannot run: {_CUDA_WHY}")
def test_cuda_plan_in_the_ffmpeg_child_makes_the_cpu_frames_within_tolerance(clip_720p):
    """NVDEC + scale_cuda (a 2x downscale, where scale_cuda's bilinear without kernel widening
    is closest to swscale's) against mmfeed's CPU path. Provisional tolerance until the first
    GPU run records the real figures."""
    from producer.ffmpeg_child import FfmpegChild

    spec = FilterSpec.parse("resize=640x360")
    with FfmpegChild(str(clip_720p), fg.cuda_plan(spec, 1280, 720)) as child:
        gpu = np.stack(list(child.frames()))
    cpu = video.decode_clip(clip_720p, spec, 12)
    assert gpu.shape == cpu.shape
    diff = np.abs(gpu.astype(np.int16) - cpu.astype(np.int16))
    assert diff.mean() <= 2.0 and np.percentile(diff, 99) <= 16, (diff.mean(), diff.max())


@pytest.mark.skipif(_CUDA_WHY is not None, reason=f"FFmpeg CUDA filters cannot run: {_CUDA_WHY}")
def test_cuda_crop_in_the_decoder_makes_the_cpu_crop(clip_720p):
    from producer.ffmpeg_child import FfmpegChild

    spec = FilterSpec.parse("crop=640x360+100+50")
    with FfmpegChild(str(clip_720p), fg.cuda_plan(spec, 1280, 720)) as child:
        gpu = np.stack(list(child.frames()))
    cpu = video.decode_clip(clip_720p, spec, 12)
    assert gpu.shape == cpu.shape
    assert np.abs(gpu.astype(np.int16) - cpu.astype(np.int16)).mean() <= 2.0
