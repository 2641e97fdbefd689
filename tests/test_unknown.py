"""Unknown sensors: metadata dtype/shape, .npy, and the fixed-length byte profile fallback."""
from __future__ import annotations

import numpy as np
import pytest

from producer.modalities.unknown import load_unknown
from protocol.errors import InputError


def test_metadata_dtype_and_shape_give_that_array_as_float32(tmp_path):
    data = np.arange(60, dtype="<i2").reshape(10, 6) - 30
    (tmp_path / "imu.data").write_bytes(data.tobytes())
    got = load_unknown(tmp_path / "imu.data", {"imu": {"dtype": "int16", "shape": [10, 6]}})
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, data)


def test_big_endian_dtype_and_inferred_dimension_and_offset(tmp_path):
    data = np.linspace(-1, 1, 12).astype(">f4")
    (tmp_path / "gps.data").write_bytes(b"HEADER16........" + data.tobytes())
    meta = {"gps": {"dtype": ">f4", "shape": [-1, 3], "offset": 16}}
    np.testing.assert_allclose(load_unknown(tmp_path / "gps.data", meta), data.reshape(4, 3))


def test_size_disagreeing_with_metadata_shape_names_file_and_shape(tmp_path):
    (tmp_path / "imu.data").write_bytes(b"\0" * 100)
    with pytest.raises(InputError) as e:
        load_unknown(tmp_path / "imu.data", {"imu": {"dtype": "int16", "shape": [10, 6]}})
    assert e.value.field == "shape" and e.value.path.endswith("imu.data")
    assert e.value.expected.startswith("120 bytes") and e.value.found == "100 bytes"


@pytest.mark.parametrize("entry, field", [
    ({"dtype": "complex_thing", "shape": [2]}, "metadata.imu.dtype"),
    ({"dtype": "int16", "shape": [0, 2]}, "metadata.imu.shape"),
    ({"dtype": "int16", "shape": [2], "offset": 99}, "metadata.imu.offset"),
])
def test_bad_metadata_entry_names_the_field(tmp_path, entry, field):
    (tmp_path / "imu.data").write_bytes(b"\0" * 4)
    with pytest.raises(InputError) as e:
        load_unknown(tmp_path / "imu.data", {"imu": entry})
    assert e.value.field == field


def test_without_metadata_bytes_become_a_fixed_length_unit_vector(tmp_path):
    rng = np.random.default_rng(0)
    for size in (3, 255, 256, 10_001):
        (tmp_path / "blob.data").write_bytes(rng.integers(0, 256, size, np.uint8).tobytes())
        notes: list[str] = []
        v = load_unknown(tmp_path / "blob.data", length=256, notes=notes)
        assert v.shape == (256,) and v.dtype == np.float32
        assert abs(v.mean()) < 1e-5 and np.linalg.norm(v) == pytest.approx(1.0, abs=1e-5)
        assert "byte profile" in notes[0]


def test_byte_profile_keeps_the_shape_of_the_bytes(tmp_path):
    # A ramp of bytes stays a rising ramp after span-averaging to 16 values.
    (tmp_path / "ramp.data").write_bytes(np.arange(256, dtype=np.uint8).repeat(4).tobytes())
    v = load_unknown(tmp_path / "ramp.data", length=16)
    assert np.all(np.diff(v) > 0)


def test_constant_file_is_kept_as_a_zero_vector_not_dropped(tmp_path):
    (tmp_path / "flat.data").write_bytes(b"\x07" * 50)
    v = load_unknown(tmp_path / "flat.data", length=8)
    assert v.shape == (8,) and not v.any()


def test_empty_unknown_file_is_an_input_error(tmp_path):
    (tmp_path / "x.data").write_bytes(b"")
    with pytest.raises(InputError) as e:
        load_unknown(tmp_path / "x.data")
    assert e.value.field == "size"


def test_missing_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError) as e:
        load_unknown(tmp_path / "gone.data")
    assert e.value.field == "file"


def test_npy_file_keeps_its_own_dtype_and_shape_and_zeroes_non_finite(tmp_path):
    a = np.array([[1.0, np.nan], [3.0, 4.0]])
    np.save(tmp_path / "thermal.npy", a)
    notes: list[str] = []
    got = load_unknown(tmp_path / "thermal.npy", notes=notes)
    np.testing.assert_array_equal(got, [[1, 0], [3, 4]])
    assert "1 non-finite" in notes[0]
