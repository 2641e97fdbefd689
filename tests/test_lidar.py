"""LiDAR: KITTI/nuScenes .bin, PCD (ascii, binary, binary_compressed), BEV raster, bad input."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from producer import _lzf
from producer.modalities import lidar
from producer.modalities.pcd import read_pcd
from protocol.errors import InputError

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
KITTI = REAL / "kitti_000008.bin"
NUSCENES = REAL / "nuscenes_LIDAR_TOP_1532402927647951.pcd.bin"
KINECT = REAL / "pcl_kinect_frame_20121214T142256.332395.pcd"


def need(path: Path):
    return pytest.mark.skipif(not path.exists(), reason=f"real recording {path} not present")


# --- test-made PCD files --------------------------------------------------------------------


def pcd_header(fields, sizes, types, n, data, counts=None) -> bytes:
    counts = counts or [1] * len(fields)
    return ("# .PCD v0.7 - Point Cloud Data file format\nVERSION 0.7\n"
            f"FIELDS {' '.join(fields)}\nSIZE {' '.join(map(str, sizes))}\n"
            f"TYPE {' '.join(types)}\nCOUNT {' '.join(map(str, counts))}\n"
            f"WIDTH {n}\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\nPOINTS {n}\nDATA {data}\n").encode()


def lzf_literals(data: bytes) -> bytes:
    """A valid LZF stream made only of literal runs (<= 32 bytes each): enough to test the
    PCD container without an LZF compressor."""
    out = bytearray()
    for i in range(0, len(data), 32):
        chunk = data[i:i + 32]
        out.append(len(chunk) - 1)
        out += chunk
    return bytes(out)


@pytest.fixture
def cloud() -> np.ndarray:
    rng = np.random.default_rng(0)
    pts = rng.uniform(-10, 10, size=(50, 4)).astype(np.float32)
    pts[:, 3] = rng.uniform(0, 1, 50)
    return pts


def write_pcd(path: Path, pts: np.ndarray, data: str, trailing: bytes = b"") -> Path:
    head = pcd_header(["x", "y", "z", "intensity"], [4] * 4, ["F"] * 4, len(pts), data)
    if data == "ascii":
        body = "\n".join(" ".join(repr(float(v)) for v in row) for row in pts).encode() + b"\n"
    elif data == "binary":
        body = pts.astype("<f4").tobytes()
    else:  # binary_compressed: field by field, then LZF
        soa = np.ascontiguousarray(pts.astype("<f4").T).tobytes()
        packed = lzf_literals(soa)
        body = struct.pack("<II", len(packed), len(soa)) + packed
    path.write_bytes(head + body + trailing)
    return path


@pytest.mark.parametrize("data", ["ascii", "binary", "binary_compressed"])
def test_pcd_written_by_test_reads_back_exactly(tmp_path, cloud, data):
    got = lidar.load_points(write_pcd(tmp_path / f"c_{data}.pcd", cloud, data))
    np.testing.assert_array_equal(got, cloud)


def test_binary_compressed_trailing_zero_bytes_are_not_an_error(tmp_path, cloud):
    # PCL pads compressed files; the real Kinect frame carries 3901 zeros after its payload.
    path = write_pcd(tmp_path / "pad.pcd", cloud, "binary_compressed", trailing=b"\0" * 3901)
    np.testing.assert_array_equal(lidar.load_points(path), cloud)


def test_lzf_decoder_handles_overlapping_back_references():
    # 'a', then a back-reference of length 7+10+2 = 19 at distance 1: 20 'a's in all.
    assert _lzf.decompress(b"\x00a" + bytes([7 << 5, 10, 0]), 20) == b"a" * 20
    assert _lzf.decompress(b"\x02abc\x20\x02", 6) == b"abcabc"


def test_lzf_decoder_refuses_back_reference_before_start():
    with pytest.raises(ValueError, match="back-reference"):
        _lzf.decompress(b"\x00a\x20\x05", 4)


def test_pcd_count_and_padding_fields_become_columns(tmp_path):
    head = pcd_header(["x", "y", "z", "_", "normal"], [4, 4, 4, 1, 4], ["F", "F", "F", "U", "F"],
                      2, "binary", counts=[1, 1, 1, 4, 3])
    rec = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("p", "u1", (4,)),
                    ("n", "<f4", (3,))])
    arr = np.zeros(2, rec)
    arr["x"], arr["n"] = [1, 2], [[1, 2, 3], [4, 5, 6]]
    (tmp_path / "n.pcd").write_bytes(head + arr.tobytes())
    c = read_pcd(tmp_path / "n.pcd")
    assert list(c.columns) == ["x", "y", "z", "normal_0", "normal_1", "normal_2"]
    np.testing.assert_array_equal(c.columns["normal_2"], [3, 6])


# --- real recordings --------------------------------------------------------------------------


@need(KITTI)
def test_kitti_bin_reads_17238_points_in_the_stated_ranges():
    pts = lidar.load_points(KITTI)
    assert pts.shape == (17238, 4) and pts.dtype == np.float32
    np.testing.assert_allclose(pts.min(0), [2.889, -26.420, -3.607, 0.0], atol=1e-3)
    np.testing.assert_allclose(pts.max(0), [76.835, 10.278, 2.866, 0.990], atol=1e-3)


@need(NUSCENES)
def test_nuscenes_pcd_bin_without_header_reads_as_5_fields_and_says_why():
    notes: list[str] = []
    pts = lidar.load_points(NUSCENES, notes=notes)
    assert pts.shape == (34688, 5)
    ring = pts[:, 4]
    assert np.unique(ring).tolist() == list(range(32))  # one value per HDL-32E laser
    assert pts[:, 3].max() == 255 and np.all(pts[:, 3] == np.round(pts[:, 3]))
    assert any("5 float32 fields" in n for n in notes)


@need(NUSCENES)
def test_metadata_field_count_overrides_the_size_guess():
    # 693760 bytes divide by 16 too; metadata saying 4 fields must win over the name.
    assert lidar.load_points(NUSCENES, {"lidar": {"fields": 4}}).shape == (43360, 4)


@need(KINECT)
def test_kinect_binary_compressed_pcd_matches_the_recorded_facts():
    c = read_pcd(KINECT)
    assert (c.width, c.height, c.points) == (640, 480, 307200)
    z = c.columns["z"].reshape(480, 640)
    assert np.isfinite(z).sum() == 271328
    assert z[240, 320] == pytest.approx(0.869, abs=1e-4)
    assert np.all(c.columns["rgba"] >> 24 == 255)  # alpha always 255
    notes: list[str] = []
    pts = lidar.load_points(KINECT, notes=notes)
    assert pts.shape == (271328, 4)  # NaN pixels dropped, rgba -> grey intensity
    np.testing.assert_allclose(pts[:, 2].min(), 0.666, atol=1e-3)
    np.testing.assert_allclose(pts[:, 2].max(), 1.713, atol=1e-3)
    assert 0 <= pts[:, 3].min() and pts[:, 3].max() <= 1
    assert any("dropped 35872" in n for n in notes)


@need(KITTI)
def test_bev_of_real_kitti_frame_counts_the_same_points_as_histogram2d():
    pts = lidar.load_points(KITTI)
    cfg = lidar.BevConfig(density_saturation=1e9)  # keep the density channel invertible
    out = lidar.bev(pts, cfg)
    assert out.shape == cfg.shape == (3, 160, 160)
    keep = (pts[:, 2] >= -3) & (pts[:, 2] < 3)
    hist, _, _ = np.histogram2d(pts[keep, 0], pts[keep, 1], bins=(160, 160),
                                range=(cfg.x_range, cfg.y_range))
    counts = np.expm1(out[2] * np.log1p(1e9))
    np.testing.assert_allclose(counts, hist, atol=0.05 * hist.max())
    assert ((out[2] > 0) == (hist > 0)).all()


# --- BEV --------------------------------------------------------------------------------------


def test_bev_puts_max_height_mean_intensity_and_density_in_the_right_cell():
    cfg = lidar.BevConfig(x_range=(0, 4), y_range=(-2, 2), z_range=(-1, 1), resolution=1.0)
    pts = np.array([[0.5, -1.5, -0.5, 0.2],   # row 0, col 0
                    [0.7, -1.2, 0.5, 0.6],    # same cell, higher
                    [3.5, 1.5, 0.0, 1.0],     # row 3, col 3
                    [9.0, 0.0, 0.0, 1.0],     # outside x: ignored
                    [1.5, 0.5, 5.0, 1.0]],    # outside z: ignored
                   dtype=np.float32)
    out = lidar.bev(pts, cfg)
    assert out.shape == (3, 4, 4)
    assert out[0, 0, 0] == pytest.approx(0.75) and out[1, 0, 0] == pytest.approx(0.4)
    assert out[0, 3, 3] == pytest.approx(0.5) and out[1, 3, 3] == pytest.approx(1.0)
    assert out[2, 0, 0] == pytest.approx(np.log(3) / np.log(64))
    assert np.count_nonzero(out[2]) == 2


def test_bev_shape_depends_only_on_the_config():
    cfg = lidar.BevConfig(resolution=0.25)
    empty = lidar.bev(np.zeros((0, 4), np.float32), cfg)
    assert empty.shape == (3, 320, 320) and not empty.any()
    xyz_only = lidar.bev(np.ones((5, 3), np.float32), cfg)  # no intensity column
    assert xyz_only.shape == (3, 320, 320) and not xyz_only[1].any()


def test_bev_config_rejects_an_empty_range():
    with pytest.raises(ValueError, match="x_range"):
        lidar.BevConfig(x_range=(5, 5))


# --- metadata and bad input -----------------------------------------------------------------


def test_named_fields_put_x_y_z_intensity_first(tmp_path):
    rec = np.array([[0.5, 1.0, 2.0, 3.0, 7.0]], np.float32)  # intensity, x, y, z, ring
    (tmp_path / "lidar_top.bin").write_bytes(rec.tobytes())
    meta = {"lidar_top": {"fields": ["intensity", "x", "y", "z", "ring"]}}
    got = lidar.load_points(tmp_path / "lidar_top.bin", meta)
    np.testing.assert_array_equal(got, [[1.0, 2.0, 3.0, 0.5, 7.0]])


def test_nan_points_are_dropped_and_noted(tmp_path):
    rec = np.array([[1, 2, 3, 0.5], [np.nan, 0, 0, 1], [4, 5, 6, 0.1]], np.float32)
    (tmp_path / "lidar.bin").write_bytes(rec.tobytes())
    notes: list[str] = []
    got = lidar.load_points(tmp_path / "lidar.bin", notes=notes)
    np.testing.assert_array_equal(got, rec[[0, 2]])
    assert notes and "dropped 1 of 3" in notes[0]


def test_size_not_a_multiple_of_the_record_names_file_and_size(tmp_path):
    (tmp_path / "lidar.bin").write_bytes(b"\0" * 36)
    with pytest.raises(InputError) as e:
        lidar.load_points(tmp_path / "lidar.bin")
    assert e.value.field == "size" and e.value.path.endswith("lidar.bin")
    assert e.value.expected == "multiple of 16 bytes (4 float32 fields)"
    assert e.value.found == "36 bytes"


def test_size_not_a_multiple_of_the_metadata_record(tmp_path):
    (tmp_path / "lidar.bin").write_bytes(b"\0" * 32)
    with pytest.raises(InputError, match="multiple of 20 bytes"):
        lidar.load_points(tmp_path / "lidar.bin", {"lidar": {"fields": 5}})


def test_empty_lidar_file_is_an_input_error(tmp_path):
    (tmp_path / "lidar.bin").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        lidar.load_points(tmp_path / "lidar.bin")


def test_bad_metadata_fields_names_the_metadata_field(tmp_path):
    (tmp_path / "lidar.bin").write_bytes(b"\0" * 16)
    with pytest.raises(InputError) as e:
        lidar.load_points(tmp_path / "lidar.bin", {"lidar": {"fields": ["a", "b", "c", "d"]}})
    assert e.value.field == "metadata.lidar.fields"


def test_bad_pcd_header_type_names_the_header_field(tmp_path):
    head = pcd_header(["x", "y", "z"], [4, 4, 4], ["F", "F", "Q"], 1, "binary")
    (tmp_path / "bad.pcd").write_bytes(head + b"\0" * 12)
    with pytest.raises(InputError) as e:
        lidar.load_points(tmp_path / "bad.pcd")
    assert e.value.field == "header.TYPE" and "'z'" in e.value.found


def test_pcd_without_data_line_is_an_input_error(tmp_path):
    (tmp_path / "bad.pcd").write_bytes(b"# .PCD v0.7\nFIELDS x y z\n")
    with pytest.raises(InputError, match="DATA"):
        lidar.load_points(tmp_path / "bad.pcd")


def test_truncated_binary_pcd_is_an_input_error(tmp_path, cloud):
    path = write_pcd(tmp_path / "t.pcd", cloud, "binary")
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(InputError) as e:
        lidar.load_points(path)
    assert e.value.field == "data"


def test_compressed_size_larger_than_the_file_is_an_input_error(tmp_path, cloud):
    path = write_pcd(tmp_path / "c.pcd", cloud, "binary_compressed")
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(InputError) as e:
        lidar.load_points(path)
    assert e.value.field == "compressed size"


def test_uncompressed_size_disagreeing_with_the_header_is_an_input_error(tmp_path, cloud):
    path = write_pcd(tmp_path / "c.pcd", cloud, "binary_compressed")
    raw = bytearray(path.read_bytes())
    at = raw.index(b"DATA binary_compressed\n") + len(b"DATA binary_compressed\n")
    struct.pack_into("<I", raw, at + 4, 999)
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError) as e:
        lidar.load_points(path)
    assert e.value.field == "uncompressed size" and e.value.found == "999"


def test_corrupt_lzf_stream_is_an_input_error(tmp_path, cloud):
    path = write_pcd(tmp_path / "c.pcd", cloud, "binary_compressed")
    raw = bytearray(path.read_bytes())
    at = raw.index(b"DATA binary_compressed\n") + len(b"DATA binary_compressed\n") + 8
    raw[at] = 0xFF  # a back-reference as the first token: nothing to refer back to
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="LZF"):
        lidar.load_points(path)
