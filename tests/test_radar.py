"""Radar: ADC cubes (npy quirk, DCA1000 layout, metadata shapes), range-Doppler/azimuth maps,
point-list BEV, and the bad inputs each loader must name."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from producer.modalities import radar
from producer.synth import REAL_DIR
from protocol.errors import InputError

REAL = REAL_DIR
NPY = REAL / "openradar_adc_frame_128x8x128.npy"
DCA = REAL / "openradar_adc_frame_dca1000_layout.bin"
VOD = REAL / "vod_radar_00549.bin"  # research-only licence: read in place, never copied
NPY_META = {"radar": {"layout": "chirp_rx_sample"}}
DCA_META = {"radar": {"format": "adc", "layout": "dca1000", "dtype": "complex_int16",
                      "shape": [256, 128, 4], "tx": 2}}


def need(path: Path):
    return pytest.mark.skipif(not path.exists(), reason=f"real recording {path} not present")


def target_cube(chirps=64, samples=128, rx=4, range_bin=40, doppler_bin=10, noise=0.01):
    """One point target: beat frequency range_bin/samples, Doppler doppler_bin/chirps cycles."""
    c = np.arange(chirps)[:, None, None]
    s = np.arange(samples)[None, :, None]
    k = np.arange(rx)[None, None, :]
    phase = 2 * np.pi * (range_bin * s / samples + doppler_bin * c / chirps + 0.3 * k)
    rng = np.random.default_rng(1)
    n = noise * (rng.standard_normal((chirps, samples, rx))
                 + 1j * rng.standard_normal((chirps, samples, rx)))
    return (np.exp(1j * phase) + n).astype(np.complex64)


# --- range-Doppler / range-azimuth -------------------------------------------------------------


@pytest.mark.parametrize("doppler_bin", [10, -7, 0])
def test_range_doppler_peaks_at_the_target_range_and_doppler_cell(doppler_bin):
    cube = target_cube(range_bin=40, doppler_bin=doppler_bin)
    cfg = radar.RadarConfig(out_shape=(64, 32))
    out = radar.range_doppler(cube, cfg)
    assert out.shape == (1, 64, 32) and out.dtype == np.float32
    # 128 range bins -> 64 rows; 64 Doppler bins (zero in the middle) -> 32 columns.
    row, col = np.unravel_index(out[0].argmax(), out[0].shape)
    assert (row, col) == (40 // 2, (doppler_bin + 32) // 2)
    assert out.max() == 1.0 and out.min() >= 0.0


def test_range_doppler_shape_is_fixed_by_the_config_for_any_cube():
    cfg = radar.RadarConfig(out_shape=(48, 40))
    for shape in [(16, 32, 1), (128, 256, 4), (7, 9, 3)]:
        assert radar.range_doppler(target_cube(*shape, range_bin=2, doppler_bin=1),
                                   cfg).shape == (1, 48, 40)


def test_range_doppler_of_real_int16_cube_keeps_only_positive_range_bins():
    # A real-sampled ADC has a mirrored spectrum: only samples/2 range bins carry information.
    s = np.arange(128)
    cube = np.cos(2 * np.pi * 20 * s / 128)[None, :, None].repeat(32, 0).repeat(2, 2)
    out = radar.range_doppler(cube.astype(np.float32), radar.RadarConfig(out_shape=(64, 32)))
    row, col = np.unravel_index(out[0].argmax(), out[0].shape)
    assert (row, col) == (20, 16)


@pytest.mark.parametrize("dtype, write", [
    ("int16", lambda p, c: p.write_bytes(np.round(c * 1000).astype("<i2").tobytes())),
    ("float32", lambda p, c: p.write_bytes(c.astype("<f4").tobytes())),
    (None, lambda p, c: np.save(p, np.round(c * 1000).astype(np.int16))),  # a real .npy
])
def test_a_real_sampled_cube_read_from_a_file_peaks_at_its_one_range_bin(tmp_path, dtype, write):
    # The file path must give the same map as the array: a real cube kept real (cast to
    # complex it showed the target twice, at bins 10 and 54: mirrored, half the resolution).
    s = np.arange(128)
    cube = np.cos(2 * np.pi * 20 * s / 128)[None, :, None].repeat(32, 0).repeat(2, 2)
    path = tmp_path / ("radar.npy" if dtype is None else "radar.bin")
    write(path, cube)
    meta = {} if dtype is None else {"radar": {"dtype": dtype, "shape": [32, 128, 2]}}
    loaded = radar.load_adc(path, meta)
    assert loaded.dtype == np.float32 and loaded.shape == (32, 128, 2)
    out = radar.process(path, "range_doppler", radar.RadarConfig(out_shape=(64, 32)), meta)
    row, col = np.unravel_index(out[0].argmax(), out[0].shape)
    assert (row, col) == (20, 16)
    assert out[0, 44:].max() < 0.5  # no mirror image in the upper half


def test_unnormalised_range_doppler_is_absolute_db():
    cube = target_cube(noise=0.0)
    out = radar.range_doppler(cube, radar.RadarConfig(normalize=False, window="none",
                                                      out_shape=(128, 64)))
    # A unit target over 64 x 128 FFT points: power (64 * 128)^2 -> 20*log10(8192) dB.
    assert out.max() == pytest.approx(20 * np.log10(64 * 128), abs=0.01)


def test_range_azimuth_peaks_at_the_target_angle():
    chirps, samples, rx = 16, 64, 8
    s = np.arange(samples)[None, :, None]
    k = np.arange(rx)[None, None, :]
    cube = np.exp(2j * np.pi * (12 * s / samples + 0.25 * k)) * np.ones((chirps, 1, 1))
    out = radar.range_azimuth(cube.astype(np.complex64), radar.RadarConfig(out_shape=(64, 64)))
    row, col = np.unravel_index(out[0].argmax(), out[0].shape)
    assert row == 12 and col == 32 + 16  # 0.25 cycles per antenna -> +16 of 64 angle bins


def test_radar_config_rejects_unknown_window_and_lists_the_choices():
    with pytest.raises(ValueError, match="hann, hamming, blackman, none"):
        radar.RadarConfig(window="kaiser")


# --- ADC loading ---------------------------------------------------------------------------


@need(NPY)
def test_openradar_npy_unsigned_codes_become_signed_int16_and_say_so():
    notes: list[str] = []
    cube = radar.load_adc(NPY, NPY_META, notes)
    assert cube.shape == (128, 128, 8) and cube.dtype == np.complex64
    assert (cube.real.min(), cube.real.max()) == (-234, 202)
    assert (cube.imag.min(), cube.imag.max()) == (-265, 265)
    assert any("unsigned" in n for n in notes)


@need(NPY)
@need(DCA)
def test_dca1000_layout_decodes_bit_exactly_to_the_npy_frame():
    from_npy = radar.load_adc(NPY, NPY_META)
    from_dca = radar.load_adc(DCA, DCA_META)
    assert from_dca.shape == (128, 128, 8)
    np.testing.assert_array_equal(from_dca, from_npy)
    # The README's first 8 int16: I0 I1 Q0 Q1 I2 I3 Q2 Q3 of loop 0, TX0, RX0.
    np.testing.assert_array_equal(from_dca[0, :4, 0], [24 - 103j, 53 - 138j, -29 - 122j,
                                                       -53 - 141j])


@need(NPY)
def test_range_doppler_runs_on_the_real_frame():
    out = radar.process(NPY, "range_doppler", radar.RadarConfig(), NPY_META)
    assert out.shape == (1, 64, 64) and np.isfinite(out).all()
    assert out.max() == 1.0 and out.std() > 0.05  # a real scene, not a flat map
    assert radar.process(NPY, "range_azimuth", meta=NPY_META).shape == (1, 64, 64)


def test_complex_int16_chirp_sample_rx_bin_round_trips(tmp_path):
    cube = (np.arange(4 * 6 * 2) - 20).reshape(4, 6, 2)
    iq = np.stack([cube, -cube], axis=-1).astype("<i2")  # I, Q interleaved
    (tmp_path / "radar.bin").write_bytes(iq.tobytes())
    got = radar.load_adc(tmp_path / "radar.bin", {"radar": {"shape": [4, 6, 2]}})
    np.testing.assert_array_equal(got, cube - 1j * cube)


def test_cube_size_disagreeing_with_metadata_shape_names_file_shape_and_bytes(tmp_path):
    (tmp_path / "radar.bin").write_bytes(b"\0" * 1000)
    with pytest.raises(InputError) as e:
        radar.load_adc(tmp_path / "radar.bin", {"radar": {"shape": [4, 8, 4]}})
    assert e.value.field == "shape" and e.value.path.endswith("radar.bin")
    assert e.value.expected == "512 bytes for complex_int16 shape [4, 8, 4]"
    assert e.value.found == "1000 bytes"


def test_adc_bin_without_a_metadata_shape_is_an_input_error(tmp_path):
    (tmp_path / "radar.bin").write_bytes(b"\0" * 64)
    with pytest.raises(InputError) as e:
        radar.load_adc(tmp_path / "radar.bin")
    assert e.value.field == "metadata.radar.shape"


@pytest.mark.parametrize("entry, field", [
    ({"shape": [4, 2, 2], "dtype": "complex_int32"}, "metadata.radar.dtype"),
    ({"shape": [4, 2, 2], "layout": "zigzag"}, "metadata.radar.layout"),
    ({"shape": [3, 2, 2], "layout": "dca1000", "tx": 2}, "metadata.radar.tx"),
])
def test_bad_adc_metadata_names_the_field(tmp_path, entry, field):
    # the byte size fits the shape as complex_int16, so only the named field is wrong
    (tmp_path / "radar.bin").write_bytes(b"\0" * (int(np.prod(entry["shape"])) * 4))
    with pytest.raises(InputError) as e:
        radar.load_adc(tmp_path / "radar.bin", {"radar": entry})
    assert e.value.field == field


def test_empty_radar_file_is_an_input_error(tmp_path):
    (tmp_path / "radar.bin").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        radar.load_adc(tmp_path / "radar.bin", {"radar": {"shape": [1, 1, 1]}})


def test_point_list_cannot_feed_range_doppler(tmp_path):
    (tmp_path / "radar.bin").write_bytes(np.zeros((2, 7), np.float32).tobytes())
    with pytest.raises(InputError) as e:
        radar.process(tmp_path / "radar.bin", "range_doppler",
                      meta={"radar": {"format": "points"}})
    assert e.value.field == "metadata.radar.format"


# --- point lists -----------------------------------------------------------------------------


@need(VOD)
def test_vod_point_list_reads_322_points_in_the_stated_ranges():
    pts = radar.load_points(VOD)
    assert pts.shape == (322, 7)
    # columns: x, y, z, rcs, v_r_compensated, v_r, time
    np.testing.assert_allclose(pts[:, 0].max(), 98.40, atol=0.01)
    np.testing.assert_allclose([pts[:, 3].min(), pts[:, 3].max()], [-49.0, 30.9], atol=0.05)
    np.testing.assert_allclose([pts[:, 4].min(), pts[:, 4].max()], [-1.91, 20.58], atol=0.01)
    np.testing.assert_allclose([pts[:, 5].min(), pts[:, 5].max()], [-3.83, 18.70], atol=0.01)
    assert not pts[:, 6].any()
    out = radar.points_bev(pts)
    assert out.shape == (3, 64, 64)
    assert 0 < np.count_nonzero(out[2]) <= 322


def test_points_bev_puts_rcs_velocity_and_density_in_the_right_cell():
    cfg = radar.RadarConfig(out_shape=(10, 10), x_range=(0, 10), y_range=(-5, 5),
                            rcs_range=(-10, 10), velocity_max=10)
    pts = np.array([[2.5, -4.5, 0, 0.0, 2.0],
                    [2.2, -4.1, 0, 5.0, 4.0],
                    [20.0, 0.0, 0, 9.0, 1.0]], np.float32)  # outside x: ignored
    out = radar.points_bev(pts, cfg)
    assert out[0, 2, 0] == pytest.approx(0.75)       # max RCS 5 over [-10, 10]
    assert out[1, 2, 0] == pytest.approx(0.3)        # mean velocity 3 / 10
    assert out[2, 2, 0] == pytest.approx(np.log(3) / np.log(9))
    assert np.count_nonzero(out[2]) == 1


def test_radar_points_with_named_fields_find_rcs_and_velocity(tmp_path):
    rec = np.array([[7.0, 1.0, 2.0, 3.0, -4.0]], np.float32)
    (tmp_path / "radar_front.bin").write_bytes(rec.tobytes())
    meta = {"radar_front": {"format": "points", "fields": ["v_r", "x", "y", "z", "RCS"]}}
    got = radar.load_points(tmp_path / "radar_front.bin", meta)
    np.testing.assert_array_equal(got, [[1.0, 2.0, 3.0, -4.0, 7.0]])


def test_radar_point_file_of_wrong_size_names_the_record_size(tmp_path):
    (tmp_path / "radar.bin").write_bytes(b"\0" * 30)
    with pytest.raises(InputError) as e:
        radar.load_points(tmp_path / "radar.bin")
    assert e.value.field == "size" and "multiple of 28 bytes" in e.value.expected
