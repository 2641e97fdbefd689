"""Which decoder and filter backend a source's video goes through (producer/video_route.py),
and the media-source path through the supervised ffmpeg child, run here with the CPU graph."""
from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import shutil

from producer import ffmpeg_child
from producer.media_clips import ClipSettings
from producer.sources import MediaSource
from producer.synth import _frames, write_video
from producer.video_route import VideoRoute, choose
from protocol.filters import FilterSpec

SPEC = FilterSpec.parse("resize=32x24")


def test_a_cpu_producer_decodes_on_the_cpu_and_filters_with_numpy_or_a_cpu_graph():
    assert choose(want_cuda=False, media=True, spec=SPEC).status()[
        "video_decode"] == "cpu"
    assert choose(want_cuda=False, media=False, spec=SPEC).filters == "numpy"
    crop = FilterSpec.parse("crop=16x16")
    assert choose(want_cuda=False, media=False, spec=crop).filters == "ffmpeg-cpu"
    assert choose(want_cuda=False, media=True, spec=SPEC, chain="hflip").filters == "ffmpeg-cpu"


def test_a_live_stream_on_a_gpu_ring_without_cuda_filters_says_cpu_not_nvdec():
    """The status said `video_decode: nvdec` for a stream PyAV decoded on the CPU."""
    r = choose(want_cuda=True, media=True, spec=SPEC,
               child_refusal="ffmpeg lacks scale_cuda, yadif_cuda")
    assert (r.decoder, r.filters, r.child) == ("cpu", "numpy", False)
    assert "lacks scale_cuda" in r.why


def test_a_stream_whose_audio_is_used_stays_on_the_cpu_saying_why():
    r = choose(want_cuda=True, media=True, spec=SPEC, needs_audio=True)
    assert r.decoder == "cpu" and "audio" in r.why and "modalities --disable audio" in r.why


def test_a_stream_of_unknown_frame_size_waits_for_its_first_open():
    r = choose(want_cuda=True, media=True, spec=SPEC, frame_size_known=False)
    assert r.decoder == "cpu" and "frame size" in r.why


def test_on_a_gpu_a_video_only_stream_runs_on_the_cuda_child_with_nvdec():
    r = choose(want_cuda=True, media=True, spec=SPEC)
    assert (r.decoder, r.filters, r.child) == ("nvdec", "ffmpeg-cuda", True)
    cuda_chain = choose(want_cuda=True, media=True, spec=SPEC, chain="yadif_cuda",
                        chain_cuda=True)
    assert cuda_chain.filters == "ffmpeg-cuda"


def test_on_a_gpu_dataset_clips_decode_with_nvdec_into_torch():
    r = choose(want_cuda=True, media=False, spec=SPEC)
    assert (r.decoder, r.filters) == ("nvdec", "torch")


def test_without_a_gpu_cuda_asked_for_falls_back_to_the_cpu_with_the_reason():
    r = choose(want_cuda=True, media=False, spec=SPEC, gpu_refusal="no CUDA GPU")
    assert r.decoder == "cpu" and "no CUDA GPU" in r.why


def test_a_cpu_chain_on_a_gpu_runs_in_process_on_the_cpu():
    r = choose(want_cuda=True, media=True, spec=SPEC, chain="yadif")
    assert (r.decoder, r.filters) == ("cpu", "ffmpeg-cpu")


# --- the child route of a media source, with the CPU graph -----------------------------------

needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="no ffmpeg CLI")
CHILD_CPU = VideoRoute("cpu", "ffmpeg-cpu", "test: the child with the CPU graph", child=True)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    path = tmp_path_factory.mktemp("route") / "m.mp4"
    write_video(path, _frames(3, np.random.default_rng(9), (160, 120), 16))
    return path


def _source(path, route):
    src = MediaSource(str(path))
    src.probe()
    src.video_route = route
    return src


@needs_ffmpeg
def test_child_route_clips_are_the_demux_routes_clips(media):
    by_child = [c.video for c in _source(media, CHILD_CPU).clips(SPEC, 4)]
    by_demux = [c.video for c in _source(media, None).clips(SPEC, 4)]
    assert len(by_child) == len(by_demux) == 4
    for a, b in zip(by_child, by_demux):
        assert a.shape == b.shape == (4, 3, 24, 32)
        assert np.abs(a.astype(int) - b).max() <= 1


@needs_ffmpeg
def test_a_filter_change_on_the_child_route_starts_a_new_child(media, monkeypatch):
    pids = []
    real_start = ffmpeg_child.FfmpegChild.start

    def start(self):
        pids.append(real_start(self))
        return pids[-1]

    monkeypatch.setattr(ffmpeg_child.FfmpegChild, "start", start)
    settings = [ClipSettings(SPEC, 2, tag=1)]
    src = _source(media, CHILD_CPU)
    shapes = []
    for clip in src.clips(SPEC, 2, settings=lambda: settings[-1]):
        shapes.append((clip.tag, clip.video.shape))
        if len(shapes) == 2:
            settings.append(ClipSettings(FilterSpec.parse("resize=16x8,gray"), 2, tag=2))
        if len(shapes) == 4:
            break
    assert shapes[1] == (1, (2, 3, 24, 32)) and shapes[2] == (2, (2, 1, 8, 16))
    assert len(pids) == 2 and pids[0] != pids[1]


@needs_ffmpeg
def test_a_killed_child_on_the_child_route_is_restarted_and_clips_keep_coming(media,
                                                                               monkeypatch):
    monkeypatch.setattr(ffmpeg_child, "BACKOFF_START_S", 0.01)
    src = MediaSource(str(media), loop=True)
    src.probe()
    src.video_route = CHILD_CPU
    seen = []
    real_read = ffmpeg_child.FfmpegChild._read_frame

    def read(self):
        seen.append(self.pid)
        return real_read(self)

    monkeypatch.setattr(ffmpeg_child.FfmpegChild, "_read_frame", read)
    clips = src.clips(SPEC, 2, settings=lambda: ClipSettings(SPEC, 2))
    next(clips)
    os.kill(seen[-1], signal.SIGKILL)
    for _ in range(3):
        assert next(clips).video.shape == (2, 3, 24, 32)
    assert len(set(seen)) >= 2
    clips.close()


# --- preprocess --device ---------------------------------------------------------------------


def _has_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.mark.skipif(_has_cuda(), reason="a CUDA GPU is present: NVDEC runs (GPU checklist)")
def test_preprocess_device_cuda_without_a_gpu_says_why_and_decodes_on_the_cpu(tmp_path, caplog):
    from producer.pipeline import PipelineConfig
    from producer.preprocess import run_preprocess
    from producer.synth import make_dataset

    root = make_dataset(tmp_path / "ds", per_class={"train": 1}, size=(32, 24),
                        clip_seconds=0.5, extras=False)
    caplog.set_level("WARNING", logger="producer.preprocess")
    summary = run_preprocess(root, tmp_path / "cache", PipelineConfig(clip_frames=2),
                             workers=0, progress=False, device="cuda")
    assert summary["cached"] > 0 and not summary["rejected"]
    assert (summary["video_decode"], summary["video_filters"]) == ("cpu", "numpy")
    assert "no CUDA GPU" in summary["video_route"]
    assert any("--device cuda: video decodes on the CPU" in r.getMessage()
               for r in caplog.records)


def test_preprocess_device_cpu_says_cpu_in_its_summary(tmp_path):
    from producer.pipeline import PipelineConfig
    from producer.preprocess import run_preprocess
    from producer.synth import make_dataset

    root = make_dataset(tmp_path / "ds", per_class={"train": 1}, size=(32, 24),
                        clip_seconds=0.5, extras=False)
    summary = run_preprocess(root, tmp_path / "cache", PipelineConfig(clip_frames=2,
                                                                       filter="crop=16x16"),
                             workers=0, progress=False)
    assert (summary["video_decode"], summary["video_filters"]) == ("cpu", "ffmpeg-cpu")


@needs_ffmpeg
def test_the_child_route_starts_a_recording_at_its_segment(media):
    """A segment's start is a seek of the child (-ss), like demux_clips' seek."""
    by_child = next(_source(media, CHILD_CPU).clips(SPEC, 2, start_s=1.0))
    by_demux = next(_source(media, None).clips(SPEC, 2, start_s=1.0))
    assert by_child.start_s == pytest.approx(1.0)
    assert np.abs(by_child.video.astype(int) - by_demux.video).max() <= 1
