"""SampleSchema and SampleMeta: encodings round-trip exactly, layouts are aligned and stable,
and bad input is refused with a message naming what was wrong."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import SchemaError
from protocol.schema import (ALIGN, DTYPES, META_STRUCT, SOURCE_BYTES, ModalitySpec, SampleMeta,
                             SampleSchema)

names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.\-]{0,15}", fullmatch=True)
specs = st.builds(ModalitySpec, names, st.sampled_from(DTYPES),
                  st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple))
schemas = st.lists(specs, min_size=1, max_size=5, unique_by=lambda m: m.name).map(
    lambda ms: SampleSchema(tuple(ms)))
fast = settings(max_examples=60, deadline=None)


@fast
@given(schemas)
def test_schema_encoding_round_trips_to_an_equal_schema_with_the_same_id(schema):
    back = SampleSchema.decode(schema.encode())
    assert back == schema
    assert back.schema_id == schema.schema_id != 0
    assert back.encode() == schema.encode()


@fast
@given(schemas)
def test_every_modality_starts_64_byte_aligned_and_none_overlap(schema):
    end = 0
    for m in schema.modalities:
        off = schema.offset(m.name)
        assert off % ALIGN == 0 and off >= end
        end = off + m.nbytes
    assert schema.payload_nbytes == end


@fast
@given(schemas, st.integers(0, 2**32 - 1))
def test_pack_then_views_returns_the_same_arrays(schema, seed):
    rng = np.random.default_rng(seed)
    arrays = {m.name: rng.integers(0, 100, m.shape).astype(m.dtype) for m in schema.modalities}
    views = schema.views(schema.pack(arrays))
    for name, a in arrays.items():
        np.testing.assert_array_equal(views[name], a)
        assert views[name].dtype == a.dtype and views[name].shape == a.shape


@fast
@given(st.integers(-2**31, 2**31 - 1), st.integers(-2**63, 2**63 - 1), st.integers(0, 2**32 - 1),
       st.text(max_size=SOURCE_BYTES // 4).filter(lambda s: "\0" not in s),
       st.integers(0, 2**64 - 1))
def test_sample_meta_round_trips_through_its_88_byte_struct(label, ts, gen, source, index):
    m = SampleMeta(label=label, timestamp_ns=ts, generation=gen, source=source, index=index)
    packed = m.pack()
    assert len(packed) == META_STRUCT.size == 88
    buf = bytearray(200)
    m.pack_into(buf, 40)
    assert SampleMeta.unpack_from(buf, 40) == m == SampleMeta.unpack_from(packed)


def test_schema_id_depends_on_shape_dtype_and_order():
    a = ModalitySpec("video", "uint8", (3, 8, 8))
    b = ModalitySpec("audio", "float32", (1, 64, 10))
    ids = {SampleSchema((a, b)).schema_id, SampleSchema((b, a)).schema_id,
           SampleSchema((ModalitySpec("video", "uint8", (1, 8, 8)), b)).schema_id,
           SampleSchema((ModalitySpec("video", "int16", (3, 8, 8)), b)).schema_id}
    assert len(ids) == 4


def test_decode_refuses_garbage_naming_the_problem():
    with pytest.raises(SchemaError, match="not JSON"):
        SampleSchema.decode(b"\xff\x00")
    with pytest.raises(SchemaError, match="expected keys name, dtype, shape"):
        SampleSchema.decode(b'{"modalities": [{"name": "x"}]}')
    with pytest.raises(SchemaError, match="dtype 'complex64'"):
        SampleSchema.decode(b'{"modalities": [{"name": "x", "dtype": "complex64", "shape": [1]}]}')


def test_pack_refuses_a_wrong_shape_naming_the_modality():
    s = SampleSchema((ModalitySpec("lidar", "float32", (3, 4)),))
    with pytest.raises(SchemaError, match=r"'lidar': expected float32\[3, 4\], got float32\[4, 3\]"):
        s.pack({"lidar": np.zeros((4, 3), np.float32)})
    with pytest.raises(SchemaError, match="schema expects"):
        s.pack({"radar": np.zeros((3, 4), np.float32)})


def test_views_refuse_a_payload_smaller_than_the_schema():
    s = SampleSchema((ModalitySpec("x", "uint8", (100,)),))
    with pytest.raises(SchemaError, match="50 bytes is smaller than the schema's 100"):
        s.views(bytearray(50))


def test_a_modality_spec_reads_dtype_and_shape_from_a_torch_tensor_as_from_numpy():
    import torch

    t = ModalitySpec.from_array("video", torch.zeros((2, 3, 4), dtype=torch.uint8))
    n = ModalitySpec.from_array("video", np.zeros((2, 3, 4), np.uint8))
    assert t == n and t.dtype == "uint8" and t.shape == (2, 3, 4)
    assert ModalitySpec.from_array("x", torch.zeros(5)).dtype == "float32"


# --- packed layouts (issue 17: NV12 video in the cache) -------------------------------------


def test_an_nv12_modality_stores_1_5_bytes_a_pixel_under_its_logical_shape():
    from protocol.schema import nv12_frame_bytes

    m = ModalitySpec("video", "uint8", (8, 3, 47, 63), "nv12/bt709/full")
    assert m.shape == (8, 3, 47, 63) and m.stored_shape == (8, nv12_frame_bytes(47, 63))
    assert nv12_frame_bytes(48, 64) * 2 == 48 * 64 * 3
    schema = SampleSchema((m, ModalitySpec("vec", "float32", (4,))))
    back = SampleSchema.decode(schema.encode())
    assert back == schema and back.spec("video").layout == "nv12/bt709/full"
    assert schema.packed and not schema.unpacked().packed
    assert schema.unpacked().spec("video").shape == (8, 3, 47, 63)
    assert schema.views(bytearray(schema.payload_nbytes))["video"].shape == m.stored_shape


def test_a_schema_without_layouts_encodes_exactly_as_before():
    schema = SampleSchema((ModalitySpec("video", "uint8", (2, 3, 4, 4)),))
    assert schema.encode() == (b'{"modalities":[{"dtype":"uint8","name":"video",'
                               b'"shape":[2,3,4,4]}]}')


@pytest.mark.parametrize("spec, match", [
    (("video", "float32", (2, 3, 4, 4), "nv12/bt601/limited"), "packs uint8 RGB"),
    (("video", "uint8", (2, 1, 4, 4), "nv12/bt601/limited"), "packs uint8 RGB"),
    (("video", "uint8", (2, 3, 4, 4), "nv12/bt2020/limited"), r"nv12/<bt601\|bt709>"),
    (("video", "uint8", (2, 3, 4, 4), "yuv420"), "expected nv12"),
])
def test_a_layout_that_does_not_fit_is_refused_naming_the_modality(spec, match):
    with pytest.raises(SchemaError, match=match):
        ModalitySpec(*spec)
