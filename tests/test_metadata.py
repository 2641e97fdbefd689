"""metadata.json validation: every error names the file and the field; unknown keys survive."""
from __future__ import annotations

import json

import pytest

from producer.metadata import load_metadata, timestamp_ns
from protocol.errors import InputError

GOOD = {
    "timestamp_ns": 1_700_000_000_000_000_000,
    "timestamps": {"video": [0.0, 0.1, 0.2], "lidar": 0.05},
    "frame_rates": {"video": 10, "lidar": 20.0},
    "calibration": {"lidar": {"extrinsic": [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0],
                                            [0, 0, 0, 1]], "note": "kept"},
                    "video": {"intrinsic": [[500, 0, 32], [0, 500, 24], [0, 0, 1]]}},
    "tolerance_s": 0.02,
    "radar": {"format": "adc", "dtype": "complex_int16", "shape": [32, 64, 4],
              "layout": "dca1000", "tx": 2},
    "radar_points": {"format": "points", "fields": 7},
    "lidar_top": {"fields": ["x", "y", "z", "intensity", "ring"]},
    "imu": {"dtype": "<f4", "shape": [-1, 6], "offset": 16, "vendor": "kept too"},
}


def _write(tmp_path, obj) -> str:
    p = tmp_path / "metadata.json"
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(p)


def test_a_full_valid_file_loads_unchanged(tmp_path):
    assert load_metadata(_write(tmp_path, GOOD)) == GOOD


@pytest.mark.parametrize("obj, field, expected_part", [
    ({"radar": {"shape": "abc"}}, "radar.shape", "3 positive integers"),
    ({"radar": {"shape": [32, 64]}}, "radar.shape", "3 positive integers"),
    ({"radar": {"dtype": "complex128"}}, "radar.dtype", "complex_int16"),
    ({"radar": {"format": "cube"}}, "radar.format", '"adc"'),
    ({"radar": {"layout": "weird"}}, "radar.layout", "dca1000"),
    ({"radar": {"tx": 0}}, "radar.tx", ">= 1"),
    ({"imu": {"dtype": "object"}}, "imu.dtype", "numeric numpy dtype"),
    ({"imu": {"shape": [-1, -1]}}, "imu.shape", "at most one -1"),
    ({"imu": {"offset": -4}}, "imu.offset", ">= 0"),
    ({"lidar": {"fields": 0}}, "lidar.fields", "field count"),
    ({"timestamp_ns": "yesterday"}, "timestamp_ns", "integer"),
    ({"timestamp": -1}, "timestamp", ">= 0"),
    ({"timestamps": {"video": [0.2, 0.1]}}, "timestamps.video", "non-decreasing"),
    ({"timestamps": []}, "timestamps", "an object"),
    ({"frame_rates": {"video": 0}}, "frame_rates.video", "positive number"),
    ({"frame_rates": {"video": True}}, "frame_rates.video", "positive number"),
    ({"calibration": {"lidar": {"extrinsic": [[1, 0], [0, 1]]}}}, "calibration.lidar.extrinsic",
     "4x4"),
    ({"calibration": {"video": {"intrinsic": "eye"}}}, "calibration.video.intrinsic", "3x3"),
])
def test_a_wrong_field_is_named_with_file_and_what_was_expected(tmp_path, obj, field,
                                                                 expected_part):
    path = _write(tmp_path, obj)
    with pytest.raises(InputError) as info:
        load_metadata(path)
    err = info.value
    assert err.path == path and err.field == field and expected_part in err.expected
    assert str(err).startswith(f"{path}: {field}: expected ")
    assert err.found is not None


def test_error_message_shows_the_value_found_as_json(tmp_path):
    path = _write(tmp_path, {"radar": {"shape": "abc"}})
    with pytest.raises(InputError, match=r'metadata.json: radar.shape: expected a list of 3 '
                                         r'positive integers .*, found "abc"'):
        load_metadata(path)


def test_invalid_json_names_line_and_column(tmp_path):
    path = _write(tmp_path, '{"timestamp_ns": 1,\n "radar": {')
    with pytest.raises(InputError) as info:
        load_metadata(path)
    assert info.value.field == "json" and "line 2" in info.value.found


@pytest.mark.parametrize("text, field", [("[1, 2]", "top level"), (b"\xff\xfe{}", "json")])
def test_a_file_that_is_not_a_json_object_is_refused(tmp_path, text, field):
    p = tmp_path / "metadata.json"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(InputError) as info:
        load_metadata(p)
    assert info.value.field == field


def test_unknown_top_level_keys_are_kept_and_noted(tmp_path):
    notes: list[str] = []
    meta = load_metadata(_write(tmp_path, {"frame_rate": 10, "owner": "lab 3"}), notes)
    assert meta == {"frame_rate": 10, "owner": "lab 3"}
    assert len(notes) == 2 and "'frame_rate'" in notes[0]


def test_timestamp_comes_from_ns_or_seconds():
    assert timestamp_ns({"timestamp_ns": 12}) == 12
    assert timestamp_ns({"timestamp": 1.5}) == 1_500_000_000
    assert timestamp_ns({}) == 0
