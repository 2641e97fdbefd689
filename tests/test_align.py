"""Timestamp alignment of multi-frame recordings to video frames."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from producer.align import (align, default_tolerance, frame_sequences, frame_timestamps,
                            timestamp_field)
from producer.modalities import lidar
from protocol.errors import InputError


def test_each_video_frame_gets_the_nearest_frame_within_tolerance():
    video = np.arange(10) * 0.1                  # 10 Hz camera
    other = np.array([0.01, 0.26, 0.49, 0.70, 0.93])  # ~4 Hz sensor with jitter
    a = align(video, other, tolerance_s=0.05, modality="lidar")
    np.testing.assert_array_equal(a.nearest, [0, 0, 1, 1, 2, 2, 3, 3, 3, 4])
    # |offsets|: .01 .09 .06 .04 .09 .01 .10 0 .10 .03 -> within .05 at frames 0, 3, 5, 7, 9
    np.testing.assert_array_equal(a.index, [0, -1, -1, 1, -1, 2, -1, 3, -1, 4])
    assert (a.report.matched, a.report.misaligned) == (5, 5)
    assert a.report.worst_offset_s == pytest.approx(0.10)
    assert "5 of 10 video frames have no lidar frame within 0.050 s" in str(a.report)


def test_out_of_order_arrivals_index_the_times_as_given():
    # Files from a watched folder arrive in any order; indices still refer to the input order.
    other = np.array([0.30, 0.00, 0.20, 0.10])
    a = align([0.0, 0.1, 0.2, 0.3], other, tolerance_s=0.01)
    np.testing.assert_array_equal(a.index, [1, 3, 2, 0])
    assert a.report.misaligned == 0 and a.report.worst_offset_s == 0


def test_ties_go_to_the_earlier_frame_and_ends_clamp():
    a = align([-5.0, 0.5, 99.0], [0.0, 1.0], tolerance_s=10)
    np.testing.assert_array_equal(a.nearest, [0, 0, 1])
    np.testing.assert_allclose(a.offset_s, [5.0, -0.5, -98.0])


def test_no_frames_of_the_other_modality_reports_every_frame_misaligned():
    a = align([0.0, 1.0], [], tolerance_s=0.1, modality="radar")
    assert (a.index == -1).all() and a.report.misaligned == 2


def test_alignment_matches_a_brute_force_reference_on_random_times():
    rng = np.random.default_rng(3)
    video, other = np.sort(rng.uniform(0, 60, 500)), rng.uniform(0, 60, 333)
    a = align(video, other, tolerance_s=0.05)
    brute = np.abs(video[:, None] - other[None, :]).argmin(axis=1)
    np.testing.assert_allclose(np.abs(a.offset_s), np.abs(other[brute] - video))


def test_default_tolerance_is_half_the_median_period():
    assert default_tolerance(np.arange(20) * 0.05) == pytest.approx(0.025)


def test_frame_files_group_by_digit_suffix_and_sort_by_frame_number(tmp_path):
    files = {s: tmp_path / f"{s}.bin" for s in ("lidar_0010", "lidar_0002", "lidar_top",
                                                 "radar_7", "lidar_0001")}
    seq = frame_sequences(files)
    assert set(seq) == {"lidar", "radar"}  # lidar_top is a sensor, not a frame
    assert [p.stem for p in seq["lidar"]] == ["lidar_0001", "lidar_0002", "lidar_0010"]


def test_multi_frame_lidar_recording_aligns_to_video_frames(tmp_path):
    # Three lidar frames on disk, one point each at x = frame number; a 4-frame video.
    for i in (1, 2, 3):
        pts = np.array([[i, 0, 0, 0.5]], np.float32)
        (tmp_path / f"lidar_{i:04d}.bin").write_bytes(pts.tobytes())
    meta = {"timestamps": {"video": [0.0, 0.1, 0.2, 0.3], "lidar": [0.0, 0.105, 0.31]}}
    frames = frame_sequences({p.name.split(".")[0]: p for p in tmp_path.iterdir()})["lidar"]
    t = frame_timestamps(meta, "lidar", frames)
    a = align(frame_timestamps(meta, "video", 4), t, tolerance_s=0.02, modality="lidar")
    np.testing.assert_array_equal(a.index, [0, 1, -1, 2])
    xs = [lidar.load_points(frames[i])[0, 0] for i in a.index if i >= 0]
    assert xs == [1.0, 2.0, 3.0]


def test_per_file_timestamps_and_frame_rates_are_read_in_frame_order():
    frames = [Path("lidar_0001.bin"), Path("lidar_0002.bin")]
    meta = {"timestamps": {"lidar_0002": 0.2, "lidar_0001": 0.1}}
    np.testing.assert_array_equal(frame_timestamps(meta, "lidar", frames), [0.1, 0.2])
    # frame_rates is the key metadata.py validates and docs/dataset.md documents
    np.testing.assert_array_equal(frame_timestamps({"frame_rates": {"lidar": 4}}, "lidar", 3),
                                  [0, 0.25, 0.5])


def test_a_start_time_with_a_frame_rate_offsets_every_frame():
    meta = {"timestamps": {"lidar": 1.5}, "frame_rates": {"lidar": 4}}
    np.testing.assert_array_equal(frame_timestamps(meta, "lidar", 3), [1.5, 1.75, 2.0])
    assert timestamp_field(meta, "lidar", "lidar_0002") == "timestamps.lidar + frame_rates.lidar"


def test_the_field_that_timed_a_frame_is_named_by_source():
    assert timestamp_field({"timestamps": {"lidar": [0, 1]}}, "lidar", "lidar_0001") == \
        "timestamps.lidar"
    assert timestamp_field({"timestamps": {"lidar_0001": 0}}, "lidar", "lidar_0001") == \
        "timestamps.lidar_0001"
    assert timestamp_field({"frame_rates": {"lidar": 5}}, "lidar", "lidar_0001") == \
        "frame_rates.lidar"


@pytest.mark.parametrize("meta, field", [
    ({"timestamps": {"lidar": [0.0, 0.1]}}, "timestamps.lidar"),         # 2 times, 3 frames
    ({"timestamps": {"lidar": [0.0, "soon", 0.2]}}, "timestamps.lidar"),
    ({"timestamps": {"lidar": 0.5}}, "timestamps.lidar"),                 # a start, no rate
    ({"frame_rates": {"lidar": 0}}, "frame_rates.lidar"),
    ({"rates": {"lidar": 4}}, "timestamps.lidar"),   # not a key of the schema: no times
    ({}, "timestamps.lidar"),
])
def test_bad_or_missing_timestamps_name_metadata_and_field(meta, field):
    with pytest.raises(InputError) as e:
        frame_timestamps(meta, "lidar", 3, path="rec/metadata.json")
    assert e.value.field == field and e.value.path == "rec/metadata.json"


def test_a_frame_file_without_its_own_timestamp_is_named():
    frames = [Path(f"lidar_000{i}.bin") for i in (1, 2, 3)]
    with pytest.raises(InputError) as e:
        frame_timestamps({"timestamps": {"lidar_0001": 0.0, "lidar_0002": 0.1}}, "lidar",
                         frames)
    assert e.value.field == "timestamps.lidar_0003" and "2 of 3" in e.value.expected


def test_an_offset_exactly_at_the_tolerance_is_within_despite_binary_rounding():
    # 0.4 - 0.35 is 0.05000000000000002 in binary floating point; in seconds it is 0.05.
    assert 0.4 - 0.35 > 0.05
    assert align([0.35], [0.4], tolerance_s=0.05).index[0] == 0
    assert align([0.35], [0.41], tolerance_s=0.05).index[0] == -1
