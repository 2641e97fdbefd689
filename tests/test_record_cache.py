"""Recording live samples into the disk cache (producer/recorder.py on CacheWriter): a new
atomic version = the previous one (hard-linked, not copied) + a new part; what made each
generation kept beside it; a preprocess re-run keeps the recorded part."""
from __future__ import annotations

import os

import numpy as np
import pytest

from producer.cache_writer import CacheWriter
from producer.generations import Generation
from producer.pipeline import PipelineConfig
from producer.preprocess import run_preprocess
from producer.recorder import Recorder
from protocol.cache import CacheReader
from protocol.errors import BadArgument
from protocol.schema import ModalitySpec, SampleMeta, SampleSchema

SCHEMA = SampleSchema((ModalitySpec("video", "uint8", (2, 1, 8, 8)),))


@pytest.fixture
def cache(synth_dataset, tmp_path):
    path = tmp_path / "cache"
    run_preprocess(synth_dataset, path, PipelineConfig(), splits=["val"], workers=0,
                   progress=False)
    return path


def _live(i: int, generation: int = 5, label: int = 1):
    meta = SampleMeta(label=label, timestamp_ns=10**18 + i, generation=generation,
                      source=f"cam@{i}.00s", index=i)
    return meta, {"video": np.full((2, 1, 8, 8), i, np.uint8)}


def _record(cache, classes, n=3, gen=Generation(5, PipelineConfig(filter="gray"),
                                                reason="filter gray"), split="train"):
    rec = Recorder.start(cache, split, "cams", classes)
    for i in range(n):
        meta, arrays = _live(i, gen.number)
        rec.offer(SCHEMA, meta, arrays, gen)
    return rec.stop()


def test_a_recording_is_a_new_version_with_the_old_records_and_the_live_part(cache):
    with CacheReader(cache) as before:
        old, classes, version = len(before), before.classes, before.version
    summary = _record(cache, tuple(classes))
    assert summary["version"] == version + 1 and summary["recorded"] == 3
    with CacheReader(cache) as r:
        assert len(r) == old + 3 and r.splits == ["val", "train"]
        live = [i for i in range(len(r)) if r.meta(i).generation == 5]
        assert [r.meta(i).source for i in live] == ["cam@0.00s", "cam@1.00s", "cam@2.00s"]
        assert [r.split_of(i) for i in live] == ["train"] * 3
        assert int(r.view(live[2]).arrays["video"][0, 0, 0, 0]) == 2 and r.meta(live[0]).label == 1
        assert r.generation_settings(5)["filter"] == "gray"
        assert r.generation_settings(5)["reason"] == "filter gray"
        assert r.generation_settings(0)["reason"] == "mm-producer preprocess"


def test_the_previous_shards_are_linked_not_copied(cache):
    with CacheReader(cache) as r:
        old_shard = r.directory / f"v{r.version:06d}" / "shard-00000.bin"
        inode = os.stat(old_shard).st_ino
    _record(cache, ())
    with CacheReader(cache) as r:
        assert os.stat(r.directory / f"v{r.version:06d}" / "shard-00000.bin").st_ino == inode


def test_a_recording_that_is_not_stopped_leaves_the_cache_as_it_was(cache):
    with CacheReader(cache) as r:
        version, n = r.version, len(r)
    rec = Recorder.start(cache, "train", "cams", ())
    meta, arrays = _live(0)
    rec.offer(SCHEMA, meta, arrays, Generation(5, PipelineConfig()))
    rec.abort()
    with CacheReader(cache) as r:
        assert (r.version, len(r)) == (version, n)


def test_a_producer_with_other_classes_is_refused_naming_both(cache):
    with pytest.raises(BadArgument, match="not the cache's"):
        Recorder.start(cache, "train", "cams", ("dog", "cat"))


def test_a_label_outside_the_caches_classes_is_recorded_unlabelled_and_counted(cache):
    rec = Recorder.start(cache, "train", "cams", ())
    meta, arrays = _live(0, label=99)
    rec.offer(SCHEMA, meta, arrays, Generation(5, PipelineConfig()))
    summary = rec.stop()
    assert summary["unlabelled_outside_classes"] == 1
    with CacheReader(cache, "train") as r:
        assert r.meta(0).label == -1


def test_a_preprocess_rerun_keeps_the_recorded_part(synth_dataset, cache):
    _record(cache, ())
    run_preprocess(synth_dataset, cache, PipelineConfig(filter="gray"), splits=["val"],
                   workers=0, progress=False)
    with CacheReader(cache, "train") as r:
        assert len(r) == 3 and {r.meta(i).generation for i in range(3)} == {5}
        assert r.generation_settings(5)["filter"] == "gray"


def test_carry_all_must_come_first(cache):
    with CacheReader(cache) as r:
        classes = r.classes
    with CacheWriter(cache, classes=classes) as w:
        meta, arrays = _live(0)
        w.add("k", "", "train", SCHEMA, meta, arrays)
        with pytest.raises(Exception, match="carry_all"):
            w.carry_all()


def test_a_recording_keeps_the_compressed_records_store_and_checksum(synth_dataset, tmp_path):
    """carry_all takes over every index field of the previous version, the video store and the
    record checksum (cache format 2) included: an h264 record read back after a recording
    decodes, it is not mistaken for a raw one."""
    path = tmp_path / "cache"
    run_preprocess(synth_dataset, path, PipelineConfig(video_store="h264"), splits=["val"],
                   workers=0, progress=False)
    with CacheReader(path) as r:
        before = r.store_counts()
        crcs = np.load(r.directory / f"v{r.version:06d}" / "index.npy")["crc32"]
    assert before.get("h264", 0) > 0
    _record(path, ())
    with CacheReader(path) as r:
        assert r.store_counts()["h264"] == before["h264"]
        now = np.load(r.directory / f"v{r.version:06d}" / "index.npy")["crc32"]
        assert now[:len(crcs)].tolist() == crcs.tolist() and crcs.any()
        assert r.view(0).arrays["video"].size > 0
