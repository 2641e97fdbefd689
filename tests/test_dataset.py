"""The input index: labels from class folders, stems, kinds, and problems that never raise."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from producer.dataset import file_stem, index_dataset, kind_of


def _sample(root: Path, split: str, cls: str, name: str, files: dict[str, bytes]) -> Path:
    d = root / split / cls / name
    d.mkdir(parents=True)
    for fname, data in files.items():
        (d / fname).write_bytes(data)
    return d


def test_classes_are_the_sorted_union_over_splits(tmp_path):
    _sample(tmp_path, "train", "zebra", "a", {"imu.data": b"1"})
    _sample(tmp_path, "val", "apple", "a", {"imu.data": b"1"})
    _sample(tmp_path, "test", "mango", "a", {"imu.data": b"1"})
    index = index_dataset(tmp_path)
    assert index.classes == ["apple", "mango", "zebra"]
    assert {(s.split, s.class_name, s.label) for s in index.samples} == {
        ("train", "zebra", 2), ("val", "apple", 0), ("test", "mango", 1)}
    assert index.problems == []


def test_split_filter_keeps_the_labels_of_all_splits(tmp_path):
    # A `--split val` cache and a `--split train` cache must agree on what label 0 means.
    _sample(tmp_path, "train", "b", "x", {"imu.data": b"1"})
    _sample(tmp_path, "val", "a", "x", {"imu.data": b"1"})
    index = index_dataset(tmp_path, splits=["train"])
    assert index.classes == ["a", "b"]
    assert [(s.split, s.label) for s in index.samples] == [("train", 1)]


@pytest.mark.parametrize("name, stem, kind", [
    ("video.mp4", "video", "video"), ("video_rear.mkv", "video_rear", "video"),
    ("audio.wav", "audio", "audio"), ("lidar.bin", "lidar", "lidar"),
    ("lidar_top.pcd.bin", "lidar_top", "lidar"), ("scan.pcd", "scan", "lidar"),
    ("radar.bin", "radar", "radar"), ("radar_points.bin", "radar_points", "radar"),
    ("imu.data", "imu", "unknown"), ("gps.csv", "gps", "unknown"), ("cam.mp4", "cam", "video"),
])
def test_stem_is_the_name_up_to_the_first_dot_and_kind_follows_prefix_then_extension(
        name, stem, kind):
    assert file_stem(name) == stem
    assert kind_of(file_stem(name), name) == kind


def test_several_lidar_files_are_indexed_by_stem(synth_dataset):
    index = index_dataset(synth_dataset)
    multi = [s for s in index.samples if "lidar_front" in s.files]
    assert multi, "the synthetic dataset puts lidar_front.bin in every third sample"
    assert multi[0].stems("lidar") == ["lidar", "lidar_front"]
    assert multi[0].stems("unknown") == ["imu"]
    assert "metadata" not in multi[0].files and multi[0].metadata_path.name == "metadata.json"


def test_synthetic_dataset_indexes_every_sample_with_its_class(synth_dataset):
    index = index_dataset(synth_dataset)
    assert index.problems == []
    assert index.classes == ["circle", "square", "stripes"]
    assert len(index.samples) == 3 * (4 + 2)
    for s in index.samples:
        assert s.dir.parent.name == s.class_name == index.classes[s.label]
        assert s.key == f"{s.split}/{s.class_name}/{s.dir.name}"


def test_empty_sample_folder_is_a_problem_and_the_others_are_indexed(tmp_path):
    _sample(tmp_path, "train", "a", "good", {"imu.data": b"1"})
    (tmp_path / "train" / "a" / "empty").mkdir()
    index = index_dataset(tmp_path)
    assert [s.dir.name for s in index.samples] == ["good"]
    [p] = index.problems
    assert p.path.endswith("empty") and p.field == "files" and "empty folder" in p.found


def test_a_directory_in_place_of_a_file_is_reported_as_unreadable(tmp_path):
    # Works as root too, unlike chmod 000.
    d = _sample(tmp_path, "train", "a", "s", {"audio.wav": b"x"})
    (d / "video.mp4").mkdir()
    index = index_dataset(tmp_path)
    assert index.samples == []
    [p] = index.problems
    assert p.path.endswith("video.mp4") and p.field == "file" and p.found == "a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode; the "
                    "directory-in-place-of-a-file test covers unreadable input as root")
def test_a_file_without_read_permission_is_reported(tmp_path):
    d = _sample(tmp_path, "train", "a", "s", {"video.mp4": b"x"})
    (d / "video.mp4").chmod(0)
    index = index_dataset(tmp_path)
    [p] = index.problems
    assert p.path.endswith("video.mp4") and p.field == "file"


def test_no_split_folders_is_one_problem_naming_the_root(tmp_path):
    (tmp_path / "circle").mkdir()
    index = index_dataset(tmp_path)
    assert index.samples == [] and index.splits == []
    [p] = index.problems
    assert p.field == "splits" and "circle" in p.found


def test_bad_metadata_rejects_only_that_sample_and_names_the_field(tmp_path):
    _sample(tmp_path, "train", "a", "good", {"imu.data": b"1",
                                              "metadata.json": b'{"timestamp_ns": 5}'})
    _sample(tmp_path, "train", "a", "bad", {"imu.data": b"1", "metadata.json":
                                             json.dumps({"frame_rates": {"video": -3}}).encode()})
    index = index_dataset(tmp_path)
    assert [s.dir.name for s in index.samples] == ["good"]
    assert index.samples[0].metadata == {"timestamp_ns": 5}
    [p] = index.problems
    assert p.path.endswith("bad/metadata.json") and p.field == "frame_rates.video"


def test_two_files_with_one_stem_are_reported(tmp_path):
    _sample(tmp_path, "train", "a", "s", {"video.mp4": b"x", "video.mkv": b"y"})
    [p] = index_dataset(tmp_path).problems
    assert p.field == "file name" and "video" in p.expected


def test_unknown_metadata_keys_are_kept_and_noted(tmp_path):
    _sample(tmp_path, "train", "a", "s", {"imu.data": b"1",
                                           "metadata.json": b'{"frame_rate": 10}'})
    index = index_dataset(tmp_path)
    assert index.samples[0].metadata == {"frame_rate": 10}
    assert any("frame_rate" in n and n.startswith("train/a/s/") for n in index.notes)


def test_missing_root_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        index_dataset(tmp_path / "nope")


def test_numbered_frame_files_of_one_sensor_are_one_sequence_named_by_its_base(tmp_path):
    names = ["lidar_0002.bin", "lidar_0001.bin", "lidar_0010.bin", "lidar_top_0001.bin",
             "lidar_top_0002.bin", "radar_1.bin", "radar_2.bin", "imu_0001.data",
             "imu_0002.data", "lidar_front.bin", "video.mp4"]
    _sample(tmp_path, "train", "a", "s", {n: b"x" for n in names})
    [s] = index_dataset(tmp_path).samples
    assert s.sequences == {"lidar": ["lidar_0001", "lidar_0002", "lidar_0010"],
                           "lidar_top": ["lidar_top_0001", "lidar_top_0002"],
                           "radar": ["radar_1", "radar_2"], "imu": ["imu_0001", "imu_0002"]}
    assert s.sensors("lidar") == ["lidar", "lidar_front", "lidar_top"]
    assert s.sensors("radar") == ["radar"] and s.sensors("unknown") == ["imu"]
    assert [p.name for p in s.frames("lidar")] == ["lidar_0001.bin", "lidar_0002.bin",
                                                   "lidar_0010.bin"]
    assert s.frames("lidar_front") == []
    assert len(s.all_paths) == len(names)  # every frame is in the incremental fingerprint


def test_a_lone_numbered_file_and_numbered_video_files_stay_single_file_sensors(tmp_path):
    _sample(tmp_path, "train", "a", "s", {"lidar_0001.bin": b"x", "video_1.mp4": b"x",
                                           "video_2.mp4": b"x"})
    [s] = index_dataset(tmp_path).samples
    assert s.sequences == {}
    assert s.sensors("lidar") == ["lidar_0001"] and s.sensors("video") == ["video_1", "video_2"]


def test_a_file_named_like_a_sequence_base_is_reported(tmp_path):
    # lidar.bin beside lidar_0001.bin, lidar_0002.bin: two sensors would be called `lidar`.
    d = _sample(tmp_path, "train", "a", "s", {"lidar.bin": b"x", "lidar_0001.bin": b"x",
                                               "lidar_0002.bin": b"x"})
    _sample(tmp_path, "train", "a", "good", {"lidar_0001.bin": b"x", "lidar_0002.bin": b"x"})
    index = index_dataset(tmp_path)
    assert [s.dir.name for s in index.samples] == ["good"]
    [p] = index.problems
    assert p.path == str(d / "lidar.bin") and p.field == "file name"
    assert "lidar_<n>" in p.expected
