"""producer/sources.py on real files: replay order, looping, media clips, watched folders."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from producer.sources import (DatasetReplay, MediaSource, SourceError, WatchFolder,
                              open_source, parse_stamped_name)
from producer.synth import make_dataset
from protocol.filters import FilterSpec


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("src") / "ds"
    make_dataset(root, per_class={"train": 2}, size=(32, 24), clip_seconds=0.5, extras=False)
    return root


def test_replay_is_in_metadata_timestamp_order_not_folder_order(dataset, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(dataset, root)
    # Make the alphabetically first sample the most recent one.
    meta = root / "train" / "circle" / "0000" / "metadata.json"
    m = json.loads(meta.read_text())
    m["timestamp_ns"] += 100 * 10**9
    meta.write_text(json.dumps(m))
    replay = DatasetReplay(root)
    items = [replay.next() for _ in range(6)]
    assert replay.next() is None  # not looping: the replay ends
    stamps = [i.timestamp_ns for i in items]
    assert stamps == sorted(stamps)
    assert items[-1].sample.key == "train/circle/0000"
    assert [i.offset_s for i in items][0] == 0.0


def test_looping_replay_keeps_timestamps_increasing_with_recorded_spacing(dataset):
    replay = DatasetReplay(dataset, loop=True)
    items = [replay.next() for _ in range(13)]
    stamps = np.array([i.timestamp_ns for i in items])
    assert (np.diff(stamps) == 10**9).all()  # synth samples are one second apart
    assert [i.index for i in items] == list(range(13))
    assert items[6].sample.key == items[0].sample.key


def test_vanished_dataset_folder_is_a_source_error(dataset, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(dataset, root)
    replay = DatasetReplay(root, loop=True)
    shutil.rmtree(root)
    with pytest.raises(SourceError, match="disappeared"):
        replay.check_alive()
    for _ in range(6):
        replay.next()
    with pytest.raises(SourceError, match=str(root)):
        replay.next()  # the next pass re-indexes and finds nothing


def test_media_file_gives_filtered_clips_of_t_frames(dataset):
    video = next(dataset.rglob("video.mp4"))
    src = open_source(str(video))
    assert isinstance(src, MediaSource) and not src.is_url
    clips = list(src.clips(FilterSpec.parse("gray"), 2))
    assert len(clips) == 2  # 5 frames at 10 fps: two whole clips of 2
    assert clips[0].video.shape == (2, 1, 24, 32)
    assert clips[0].start_s < clips[1].start_s and clips[0].end_s <= clips[1].start_s + 1e-6


def test_missing_media_file_is_a_source_error(tmp_path):
    with pytest.raises(SourceError, match="not found"):
        MediaSource(str(tmp_path / "nope.mp4"))


def test_dead_stream_url_is_a_source_error_within_the_timeout():
    src = MediaSource("tcp://127.0.0.1:9?timeout=500000", timeouts=(0.5, 0.5))
    with pytest.raises(SourceError, match="127.0.0.1:9"):
        next(src.clips(FilterSpec(), 2))


@pytest.mark.parametrize("name, expected", [
    ("lidar_top_1700000000.125.bin", ("lidar_top", 1_700_000_000_125_000_000)),
    ("radar-1700000000125000000.bin", ("radar", 1_700_000_000_125_000_000)),
    ("lidar_1700000000125.bin", ("lidar", 1_700_000_000_125_000_000)),
    ("lidar_1700000000.bin", ("lidar", 1_700_000_000_000_000_000)),
    ("lidar.bin", None),
])
def test_stamped_file_names_parse_by_magnitude(name, expected):
    assert parse_stamped_name(name) == expected


def test_watch_folder_picks_up_new_files_in_time_order_and_reports_unstamped(tmp_path):
    w = WatchFolder(tmp_path)
    (tmp_path / "lidar_1700000001.0.bin").write_bytes(b"\0" * 16)
    (tmp_path / "lidar_1700000000.5.bin").write_bytes(b"\0" * 16)
    (tmp_path / "notes.txt").write_text("no timestamp")
    assert w.scan() == 2
    assert w.scan() == 0  # nothing new
    (tmp_path / "lidar_1700000000.0.bin").write_bytes(b"\0" * 16)
    assert w.scan() == 1
    assert w.times["lidar"].tolist() == [1_700_000_000_000_000_000, 1_700_000_000_500_000_000,
                                         1_700_000_001_000_000_000]
    assert [p.name for p in w.paths["lidar"]][0] == "lidar_1700000000.0.bin"
    assert w.ignored == {"notes.txt"}
    assert w.stems() == {"lidar": {"lidar"}}
