"""Compressed video in the disk cache (issue 17): mixed stores in one cache, the index saying
which record is which, format 1 caches still read, damaged records skipped by name.

The h264/hevc records are real: the synthetic dataset (H.264 files) run through
`run_preprocess` with `video_store`, i.e. decoded by the pipeline and encoded by libx264/libx265.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from producer.cache_writer import CacheWriter
from producer.pipeline import PipelineConfig
from producer.preprocess import run_preprocess
from protocol import video_store as vs
from protocol.cache import (FORMAT_VERSION, MANIFEST_FILE, CacheReader, compact_rows,
                            open_version)
from protocol.errors import CorruptRecord, SchemaError
from protocol.schema import SampleMeta, SampleSchema

FIXTURE_V1 = Path(__file__).resolve().parent / "data" / "cache_v1"
MM_PRODUCER = Path(sys.executable).parent / "mm-producer"


def psnr(a, b) -> float:
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


@pytest.fixture(scope="module")
def caches(synth_dataset, tmp_path_factory) -> dict[str, Path]:
    """The synthetic dataset's train+val preprocessed once per store (in-process workers)."""
    root = tmp_path_factory.mktemp("stores")
    out = {}
    for store in ("raw", "h264"):
        out[store] = root / store
        summary = run_preprocess(synth_dataset, out[store], PipelineConfig(video_store=store),
                                 workers=0, progress=False)
        assert not summary["rejected"]
    return out


def group(reader: CacheReader) -> np.ndarray:
    """The records of the reader's largest schema group (the synthetic set has two schemas:
    imu.data with and without its metadata shape)."""
    return max(reader.schema_groups().values(), key=len)


def batch(reader: CacheReader, idx) -> tuple[np.ndarray, object]:
    out = np.zeros((len(idx), reader.max_payload_nbytes), np.uint8)
    schema, metas = reader.read_batch_into(np.asarray(idx), out)
    return out, metas


def test_an_h264_cache_decodes_every_record_close_to_the_raw_cache(caches):
    raw, h264 = CacheReader(caches["raw"], "train"), CacheReader(caches["h264"], "train")
    assert h264.store_counts() == {"h264": len(h264)} and raw.store_counts() == {"raw": len(raw)}
    assert [h264.meta(i).source for i in range(len(h264))] == \
        [raw.meta(i).source for i in range(len(raw))]
    idx = group(raw)
    a, _ = batch(raw, idx)
    b, metas = batch(h264, idx)
    assert not metas.failed
    schema = raw.schema(int(idx[0]))
    for j in range(len(idx)):
        va, vb = schema.views(a[j]), schema.views(b[j])
        for name in schema.names:
            if name == "video":
                assert psnr(va[name], vb[name]) > 22.0  # noisy synthetic clips
            else:  # the other modalities are stored as they are
                np.testing.assert_array_equal(va[name], vb[name])
    video_bytes = schema.spec("video").nbytes
    rest = schema.payload_nbytes - video_bytes
    for i in idx:  # the clip itself at least 10x smaller (the record keeps lidar, audio ...)
        assert (h264.stored_nbytes(i) - rest) * 10 <= video_bytes


def test_one_cache_mixes_stores_and_the_index_says_which_record_is_which(tmp_path, caches):
    src = CacheReader(caches["raw"], "train")
    classes = src.classes
    picked = group(src)[:6]
    schema = src.schema(int(picked[0]))
    with CacheWriter(tmp_path / "mixed", classes=classes) as w:
        for i, store in enumerate(["raw", "h264", "hevc", "nv12", "h264", "raw"]):
            sample = src.view(int(picked[i]))
            stored, record = vs.encode_record(schema, sample.arrays,
                                              vs.StoreSettings.for_store(store))
            w.add(f"train/x/{i}", "fp", "train", stored, sample.meta, payload=record)
        summary = w.commit()
    assert summary.stores == {"raw": 2, "h264": 2, "hevc": 1, "nv12": 1}
    manifest = json.loads((tmp_path / "mixed" / "v000001" / MANIFEST_FILE).read_text())
    assert manifest["format_version"] == FORMAT_VERSION == 2 and manifest["stores"] == summary.stores
    r = CacheReader(tmp_path / "mixed")
    assert [r.store(i) for i in range(len(r))] == ["raw", "h264", "hevc", "nv12", "h264", "raw"]
    groups = r.schema_groups()
    assert sorted(len(g) for g in groups.values()) == [1, 5]  # nv12 has its own (packed) schema
    plain = groups[schema.schema_id]
    out, metas = batch(r, plain)  # raw and compressed records in one batch
    assert not metas.failed
    ref, _ = batch(src, picked[plain])
    for j in range(len(plain)):
        assert psnr(schema.views(out[j])["video"], schema.views(ref[j])["video"]) > 22.0
        np.testing.assert_array_equal(schema.views(out[j])["lidar"], schema.views(ref[j])["lidar"])
    nv12 = r.schema(int(next(iter(g for g in groups.values() if len(g) == 1))[0]))
    assert nv12.packed and nv12.unpacked() == schema


def test_a_cache_written_by_format_1_still_reads_and_carries_over(tmp_path):
    cache = tmp_path / "v1"
    shutil.copytree(FIXTURE_V1, cache)
    assert json.loads((cache / "v000001" / MANIFEST_FILE).read_text())["format_version"] == 1
    r = CacheReader(cache)
    assert len(r) == 4 and r.store_counts() == {"raw": 4} and r.splits == ["train", "val"]
    s = r.view(2)
    np.testing.assert_array_equal(s.arrays["vec"], np.arange(4, dtype=np.float32) + 2)
    assert s.meta.source == "train/a/0002" and s.meta.label == 0
    out, metas = batch(CacheReader(cache, "train"), [0, 1, 2])
    assert not metas.failed and list(metas.label) == [0, 1, 0]
    # the next writer (format 2) carries the format 1 records over byte for byte
    with CacheWriter(cache, classes=["a", "b"], config_hash="format-1-fixture") as w:
        for i, key in enumerate(["train/a/0000", "train/b/0001", "train/a/0002", "val/b/0003"]):
            assert w.keep_if_unchanged(key, f"fp{i}")
        w.commit()
    v2 = open_version(cache)
    assert v2.manifest["format_version"] == 2 and v2.number == 2
    np.testing.assert_array_equal(CacheReader(cache).view(2).arrays["video"], s.arrays["video"])


def corrupt_record(cache: Path, reader: CacheReader, i: int) -> Path:
    """Flip bytes in the middle of record i's video packets, in its shard file."""
    shard = reader._vdir / f"shard-{int(reader._shard[i]):05d}.bin"
    _, off = vs.rest_layout(reader.schema(i))
    start = int(reader._offset[i]) + off
    blob = shard.read_bytes()[start: int(reader._offset[i]) + reader.stored_nbytes(i)]
    pos = start + vs.blob_info(blob)[-1] + 20  # past the header and sizes: packet bytes
    with open(shard, "r+b") as f:
        f.seek(pos)
        data = f.read(16)
        f.seek(pos)
        f.write(bytes(b ^ 0x5A for b in data))
    return shard


def test_a_corrupt_h264_record_is_reported_by_record_and_file_and_the_rest_of_the_batch_reads(
        caches, tmp_path):
    cache = tmp_path / "h264"
    shutil.copytree(caches["h264"], cache)
    r = CacheReader(cache, "train")
    idx = group(r)
    bad = int(idx[3])
    shard = corrupt_record(cache, r, bad)
    out, metas = batch(r, idx)
    assert [(f.row, f.record) for f in metas.failed] == [(3, bad)]
    err = metas.failed[0].error
    assert isinstance(err, CorruptRecord) and str(shard) in str(err)
    assert r.meta(bad).source in str(err) and "CRC" in str(err)
    ref, _ = batch(CacheReader(caches["h264"], "train"), idx)
    good = [j for j in range(len(idx)) if j != 3]
    np.testing.assert_array_equal(out[good], ref[good])
    with pytest.raises(CorruptRecord, match=f"record {bad} "):
        r.read_into(bad, np.zeros(r.max_payload_nbytes, np.uint8))
    labels = metas.label.copy()
    keep = compact_rows(out, len(idx), metas.failed, extra=(labels,))
    assert len(keep) == len(idx) - 1 and 3 not in keep.tolist()
    np.testing.assert_array_equal(out[: len(keep)], ref[keep])
    np.testing.assert_array_equal(labels[: len(keep)], metas.label[keep])


def test_cold_compressed_records_are_read_from_the_file_and_decode(caches, tmp_path):
    cache = tmp_path / "h264"
    shutil.copytree(caches["h264"], cache)
    for p in cache.rglob("shard-*.bin"):  # out of the page cache: the pread path
        fd = os.open(p, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    r = CacheReader(cache, "train", decode_threads=2)
    out, metas = batch(r, group(r))
    assert not metas.failed and metas.cold > 0
    ref, _ = batch(CacheReader(caches["h264"], "train"), group(r))
    np.testing.assert_array_equal(out, ref)


def test_a_forked_worker_decodes_with_its_own_threads(caches):
    r = CacheReader(caches["h264"], "train", decode_threads=2)
    ref, _ = batch(r, group(r))  # the parent's pool and decoders exist now
    code = os.fork()
    if code == 0:  # child: must not use the parent's (thread-less) pool
        try:
            out, metas = batch(r, group(r))
            os._exit(0 if not metas.failed and np.array_equal(out, ref) else 3)
        except BaseException:
            os._exit(4)
    _, status = os.waitpid(code, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_the_writer_refuses_bytes_that_are_no_record_of_the_schema(tmp_path):
    schema = SampleSchema.from_arrays({"video": np.zeros((2, 3, 8, 8), np.uint8)})
    with CacheWriter(tmp_path / "c", classes=["a"]) as w:
        with pytest.raises(SchemaError, match="train/a/0.*packs to 384.*magic"):
            w.add("train/a/0", "fp", "train", schema, SampleMeta(label=0), payload=b"x" * 100)


def test_preprocess_video_store_is_in_the_config_hash_so_another_store_redoes_records(
        synth_dataset, tmp_path):
    raw = PipelineConfig()
    assert "video_store" not in raw.to_dict()  # raw caches made before stores keep their hash
    assert PipelineConfig(video_store="h264").config_hash() != raw.config_hash()
    cache = tmp_path / "c"
    cmd = [str(MM_PRODUCER), "preprocess", str(synth_dataset), "--cache", str(cache),
           "--split", "val", "--workers", "1", "--quiet", "--json"]

    def run(store: str) -> dict:
        p = subprocess.run(cmd + ["--video-store", store], capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout.strip().splitlines()[-1])

    first = run("hevc")
    assert first["stores"] == {"hevc": 6} and first["processed"] == 6
    assert run("hevc")["reused"] == 6
    again = run("nv12")
    assert again["processed"] == 6 and again["stores"] == {"nv12": 6}


def test_the_trainer_skips_counts_and_names_a_corrupt_record_and_trains_on(caches, tmp_path,
                                                                           caplog):
    import logging

    from trainer.loop import Trainer, TrainConfig

    cache = tmp_path / "h264"
    shutil.copytree(caches["h264"], cache)
    r = CacheReader(cache, "train")
    bad = int(group(r)[0])
    shard = corrupt_record(cache, r, bad)
    n_train = len(r)
    with caplog.at_level(logging.WARNING, logger="trainer.cache"):
        tr = Trainer(TrainConfig(cache=cache, batch_size=4, epochs=2, checkpoint_dir=tmp_path))
        try:
            while tr.step < tr.total_steps:
                assert tr.step_once(timeout=30.0)
            summary = tr.summary()
        finally:
            tr.close()
    assert summary["records_corrupt"] >= 1
    assert summary["samples_disk"] <= 2 * (n_train - 1) and summary["steps"] == tr.total_steps
    said = [rec.getMessage() for rec in caplog.records if "CRC" in rec.getMessage()]
    assert len(said) == 1 and str(shard) in said[0] and f"record {bad} " in said[0]


def test_dataloader_workers_drop_a_corrupt_record_and_the_parent_counts_it(caches, tmp_path):
    # In a fresh process: DataLoader workers fork from the loader thread, and this test process
    # has decoded video on its main thread (whose swscale context a forked child must never
    # free: producer/modalities/_fork.py); a trainer process decodes no source video.
    cache = tmp_path / "h264"
    shutil.copytree(caches["h264"], cache)
    r = CacheReader(cache, "train")
    corrupt_record(cache, r, int(group(r)[1]))
    script = textwrap.dedent(f"""
        import json
        from protocol.cache import CacheReader
        from trainer.prefetch import WorkerDiskLoader
        r = CacheReader({str(cache)!r}, "train")
        loader = WorkerDiskLoader(r, 4, workers=1, epochs=1, shuffle=False).start()
        got = 0
        while (b := loader.get(60.0)) is not None:
            got += b.n
            b.release()
        loader.close()
        print(json.dumps({{"got": got, "records": len(r), "corrupt": loader.stats.corrupt,
                          "exhausted": loader.exhausted}}))
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=240, cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["exhausted"] and out["corrupt"] == 1 and out["got"] == out["records"] - 1
    assert "CRC" in p.stderr  # the warning names it (logging's default stderr handler)


def test_raw_h264_and_nv12_caches_train_the_demo_video_to_the_same_accuracy_band(tmp_path):
    """The demo's synthetic clips (class = shape and colour), video only so that the store is
    what matters, trained the same way (seed, steps) from each store; val accuracy must be in
    one band: each at least 0.75 and within 2 of the 12 val clips of raw's."""
    from producer.synth import make_dataset

    from trainer.loop import Trainer, TrainConfig

    data = make_dataset(tmp_path / "ds", per_class={"train": 8, "val": 4}, seed=3, extras=False)
    accuracy = {}
    for store in ("raw", "h264", "nv12"):
        cache = tmp_path / store
        run_preprocess(data, cache, PipelineConfig(video_store=store, enabled={"video"}),
                       workers=0, progress=False)
        assert CacheReader(cache).store_counts() == {store: 36}
        tr = Trainer(TrainConfig(cache=cache, batch_size=8, steps=45, lr=3e-3, seed=0,
                                 checkpoint_dir=tmp_path / f"ck-{store}"))
        try:
            while tr.step < 45:
                assert tr.step_once(timeout=30.0)
            accuracy[store] = tr.evaluate()
        finally:
            tr.close()
    assert min(accuracy.values()) >= 0.75, accuracy
    assert all(abs(a - accuracy["raw"]) <= 2 / 12 + 1e-9 for a in accuracy.values()), accuracy
