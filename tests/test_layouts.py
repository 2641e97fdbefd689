"""trainer/layouts.py: NV12 planes from the cache become RGB on the trainer's device, equal to
swscale's conversion of the same planes within the stated tolerance: at most 1 level, under
0.02 levels on average, for BT.601/BT.709, limited/full range, odd and even sizes."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from producer.modalities import video
from producer.synth import REAL_DIR
from protocol import video_store as vs
from protocol.filters import FilterSpec
from protocol.schema import ModalitySpec, SampleSchema
from trainer.batching import HostBatch
from trainer.layouts import nv12_to_rgb, unpack_inputs
from trainer.prefetch import DevicePrefetcher

MAX_LEVELS, MEAN_LEVELS = 1, 0.02
CAR = REAL_DIR / "intel_car-detection.mp4"  # $MMFEED_REAL_DATA (producer/synth.py)


def clips(synth_dataset) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out = [rng.integers(0, 256, (2, 3, 31, 47), dtype=np.uint8),  # noise: chroma's worst case
           video.decode_clip(next(iter(sorted(synth_dataset.glob("train/*/*/video.mp4")))),
                             FilterSpec(), 4)]
    if CAR.exists():
        out.append(video.decode_clip(CAR, FilterSpec.parse("resize=225x127"), 3,
                                     segment=(1.0, 3.0)))
    return out


@pytest.mark.parametrize("matrix", ["bt601", "bt709"])
@pytest.mark.parametrize("color_range", ["limited", "full"])
def test_torch_nv12_to_rgb_equals_swscale_within_tolerance(synth_dataset, matrix, color_range):
    for clip in clips(synth_dataset):
        h, w = clip.shape[-2:]
        planes = vs.to_nv12(clip, matrix, color_range)
        ref = vs.nv12_to_rgb_swscale(planes, h, w, matrix, color_range).astype(np.int16)
        got = nv12_to_rgb(torch.from_numpy(planes), h, w, matrix, color_range).numpy()
        diff = np.abs(ref - got)
        assert diff.max() <= MAX_LEVELS and diff.mean() < MEAN_LEVELS, (clip.shape, diff.mean())


def packed_batch(synth_dataset) -> tuple[SampleSchema, torch.Tensor, np.ndarray]:
    clip = clips(synth_dataset)[1]
    arrays = {"video": clip, "vec": np.arange(3, dtype=np.float32)}
    schema, record = vs.encode_record(SampleSchema.from_arrays(arrays), arrays,
                                      vs.StoreSettings.for_store("nv12", matrix="bt709"))
    buf = torch.zeros((2, schema.payload_nbytes + 64 - schema.payload_nbytes % 64),
                      dtype=torch.uint8)
    buf[:, : len(record)] = torch.frombuffer(bytearray(record), dtype=torch.uint8)
    return schema, buf, clip


def test_a_host_batch_of_nv12_records_gives_the_model_rgb_of_the_logical_shape(synth_dataset):
    schema, buf, clip = packed_batch(synth_dataset)
    hb = HostBatch(schema, 0, buf, torch.zeros(2, dtype=torch.int64), 2)
    db = DevicePrefetcher(lambda t: hb, torch.device("cpu")).get(0.1)
    v = db.inputs["video"]
    assert v.dtype == torch.uint8 and tuple(v.shape) == (2, *clip.shape)
    ref = vs.nv12_to_rgb_swscale(vs.to_nv12(clip, "bt709"), *clip.shape[-2:], "bt709")
    assert np.abs(v[1].numpy().astype(int) - ref).max() <= MAX_LEVELS
    np.testing.assert_array_equal(db.inputs["vec"][1].numpy(), [0, 1, 2])


def test_a_schema_without_layouts_is_passed_through_untouched():
    schema = SampleSchema((ModalitySpec("video", "uint8", (2, 3, 4, 4)),))
    inputs = {"video": torch.zeros(1, 2, 3, 4, 4, dtype=torch.uint8)}
    assert unpack_inputs(schema, inputs) is inputs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the device conversion needs a CUDA GPU")
def test_cuda_nv12_conversion_after_the_copy_equals_the_cpu_conversion(synth_dataset):
    schema, buf, clip = packed_batch(synth_dataset)
    hb = HostBatch(schema, 0, buf.pin_memory(), torch.zeros(2, dtype=torch.int64), 2)
    db = DevicePrefetcher(lambda t: hb, torch.device("cuda")).get(1.0)
    assert db.inputs["video"].is_cuda
    cpu = unpack_inputs(schema, hb.views())["video"]
    assert (db.inputs["video"].cpu().int() - cpu.int()).abs().max() <= MAX_LEVELS
