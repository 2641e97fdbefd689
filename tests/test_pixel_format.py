"""`pixel_format=yuv420` (issue 20): the clip travels as the decoder's 4:2:0 planes (NV12, 1.5
bytes a pixel) through ring and cache, and the trainer turns it into the RGB the producer's
rgb path makes, on its device. Tolerance: at most 1 level per channel (rounding), under 0.02
levels on average, against swscale's RGB of the same decoded frames."""
from __future__ import annotations

import os
import uuid

import av
import numpy as np
import pytest
import torch

from producer.dataset import index_dataset
from producer.modalities import video
from producer.modalities.video import INTERPOLATION
from producer.pipeline import Pipeline, PipelineConfig
from producer.preprocess import run_preprocess
from protocol.cache import CacheReader
from protocol.errors import FilterSpecError, InputError
from protocol.filters import FilterSpec
from protocol.ring import RingConfig, RingReader, RingWriter
from protocol.schema import SampleMeta, SampleSchema, nv12_frame_bytes
from trainer.layouts import unpack_inputs


def _clip(path, w=320, h=240, n=10, colorspace=None, color_range=None):
    """A real H.264 clip with sharp colour edges and a noise patch (chroma's worst case)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"crf": "18"}
        if colorspace is not None:
            s.codec_context.colorspace = colorspace
            s.codec_context.color_range = color_range
        for i in range(n):
            img = np.stack([(xx * 0.8 + i * 5) % 256, (yy + i * 3) % 256,
                            ((xx ^ yy) * 2) % 256], -1).astype(np.uint8)
            img[h // 3:h // 2, w // 3:w // 2] = rng.integers(0, 255, (h // 2 - h // 3,
                                                                      w // 2 - w // 3, 3))
            frame = av.VideoFrame.from_ndarray(img, "rgb24")
            for pk in s.encode(frame.reformat(format="yuv420p", dst_colorspace=colorspace,
                                              dst_color_range=color_range)
                               if colorspace is not None else frame):
                c.mux(pk)
        for pk in s.encode():
            c.mux(pk)
    return path


def _rgb(planes: np.ndarray, layout_of: np.ndarray) -> np.ndarray:
    schema = SampleSchema.from_arrays({"video": layout_of})
    return unpack_inputs(schema, {"video": torch.from_numpy(np.asarray(planes))[None]}
                         )["video"][0].numpy()


def _close(got: np.ndarray, ref: np.ndarray) -> None:
    d = np.abs(got.astype(int) - ref.astype(int))
    assert d.max() <= 1 and d.mean() < 0.02, (d.max(), d.mean())


def test_an_odd_crop_resized_to_even_sides_is_fine_in_yuv420():
    spec = FilterSpec.parse("crop=101x51,resize=64x48,pixel_format=yuv420")
    assert spec.output_size(320, 240) == (64, 48)


def test_pixel_format_defaults_to_rgb_and_existing_specs_keep_their_text():
    assert FilterSpec.parse("resize=64x64").pixel_format == "rgb"
    assert str(FilterSpec.parse("resize=64x64,pixel_format=rgb")) == "resize=64x64"
    spec = FilterSpec.parse("pixel_format=yuv420,resize=64x48")
    assert spec.pixel_format == "yuv420"
    assert FilterSpec.parse(str(spec)) == spec


@pytest.mark.parametrize("text, says", [
    ("pixel_format=nv21", "expected one of rgb, yuv420"),
    ("gray,pixel_format=yuv420", "carries colour"),
    ("resize=63x48,pixel_format=yuv420", "even output sides"),
    ("crop=101x50,pixel_format=yuv420", "crop=101x50.*even output sides"),
])
def test_a_bad_pixel_format_spec_is_refused_saying_why(text, says):
    with pytest.raises(FilterSpecError, match=says):
        FilterSpec.parse(text)


def test_a_yuv420_clip_is_nv12_planes_of_half_the_rgb_bytes(tmp_path):
    path = _clip(tmp_path / "c.mp4")
    rgb = video.decode_clip(path, FilterSpec.parse("resize=112x112"), 8)
    yuv = video.decode_clip(path, FilterSpec.parse("resize=112x112,pixel_format=yuv420"), 8)
    assert yuv.shape == (8, nv12_frame_bytes(112, 112)) and yuv.dtype == np.uint8
    assert rgb.nbytes == 2 * yuv.nbytes
    spec = SampleSchema.from_arrays({"video": yuv}).spec("video")
    assert spec.shape == (8, 3, 112, 112) and spec.layout == "nv12/bt601/limited/left"
    assert spec.nbytes == yuv.nbytes


def test_yuv420_converted_by_the_trainer_equals_the_producers_rgb(tmp_path):
    path = _clip(tmp_path / "c.mp4")
    rgb = video.decode_clip(path, FilterSpec(), 8)  # swscale: yuv420p -> gbrp, exact rounding
    yuv = video.decode_clip(path, FilterSpec(pixel_format="yuv420"), 8)
    _close(_rgb(yuv, yuv), rgb)


def test_resized_yuv420_planes_convert_as_swscale_converts_them(tmp_path):
    """Resized planes carry 4:2:0 chroma at the output size (less colour detail than rgb at
    that size, by design); their conversion must still be swscale's."""
    path = _clip(tmp_path / "c.mp4")
    yuv = video.decode_clip(path, FilterSpec.parse("resize=112x84,pixel_format=yuv420"), 4)
    with av.open(str(path)) as c:
        frames = [f for _, f in zip(range(4), c.decode(video=0))]
    ref = []
    for f in frames:
        g = f.reformat(112, 84, "nv12", interpolation=INTERPOLATION).reformat(
            format="gbrp", interpolation=INTERPOLATION)
        p = [np.frombuffer(g.planes[i], np.uint8).reshape(-1, g.planes[i].line_size)[:, :112]
             for i in range(3)]
        ref.append(np.stack([p[2], p[0], p[1]]))
    _close(_rgb(yuv, yuv), np.stack(ref))


def test_a_bt709_full_range_clip_is_tagged_so_and_converted_exactly(tmp_path):
    path = _clip(tmp_path / "c.mp4", colorspace=1, color_range=2)  # BT.709, JPEG (full) range
    yuv = video.decode_clip(path, FilterSpec(pixel_format="yuv420"), 4)
    assert yuv.mm_layout == "nv12/bt709/full/left"
    with av.open(str(path)) as c:
        frames = [f for _, f in zip(range(4), c.decode(video=0))]
    ref = []
    for f in frames:
        g = f.reformat(format="gbrp", src_colorspace="ITU709", src_color_range="JPEG",
                       dst_color_range="JPEG", interpolation=INTERPOLATION)
        p = [np.frombuffer(g.planes[i], np.uint8).reshape(-1, g.planes[i].line_size)[:, :320]
             for i in range(3)]
        ref.append(np.stack([p[2], p[0], p[1]]))
    _close(_rgb(yuv, yuv), np.stack(ref))


def test_an_odd_sized_source_without_resize_is_an_input_error_naming_the_file(tmp_path):
    path = _clip(tmp_path / "odd.mp4", w=322, h=242)
    with av.open(str(path)) as c:
        assert c.streams.video[0].codec_context.width == 322
    crop = FilterSpec.parse("crop=100x51,pixel_format=rgb")  # fine in rgb
    assert video.decode_clip(path, crop, 2).shape == (2, 3, 51, 100)
    with pytest.raises(InputError, match="odd.mp4.*even output sides|even output sides"):
        video.decode_clip(path, FilterSpec(fps=25.0, crop=(101, 51, None, None),
                                           pixel_format="yuv420"), 2)


def test_preprocess_with_yuv420_caches_the_decoders_planes_at_half_the_bytes(synth_dataset,
                                                                            tmp_path):
    rgb_cfg = PipelineConfig(filter="resize=32x32", clip_frames=4)
    yuv_cfg = PipelineConfig(filter="resize=32x32,pixel_format=yuv420", clip_frames=4)
    assert rgb_cfg.config_hash() != yuv_cfg.config_hash()
    run_preprocess(synth_dataset, tmp_path / "rgb", rgb_cfg, workers=0, progress=False)
    run_preprocess(synth_dataset, tmp_path / "yuv", yuv_cfg, workers=2, progress=False)
    planes = [Pipeline(yuv_cfg).process(s, [])["video"]
              for s in index_dataset(synth_dataset).samples]
    with CacheReader(tmp_path / "rgb") as a, CacheReader(tmp_path / "yuv") as b:
        assert len(a) == len(b) == len(planes)
        for i in range(len(b)):
            spec = b.schema(i).spec("video")
            assert spec.layout == "nv12/bt601/limited/left" and spec.shape == (4, 3, 32, 32)
            assert b.store(i) == "nv12"
            assert 2 * spec.nbytes == a.schema(i).spec("video").nbytes
            assert np.array_equal(b.view(i).arrays["video"], planes[i])  # dataset order


def test_a_yuv420_sample_goes_through_the_ring_as_planes(synth_dataset):
    sample = index_dataset(synth_dataset).samples[0]
    arrays = Pipeline(PipelineConfig(filter="resize=32x32,pixel_format=yuv420",
                                     clip_frames=4)).process(sample, [])
    schema = SampleSchema.from_arrays(arrays)
    name = f"mmft-{os.getpid()}-{uuid.uuid4().hex[:10]}"
    with RingWriter.create(RingConfig(name, slots=2, slot_bytes=1 << 20)) as w:
        with RingReader.attach(name, start="next") as r:
            w.publish(schema, SampleMeta(label=1), arrays)
            got = r.receive(timeout=10)
    assert got.schema == schema and got.schema.spec("video").layout
    assert np.array_equal(got.arrays["video"], arrays["video"])


def test_planes_of_one_shape_but_another_matrix_get_their_own_schema(tmp_path):
    from producer.pipeline import schema_of

    a = video.decode_clip(_clip(tmp_path / "a.mp4"), FilterSpec(pixel_format="yuv420"), 2)
    b = video.decode_clip(_clip(tmp_path / "b.mp4", colorspace=1, color_range=2),
                          FilterSpec(pixel_format="yuv420"), 2)
    assert a.shape == b.shape
    assert schema_of({"video": a}).spec("video").layout == "nv12/bt601/limited/left"
    assert schema_of({"video": b}).spec("video").layout == "nv12/bt709/full/left"


def test_a_yuv420_clip_is_previewed_as_its_rgb_picture(tmp_path):
    from protocol.preview import decode_sample, encode_sample
    from protocol.video_store import pictured

    path = _clip(tmp_path / "c.mp4")
    rgb = video.decode_clip(path, FilterSpec.parse("resize=64x48"), 2)
    yuv = video.decode_clip(path, FilterSpec.parse("resize=64x48,pixel_format=yuv420"), 2)
    (m,) = decode_sample(encode_sample(pictured({"video": yuv}), {}))
    assert m.shape == (2, 3, 48, 64)
    schema = SampleSchema.from_arrays({"video": yuv})
    shown = pictured({"video": np.asarray(yuv)}, schema)["video"]  # a cache view: plain planes
    assert shown.shape == (2, 3, 48, 64)
    # the trainer's picture of the same planes, but for the chroma siting a preview ignores
    assert np.abs(shown.astype(int) - _rgb(yuv, yuv).astype(int)).mean() < 3
    assert rgb.shape == shown.shape
