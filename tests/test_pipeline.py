"""THE pipeline: shapes per config, run-time switches, bad files, and real recordings."""
from __future__ import annotations

import dataclasses

import json
import subprocess
import sys

import numpy as np
import pytest

from producer.dataset import index_dataset
from producer.modalities import lidar, radar
from producer.pipeline import Pipeline, PipelineConfig, union_inputs
from producer.synth import _radar_cube, link_real_recordings, make_long_recording
from producer.synth import REAL_DIR as REAL_DATA
from protocol.errors import FilterSpecError, InputError
from protocol.filters import FilterSpec



def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture(scope="module")
def index(synth_dataset):
    return index_dataset(synth_dataset)


@pytest.fixture(scope="module")
def multi(index):
    """A sample with two LiDAR files (lidar.bin and lidar_front.bin)."""
    return next(s for s in index.samples if "lidar_front" in s.files)


def test_default_config_gives_every_input_with_its_dtype_and_shape(multi):
    out = Pipeline().process(multi)
    assert list(out) == ["video", "audio", "lidar", "radar", "imu"]
    assert out["video"].dtype == np.uint8 and out["video"].shape == (8, 3, 48, 64)
    assert out["audio"].dtype == np.float32 and out["audio"].shape == (1, 64, 101)
    assert out["lidar"].dtype == np.float32 and out["lidar"].shape == (3, 160, 160)
    assert out["radar"].dtype == np.float32 and out["radar"].shape == (1, 64, 64)
    assert out["imu"].dtype == np.float32 and out["imu"].shape == (50, 6)  # metadata shape


@pytest.mark.skipif(_cuda(), reason="checks the CPU fallback taken without a GPU")
def test_nvdec_video_without_a_gpu_decodes_on_the_cpu_and_gives_the_same_sample(multi, caplog):
    from producer.modalities import video

    video._warned_no_cuda = False
    with caplog.at_level("WARNING", logger=video.__name__):
        gpu = Pipeline(video_device="cuda").process(multi)
        Pipeline(video_device="cuda").process(multi)
    cpu = Pipeline().process(multi)
    assert list(gpu) == list(cpu)
    assert all(isinstance(a, np.ndarray) and np.array_equal(a, cpu[k]) for k, a in gpu.items())
    assert sum("no CUDA GPU is available" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.skipif(not _cuda(), reason="NVDEC decode needs an NVIDIA GPU with CUDA")
def test_nvdec_video_is_a_cuda_tensor_beside_numpy_inputs_and_matches_the_cpu(multi):
    gpu = Pipeline(video_device="cuda").process(multi)
    cpu = Pipeline().process(multi)
    assert gpu["video"].is_cuda and tuple(gpu["video"].shape) == cpu["video"].shape
    diff = np.abs(gpu["video"].cpu().numpy().astype(int) - cpu["video"].astype(int))
    assert diff.mean() <= 1.5 and diff.max() <= 24  # the CPU/GPU tolerance of test_video.py
    assert all(isinstance(gpu[k], np.ndarray) for k in ("audio", "lidar", "radar", "imu"))


def test_pipeline_refuses_a_video_device_it_does_not_know():
    with pytest.raises(ValueError, match="video_device must be 'cpu' or 'cuda'"):
        Pipeline(video_device="gpu")


def test_shapes_are_the_same_for_every_sample_of_one_config(index):
    pipe = Pipeline(PipelineConfig(filter="resize=32x24"))
    shapes = {tuple((k, v.shape) for k, v in pipe.process(s).items() if k != "imu")
              for s in index.samples}
    assert len(shapes) == 1


@pytest.mark.parametrize("spec, channels, size", [
    ("gray", 1, (48, 64)), ("resize=32x16", 3, (16, 32)), ("gray,resize=20x20", 1, (20, 20)),
    ("crop=32x32", 3, (32, 32))])
def test_filter_spec_sets_video_channels_and_size(multi, spec, channels, size):
    v = Pipeline(PipelineConfig(filter=spec, clip_frames=4)).process(multi)["video"]
    assert v.shape == (4, channels, *size)


def test_gray_is_the_luma_of_the_same_frames(multi):
    rgb = Pipeline(PipelineConfig()).process(multi)["video"].astype(np.float32)
    gray = Pipeline(PipelineConfig(filter="gray")).process(multi)["video"].astype(np.float32)
    luma = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]
    assert np.abs(gray[:, 0] - luma).mean() < 6.0  # BT.601 limited range rounding


def test_sensor_switch_feeds_lidar_from_the_other_file(multi):
    base = Pipeline().process(multi)["lidar"]
    front = Pipeline(PipelineConfig(sensors={"lidar": "lidar_front"})).process(multi)["lidar"]
    expected = lidar.bev(lidar.load_points(multi.files["lidar_front"], multi.metadata))
    np.testing.assert_array_equal(front, expected)
    assert not np.array_equal(front, base)


def test_a_switched_sensor_absent_from_a_sample_leaves_the_input_out_with_a_note(index):
    single = next(s for s in index.samples if "lidar_front" not in s.files)
    notes: list[str] = []
    out = Pipeline(PipelineConfig(sensors={"lidar": "lidar_front"})).process(single, notes)
    assert "lidar" not in out and "video" in out
    assert any("lidar_front" in n and "left out" in n for n in notes)


def test_radar_method_switch_changes_the_output(multi):
    rd = Pipeline().process(multi)["radar"]
    ra = Pipeline(PipelineConfig(methods={"radar": "range_azimuth"})).process(multi)["radar"]
    assert rd.shape == ra.shape == (1, 64, 64)
    assert not np.allclose(rd, ra)


def test_with_changes_merges_switches_and_parses_filter_strings():
    cfg = PipelineConfig(sensors={"radar": "radar_b"})
    new = cfg.with_changes(sensors={"lidar": "lidar_front"}, filter="gray", clip_frames=4)
    assert new.sensors == {"radar": "radar_b", "lidar": "lidar_front"}
    assert new.filter == FilterSpec(gray=True) and new.clip_frames == 4
    assert cfg.sensors == {"radar": "radar_b"}  # the original is untouched
    assert new.config_hash() != cfg.config_hash()


@pytest.mark.parametrize("changes, error", [
    ({"methods": {"radar": "fft3d"}}, ValueError), ({"methods": {"lidar": "bev"}}, ValueError),
    ({"sensors": {"sonar": "sonar"}}, ValueError), ({"sensors": {"lidar": "a/b"}}, ValueError),
    ({"clip_frames": 0}, ValueError), ({"segment": (2.0, 1.0)}, ValueError),
    ({"filter": "sepia"}, FilterSpecError)])
def test_bad_switch_values_are_refused_before_anything_runs(changes, error):
    with pytest.raises(error):
        PipelineConfig().with_changes(**changes)


def test_config_hash_is_stable_across_processes():
    cfg = PipelineConfig(filter="gray", enabled={"video", "audio", "lidar"},
                         sensors={"lidar": "lidar_front"})
    code = ("from producer.pipeline import PipelineConfig as C; print(C(filter='gray', "
            "enabled={'lidar', 'audio', 'video'}, sensors={'lidar': 'lidar_front'})"
            ".config_hash())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, env={"PYTHONHASHSEED": "123"}).stdout.strip()
    assert other == cfg.config_hash()
    assert PipelineConfig().config_hash() != cfg.config_hash()


def test_enabled_limits_the_inputs(multi):
    out = Pipeline(PipelineConfig(enabled={"audio", "imu"})).process(multi)
    assert list(out) == ["audio", "imu"]


def test_unknown_sensor_is_never_dropped_with_or_without_metadata(index):
    with_meta = next(s for s in index.samples if "imu" in s.metadata)
    without = next(s for s in index.samples if "imu" not in s.metadata)
    assert Pipeline().process(with_meta)["imu"].shape == (50, 6)
    notes: list[str] = []
    assert Pipeline().process(without, notes)["imu"].shape == (256,)
    assert any("imu.data" in n for n in notes)


def test_a_sample_missing_a_modality_is_processed_with_what_it_has(bad_dataset):
    root, made = bad_dataset
    sample = next(s for s in index_dataset(root).samples if s.dir == made["missing_audio"])
    out = Pipeline().process(sample)
    assert "audio" not in out and {"video", "lidar", "radar"} <= set(out)


@pytest.mark.parametrize("case, file, field", [
    ("truncated_video", "video.mp4", "container"),
    ("lidar_not_multiple_of_16", "lidar.bin", "size"),
    ("radar_size_disagrees", "radar.bin", "shape")])
def test_a_bad_modality_file_raises_input_error_naming_file_and_field(bad_dataset, case, file,
                                                                      field):
    root, made = bad_dataset
    sample = next(s for s in index_dataset(root).samples if s.dir == made[case])
    with pytest.raises(InputError) as info:
        Pipeline().process(sample)
    assert info.value.path == str(made[case] / file) and info.value.field == field


def _nearest_mean_accuracy(train: list, val: list) -> float:
    xs = np.stack([x for x, _ in train]).reshape(len(train), -1)
    ys = np.array([y for _, y in train])
    means = np.stack([xs[ys == c].mean(0) for c in np.unique(ys)])
    hits = [int(np.argmin(((means - x.reshape(-1)) ** 2).sum(1)) == y) for x, y in val]
    return sum(hits) / len(hits)


@pytest.mark.parametrize("inp", ["video", "audio", "radar"])
def test_synthetic_classes_are_separable_in_each_modality(index, inp):
    # If the bytes arrived scrambled, a nearest-class-mean classifier would sit at chance (1/3).
    pipe = Pipeline(PipelineConfig(enabled={inp}))
    feats = {s.key: (pipe.process(s)[inp].astype(np.float32), s.label) for s in index.samples}
    train = [v for k, v in feats.items() if k.startswith("train/")]
    val = [v for k, v in feats.items() if k.startswith("val/")]
    if inp == "video":  # colour is the class mark that survives random positions
        train = [(x.mean(axis=(0, 2, 3)), y) for x, y in train]
        val = [(x.mean(axis=(0, 2, 3)), y) for x, y in val]
    assert _nearest_mean_accuracy(train, val) == 1.0


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"real recordings not present at {REAL_DATA}")
def test_the_pipeline_runs_on_the_real_recordings(tmp_path):
    made = link_real_recordings(tmp_path, REAL_DATA)
    assert made, "the README lists these files; link_real_recordings found none"
    index = index_dataset(tmp_path)
    assert index.problems == []
    by_name = {s.dir.name: s for s in index.samples}
    notes: list[str] = []
    walk = Pipeline(PipelineConfig(filter="resize=96x54", clip_frames=4)).process(
        by_name["0000"], notes)
    assert walk["video"].shape == (4, 3, 54, 96)
    assert walk["audio"].shape == (1, 64, 101) and np.isfinite(walk["audio"]).all()
    assert walk["lidar"].shape == (3, 160, 160) and walk["lidar"][2].max() > 0  # KITTI points
    assert walk["radar"].shape == (1, 64, 64)  # DCA1000 frame decoded via metadata
    nus = Pipeline(PipelineConfig(sensors={"lidar": "lidar_top"})).process(by_name["0000"])
    assert not np.array_equal(nus["lidar"], walk["lidar"])
    kinect = Pipeline(PipelineConfig(sensors={"lidar": "lidar_kinect"}, enabled={"lidar"}))
    assert kinect.process(by_name["0000"])["lidar"].shape == (3, 160, 160)

    car_notes: list[str] = []
    car = Pipeline(PipelineConfig(clip_frames=2)).process(by_name["0001"], car_notes)
    assert car["video"].shape == (2, 3, 432, 768) and "lidar" not in car
    assert any("resampled 48000 Hz -> 16000 Hz" in n for n in car_notes)
    points = Pipeline(PipelineConfig(sensors={"radar": "radar_points"},
                                     methods={"radar": "points_bev"}, enabled={"radar"}))
    bev = points.process(by_name["0001"])["radar"]
    assert bev.shape == (3, 64, 64) and bev[2].max() > 0  # View-of-Delft points landed


# --- long recordings: frame sequences aligned to the clip by timestamp ----------------------


@pytest.fixture(scope="module")
def long_root(tmp_path_factory):
    """Long-recording samples (3 s video at 10 fps + lidar frames, each its own scene)."""
    root = tmp_path_factory.mktemp("long") / "dataset"
    cls = root / "train" / "circle"
    for style in ("list", "per_file", "rate"):
        make_long_recording(cls / style, rate=4.0, stamps=style)        # frames every 0.25 s
    make_long_recording(cls / "late", rate=4.0, offset_s=5.0)           # starts after the video
    make_long_recording(cls / "sparse", rate=2.0, tolerance_s=0.15)     # frames every 0.5 s
    make_long_recording(cls / "unstamped", rate=4.0, stamps="none")
    make_long_recording(cls / "top", rate=4.0, sensor="lidar_top")
    lidar_scene = np.random.default_rng(7).uniform(-5, 5, (300, 4)).astype("<f4")
    lidar_scene.tofile(cls / "top" / "lidar.bin")
    make_long_recording(cls / "imu", rate=4.0)
    for i in range(1, 14):  # imu frame i holds the value i: which one fed the input shows
        np.full((5, 3), i, "<f4").tofile(cls / "imu" / f"imu_{i:04d}.data")
    meta = json.loads((cls / "imu" / "metadata.json").read_text())
    meta["timestamps"]["imu"] = [(i - 1) * 0.25 for i in range(1, 14)]
    meta["imu"] = {"dtype": "float32", "shape": [5, 3]}  # the sensor's section fits each frame
    (cls / "imu" / "metadata.json").write_text(json.dumps(meta))
    make_long_recording(cls / "radar", rate=4.0, sensor="lidar")
    for i in range(1, 14):  # radar_front frame i: class i's target range and Doppler bins
        _radar_cube(i, np.random.default_rng(i)).tofile(cls / "radar" / f"radar_front_{i:04d}.bin")
    meta = json.loads((cls / "radar" / "metadata.json").read_text())
    meta["frame_rates"]["radar_front"] = 4.0
    meta["radar_front"] = {"format": "adc", "dtype": "complex_int16", "shape": [32, 64, 4]}
    (cls / "radar" / "metadata.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def long_samples(long_root):
    index = index_dataset(long_root)
    assert index.problems == []
    return {s.dir.name: s for s in index.samples}


def _bev_of(sample, stem):
    return lidar.bev(lidar.load_points(sample.files[stem], sample.metadata))


@pytest.mark.parametrize("style", ["list", "per_file", "rate"])
def test_a_long_recording_feeds_the_lidar_frame_nearest_the_clip_centre(long_samples, style):
    # 8 frames at 10 fps from 0 s: clip 0.0..0.7 s, centre 0.35 s; lidar every 0.25 s:
    # 0.25 s (lidar_0002) is 0.10 s off, 0.50 s is 0.15 s off.
    s = long_samples[style]
    notes: list[str] = []
    out = Pipeline().process(s, notes)
    assert list(out) == ["video", "lidar"] and out["video"].shape == (8, 3, 48, 64)
    np.testing.assert_array_equal(out["lidar"], _bev_of(s, "lidar_0002"))
    assert not np.array_equal(out["lidar"], _bev_of(s, "lidar_0001"))  # scenes differ
    assert notes == []  # every clip frame has a lidar frame within 0.125 s


def test_a_segment_change_moves_the_lidar_to_the_frame_nearest_the_new_clip_centre(
        long_samples):
    # segment 2..3 s: clip 2.0..2.7 s, centre 2.35 s -> 2.25 s (lidar_0010). The segment's own
    # centre, 2.5 s, would pick lidar_0011: the clip's frame times are what count.
    s = long_samples["list"]
    out = Pipeline(PipelineConfig(segment=(2.0, 3.0))).process(s)
    np.testing.assert_array_equal(out["lidar"], _bev_of(s, "lidar_0010"))


def test_without_video_a_sequence_aligns_to_the_segment_centre_else_its_first_frame(
        long_samples):
    s = long_samples["list"]
    only = Pipeline(PipelineConfig(enabled={"lidar"}, segment=(2.0, 3.0))).process(s)
    np.testing.assert_array_equal(only["lidar"], _bev_of(s, "lidar_0011"))  # 2.5 s
    first = Pipeline(PipelineConfig(enabled={"lidar"})).process(s)
    np.testing.assert_array_equal(first["lidar"], _bev_of(s, "lidar_0001"))


def test_a_sequence_beyond_tolerance_is_left_out_with_a_note_and_the_video_kept(long_samples):
    s = long_samples["late"]  # lidar at 5.0, 5.25 s; the clip is 0.0..0.7 s
    notes: list[str] = []
    out = Pipeline().process(s, notes)
    assert list(out) == ["video"] and out["video"].shape == (8, 3, 48, 64)
    assert any(n.startswith("lidar_0001.bin") and "+4.650 s off" in n
               and "timestamps.lidar" in n and "lidar left out" in n for n in notes), notes
    assert any("8 of 8 video frames have no lidar frame within 0.125 s" in n for n in notes)
    assert Pipeline().inputs_of(s) == ["video", "lidar"]  # only decoding can tell


def test_a_partly_misaligned_clip_keeps_the_centre_frame_and_reports_the_alignment(
        long_samples):
    # lidar every 0.5 s, tolerance_s 0.15: clip frames 0.2, 0.3 and 0.7 s are 0.2 s from any
    # lidar frame; the centre 0.35 s is 0.15 s from 0.5 s (lidar_0002), within tolerance.
    s = long_samples["sparse"]
    notes: list[str] = []
    out = Pipeline().process(s, notes)
    np.testing.assert_array_equal(out["lidar"], _bev_of(s, "lidar_0002"))
    assert any("3 of 8 video frames have no lidar frame within 0.150 s (worst 0.200 s)" in n
               for n in notes), notes


def test_a_sequence_without_timestamps_is_rejected_naming_metadata_and_the_field(
        long_samples):
    s = long_samples["unstamped"]
    with pytest.raises(InputError) as e:
        Pipeline().process(s)
    assert e.value.path == str(s.dir / "metadata.json") and e.value.field == "timestamps.lidar"
    # a sequence that feeds no input needs no times
    assert list(Pipeline(PipelineConfig(enabled={"video"})).process(s)) == ["video"]


def test_a_sequence_is_a_sensor_the_sensor_setting_selects(long_samples):
    s = long_samples["top"]  # lidar.bin beside lidar_top_0001.bin ...
    assert s.sensors("lidar") == ["lidar", "lidar_top"]
    plain = Pipeline().process(s)["lidar"]
    np.testing.assert_array_equal(plain, _bev_of(s, "lidar"))
    top = Pipeline(PipelineConfig(sensors={"lidar": "lidar_top"})).process(s)["lidar"]
    np.testing.assert_array_equal(top, _bev_of(s, "lidar_top_0002"))
    notes: list[str] = []
    frame = Pipeline(PipelineConfig(sensors={"lidar": "lidar_top_0002"})).process(s, notes)
    assert "lidar" not in frame  # a frame is not a sensor
    assert any("has lidar, lidar_top" in n for n in notes)


def test_an_unknown_sensor_sequence_is_one_input_and_inputs_of_agrees(long_samples):
    s = long_samples["imu"]
    pipe = Pipeline()
    out = pipe.process(s)
    assert list(out) == pipe.inputs_of(s) == ["video", "lidar", "imu"]
    np.testing.assert_array_equal(out["imu"], np.full((5, 3), 2, np.float32))  # 0.25 s
    assert union_inputs(pipe, [long_samples["list"], s]) == ["video", "lidar", "imu"]


def test_a_bad_section_of_a_sequence_sensor_is_named_as_the_user_wrote_it(long_samples):
    # each frame borrows the `imu` section; an error in it names `metadata.imu.dtype`, not
    # the frame file's stem (imu_0002), which appears nowhere in metadata.json
    s = long_samples["imu"]
    bad = dataclasses.replace(s, metadata={**s.metadata, "imu": {"dtype": "float33",
                                                                 "shape": [5, 3]}})
    with pytest.raises(InputError) as e:
        Pipeline().process(bad)
    assert e.value.field == "metadata.imu.dtype" and e.value.path.endswith("imu_0002.data")


def test_a_radar_sequence_with_its_own_section_feeds_its_aligned_frame(long_samples):
    s = long_samples["radar"]  # radar_front_0001.bin ... at 4 Hz; section `radar_front`
    assert s.sensors("radar") == ["radar_front"]
    out = Pipeline().process(s)["radar"]
    section = {"radar": s.metadata["radar_front"]}
    frames = [radar.process(s.files[f"radar_front_{i:04d}"], "range_doppler", meta=section)
              for i in (1, 2)]
    np.testing.assert_array_equal(out, frames[1])  # 0.25 s, nearest the clip centre 0.35 s
    assert not np.array_equal(frames[0], frames[1])


@pytest.mark.parametrize("spec, segment, expected", [
    ("none", (2.0, 3.0), [2.0, 2.1, 2.2, 2.3, 2.4, 2.5, 2.6, 2.7]),
    ("fps=5", None, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4]),
    ("none", (2.5, 3.5), [2.5, 2.6, 2.7, 2.8, 2.9, 2.9, 2.9, 2.9]),  # short: last one repeats
])
def test_decode_clip_reports_each_chosen_frame_time_from_the_same_decode(long_samples, spec,
                                                                        segment, expected):
    from producer.modalities import video

    times: list[float] = []
    clip = video.decode_clip(long_samples["list"].files["video"], FilterSpec.parse(spec), 8,
                             segment, [], times=times)
    assert clip.shape[0] == 8
    np.testing.assert_allclose(times, expected, atol=1e-6)
