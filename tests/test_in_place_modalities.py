"""`out=` in the modality functions and `Pipeline.process(into=...)`: an input made in a view
handed in (a ring slot's, producer/slot_fill.py) is the same array, value for value, as the
one made without, and it IS that view; a view that does not fit is left alone."""
from __future__ import annotations

import numpy as np
import pytest

from producer.dataset import index_dataset
from producer.modalities import audio, lidar, radar, unknown
from producer.modalities.audio import AudioConfig
from producer.modalities.lidar import BevConfig
from producer.modalities.radar import RadarConfig
from producer.pipeline import Pipeline, PipelineConfig
from producer.synth import make_dataset


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("inplace") / "ds", per_class={"train": 2},
                        size=(32, 24), clip_seconds=0.5)
    return [s for s in index_dataset(root).samples if s.split == "train"]


def _views_like(arrays: dict) -> dict:
    """Fresh views into one block, laid out like `arrays` (what a slot's views are)."""
    total = sum(a.nbytes for a in arrays.values())
    block = np.full(total, 0xAB, np.uint8)  # garbage: every byte must be written
    out, pos = {}, 0
    for name, a in arrays.items():
        out[name] = block[pos:pos + a.nbytes].view(a.dtype).reshape(a.shape)
        pos += a.nbytes
    return out


@pytest.mark.parametrize("method", ["range_doppler", "range_azimuth"])
def test_the_pipeline_makes_every_input_in_the_views_handed_in(samples, method):
    p = Pipeline(PipelineConfig(clip_frames=4, methods={"radar": method}))
    for sample in samples[:2]:  # one with the imu's metadata shape, one without (synth.py)
        want = p.process(sample)
        into = _views_like(want)
        got = p.process(sample, None, into)
        assert list(got) == list(want)
        for name in want:
            assert got[name] is into[name], f"{name} was not made in its view"
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_a_view_of_another_shape_is_left_alone_and_the_input_made_apart(samples):
    p = Pipeline(PipelineConfig(clip_frames=4))
    want = p.process(samples[0])
    wrong = {name: np.zeros((1,) + a.shape, a.dtype) for name, a in want.items()}
    got = p.process(samples[0], None, wrong)
    for name in want:
        assert got[name] is not wrong[name]
        assert not wrong[name].any(), f"{name} wrote into a view that does not fit"
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def _made_into_out(fn, *args) -> None:
    """`fn(*args, out)` writes into a float32 `out` (NaN-filled first, so every element is
    seen written) and returns it, equal to what `fn(*args)` makes on its own."""
    want = fn(*args)
    out = np.full(want.shape, np.nan, np.float32)
    assert fn(*args, out) is out
    np.testing.assert_array_equal(out, want)


def test_log_mel_from_samples_computes_into_out():
    cfg = AudioConfig()
    rng = np.random.default_rng(0)
    x = rng.standard_normal(cfg.n_samples).astype(np.float32)
    _made_into_out(audio.log_mel_from_samples, x, cfg)


def test_lidar_bev_rasterises_into_out():
    cfg = BevConfig()
    pts = np.random.default_rng(1).uniform(-40, 40, (5000, 4)).astype(np.float32)
    pts[:, 2] = np.abs(pts[:, 2]) % 3 - 1.5
    pts[:, 3] = np.abs(pts[:, 3]) / 40
    _made_into_out(lidar.bev, pts, cfg)


def test_radar_points_bev_rasterises_into_out():
    cfg = RadarConfig()
    pts = np.random.default_rng(2).uniform(-30, 30, (800, 5)).astype(np.float32)
    _made_into_out(radar.points_bev, pts, cfg)


def test_an_unknown_float32_file_is_read_straight_into_out(tmp_path):
    data = np.arange(60, dtype=np.float32).reshape(10, 6)
    data[3, 2] = np.inf
    path = tmp_path / "imu.data"
    data.tofile(path)
    meta = {"imu": {"dtype": "float32", "shape": [10, 6]}}
    notes_a, notes_b = [], []
    want = unknown.load_unknown(path, meta, notes=notes_a)
    out = np.full((10, 6), np.nan, np.float32)
    assert unknown.load_unknown(path, meta, notes=notes_b, out=out) is out
    np.testing.assert_array_equal(out, want)
    assert notes_a == notes_b and "1 non-finite values set to 0" in notes_b[0]


def test_an_unknown_byte_profile_is_normalised_into_out(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(range(256)) * 7)
    want = unknown.load_unknown(path, None, 64)
    out = np.full(64, np.nan, np.float32)
    assert unknown.load_unknown(path, None, 64, out=out) is out
    np.testing.assert_array_equal(out, want)
