"""Video modality: frame selection, filter specs, bad input, the torch colour path.

Most tests decode small H.264 clips made here with PyAV whose frame i has a known brightness
(left half 5 + 10 i, right half 250 - 10 i), so a decoded frame says which source frame it
is; the rest run on the real recordings ($MMFEED_REAL_DATA, producer.synth.REAL_DIR) when
present.
"""
from __future__ import annotations

import gc
import logging
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from producer.modalities import gpu_video, video
from producer.synth import REAL_DIR
from protocol.errors import InputError
from protocol.filters import FilterSpec

REAL = REAL_DIR
WALK = REAL / "person_walk_5s_384x216_h264.mp4"
BOTTLE = REAL / "intel_bottle-detection.mp4"
CAR = REAL / "intel_car-detection.mp4"
JFK = REAL / "jfk_speech_16k_mono.wav"
W, H, RATE, N = 64, 48, 10, 24


def spec(s: str) -> FilterSpec:
    return FilterSpec.parse(s)


def real(p: Path) -> Path:
    if not p.exists():
        pytest.skip(f"real recording {p} not present")
    return p


def make_clip(path: Path, n: int = N, rate: int = RATE, faststart: bool = False) -> Path:
    """Lossless H.264 (qp 0) so brightness survives the round trip within rounding."""
    opts = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=opts) as out:
        s = out.add_stream("libx264", rate=rate)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.options = {"preset": "ultrafast", "qp": "0"}
        for i in range(n):
            img = np.empty((H, W, 3), np.uint8)
            img[:, : W // 2] = 5 + 10 * i
            img[:, W // 2:] = 250 - 10 * i
            for pkt in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(pkt)
        for pkt in s.encode():
            out.mux(pkt)
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return make_clip(tmp_path_factory.mktemp("video") / "index.mp4")


def indices(frames: np.ndarray) -> list[int]:
    """Source frame index of each decoded (C, H, W) frame, from its left half's brightness."""
    left = frames[:, :, :, : frames.shape[-1] // 2].reshape(len(frames), -1).mean(axis=1)
    return [int(round((v - 5) / 10)) for v in left]


# --- frame selection ----------------------------------------------------------------------


def test_clip_at_source_rate_takes_every_frame_in_order(clip):
    out = video.decode_clip(clip, spec("none"), 8)
    assert out.shape == (8, 3, H, W) and out.dtype == np.uint8 and out.flags.c_contiguous
    assert indices(out) == list(range(8))


def test_segment_starts_at_its_start_time(clip):
    assert indices(video.decode_clip(clip, spec("none"), 8, segment=(1.0, 2.0))) == list(range(10, 18))


def test_fps_sampling_picks_frames_by_timestamp(clip):
    assert indices(video.decode_clip(clip, spec("fps=2.5"), 5)) == [0, 4, 8, 12, 16]


def test_fps_above_source_rate_repeats_frames(clip):
    assert indices(video.decode_clip(clip, spec("fps=20"), 6)) == [0, 0, 1, 1, 2, 2]


def test_short_segment_repeats_last_frame_and_says_so(clip):
    notes: list[str] = []
    out = video.decode_clip(clip, spec("none"), 8, segment=(2.0, 2.35), notes=notes)
    assert indices(out) == [20, 21, 22, 23, 23, 23, 23, 23]
    assert len(notes) == 1 and "4 of 8 frames" in notes[0] and "repeated the last frame" in notes[0]


def test_segment_end_is_respected(clip):
    notes: list[str] = []
    out = video.decode_clip(clip, spec("none"), 4, segment=(0.5, 0.7), notes=notes)
    assert indices(out) == [5, 6, 6, 6]  # 0.7 s is exclusive


# --- filter spec --------------------------------------------------------------------------


@pytest.mark.parametrize("s, shape", [
    ("resize=32x16", (3, 16, 32)),
    ("gray", (1, H, W)),
    ("crop=20x10", (3, 10, 20)),
    ("crop=40x40+4+2,resize=16x16,gray", (1, 16, 16)),
])
def test_output_has_the_size_and_channels_the_spec_says(clip, s, shape):
    assert video.decode_clip(clip, spec(s), 2).shape == (2, *shape)


def test_crop_takes_the_region_it_names(clip):
    # Right half of frame i is 250 - 10 i; a crop inside it sees exactly that.
    out = video.decode_clip(clip, spec("crop=24x24+36+10"), 3).astype(float)
    assert np.allclose(out.reshape(3, -1).mean(axis=1), [250, 240, 230], atol=2)
    assert out.std(axis=(1, 2, 3)).max() < 1.5  # no left-half pixels leaked in


def test_gray_is_one_channel_of_full_range_luma():
    rgb = video.decode_clip(real(WALK), spec("none"), 3).astype(float)
    gray = video.decode_clip(real(WALK), spec("gray"), 3).astype(float)
    luma = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]  # BT.601
    # Tolerance: rounding, and RGB clipped at saturated colour edges (measured: mean 0.30,
    # max 11.8 at a handful of edge pixels).
    diff = np.abs(gray[:, 0] - luma)
    assert gray.shape == (3, 1, 216, 384)
    assert diff.mean() < 0.6 and np.percentile(diff, 99) <= 2.0


def test_planar_conversion_is_right_at_every_width(tmp_path):
    # NOTE [swscale gbrp bug] in video.py: FFmpeg 8.1 garbles row ends of unscaled
    # yuv420p -> gbrp at widths like 24 or 120 unless ACCURATE_RND is set. If this fails,
    # crops and odd sizes silently feed the model wrong pixels.
    for w in (18, 24, 36, 64, 120):
        img = np.full((16, w, 3), 200, np.uint8)
        frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p")
        out = np.empty((3, 16, w), np.uint8)
        video._Converter(spec("none")).into(frame, out)
        assert np.abs(out.astype(int) - 200).max() <= 2, f"width {w}"


def test_resize_keeps_the_picture(clip):
    small = video.decode_clip(clip, spec("resize=16x12"), 4)
    assert indices(small) == [0, 1, 2, 3]


# --- real recordings ----------------------------------------------------------------------


def test_real_clip_has_all_fifty_frames():
    notes: list[str] = []
    out = video.decode_clip(real(WALK), spec("resize=96x54"), 50, notes=notes)
    assert out.shape == (50, 3, 54, 96) and notes == []
    assert not np.array_equal(out[0], out[49])  # a person walks in


def test_real_clip_with_b_frames_and_fractional_rate_decodes_a_segment():
    notes: list[str] = []
    out = video.decode_clip(real(BOTTLE), spec("resize=64x64,fps=5"), 10, segment=(20.0, 22.0), notes=notes)
    assert out.shape == (10, 3, 64, 64) and notes == []


def test_real_file_with_an_audio_track_decodes_its_video():
    out = video.decode_clip(real(CAR), spec("gray,resize=64x36"), 4, segment=(29.5, 31.0))
    assert out.shape == (4, 1, 36, 64)


# --- converting beside decoding -------------------------------------------------------------
# HD frames are converted on a helper thread while the next one decodes (video.OVERLAP_MIN_PIXELS).
# Moving the threshold sends these small clips down either path; the output must not change.


def both_ways(monkeypatch, *args, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    monkeypatch.setattr(video, "OVERLAP_MIN_PIXELS", 10**9)
    inline = video.decode_clip(*args, **kwargs)
    monkeypatch.setattr(video, "OVERLAP_MIN_PIXELS", 0)
    beside = video.decode_clip(*args, **kwargs)
    return inline, beside


@pytest.mark.parametrize("s, frames, segment", [
    ("none", N, None),
    ("gray,resize=32x24", 8, None),
    ("crop=40x30+8+6", 8, (0.5, 2.0)),
    ("fps=25", 12, None),              # above the source rate: frames repeat across slots
    ("none", 10, (2.0, 2.4)),          # short segment: the last frame repeats
])
def test_frames_converted_beside_decoding_equal_frames_converted_in_line(clip, monkeypatch,
                                                                         s, frames, segment):
    inline, beside = both_ways(monkeypatch, clip, spec(s), frames, segment)
    assert np.array_equal(inline, beside)


def test_real_hd_clip_takes_the_helper_thread_and_gives_the_same_frames(monkeypatch):
    car = real(CAR)
    inline, beside = both_ways(monkeypatch, car, spec("none"), 6, segment=(29.5, 31.0))
    assert np.array_equal(inline, beside)
    monkeypatch.undo()
    with av.open(str(car)) as c:
        w, h = c.streams.video[0].width, c.streams.video[0].height
    assert w * h >= video.OVERLAP_MIN_PIXELS  # the default threshold routes it there too
    assert np.array_equal(video.decode_clip(car, spec("none"), 6, segment=(29.5, 31.0)), inline)


def test_a_file_cut_short_is_still_an_input_error_when_frames_convert_beside_decoding(tmp_path,
                                                                                     monkeypatch):
    monkeypatch.setattr(video, "OVERLAP_MIN_PIXELS", 0)
    data = make_clip(tmp_path / "fs.mp4", faststart=True).read_bytes()
    bad = tmp_path / "cut.mp4"
    bad.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(InputError) as e:
        video.decode_clip(bad, spec("none"), N)
    assert e.value.field == "video data"
    # the helper was drained, not left half-way: the next clip decodes whole
    good = video.decode_clip(make_clip(tmp_path / "ok.mp4"), spec("none"), N)
    assert indices(good) == list(range(N))


@pytest.mark.parametrize("overlap", [False, True], ids=["in-line", "beside-decoding"])
def test_a_process_forked_after_decoding_decodes_with_its_own_threads(clip, monkeypatch, overlap):
    # Neither the parent's swscale slice threads nor its helper thread exist in a fork (a
    # DataLoader worker, say): reusing the parent's objects there waited forever.
    import multiprocessing as mp

    monkeypatch.setattr(video, "OVERLAP_MIN_PIXELS", 0 if overlap else 10**9)
    parent = video.decode_clip(clip, spec("none"), 6)
    with mp.get_context("fork").Pool(1) as pool:
        child = pool.apply_async(video.decode_clip, (clip, spec("none"), 6)).get(timeout=60)
    assert np.array_equal(parent, child)


def _collect_then_decode(clip):
    gc.collect()  # what any child's allocator does sooner or later
    return video.decode_clip(clip, spec("none"), 6)


def test_a_fork_does_not_inherit_a_dead_decoder_that_would_hang_the_child(clip):
    # A threaded decoder left in a reference cycle (a traceback holding its container, say)
    # is garbage the parent has not collected yet. Freeing it joins FFmpeg's frame threads:
    # in a forked child, which has none, that waited forever (seen in the full suite: a pool
    # worker hung in gc -> CodecContext dealloc). The fork hook collects it in the parent.
    import multiprocessing as mp

    enabled = gc.isenabled()
    gc.disable()  # keep the cycle alive until the fork, as a busy parent would
    try:
        container = video._open(clip)
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for _, _frame in zip(range(4), container.decode(stream)):
            pass  # frame threads started
        cycle: list = [container, stream]
        cycle.append(cycle)
        container.close()
        del container, stream, cycle, _frame
        with mp.get_context("fork").Pool(1) as pool:
            child = pool.apply_async(_collect_then_decode, (clip,)).get(timeout=60)
    finally:
        if enabled:
            gc.enable()
    assert np.array_equal(child, video.decode_clip(clip, spec("none"), 6))


def test_an_error_on_the_helper_thread_reaches_the_caller_and_skips_the_rest_of_its_clip():
    worker = video._ConvertWorker()
    ran: list[int] = []

    def fails() -> None:
        raise ValueError("plane copy failed")

    worker.submit(ran.append, 1)
    worker.submit(fails)
    worker.submit(ran.append, 2)   # behind the error: its clip is lost anyway
    with pytest.raises(ValueError, match="plane copy failed"):
        worker.drain()
    worker.submit(ran.append, 3)   # the worker serves the next clip
    worker.drain()
    assert ran == [1, 3]


# --- bad input ----------------------------------------------------------------------------


def test_mp4_cut_in_half_is_an_input_error(tmp_path):
    # PyAV writes the moov atom last: half a file has no index at all.
    bad = tmp_path / "half.mp4"
    data = make_clip(tmp_path / "ok.mp4").read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as e:
        video.decode_clip(bad, spec("none"), 4)
    assert e.value.path == str(bad) and e.value.field == "container"


def test_faststart_mp4_cut_short_is_an_input_error_not_a_short_clip(tmp_path):
    # moov first: the index promises frames the file no longer has.
    data = make_clip(tmp_path / "fs.mp4", faststart=True).read_bytes()
    bad = tmp_path / "cut.mp4"
    bad.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(InputError) as e:
        video.decode_clip(bad, spec("none"), N)
    assert e.value.field == "video data" and str(bad) in str(e.value)


def test_real_mp4_with_overwritten_bytes_is_an_input_error(tmp_path):
    data = bytearray(real(BOTTLE).read_bytes())
    third = len(data) // 3
    data[third:third + 50_000] = bytes(50_000)
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(bytes(data))
    with pytest.raises(InputError) as e:
        video.decode_clip(bad, spec("resize=32x32"), 2000)
    assert e.value.field == "video data"


def test_file_without_video_stream_is_an_input_error():
    with pytest.raises(InputError) as e:
        video.decode_clip(real(JFK), spec("none"), 2)
    assert e.value.field == "video stream" and "audio" in str(e.value)


def test_non_media_file_is_an_input_error(tmp_path):
    bad = tmp_path / "notes.mp4"
    bad.write_bytes(b"this is not a video\n" * 100)
    with pytest.raises(InputError) as e:
        video.decode_clip(bad, spec("none"), 2)
    assert e.value.field == "container" and str(bad) in str(e.value)


@pytest.mark.parametrize("segment", [(5.0, 6.0), (1.0, 0.5), (-1.0, 1.0)])
def test_segment_outside_the_file_is_an_input_error(clip, segment):
    with pytest.raises(InputError) as e:
        video.decode_clip(clip, spec("none"), 2, segment=segment)
    assert e.value.field == "segment"


# --- live iteration -----------------------------------------------------------------------


def test_iter_frames_samples_by_pts(clip):
    got = list(video.iter_frames(clip, spec("fps=2,resize=32x24")))
    pts = [t for t, _ in got]
    assert np.allclose(pts, np.arange(0, 2.4, 0.5))
    assert all(f.shape == (3, 24, 32) and f.dtype == np.uint8 for _, f in got)
    assert indices(np.stack([f for _, f in got])) == [0, 5, 10, 15, 20]


def test_iter_frames_without_fps_yields_every_frame(clip):
    assert len(list(video.iter_frames(clip, spec("gray")))) == N


def test_iter_frames_on_a_missing_source_is_an_input_error(tmp_path):
    with pytest.raises(InputError) as e:
        next(video.iter_frames(tmp_path / "nowhere.mp4", spec("none"), timeout=(1.0, 1.0)))
    assert e.value.field == "container"


# --- the torch (CUDA) colour path ---------------------------------------------------------


def _planes(path: Path, n: int):
    def plane(f, i):
        p = f.planes[i]
        return torch.from_numpy(np.frombuffer(p, np.uint8).reshape(p.height, p.line_size)[:, : p.width].copy())

    with av.open(str(path)) as c:
        fr = [f for _, f in zip(range(n), c.decode(video=0))]
    return tuple(torch.stack([plane(f, i) for f in fr]) for i in range(3))


@pytest.mark.parametrize("s, mean_tol, max_tol", [
    # Same size: the same maths, rounding apart (measured mean 0.005, max 1).
    ("none", 0.05, 2),
    ("gray", 0.01, 0),  # (Y - 16) * 255 / 219 exactly as swscale
    # Resized: torch's antialiased bilinear vs swscale's bilinear differ at edges (measured
    # mean 0.18 / 0.27, max 7 / 15 on this clip).
    ("resize=112x64", 0.5, 20),
    ("crop=200x100+10+20,resize=50x50", 0.6, 24),
])
def test_torch_yuv_to_rgb_matches_swscale_within_tolerance(s, mean_tol, max_tol):
    y, u, v = _planes(real(WALK), 6)
    got = gpu_video.apply_spec(y, (u, v), spec(s)).numpy().astype(int)
    ref = video.decode_clip(WALK, spec(s), 6).astype(int)
    diff = np.abs(got - ref)
    assert got.shape == ref.shape
    assert diff.mean() <= mean_tol and diff.max() <= max_tol


def test_nv12_and_planar_chroma_give_the_same_rgb():
    y, u, v = _planes(real(WALK), 2)
    uv = torch.stack((u, v), dim=-1).reshape(u.shape[0], u.shape[1], -1)  # interleave like NV12
    assert torch.equal(gpu_video.apply_spec(y, (uv,), spec("none")),
                       gpu_video.apply_spec(y, (u, v), spec("none")))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="NVDEC decode needs an NVIDIA GPU with CUDA")
@pytest.mark.parametrize("s", ["none", "gray", "resize=112x112", "crop=200x200,resize=64x64"])
def test_cuda_decode_matches_cpu_decode_within_tolerance(s):
    got_t: list[float] = []
    ref_t: list[float] = []
    got = video.decode_clip(real(WALK), spec(s), 8, segment=(1.0, 3.0), device="cuda",
                            times=got_t)
    ref = video.decode_clip(WALK, spec(s), 8, segment=(1.0, 3.0), times=ref_t)
    assert got.is_cuda and tuple(got.shape) == ref.shape
    assert got_t == ref_t and len(ref_t) == 8  # the same frames, so sensors align the same
    diff = np.abs(got.cpu().numpy().astype(int) - ref.astype(int))
    assert diff.mean() <= 1.5 and diff.max() <= 24  # as the CPU torch-vs-swscale test


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback taken without a GPU")
def test_cuda_request_without_gpu_falls_back_to_cpu_and_logs_once(clip, caplog, monkeypatch):
    monkeypatch.setattr(video, "_warned_no_cuda", False)
    with caplog.at_level(logging.WARNING, logger=video.__name__):
        a = video.decode_clip(clip, spec("none"), 3, device="cuda")
        b = video.decode_clip(clip, spec("none"), 3, device="cuda")
    assert isinstance(a, np.ndarray) and np.array_equal(a, b)
    assert np.array_equal(a, video.decode_clip(clip, spec("none"), 3))
    assert sum("no CUDA GPU" in r.getMessage() for r in caplog.records) == 1
