"""The disk cache: format, CacheWriter (producer) and CacheReader (protocol), with real files,
real subprocesses killed with SIGKILL, and real forked readers."""
from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from producer.cache_writer import CacheWriter, fingerprint_files, hash_config
from protocol.cache import (
    CURRENT,
    FORMAT_VERSION,
    INDEX_FILE,
    MANIFEST_FILE,
    RECORD_ALIGN,
    CacheReader,
    shard_name,
    version_name,
)
from protocol.errors import (
    CacheCorrupt,
    CacheError,
    CacheLocked,
    CacheNotFound,
    SchemaError,
    VersionMismatch,
)
from protocol.schema import SampleMeta, SampleSchema

CLASSES = ["bike", "car", "walk"]
REPO = Path(__file__).resolve().parents[1]


def make_sample(kind: str, seed: int) -> dict[str, np.ndarray]:
    """Three schemas the pipeline really produces: a video clip, a float raster, a vector."""
    rng = np.random.default_rng(seed)
    if kind == "video":
        return {"video": rng.integers(0, 256, (4, 3, 24, 32), dtype=np.uint8)}
    if kind == "raster":
        return {"lidar": rng.standard_normal((3, 40, 40), dtype=np.float32),
                "audio": rng.standard_normal((1, 64, 101), dtype=np.float32)}
    return {"vec": rng.standard_normal(257).astype(np.float32)}


KINDS = ["video", "raster", "vector"]


def dataset(n: int = 12) -> list[dict]:
    """n samples over splits, classes and kinds; each with key, fingerprint and arrays."""
    out = []
    for i in range(n):
        split = ["train", "val", "test"][i % 3]
        label = i % len(CLASSES)
        kind = KINDS[(i // 3) % 3]
        out.append(dict(key=f"{split}/{CLASSES[label]}/s{i:03d}", fp=f"fp{i}", split=split,
                        label=label, kind=kind, arrays=make_sample(kind, i),
                        meta=SampleMeta(label=label, timestamp_ns=10**9 * i + 7, generation=i % 2,
                                        source=f"{split}/s{i:03d}/video.mp4", index=i)))
    return out


def write(cache, samples, *, config_hash="cfg", shard_bytes=1 << 30, use_payload=False):
    with CacheWriter(cache, classes=CLASSES, config_hash=config_hash,
                     shard_bytes=shard_bytes) as w:
        for s in samples:
            schema = SampleSchema.from_arrays(s["arrays"])
            if use_payload:  # as a worker process would hand it over
                w.add(s["key"], s["fp"], s["split"], schema, s["meta"],
                      payload=bytes(schema.pack(s["arrays"])))
            else:
                w.add(s["key"], s["fp"], s["split"], schema, s["meta"], s["arrays"])
        return w.commit()


def assert_reads_back(reader: CacheReader, samples: list[dict]) -> None:
    """Every record equals its sample exactly, through read_into and through view."""
    assert len(reader) == len(samples)
    buf = np.empty(reader.max_payload_nbytes, np.uint8)
    for i, s in enumerate(samples):
        schema, meta = reader.read_into(i, buf)
        assert meta == s["meta"]
        assert schema == SampleSchema.from_arrays(s["arrays"])
        for name, a in schema.views(buf).items():
            np.testing.assert_array_equal(a, s["arrays"][name])
        for name, a in reader.view(i).arrays.items():
            assert not a.flags.writeable  # views over a read-only map
            np.testing.assert_array_equal(a, s["arrays"][name])
    np.testing.assert_array_equal(reader.labels, [s["label"] for s in samples])


# --- round trip ----------------------------------------------------------------------------


@pytest.mark.parametrize("use_payload", [False, True], ids=["arrays", "packed_payload"])
def test_round_trip_of_several_schemas_across_splits_is_exact(tmp_path, use_payload):
    samples = dataset()
    summary = write(tmp_path / "c", samples, use_payload=use_payload)
    assert (summary.records, summary.written, summary.carried) == (12, 12, 0)
    assert summary.counts == {"train": 4, "val": 4, "test": 4}
    with CacheReader(tmp_path / "c") as r:
        assert r.classes == CLASSES and r.splits == ["train", "val", "test"]
        assert_reads_back(r, samples)
    for split in ("train", "val", "test"):
        with CacheReader(tmp_path / "c", split=split) as r:
            assert r.labels.dtype == np.int64
            assert_reads_back(r, [s for s in samples if s["split"] == split])


def test_schema_groups_partition_records_by_schema(tmp_path):
    samples = dataset()
    write(tmp_path / "c", samples)
    with CacheReader(tmp_path / "c") as r:
        groups = r.schema_groups()
        assert len(groups) == 3
        assert sorted(np.concatenate(list(groups.values())).tolist()) == list(range(len(r)))
        for sid, idx in groups.items():
            assert all(r.schema(int(i)).schema_id == sid for i in idx)


def test_read_batch_into_fills_rows_of_one_schema_and_refuses_mixed(tmp_path):
    samples = dataset()
    write(tmp_path / "c", samples)
    with CacheReader(tmp_path / "c") as r:
        sid, idx = next(iter(r.schema_groups().items()))
        out = np.zeros((len(idx), r.max_payload_nbytes), np.uint8)
        schema, metas = r.read_batch_into(idx, out)
        assert schema.schema_id == sid
        for row, i in enumerate(idx):
            assert metas[row] == samples[i]["meta"]
            for name, a in schema.views(out[row]).items():
                np.testing.assert_array_equal(a, samples[i]["arrays"][name])
        with pytest.raises(SchemaError, match="schema_groups"):
            r.read_batch_into([0, 3], out)  # sample 0 is video, 3 is raster


def test_read_into_refuses_a_small_readonly_or_strided_buffer(tmp_path):
    write(tmp_path / "c", dataset(3))
    with CacheReader(tmp_path / "c") as r:
        n = r.payload_nbytes(0)
        with pytest.raises(ValueError, match="needs"):
            r.read_into(0, np.empty(n - 1, np.uint8))
        with pytest.raises(ValueError, match="writable"):
            r.read_into(0, bytes(n))
        with pytest.raises(ValueError, match="contiguous"):
            r.read_into(0, np.empty(2 * n, np.uint8)[::2])  # a copy would silently lose data
        with pytest.raises(IndexError, match="out of range"):
            r.read_into(3, np.empty(n, np.uint8))
        r.read_into(0, bytearray(n))  # any writable buffer works


# --- layout ----------------------------------------------------------------------------------


def test_records_are_page_aligned_and_shards_are_page_multiples(tmp_path):
    write(tmp_path / "c", dataset())
    vdir = tmp_path / "c" / version_name(1)
    index = np.load(vdir / INDEX_FILE)
    assert np.all(index["offset"] % RECORD_ALIGN == 0)
    for shard in vdir.glob("shard-*.bin"):
        assert shard.stat().st_size % RECORD_ALIGN == 0
    # records do not overlap
    order = np.lexsort((index["offset"], index["shard"]))
    s, o, n = index["shard"][order], index["offset"][order], index["nbytes"][order]
    same = s[1:] == s[:-1]
    assert np.all(o[1:][same] >= (o + n)[:-1][same])


def test_tiny_shard_size_rolls_over_and_everything_reads_back(tmp_path):
    samples = dataset()
    # 40 KiB shards: the 36 KiB video records fit one per shard; the 45 KiB raster ones exceed
    # a shard and must get a shard of their own rather than fail.
    summary = write(tmp_path / "c", samples, shard_bytes=40 << 10)
    assert summary.shards >= 6
    vdir = tmp_path / "c" / version_name(1)
    assert sorted(p.name for p in vdir.glob("shard-*.bin")) == [
        shard_name(i) for i in range(summary.shards)]
    with CacheReader(tmp_path / "c") as r:
        assert_reads_back(r, samples)


@pytest.mark.parametrize("early", ["1", "0"], ids=["early_writeback", "all_at_commit"])
def test_the_disk_write_starts_while_records_are_still_added_and_changes_no_byte(
        tmp_path, monkeypatch, early):
    # The commit's fsync used to write the whole shard while nothing else ran; now the disk
    # starts on each WRITEBACK_EVERY bytes as they land (producer/writeback.py).
    from producer.writeback import WRITEBACK_ENV, WRITEBACK_EVERY, available

    monkeypatch.setenv(WRITEBACK_ENV, early)
    rng = np.random.default_rng(3)
    samples = [dict(key=f"train/bike/s{i:03d}", fp=f"fp{i}", split="train", label=0,
                    arrays={"lidar": rng.standard_normal((4, 256, 256), dtype=np.float32)},
                    meta=SampleMeta(label=0, index=i)) for i in range(12)]  # 1 MiB each
    with CacheWriter(tmp_path / "c", classes=CLASSES) as w:
        for s in samples:
            w.add(s["key"], s["fp"], s["split"], SampleSchema.from_arrays(s["arrays"]),
                  s["meta"], s["arrays"])
        if early == "1" and available():
            assert w.written_back >= WRITEBACK_EVERY
        else:
            assert w.written_back == 0
        w.commit()
    with CacheReader(tmp_path / "c") as r:
        assert_reads_back(r, samples)


def test_early_writeback_of_a_file_that_cannot_take_it_is_left_to_fsync():
    from producer.writeback import start_writeback

    rd, wr = os.pipe()
    try:
        assert start_writeback(wr, 0, 1 << 20) is False  # ESPIPE: said, not raised
        assert start_writeback(wr, 0, 0) is False
    finally:
        os.close(rd)
        os.close(wr)


def test_no_per_sample_files_in_a_version(tmp_path):
    write(tmp_path / "c", dataset(30))
    names = {p.name for p in (tmp_path / "c" / version_name(1)).iterdir()}
    assert names == {"shard-00000.bin", "index.npy", "schemas.json", "keys.json", "manifest.json"}
    schemas = json.loads((tmp_path / "c" / version_name(1) / "schemas.json").read_text())
    assert len(schemas) == 3  # once per distinct schema, not per sample


# --- incremental -----------------------------------------------------------------------------


def test_unchanged_keys_are_carried_over_bit_exactly_and_changed_ones_replaced(tmp_path):
    cache = tmp_path / "c"
    samples = dataset()
    write(cache, samples)
    changed = samples[4]
    changed.update(fp="fp4-new", arrays=make_sample(changed["kind"], 999))
    dropped = samples.pop(7)
    with CacheWriter(cache, classes=CLASSES, config_hash="cfg") as w:
        kept = []
        for s in samples:
            if w.keep_if_unchanged(s["key"], s["fp"]):
                kept.append(s["key"])
                continue
            w.add(s["key"], s["fp"], s["split"], SampleSchema.from_arrays(s["arrays"]),
                  s["meta"], s["arrays"])
        summary = w.commit()
    assert changed["key"] not in kept and dropped["key"] not in kept and len(kept) == 10
    assert (summary.version, summary.carried, summary.written, summary.removed_keys) == (2, 10, 1, 1)
    with CacheReader(cache) as r:
        assert r.version == 2
        # records follow call order: the replaced sample is where it was added
        assert_reads_back(r, samples)


def test_carried_records_keep_their_exact_payload_bytes(tmp_path):
    cache = tmp_path / "c"
    samples = dataset(6)
    write(cache, samples)
    with CacheReader(cache) as r:
        before = [bytes(r.view(i).arrays[r.schema(i).names[0]].tobytes()) for i in range(len(r))]
    with CacheWriter(cache, classes=CLASSES, config_hash="cfg", shard_bytes=16 << 10) as w:
        assert all(w.keep_if_unchanged(s["key"], s["fp"]) for s in samples)
        w.commit()
    with CacheReader(cache) as r:
        after = [bytes(r.view(i).arrays[r.schema(i).names[0]].tobytes()) for i in range(len(r))]
        assert_reads_back(r, samples)
    assert before == after


@pytest.mark.parametrize("change", ["config", "classes"])
def test_new_config_or_classes_redo_every_sample(tmp_path, change):
    cache = tmp_path / "c"
    samples = dataset(3)
    write(cache, samples)
    classes = CLASSES + ["zebra"] if change == "classes" else CLASSES
    cfg = "other" if change == "config" else "cfg"
    with CacheWriter(cache, classes=classes, config_hash=cfg) as w:
        assert not any(w.unchanged(s["key"], s["fp"]) for s in samples)


def test_a_key_is_not_unchanged_once_written_in_this_run(tmp_path):
    cache = tmp_path / "c"
    samples = dataset(1)
    write(cache, samples)
    with CacheWriter(cache, classes=CLASSES, config_hash="cfg") as w:
        assert w.keep_if_unchanged(samples[0]["key"], "fp0")
        assert not w.unchanged(samples[0]["key"], "fp0")
        with pytest.raises(CacheError, match="already written"):
            w.carry_over(samples[0]["key"])


def test_fingerprint_follows_file_size_and_mtime_and_config_hash_is_stable(tmp_path):
    f = tmp_path / "video.mp4"
    f.write_bytes(b"abc")
    fp = fingerprint_files([f])
    assert fingerprint_files([f]) == fp
    os.utime(f, ns=(1, 10**18))
    assert fingerprint_files([f]) != fp
    assert hash_config({"a": 1, "b": [2]}) == hash_config({"b": [2], "a": 1})
    assert hash_config({"a": 1}) != hash_config({"a": 2})


def test_keep_one_prunes_older_versions(tmp_path):
    cache = tmp_path / "c"
    for n in range(3):
        write(cache, dataset(2), config_hash=f"c{n}")
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith("v")) == [
        version_name(2), version_name(3)]


def test_open_reader_keeps_reading_its_version_after_commit_and_prune(tmp_path):
    cache = tmp_path / "c"
    old = dataset(3)
    write(cache, old)
    r = CacheReader(cache)
    for n in range(2):  # v1 is pruned by the second commit
        write(cache, dataset(5), config_hash=f"new{n}")
    assert not (cache / version_name(1)).exists()
    assert_reads_back(r, old)  # its descriptors hold the unlinked shard
    r.close()


# --- atomicity -------------------------------------------------------------------------------

_KILLED_WRITER = textwrap.dedent("""
    import sys, numpy as np
    from producer.cache_writer import CacheWriter
    from protocol.schema import SampleSchema, SampleMeta
    w = CacheWriter(sys.argv[1], classes=["bike", "car", "walk"], config_hash="cfg")
    a = {"x": np.ones((256, 256), np.float32)}
    for i in range(20):
        w.add(f"train/bike/k{i}", "f", "train", SampleSchema.from_arrays(a), SampleMeta(label=0), a)
    print("added", flush=True)
    sys.stdin.read()   # held here until SIGKILLed
""")


def test_killed_writer_leaves_previous_version_readable_and_next_writer_cleans_up(tmp_path):
    cache = tmp_path / "c"
    samples = dataset()
    write(cache, samples)
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(cache)], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "added"
        # The half-written version is on disk, with data, when the writer dies.
        assert (cache / version_name(2) / shard_name(0)).stat().st_size > 0
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (cache / CURRENT).read_text().strip() == version_name(1)
    with CacheReader(cache) as r:
        assert r.version == 1
        assert_reads_back(r, samples)
    # The next writer gets the lock the dead one held, and removes its leftover.
    with CacheWriter(cache, classes=CLASSES, config_hash="cfg") as w:
        assert w.version == 2 and not (cache / version_name(2) / shard_name(0)).exists()
        assert all(w.keep_if_unchanged(s["key"], s["fp"]) for s in samples)
        w.commit()
    with CacheReader(cache) as r:
        assert r.version == 2
        assert_reads_back(r, samples)


def test_exception_inside_writer_block_leaves_previous_version(tmp_path):
    cache = tmp_path / "c"
    samples = dataset(3)
    write(cache, samples)
    with pytest.raises(RuntimeError):
        with CacheWriter(cache, classes=CLASSES, config_hash="cfg") as w:
            w.add("train/bike/x", "f", "train", SampleSchema.from_arrays(samples[0]["arrays"]),
                  SampleMeta(label=0), samples[0]["arrays"])
            raise RuntimeError("decode failed")
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith("v")) == [version_name(1)]
    with CacheReader(cache) as r:
        assert_reads_back(r, samples)


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    with CacheWriter(tmp_path / "c", classes=CLASSES) as w:
        with pytest.raises(CacheLocked, match=r"\.lock"):
            CacheWriter(tmp_path / "c", classes=CLASSES)
        w.commit()
    CacheWriter(tmp_path / "c", classes=CLASSES).abort()  # free again after commit


def test_first_write_interrupted_leaves_no_cache_and_a_clear_error(tmp_path):
    w = CacheWriter(tmp_path / "c", classes=CLASSES)
    w.add("train/bike/a", "f", "train", SampleSchema.from_arrays(make_sample("vector", 0)),
          SampleMeta(label=0), make_sample("vector", 0))
    # no commit: a reader sees no cache yet
    with pytest.raises(CacheNotFound, match="mm-producer preprocess DATASET --cache"):
        CacheReader(tmp_path / "c")
    w.abort()


# --- bad input -------------------------------------------------------------------------------


def test_add_rejects_wrong_payload_size_wrong_arrays_and_bad_label(tmp_path):
    arrays = make_sample("vector", 0)
    schema = SampleSchema.from_arrays(arrays)
    with CacheWriter(tmp_path / "c", classes=CLASSES) as w:
        with pytest.raises(SchemaError, match="payload of 10 bytes"):
            w.add("k", "f", "train", schema, SampleMeta(label=0), payload=bytes(10))
        with pytest.raises(SchemaError, match="vec"):
            w.add("k", "f", "train", schema, SampleMeta(label=0),
                  {"vec": arrays["vec"].astype(np.float64)})
        with pytest.raises(ValueError, match="label 3"):
            w.add("k", "f", "train", schema, SampleMeta(label=3), arrays)
        with pytest.raises(TypeError, match="exactly one"):
            w.add("k", "f", "train", schema, SampleMeta(label=0))
        w.add("k", "f", "train", schema, SampleMeta(label=0), arrays)  # the good one still goes in
        assert w.commit().records == 1


def test_missing_directory_error_names_it_and_says_how_to_create_it(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(CacheNotFound) as e:
        CacheReader(missing)
    assert str(missing) in str(e.value)
    assert f"mm-producer preprocess DATASET --cache {missing}" in str(e.value)


def test_unknown_split_names_the_splits_the_cache_has(tmp_path):
    write(tmp_path / "c", dataset(3))
    with pytest.raises(CacheError, match=r"no split 'holdout'.*\['train', 'val', 'test'\]"):
        CacheReader(tmp_path / "c", split="holdout")


def test_other_format_version_raises_version_mismatch_naming_both(tmp_path):
    write(tmp_path / "c", dataset(3))
    mpath = tmp_path / "c" / version_name(1) / MANIFEST_FILE
    manifest = json.loads(mpath.read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(VersionMismatch) as e:
        CacheReader(tmp_path / "c")
    assert f"version {FORMAT_VERSION + 1}" in str(e.value)
    assert f"version {FORMAT_VERSION}" in str(e.value)
    assert str(tmp_path / "c") in str(e.value)


def _garble_current(v: Path) -> Path:
    (v.parent / CURRENT).write_text("latest please\n")
    return v.parent / CURRENT


def _garble_manifest(v: Path) -> Path:
    (v / MANIFEST_FILE).write_bytes(b"\x00\x01garbage")
    return v / MANIFEST_FILE


def _wrong_magic(v: Path) -> Path:
    m = json.loads((v / MANIFEST_FILE).read_text())
    m["magic"] = "something-else"
    (v / MANIFEST_FILE).write_text(json.dumps(m))
    return v / MANIFEST_FILE


def _garble_index(v: Path) -> Path:
    (v / INDEX_FILE).write_bytes(b"not numpy at all")
    return v / INDEX_FILE


def _truncate_shard(v: Path) -> Path:
    with open(v / shard_name(0), "r+b") as f:
        f.truncate(4096)
    return v / shard_name(0)


def _drop_schemas(v: Path) -> Path:
    (v / "schemas.json").write_text("{}")
    return v / INDEX_FILE  # the index names a schema that is gone


@pytest.mark.parametrize("damage", [_garble_current, _garble_manifest, _wrong_magic,
                                    _garble_index, _truncate_shard, _drop_schemas])
def test_damaged_cache_gives_cache_corrupt_naming_the_file(tmp_path, damage):
    write(tmp_path / "c", dataset(6))
    path = damage(tmp_path / "c" / version_name(1))
    with pytest.raises(CacheCorrupt) as e:
        CacheReader(tmp_path / "c")
    assert str(path) in str(e.value)


def test_writer_over_a_damaged_cache_rebuilds_it(tmp_path):
    samples = dataset(3)
    write(tmp_path / "c", samples)
    _garble_index(tmp_path / "c" / version_name(1))
    with CacheWriter(tmp_path / "c", classes=CLASSES, config_hash="cfg") as w:
        assert not w.unchanged(samples[0]["key"], samples[0]["fp"])  # nothing trusted
    write(tmp_path / "c", samples)
    with CacheReader(tmp_path / "c") as r:
        assert_reads_back(r, samples)


# --- processes -------------------------------------------------------------------------------


def _read_all_in_child(reader: CacheReader, queue) -> None:
    try:
        buf = np.empty(reader.max_payload_nbytes, np.uint8)
        digests = []
        for i in range(len(reader)):
            reader.read_into(i, buf)
            digests.append(bytes(buf[: reader.payload_nbytes(i)]).hex()[:64] +
                           str(int(buf[: reader.payload_nbytes(i)].sum())))
        queue.put((os.getpid(), digests))
    except BaseException as e:  # report, don't hang the parent
        queue.put((os.getpid(), repr(e)))


def _expected_digests(samples) -> list[str]:
    out = []
    for s in samples:
        b = np.frombuffer(SampleSchema.from_arrays(s["arrays"]).pack(s["arrays"]), np.uint8)
        out.append(bytes(b).hex()[:64] + str(int(b.sum())))
    return out


def test_reader_after_fork_reads_correctly(tmp_path):
    samples = dataset()
    write(tmp_path / "c", samples, shard_bytes=64 << 10)
    ctx = multiprocessing.get_context("fork")
    with CacheReader(tmp_path / "c") as r:
        assert_reads_back(r, samples)  # parent has mapped every shard before forking
        q = ctx.Queue()
        procs = [ctx.Process(target=_read_all_in_child, args=(r, q)) for _ in range(2)]
        for p in procs:
            p.start()
        results = [q.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
        for pid, digests in results:
            assert pid != os.getpid()
            assert digests == _expected_digests(samples)
        assert_reads_back(r, samples)  # the children closing their maps did not touch ours


def test_pickled_reader_reopens_the_same_version_and_split(tmp_path):
    samples = dataset()
    write(tmp_path / "c", samples)
    with CacheReader(tmp_path / "c", split="val") as r:
        blob = pickle.dumps(r)
    assert len(blob) < 1000  # the path and version, never the data
    write(tmp_path / "c", dataset(2), config_hash="newer")
    with pickle.loads(blob) as r2:
        assert (r2.version, r2.split) == (1, "val")
        assert_reads_back(r2, [s for s in samples if s["split"] == "val"])


def test_record_evicted_from_page_cache_is_read_from_the_file_with_the_same_bytes(tmp_path):
    # read_into copies from the map when the record's pages are cached, else preadv()s the file
    # (NOTE [one copy, two ways]); this drives the second path.
    samples = dataset(6)
    write(tmp_path / "c", samples)
    for shard in (tmp_path / "c" / version_name(1)).glob("shard-*.bin"):
        fd = os.open(shard, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # commit fsync'd: pages are clean
        os.close(fd)
    with CacheReader(tmp_path / "c") as r:
        if r._is_resident(r._record(0)):
            pytest.skip("this filesystem keeps pages cached despite POSIX_FADV_DONTNEED (tmpfs?)")
        assert_reads_back(r, samples)


def test_prefetch_accepts_any_order_and_refuses_indices_out_of_range(tmp_path):
    write(tmp_path / "c", dataset(6))
    with CacheReader(tmp_path / "c") as r:
        r.prefetch([5, 0, 0, 3])
        with pytest.raises(IndexError, match="0..5"):
            r.prefetch([6])


# --- batched reads (the trainer's data path) -------------------------------------------------


def video_samples(n: int) -> list[dict]:
    """n records of ONE schema (9 KiB video clips, 12 KiB apart on disk), all in train."""
    return [dict(key=f"train/car/v{i:03d}", fp=f"fp{i}", split="train", label=i % 3,
                 kind="video", arrays=make_sample("video", 100 + i),
                 meta=SampleMeta(label=i % 3, timestamp_ns=i * 1000 + 1, generation=i % 4,
                                 source=f"train/v{i:03d}", index=i))
            for i in range(n)]


def drop_from_page_cache(cache: Path) -> None:
    """Evict the (clean, unmapped) shard pages, so a reader opened next finds them cold."""
    for p in sorted(cache.glob("v*/shard-*.bin")):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def rows_for(reader: CacheReader, n: int, extra: int = 64) -> np.ndarray:
    return np.full((n, reader.max_payload_nbytes + extra), 0xAB, np.uint8)


def test_batched_read_equals_single_reads_across_shards_in_shuffled_order(tmp_path):
    samples = video_samples(40)
    summary = write(tmp_path / "c", samples, shard_bytes=64 << 10)  # 5 records a shard
    assert summary.shards >= 8
    idx = np.random.default_rng(3).permutation(40)[:33]
    idx[5] = idx[20]  # a record asked for twice lands in both rows
    with CacheReader(tmp_path / "c") as r:
        out = rows_for(r, len(idx))
        schema, metas = r.read_batch_into(idx, out)
        single = np.empty(r.max_payload_nbytes, np.uint8)
        n = schema.payload_nbytes
        assert len(metas) == len(idx)
        for row, i in enumerate(idx):
            _, meta = r.read_into(int(i), single)
            assert bytes(out[row, :n]) == bytes(single[:n])
            assert (out[row, n:] == 0xAB).all()  # nothing written past the payload
            assert metas[row] == meta == samples[i]["meta"]
            for name, a in schema.views(out[row]).items():
                np.testing.assert_array_equal(a, samples[i]["arrays"][name])
        np.testing.assert_array_equal(metas.generation, [samples[i]["meta"].generation for i in idx])
        np.testing.assert_array_equal(metas.label, r.labels[idx])
        assert metas[1:3] == [metas[1], metas[2]]


def test_cold_batched_read_is_exact_and_reads_back_to_back_records_in_one_call(tmp_path,
                                                                               monkeypatch):
    samples = video_samples(24)
    write(tmp_path / "c", samples, shard_bytes=128 << 10)  # 10 records a shard: 3 shards
    drop_from_page_cache(tmp_path / "c")
    calls = []
    real_preadv = os.preadv
    monkeypatch.setattr(os, "preadv", lambda *a: calls.append(a[2]) or real_preadv(*a))
    idx = np.random.default_rng(1).permutation(24)  # every record: runs of neighbours on disk
    with CacheReader(tmp_path / "c") as r:
        out = rows_for(r, len(idx))
        schema, metas = r.read_batch_into(idx, out)
        assert metas.cold > 0, "the shard pages were still cached after POSIX_FADV_DONTNEED"
        assert 0 < len(calls) < metas.cold  # coalesced: fewer reads than cold records
        for row, i in enumerate(idx):
            for name, a in schema.views(out[row]).items():
                np.testing.assert_array_equal(a, samples[i]["arrays"][name])
        _, again = r.read_batch_into(idx, out)  # now read in: served from the map
        assert again.cold == 0


def test_batched_read_fills_rows_of_a_strided_buffer(tmp_path):
    samples = video_samples(6)
    write(tmp_path / "c", samples)
    with CacheReader(tmp_path / "c") as r:
        big = np.zeros((6, r.max_payload_nbytes + 4096), np.uint8)
        out = big[:, : r.max_payload_nbytes]  # rows contiguous, the whole not
        assert not out.flags.c_contiguous
        schema, _ = r.read_batch_into([5, 0, 3, 1, 4, 2], out)
        for row, i in enumerate([5, 0, 3, 1, 4, 2]):
            for name, a in schema.views(out[row]).items():
                np.testing.assert_array_equal(a, samples[i]["arrays"][name])
        assert not big[:, r.max_payload_nbytes:].any()


def test_batched_read_refuses_bad_indices_buffers_and_a_closed_reader(tmp_path):
    write(tmp_path / "c", dataset())
    r = CacheReader(tmp_path / "c")
    vid = r.schema_groups()[r.schema(0).schema_id]
    n = r.payload_nbytes(0)
    with pytest.raises(SchemaError, match="schema_groups"):
        r.read_batch_into([0, 3], np.empty((2, r.max_payload_nbytes), np.uint8))
    with pytest.raises(IndexError, match="out of range"):
        r.read_batch_into([0, 12], np.empty((2, n), np.uint8))
    with pytest.raises(IndexError, match="out of range"):
        r.read_batch_into([-1], np.empty((1, n), np.uint8))
    with pytest.raises(ValueError, match="at least one"):
        r.read_batch_into([], np.empty((1, n), np.uint8))
    with pytest.raises(ValueError, match="needs"):
        r.read_batch_into(vid, np.empty((len(vid), n - 1), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        r.read_batch_into(vid, np.empty((len(vid) - 1, n), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        r.read_batch_into(vid, np.empty((len(vid), n), np.float32))
    with pytest.raises(ValueError, match="writable"):
        ro = np.empty((len(vid), n), np.uint8)
        ro.flags.writeable = False
        r.read_batch_into(vid, ro)
    r.close()
    with pytest.raises(CacheError, match="closed"):
        r.read_batch_into(vid, np.empty((len(vid), n), np.uint8))
