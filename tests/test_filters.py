"""The filter spec grammar (protocol/filters.py): what `mmctl filter SPEC` may send, parsed by
the one function both the daemon and the video modality use."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import FilterSpecError
from protocol.filters import MAX_SIDE, FilterSpec


@pytest.mark.parametrize("text, expected", [
    ("", FilterSpec()),
    ("none", FilterSpec()),
    ("  None ", FilterSpec()),
    ("gray", FilterSpec(gray=True)),
    ("grayscale", FilterSpec(gray=True)),
    ("grey", FilterSpec(gray=True)),
    ("rgb", FilterSpec()),
    ("resize=224x112", FilterSpec(width=224, height=112)),
    ("crop=100x50", FilterSpec(crop=(100, 50, None, None))),
    ("crop=100x50+10+20", FilterSpec(crop=(100, 50, 10, 20))),
    ("fps=12.5", FilterSpec(fps=12.5)),
    ("FPS=5, Resize=32x24 ,GRAY", FilterSpec(gray=True, width=32, height=24, fps=5.0)),
])
def test_each_operation_parses_to_its_field(text, expected):
    assert FilterSpec.parse(text) == expected


def test_the_string_form_is_canonical_whatever_the_order_of_operations():
    a = FilterSpec.parse("gray,fps=10,resize=64x48,crop=320x240+8+4")
    b = FilterSpec.parse("crop=320x240+8+4, resize=64x48, fps=10, grayscale")
    assert a == b
    assert str(a) == str(b) == "crop=320x240+8+4,resize=64x48,gray,fps=10"
    assert str(FilterSpec()) == "none"


@pytest.mark.parametrize("text, says", [
    ("sepia", "unknown operation 'sepia'"),
    ("gray,gray", "'gray' given twice"),
    ("gray,rgb", "given twice"),
    ("resize=10x10,resize=20x20", "'resize' given twice"),
    ("resize=10", "expected WxH"),
    ("resize=0x10", "expected WxH"),
    (f"resize={MAX_SIDE + 1}x10", f"1..{MAX_SIDE}"),
    ("crop=10x", "expected WxH or WxH+X+Y"),
    ("crop=10x10+5", "expected WxH or WxH+X+Y"),
    ("fps=0", "0.01 to 1000 frames/s"),
    ("fps=1001", "0.01 to 1000 frames/s"),
    ("fps=fast", "0.01 to 1000 frames/s"),
    ("fps=nan", "0.01 to 1000 frames/s"),
    ("fps=inf", "0.01 to 1000 frames/s"),
    ("fps=1e-300", "0.01 to 1000 frames/s"),   # a clip would span 1e300 s: nothing, ever
    ("fps=-5", "0.01 to 1000 frames/s"),
    ("gray=1", "unknown operation 'gray=1'"),
    ("gray,", "unknown operation ''"),
])
def test_a_bad_spec_is_refused_naming_the_operation_and_what_is_accepted(text, says):
    with pytest.raises(FilterSpecError) as e:
        FilterSpec.parse(text)
    assert says in str(e.value)
    assert repr(text) in str(e.value)  # names the spec the user sent


@pytest.mark.parametrize("spec", ["x" * 60_000, "gray," + "y" * 60_000,
                                  "resize=" + "9" * 60_000, "z" * 30_000 + ",z" * 2])
def test_a_huge_spec_is_refused_without_echoing_it_whole(spec):
    with pytest.raises(FilterSpecError) as e:
        FilterSpec.parse(spec)
    assert len(str(e.value)) < 1000 and "..." in str(e.value)


def test_a_spec_that_is_not_a_string_is_refused_naming_its_type():
    with pytest.raises(FilterSpecError, match="must be a string, got list"):
        FilterSpec.parse(["gray"])  # type: ignore[arg-type]


def test_a_centred_crop_is_clamped_to_the_source_and_resize_sets_the_output_size():
    spec = FilterSpec.parse("crop=200x100")
    assert spec.crop_box(640, 480) == (220, 190, 200, 100)
    assert spec.crop_box(150, 80) == (0, 0, 150, 80)          # larger than the source
    assert spec.output_size(640, 480) == (200, 100)           # the crop's size without resize
    placed = FilterSpec.parse("crop=200x100+600+400")
    assert placed.crop_box(640, 480) == (440, 380, 200, 100)  # moved inside, never outside
    assert FilterSpec.parse("crop=200x100,resize=32x16").output_size(640, 480) == (32, 16)
    assert FilterSpec().output_size(640, 480) == (640, 480)
    assert FilterSpec.parse("gray").channels == 1 and FilterSpec().channels == 3


def test_a_crop_that_does_not_fit_the_frame_is_a_problem_naming_the_frame_size():
    assert "larger than the 768x432 frame" in FilterSpec.parse("crop=2000x2000").frame_problem(
        768, 432)
    assert "at most crop=768x432" in FilterSpec.parse("crop=800x100").frame_problem(768, 432)
    edge = FilterSpec.parse("crop=100x100+700+400").frame_problem(768, 432)
    assert "reaches past the edge of the 768x432 frame" in edge and "+668+332" in edge
    assert FilterSpec.parse("crop=768x432").frame_problem(768, 432) is None
    assert FilterSpec.parse("crop=100x100+668+332").frame_problem(768, 432) is None
    assert FilterSpec.parse("gray,resize=4000x4000").frame_problem(768, 432) is None


sides = st.integers(1, MAX_SIDE)
specs = st.builds(
    FilterSpec,
    gray=st.booleans(),
    width=st.none() | sides,
    height=st.none(),
    crop=st.none() | st.tuples(sides, sides, st.none(), st.none())
    | st.tuples(sides, sides, st.integers(0, 9999), st.integers(0, 9999)),
    fps=st.none() | st.sampled_from([0.5, 1.0, 7.5, 10.0, 29.97, 1000.0]),
).map(lambda s: FilterSpec(s.gray, s.width, s.width, s.crop, s.fps))


@given(specs)
def test_every_spec_survives_its_string_form(spec):
    # what the daemon replies and status shows is a spec that parses back to the same one
    assert FilterSpec.parse(str(spec)) == spec
