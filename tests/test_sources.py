"""producer/sources.py and media_clips.py on real files: replay order, looping, media clips with
their audio, settings switched between clips, watched folders."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from producer.media_clips import AudioWindow, ClipSettings
from producer.sources import (DatasetReplay, MediaSource, SourceError, WatchFolder,
                              open_source, parse_stamped_name)
from producer.synth import make_dataset
from protocol.filters import FilterSpec

sys.path.insert(0, str(Path(__file__).parent))
import _av_stream  # noqa: E402


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


def test_a_replay_names_a_frame_sequence_by_its_sensor_not_its_frame_files(dataset, tmp_path):
    # what `mmctl sensor lidar lidar_top` and `mmctl modalities` are checked against
    from producer.synth import make_long_recording

    root = tmp_path / "ds"
    shutil.copytree(dataset, root)
    make_long_recording(root / "train" / "circle" / "long", sensor="lidar_top", seconds=1.0)
    stems = DatasetReplay(root).stems()
    assert "lidar_top" in stems["lidar"]
    assert not any(s.startswith("lidar_top_") for s in stems["lidar"])
    assert {"video", "audio"} <= set(stems)


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


def test_watch_folder_names_an_unstamped_file_in_the_scan_that_first_sees_it(tmp_path):
    w = WatchFolder(tmp_path)
    (tmp_path / "notes.txt").write_text("no timestamp")
    w.scan()
    assert w.newly_ignored == ["notes.txt"]
    w.scan()
    assert w.newly_ignored == [] and w.ignored == {"notes.txt"}


def test_watch_folder_memory_stays_bounded_while_a_recorder_rotates_files_for_days(tmp_path):
    # A recorder writes a frame and deletes the oldest, forever; so does a stray log file.
    w = WatchFolder(tmp_path, keep=8)
    t0 = 1_700_000_000
    for k in range(500):
        (tmp_path / f"lidar_{t0 + k}.bin").write_bytes(b"\0" * 16)
        (tmp_path / f"recorder.log.{k}").write_text("x")
        if k >= 4:
            (tmp_path / f"lidar_{t0 + k - 4}.bin").unlink()
            (tmp_path / f"recorder.log.{k - 4}").unlink()
        assert w.scan() == 1
    assert len(w._seen) <= 2 * 5 and len(w.ignored) <= 5  # what is in the folder, not all ever seen
    assert len(w.paths["lidar"]) == 8 and w.times["lidar"][-1] == (t0 + 499) * 10**9
    # a name that comes back after it went away is new again
    (tmp_path / f"lidar_{t0}.bin").write_bytes(b"\0" * 16)
    assert w.scan() == 1


# --- one demux: video clips with the audio of their span; settings switched between clips ---


@pytest.fixture(scope="module")
def av_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("av") / "tone.mkv"
    _av_stream.write(str(path), 2.0, "matroska", paced=False)
    return path


def _peak_hz(x: np.ndarray, rate: int) -> float:
    return float(np.argmax(np.abs(np.fft.rfft(x)))) * rate / x.size


def test_media_clips_carry_the_audio_of_their_own_time_span(av_file):
    src = MediaSource(str(av_file))
    clips = list(src.clips(FilterSpec(), 4, audio_rate=16000))
    assert src.has_audio() and src.stems()["audio"] == {"audio"}
    assert len(clips) == 12  # 50 frames at 25 fps: 12 whole clips of 4
    for c in clips:
        span = c.end_s - c.start_s
        assert span == pytest.approx(4 / _av_stream.FPS, abs=1e-6)
        assert c.audio.dtype == np.float32 and c.audio.size == round(span * 16000)
        assert _peak_hz(c.audio, 16000) == pytest.approx(_av_stream.TONE_HZ, abs=16000 / c.audio.size)
        assert np.abs(c.audio).max() > 0.3  # the signal, not silence (0.5 in each channel)
    starts = np.array([c.start_s for c in clips])
    np.testing.assert_allclose(np.diff(starts), 4 / _av_stream.FPS, atol=1e-6)


def test_media_clips_without_audio_rate_decode_video_only(av_file):
    clip = next(MediaSource(str(av_file)).clips(FilterSpec(), 2))
    assert clip.audio is None and clip.video.shape == (2, 3, 48, 64)


def test_settings_change_takes_effect_at_a_clip_boundary_without_losing_frames(av_file):
    current = {"s": ClipSettings(FilterSpec(), 4, tag="before")}
    src = MediaSource(str(av_file))
    clips = []
    for c in src.clips(FilterSpec(), 4, audio_rate=16000, settings=lambda: current["s"]):
        clips.append(c)
        if len(clips) == 2:
            current["s"] = ClipSettings(FilterSpec.parse("gray,resize=32x24"), 3, tag="after")
    tags = [c.tag for c in clips]
    k = tags.index("after")
    assert k >= 2 and tags == ["before"] * k + ["after"] * (len(clips) - k)
    assert all(c.video.shape == (4, 3, 48, 64) for c in clips[:k])
    assert all(c.video.shape == (3, 1, 24, 32) and c.spec.gray for c in clips[k:])
    for a, b in zip(clips, clips[1:]):  # one open, no frame skipped or repeated at the seam
        assert b.start_s == pytest.approx(a.end_s, abs=1e-6)
    assert all(c.audio.size == round((c.end_s - c.start_s) * 16000) for c in clips)


@pytest.mark.parametrize("before,after", [("scale=32:16", None), (None, "scale=32:16")],
                         ids=["chain_cleared", "chain_set"])
def test_every_clip_is_made_by_the_ffmpeg_chain_of_its_own_tag_wherever_the_change_lands(
        av_file, before, after):
    # The decode thread reads the settings at a packet (which chain runs) and again at the
    # clip boundary (which tag the clip gets): a change landing between the two reads once
    # made a clip of the old chain's frames under the new tag (seen as a 32x16 sample of the
    # generation that cleared the chain). Landing at each read in turn, none may.
    shape = {"scale=32:16": (4, 3, 16, 32), None: (4, 3, 48, 64)}
    for flip in range(1, 20):  # ~3 reads a clip: the change lands within the first 6 of 12
        calls = {"n": 0}

        def settings():
            calls["n"] += 1
            chain, tag = (before, "before") if calls["n"] <= flip else (after, "after")
            return ClipSettings(FilterSpec(), 4, tag=tag, chain=chain)

        clips = list(MediaSource(str(av_file)).clips(FilterSpec(), 4, settings=settings))
        tags = [c.tag for c in clips]
        assert "after" in tags and tags == sorted(tags, key=("before", "after").index), flip
        for c in clips:
            want = shape[before if c.tag == "before" else after]
            assert np.asarray(c.video).shape == want, (flip, c.tag)


def test_audio_window_fills_gaps_with_silence_and_bounds_its_memory():
    w = AudioWindow(100, keep_s=2.0)
    w.sync(10.0)
    w.append(np.ones(50, np.float32))           # 10.0 .. 10.5
    w.sync(11.0)                                 # 0.5 s missing from the stream
    w.append(np.full(50, 2.0, np.float32))      # 11.0 .. 11.5
    got = w.take(10.25, 11.25)
    np.testing.assert_array_equal(got, np.r_[np.ones(25), np.zeros(50), np.full(25, 2.0)])
    np.testing.assert_array_equal(w.take(11.4, 11.7), np.r_[np.full(10, 2.0), np.zeros(20)])
    w.append(np.full(150, 3.0, np.float32))     # past keep_s: the oldest samples go
    assert w.end_s == pytest.approx(13.0) and w.t0 == pytest.approx(11.0)
    np.testing.assert_array_equal(w.take(10.0, 11.0), np.zeros(100))
    w.sync(1.0)                                  # timestamps jumped back: start over
    w.append(np.ones(10, np.float32))
    assert w.t0 == 1.0 and w.end_s == pytest.approx(1.1)
