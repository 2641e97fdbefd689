"""protocol/video_store.py: clips encoded by PyAV's libx264/libx265 decode alone, at their size,
close to the raw clip; NV12 planes round-trip through swscale; damaged blobs are refused by name.

Clips are real: the synthetic dataset's H.264 files decoded by the pipeline's own decode_clip,
and a real recording (intel_car-detection.mp4) where present. Fidelity is PSNR in dB against
the raw clip (the store is lossy by design). The synthetic clips carry +-12 levels of
independent per-pixel noise (about 31 dB by itself) that a codec smooths away: the default
settings measured 24.8 dB at worst and 30.5 dB on average on them, so their bound is 22 dB (the
demo-training test holds what matters there: accuracy); real footage measured 41.9 dB at worst
at 224x224, bound 38 dB.
"""
from __future__ import annotations

import numpy as np
import pytest


from producer.modalities import video
from producer.synth import REAL_DIR
from protocol.filters import FilterSpec
from protocol.schema import SampleSchema, nv12_frame_bytes
from protocol import video_store as vs

MIN_PSNR_DB = 22.0       # synthetic noisy clips (module docstring)
MIN_PSNR_REAL_DB = 38.0  # real footage
CAR = REAL_DIR / "intel_car-detection.mp4"  # $MMFEED_REAL_DATA (producer/synth.py)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


@pytest.fixture(scope="module")
def clip(synth_dataset) -> np.ndarray:
    path = next(iter(sorted(synth_dataset.glob("train/*/*/video.mp4"))))
    return video.decode_clip(path, FilterSpec(), 8)


@pytest.mark.parametrize("store", ["h264", "hevc"])
def test_a_compressed_clip_decodes_alone_to_its_shape_close_to_the_raw_clip(clip, store):
    blob = vs.encode_video(clip, vs.StoreSettings.for_store(store))
    out = np.zeros_like(clip)
    vs.decode_video_into(blob, out)
    assert psnr(clip, out) > MIN_PSNR_DB
    assert len(blob) * 10 <= clip.nbytes  # the goal: at least 10x smaller


@pytest.mark.parametrize("store", ["h264", "hevc"])
def test_real_footage_keeps_its_detail_at_a_fraction_of_the_bytes(store):
    if not CAR.exists():
        pytest.skip(f"real recording {CAR} not present")
    clip = video.decode_clip(CAR, FilterSpec.parse("resize=224x224"), 8, segment=(1.0, 4.0))
    blob = vs.encode_video(clip, vs.StoreSettings.for_store(store))
    out = np.zeros_like(clip)
    vs.decode_video_into(blob, out)
    assert psnr(clip, out) > MIN_PSNR_REAL_DB
    assert len(blob) * 50 <= clip.nbytes


@pytest.mark.parametrize("store", ["h264", "hevc"])
def test_odd_sized_and_gray_clips_round_trip(clip, store):
    settings = vs.StoreSettings.for_store(store)
    for c in (np.ascontiguousarray(clip[:, :, :47, :63]), np.ascontiguousarray(clip[:, :1])):
        out = np.zeros_like(c)
        vs.decode_video_into(vs.encode_video(c, settings), out)
        assert psnr(c, out) > MIN_PSNR_DB, c.shape


def test_decoding_into_another_shape_is_refused_naming_both(clip):
    blob = vs.encode_video(clip, vs.StoreSettings.for_store("h264"))
    with pytest.raises(vs.VideoStoreError, match=r"\[8, 3, 48, 64\].*\[4, 3, 48, 64\]"):
        vs.decode_video_into(blob, np.zeros((4, 3, 48, 64), np.uint8))


def test_a_truncated_blob_is_refused_before_decoding(clip):
    blob = vs.encode_video(clip, vs.StoreSettings.for_store("h264"))
    with pytest.raises(vs.VideoStoreError, match="packets add up to"):
        vs.decode_video_into(blob[:-100], np.zeros_like(clip))
    with pytest.raises(vs.VideoStoreError, match="magic"):
        vs.decode_video_into(b"XXXX" + blob[4:], np.zeros_like(clip))


def test_a_decoder_that_failed_is_not_reused_for_the_next_clip(clip):
    settings = vs.StoreSettings.for_store("h264")
    blob = bytearray(vs.encode_video(clip, settings))
    info = vs.blob_info(blob)
    damaged = bytearray(blob)
    damaged[info[-1]:] = bytes(len(damaged) - info[-1])  # every packet zeroed
    with pytest.raises(vs.VideoStoreError):
        vs.decode_video_into(damaged, np.zeros_like(clip))
    out = np.zeros_like(clip)
    vs.decode_video_into(bytes(blob), out)
    assert psnr(clip, out) > MIN_PSNR_DB


@pytest.mark.parametrize("matrix", ["bt601", "bt709"])
@pytest.mark.parametrize("color_range", ["limited", "full"])
def test_nv12_planes_hold_1_5_bytes_a_pixel_and_round_trip(clip, matrix, color_range):
    odd = np.ascontiguousarray(clip[:, :, :47, :63])
    planes = vs.to_nv12(odd, matrix, color_range)
    assert planes.shape == (8, nv12_frame_bytes(47, 63)) == (8, 47 * 63 + 2 * 24 * 32)
    back = vs.nv12_to_rgb_swscale(planes, 47, 63, matrix, color_range)
    assert psnr(odd, back) > 35.0  # colour conversion and 4:2:0 only, no codec


def test_records_hold_the_other_modalities_exactly_and_name_their_store(clip):
    arrays = {"video": clip, "audio": np.arange(20, dtype=np.float32).reshape(1, 4, 5)}
    schema = SampleSchema.from_arrays(arrays)
    for store in vs.STORES:
        stored, record = vs.encode_record(schema, arrays, vs.StoreSettings.for_store(store))
        assert vs.store_of_record(stored, record) == vs.STORES.index(store)
        if store in ("h264", "hevc"):
            assert stored == schema and len(record) < schema.payload_nbytes
            row = np.zeros(schema.payload_nbytes, np.uint8)
            vs.decode_record_into(schema, record, row)
            np.testing.assert_array_equal(schema.views(row)["audio"], arrays["audio"])
            assert psnr(clip, schema.views(row)["video"]) > MIN_PSNR_DB
        elif store == "nv12":
            assert stored.spec("video").layout == "nv12/bt601/limited"
            assert stored.unpacked() == schema
            assert len(record) == stored.payload_nbytes < schema.payload_nbytes


def test_a_clip_that_does_not_compress_is_stored_raw_with_a_note():
    # gray noise at crf 0 (lossless): 8 bits of entropy a pixel, nothing to take away
    noise = np.random.default_rng(0).integers(0, 256, (4, 1, 32, 32), dtype=np.uint8)
    schema = SampleSchema.from_arrays({"video": noise})
    notes: list[str] = []
    stored, record = vs.encode_record(schema, {"video": noise},
                                      vs.StoreSettings.for_store("h264", crf=0), notes)
    assert vs.store_of_record(stored, record) == vs.RAW
    assert bytes(record) == bytes(schema.pack({"video": noise}))
    assert "not smaller than the raw clip" in notes[0]


def test_a_gray_clip_stays_raw_in_the_nv12_store_with_a_note(clip):
    gray = np.ascontiguousarray(clip[:, :1])
    schema = SampleSchema.from_arrays({"video": gray})
    notes: list[str] = []
    stored, record = vs.encode_record(schema, {"video": gray},
                                      vs.StoreSettings.for_store("nv12"), notes)
    assert stored == schema and vs.store_of_record(stored, record) == vs.RAW
    assert "gray" in notes[0]


def test_store_settings_refuse_unknown_values_naming_the_choices():
    with pytest.raises(ValueError, match="raw, h264, hevc, nv12"):
        vs.StoreSettings("av1")
    with pytest.raises(ValueError, match="bt601, bt709"):
        vs.StoreSettings("nv12", matrix="srgb")
    with pytest.raises(ValueError, match="0..51"):
        vs.StoreSettings.for_store("h264", crf=60)
