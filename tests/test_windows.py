"""Partial loading (issue 17): a window of a record read through the map touches only its own
pages, proven page by page with mincore on a shard evicted from the page cache; and `--tiles`
turns a large input into patch samples whose bytes read are a fraction of the record's."""
from __future__ import annotations

import ctypes
import mmap
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from producer.cache_writer import CacheWriter
from protocol import video_store as vs
from protocol.cache import CacheReader
from protocol.schema import SampleMeta, SampleSchema

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def resident_pages(path: Path) -> set[int]:
    """Page numbers of `path` in the page cache (mincore over a fresh map of the file)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
        try:
            vec = (ctypes.c_ubyte * ((size + PAGE - 1) // PAGE))()
            arr = np.frombuffer(mm, np.uint8)
            assert _libc.mincore(arr.ctypes.data, size, vec) == 0, ctypes.get_errno()
            out = {k for k in range(len(vec)) if vec[k] & 1}
            del arr
        finally:
            mm.close()
    return out


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.fixture
def big_cache(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    arrays = {"lidar": rng.standard_normal((3, 512, 1024), dtype=np.float32),  # a row = a page
              "recording": rng.integers(0, 256, (64, 64, 64), dtype=np.uint8),  # a frame = a page
              "label_vec": np.arange(4, dtype=np.float32)}
    with CacheWriter(tmp_path / "c", classes=["a"]) as w:
        w.add("train/a/0", "fp", "train", SampleSchema.from_arrays(arrays),
              SampleMeta(label=0), arrays)
        w.commit()
    return tmp_path / "c", arrays


def shard_of(cache: Path) -> Path:
    return next(iter(sorted(cache.glob("v*/shard-*.bin"))))


def test_a_crop_of_a_cold_grid_reads_exactly_its_own_pages(big_cache):
    cache, arrays = big_cache
    shard = shard_of(cache)
    evict(shard)
    assert not resident_pages(shard), "the page cache did not drop the shard"
    r = CacheReader(cache)
    out = r.read_window_into(0, "lidar", (slice(None), slice(100, 164), slice(256, 320)))
    np.testing.assert_array_equal(out, arrays["lidar"][:, 100:164, 256:320])
    schema = r.schema(0)
    start = schema.offset("lidar")  # the record is at offset 0 of the shard
    want = {(start + (c * 512 + y) * 1024 * 4 + 256 * 4) // PAGE
            for c in range(3) for y in range(100, 164)}
    got = resident_pages(shard)
    r.close()
    assert got == want and len(got) == 192  # 192 of the grid's 1536 pages
    assert len(got) * PAGE <= arrays["lidar"].nbytes // 8  # 768 KiB of a 6 MiB grid


def test_a_time_window_of_a_cold_recording_reads_only_its_frames(big_cache):
    cache, arrays = big_cache
    shard = shard_of(cache)
    evict(shard)
    r = CacheReader(cache)
    out = r.read_window_into(0, "recording", (slice(10, 13),))
    np.testing.assert_array_equal(out, arrays["recording"][10:13])
    start = r.schema(0).offset("recording")
    r.close()
    assert resident_pages(shard) == {(start + f * 4096) // PAGE for f in (10, 11, 12)}


def test_window_reads_of_warm_records_return_the_same_bytes(big_cache):
    cache, arrays = big_cache
    r = CacheReader(cache)
    out = np.empty((2, 8, 1024), np.float32)
    assert r.read_window_into(0, "lidar", ((1, 3), (0, 8)), out) is out
    np.testing.assert_array_equal(out, arrays["lidar"][1:3, :8])
    np.testing.assert_array_equal(r.read_window_into(0, "label_vec", ()), arrays["label_vec"])


@pytest.mark.parametrize("window, match", [
    ((slice(0, 4, 2),), "step 2"),
    ((slice(None), (500, 600)), r"500:600 is not inside 0:512"),
    ((0, 0, 0, 0), "4 dimensions"),
])
def test_a_window_outside_the_modality_is_refused_naming_it(big_cache, window, match):
    cache, _ = big_cache
    with pytest.raises(ValueError, match=match):
        CacheReader(cache).read_window_into(0, "lidar", window)


def test_windows_of_compressed_and_nv12_records_equal_the_decoded_clip(tmp_path):
    rng = np.random.default_rng(1)
    y = np.linspace(0, 200, 32, dtype=np.float32)
    clip = (y[None, None, :, None] + rng.integers(0, 20, (8, 3, 32, 48))).astype(np.uint8)
    arrays = {"video": clip, "vec": np.ones(5, np.float32)}
    schema = SampleSchema.from_arrays(arrays)
    with CacheWriter(tmp_path / "c", classes=["a"]) as w:
        for k, store in enumerate(("h264", "nv12")):
            stored, record = vs.encode_record(schema, arrays, vs.StoreSettings.for_store(store))
            w.add(f"train/a/{k}", "fp", "train", stored, SampleMeta(label=0), payload=record)
        w.commit()
    r = CacheReader(tmp_path / "c")
    decoded = r.view(0).arrays["video"]
    np.testing.assert_array_equal(r.read_window_into(0, "video", ((2, 5), (0, 3), (8, 16))),
                                  decoded[2:5, :, 8:16])
    np.testing.assert_array_equal(r.read_window_into(0, "vec", ()), arrays["vec"])
    planes = r.view(1).arrays["video"]
    np.testing.assert_array_equal(r.read_window_into(1, "video", ((2, 5),)), planes[2:5])
    with pytest.raises(ValueError, match="packed"):
        r.read_window_into(1, "video", ((2, 5), (0, 10)))


# --- tiles ----------------------------------------------------------------------------------

sys.path.insert(0, str(Path(__file__).parent))


def test_tile_positions_cover_every_pixel_with_an_edge_tile():
    from trainer.windows import TileSpec

    spec = TileSpec.parse("lidar=64x48/32")
    assert (spec.height, spec.width, spec.stride_h, spec.stride_w) == (64, 48, 32, 32)
    ys, xs = spec.positions(150, 100)
    assert sorted(set(ys.tolist())) == [0, 32, 64, 86] and sorted(set(xs.tolist())) == [0, 32, 52]
    assert TileSpec.parse("video=112").positions(100, 200)[0].size == 0  # too small: none
    with pytest.raises(ValueError, match="INPUT=HxW"):
        TileSpec.parse("lidar")


def test_tiles_are_patch_samples_that_read_only_their_bytes(big_cache):
    from trainer.windows import TiledReader, TileSpec

    cache, arrays = big_cache
    r = TiledReader(CacheReader(cache), TileSpec.parse("lidar=128x256"))
    assert len(r) == 4 * 4 and list(r.labels) == [0] * 16
    (sid, group), = r.schema_groups().items()
    schema = r.schema(0)
    assert schema.spec("lidar").shape == (3, 128, 256) and schema.schema_id == sid
    out = np.zeros((3, r.max_payload_nbytes), np.uint8)
    _, metas = r.read_batch_into(group[[0, 5, 15]], out)
    assert not metas.failed
    for row, j in enumerate((0, 5, 15)):
        _, y0, x0 = r.record_of(j)
        v = schema.views(out[row])
        np.testing.assert_array_equal(v["lidar"], arrays["lidar"][:, y0:y0 + 128, x0:x0 + 256])
        np.testing.assert_array_equal(v["recording"], arrays["recording"])
    assert r.bytes_read == 3 * sum(m.nbytes for m in schema.modalities)
    assert r.bytes_read < 3 * CacheReader(cache).schema(0).payload_nbytes / 4


def test_mm_trainer_trains_on_tiles_of_a_grid(tmp_path):
    from _trainer_data import build_cache

    from trainer.loop import Trainer, TrainConfig

    cache = build_cache(tmp_path / "c", n_train=24, n_val=6)
    tr = Trainer(TrainConfig(cache=cache, batch_size=8, steps=3, checkpoint_dir=tmp_path,
                             tiles="video=8x8"))
    try:
        assert len(tr.train_reader) == 24 * 4
        seen = set()
        real = tr._prepare

        def spy(b, train=True):
            inputs, labels = real(b, train)
            seen.add(tuple(inputs["video"].shape[1:]))
            return inputs, labels

        tr._prepare = spy
        while tr.step < 3:
            assert tr.step_once(timeout=10.0)
        assert tr.evaluate() is not None
    finally:
        tr.close()
    assert seen == {(2, 3, 8, 8)}


def test_mm_trainer_refuses_a_bad_tiles_spec_before_starting(big_cache, tmp_path):
    import subprocess

    cache, _ = big_cache
    mm_trainer = Path(sys.executable).parent / "mm-trainer"
    for spec, said in (("lidar", "expected INPUT=HxW"),
                       ("radar=8x8", "no record of")):
        p = subprocess.run([str(mm_trainer), "run", "--cache", str(cache), "--steps", "1",
                            "--checkpoint-dir", str(tmp_path), "--tiles", spec],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and said in p.stderr, p.stderr
