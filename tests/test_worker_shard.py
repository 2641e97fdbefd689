"""Preprocess workers write records into shard files of their own (producer/worker_shard.py);
the cache writer adopts them by index row, without copying a byte, and makes them shards at
commit. Real files, a real CacheWriter, read back through CacheReader."""
from __future__ import annotations

import numpy as np
import pytest

from producer.cache_writer import CacheWriter
from producer.worker_shard import WorkerShard
from protocol.cache import CacheReader
from protocol.errors import CacheError, SchemaError
from protocol.schema import SampleMeta, SampleSchema

CLASSES = ["a", "b"]


def _sample(i: int) -> dict[str, np.ndarray]:
    return {"lidar": np.full((3, 32, 32), i, np.float32), "imu": np.full(6, -i, np.float32)}


def _write_placed(w: CacheWriter, shard: WorkerShard, n: int, first: int = 0) -> None:
    for i in range(first, first + n):
        arrays = _sample(i)
        schema = SampleSchema.from_arrays(arrays)
        placed = shard.append(schema, schema.pack(arrays))
        w.add_placed(f"train/a/{i}", f"fp{i}", "train", schema, SampleMeta(label=0, index=i),
                     placed)


def test_records_a_worker_wrote_read_back_through_the_index_and_its_files_become_shards(tmp_path):
    with CacheWriter(tmp_path / "c", classes=CLASSES, shard_bytes=64 << 10) as w:
        shard = WorkerShard(w.worker_target)
        _write_placed(w, shard, 10)  # 12 KiB records in 64 KiB files: rolls over
        shard.close()
        arrays = _sample(99)  # and one the writer stores itself, in a shard of its own
        w.add("train/b/99", "fp99", "train", SampleSchema.from_arrays(arrays),
              SampleMeta(label=1, index=99), arrays)
        summary = w.commit()
    assert shard.files >= 2 and summary.shards == shard.files + 1
    version = tmp_path / "c" / (tmp_path / "c" / "CURRENT").read_text().strip()
    assert not list(version.glob("worker-*"))
    with CacheReader(tmp_path / "c") as r:
        assert len(r) == 11
        for i in range(10):
            got = r.view(i).arrays
            assert (got["lidar"] == i).all() and (got["imu"] == -i).all()
        assert (r.view(10).arrays["lidar"] == 99).all() and r.meta(10).label == 1


def test_a_worker_file_no_record_was_taken_from_is_removed_at_commit(tmp_path):
    # A worker killed before the parent stored its chunk leaves a file nobody adopted.
    with CacheWriter(tmp_path / "c", classes=CLASSES) as w:
        kept, orphan = WorkerShard(w.worker_target), WorkerShard(w.worker_target)
        _write_placed(w, kept, 2)
        arrays = _sample(7)
        orphan.append(SampleSchema.from_arrays(arrays), SampleSchema.from_arrays(arrays)
                      .pack(arrays))
        kept.close()
        orphan.close()
        w.commit()
    version = tmp_path / "c" / (tmp_path / "c" / "CURRENT").read_text().strip()
    assert sorted(p.name for p in version.iterdir() if p.name.startswith(("shard-", "worker-"))
                  ) == ["shard-00000.bin"]
    with CacheReader(tmp_path / "c") as r:
        assert len(r) == 2


def test_a_placed_record_outside_this_version_or_of_the_wrong_size_is_refused(tmp_path):
    with CacheWriter(tmp_path / "c", classes=CLASSES) as w:
        shard = WorkerShard(w.worker_target)
        arrays = _sample(1)
        schema = SampleSchema.from_arrays(arrays)
        placed = shard.append(schema, schema.pack(arrays))
        meta = SampleMeta(label=0, index=1)
        with pytest.raises(CacheError, match="no worker shard file of this version"):
            w.add_placed("k", "fp", "train", schema, meta, placed._replace(file="../CURRENT"))
        with pytest.raises(CacheError, match="no worker shard file"):
            w.add_placed("k", "fp", "train", schema, meta, placed._replace(file="worker-1-9.part"))
        with pytest.raises(SchemaError, match=f"packs to {schema.payload_nbytes}"):
            w.add_placed("k", "fp", "train", schema, meta, placed._replace(nbytes=12))
        shard.close()


def test_a_raw_record_written_from_the_arrays_is_byte_for_byte_the_packed_payload(tmp_path):
    # Gather-written from the pipeline's arrays (no pack into fresh memory first), padding
    # between the inputs included; an array not laid out as the schema says is left to pack.
    arrays = {"video": np.arange(3 * 5 * 7, dtype=np.uint8).reshape(1, 3, 5, 7),  # 105 bytes
              "imu": np.linspace(-1, 1, 6, dtype=np.float32)}  # at offset 128: a 23-byte gap
    schema = SampleSchema.from_arrays(arrays)
    with CacheWriter(tmp_path / "c", classes=CLASSES) as w:
        shard = WorkerShard(w.worker_target)
        placed = shard.append_arrays(schema, arrays)
        assert placed is not None and placed.nbytes == schema.payload_nbytes
        strided = {**arrays, "imu": np.linspace(-1, 1, 12, dtype=np.float32)[::2]}
        assert shard.append_arrays(schema, strided) is None
        w.add_placed("k", "fp", "train", schema, SampleMeta(label=0), placed)
        shard.close()
        written = (tmp_path / "c" / f"v{w.version:06d}" / placed.file).read_bytes()
        assert written[placed.offset:placed.offset + placed.nbytes] == bytes(schema.pack(arrays))
        w.commit()
