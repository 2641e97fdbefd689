"""Samples made in place in ring slots (producer/slot_fill.py), seen from outside: a real
`mm-producer run` process, its real ring read by this process, `status` over real ZeroMQ.
Bytes copied into slots beyond the pipeline's own output are counted in status `copies`."""
from __future__ import annotations

import contextlib

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _polling import wait_for  # noqa: E402
from _rings import ring_name_fixture  # noqa: E402
from test_producer_daemon import Daemon, first_sample_of  # noqa: E402

from producer.dataset import index_dataset
from producer.pipeline import Pipeline, PipelineConfig
from producer.ring_sink import Put, RingSink
from producer.slot_fill import FORCE_COPY_ENV, SlotFill
from protocol.ring import RingConfig, RingReader, RingWriter
from protocol.schema import ModalitySpec, SampleMeta, SampleSchema
from producer.synth import make_dataset

SLOT_BYTES = 1 << 20
LIDAR = SampleSchema((ModalitySpec("lidar", "float32", (3, 16, 16)),))

ring_name = ring_name_fixture("mmip")


@pytest.fixture
def lidar_fill(ring_name):
    """A 2-slot ring holding one published sample of LIDAR in generation 1, and a SlotFill
    that knows that schema: its next loan is in place (the unit tests below, no daemon)."""
    sink = RingSink(RingConfig(ring_name, slots=2, slot_bytes=1 << 16), RingWriter.create)
    fill = SlotFill(sink, force_copy=False)
    try:
        first = {"lidar": np.zeros((3, 16, 16), np.float32)}
        assert sink.put(LIDAR, SampleMeta(generation=1, index=0), first, 1.0)[0] is Put.PUBLISHED
        fill.copied(LIDAR, 1, 1)
        yield sink, fill
    finally:
        sink.close()


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """Samples of one schema: video, audio, lidar (no radar, no unknown sensor)."""
    root = tmp_path_factory.mktemp("plain") / "ds"
    return make_dataset(root, per_class={"train": 2}, size=(32, 24), clip_seconds=0.5,
                        extras=False)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Every modality; the imu's metadata dtype/shape on every other sample (synth.py), so
    samples alternate between two schemas that differ in the last input only."""
    root = tmp_path_factory.mktemp("mixed") / "ds"
    return make_dataset(root, per_class={"train": 2}, size=(32, 24), clip_seconds=0.5)


def _run(source, *args, env=None) -> Daemon:
    return Daemon(source, "--loop", "--rate", "max", "--clip-frames", "4",
                  "--slot-bytes", str(SLOT_BYTES), *args, env=env)


@contextlib.contextmanager
def _in_place(source):
    """A running daemon that has made a few samples in place already; stopped after."""
    d = _run(source)
    try:
        wait_for(lambda: _copies(d)["in_place_samples"] >= 3, what="samples made in place")
        yield d
    finally:
        d.stop()


def _copies(d: Daemon) -> dict:
    return d.status()["copies"]


def test_after_a_generations_first_sample_no_byte_is_copied_into_the_ring(plain):
    d = _run(plain)
    try:
        c = wait_for(lambda: (c := _copies(d))["in_place_samples"] >= 5 and c,
                     what="samples made in place")
        assert c["path"] == "in place"
        assert c["copy_bytes_per_sample"] == 0
        assert c["copied_samples"] == 1  # the generation's first: its schema was not known
        assert c["copied_inputs"] == {}
    finally:
        d.stop()


def test_a_sample_made_in_place_reads_back_equal_to_the_pipelines_own(plain):
    with _in_place(plain) as d:
        s = first_sample_of(d.ring, 1)
        by_key = {x.key: x for x in index_dataset(plain).samples}
        want = Pipeline(PipelineConfig(clip_frames=4)).process(by_key[s.meta.source])
        assert list(s.arrays) == list(want)
        for name, a in want.items():
            np.testing.assert_array_equal(s.arrays[name], a, err_msg=name)


def test_a_filter_change_copies_its_first_sample_once_then_is_back_to_zero(plain):
    with _in_place(plain) as d:
        before = _copies(d)
        gen = d.request("filter", spec="gray")["generation"]
        first_sample_of(d.ring, gen)
        c = wait_for(lambda: (c := _copies(d))["in_place_samples"]
                     >= before["in_place_samples"] + 3 and c, what="in place again")
        assert c["copied_samples"] == before["copied_samples"] + 1  # the new schema's first
        assert c["copy_bytes_per_sample"] == 0
        assert d.status()["generation"] == gen


def test_samples_alternating_between_two_schemas_copy_only_the_input_that_differs(mixed):
    d = _run(mixed)
    try:
        c = wait_for(lambda: (c := _copies(d))["in_place_samples"] >= 3
                     and c["copied_samples"] >= 4 and c, what="samples of both schemas")
        assert set(c["copied_inputs"]) == {"imu"}  # video, audio, lidar, radar: in place
        assert c["copy_bytes_per_sample"] in (0, 256 * 4)  # the (256,) float32 imu profile
    finally:
        d.stop()


def test_a_reader_one_ring_behind_keeps_its_next_sample_and_a_lapped_one_costs_no_copies(plain):
    """A loan would take the slot holding the sample a lagging reader reads next for the whole
    making of the new one (tens of ms at 1080p); the step makes that one apart and publishes
    it by copy instead, counted. Once the reader is lapped (it never reads here) its next
    sample is gone whatever a write does, so the samples after it are made in place again
    while it is still attached (protocol/ring_readers.py next_slot_needed)."""
    with _in_place(plain) as d:
        with RingReader.attach(d.ring, start="newest"):  # registered, never reads
            c = wait_for(lambda: (c := _copies(d))["copied_reader_behind"] >= 1 and c,
                         what="the sample made apart for the reader one ring behind")
            assert c["copied_inputs"] == {}  # a whole sample, not inputs that could not fit
            after = wait_for(lambda: (a := _copies(d))["in_place_samples"]
                             >= c["in_place_samples"] + 3 and a,
                             what="in place again with the lapped reader still attached")
            assert after["copied_reader_behind"] == c["copied_reader_behind"]


def test_the_forced_copy_path_copies_every_whole_sample(plain):
    d = _run(plain, env={FORCE_COPY_ENV: "1"})
    try:
        c = wait_for(lambda: (c := _copies(d))["copied_samples"] >= 3 and c,
                     what="samples published")
        s = first_sample_of(d.ring, 1)
        assert c["path"].startswith("copy (forced")
        assert c["in_place_samples"] == 0
        assert c["copy_bytes_per_sample"] == s.schema.payload_nbytes
    finally:
        d.stop()


def test_a_ring_replaced_while_a_sample_is_loaned_gets_that_sample_by_a_counted_redo(lidar_fill):
    from protocol.errors import RingDamaged

    sink, fill = lidar_fill
    made = {"lidar": fill.loan(1, 1.0).get("lidar")}  # the slot is loaned here
    made["lidar"][:] = 7.0  # made in place...
    sink._replace(RingDamaged("test: replaced while a sample is loaned"))  # ...then moved
    with RingReader.attach(sink.config.name, start="oldest") as r:
        put, why = fill.finish(LIDAR, SampleMeta(generation=1, index=1), made)
        assert put is Put.PUBLISHED, why
        s = r.receive(timeout=5)
    assert s.meta.index == 1 and (s.arrays["lidar"] == 7.0).all()
    assert fill.redone == 1 and fill.copy_bytes_last == LIDAR.payload_nbytes
    assert fill.status()["copied_inputs"] == {"lidar": 1}


def test_a_preview_of_a_sample_whose_slot_was_loaned_again_is_refused_not_drawn_torn(ring_name):
    from producer.generations import Generation
    from producer.watching import RunWatch, WrongState

    schema, name = LIDAR, ring_name
    watch = RunWatch(name, None)
    gen = Generation(1, PipelineConfig())
    with RingWriter.create(RingConfig(name, slots=1, slot_bytes=1 << 16)) as w:
        slot = w.loan(schema)
        slot.arrays["lidar"][:] = 0.5
        n = slot.commit(SampleMeta(generation=1, index=0))
        watch.published(schema, SampleMeta(generation=1, index=0), slot.arrays, gen, (w, n))
        assert watch.preview((), None)["index"] == 0  # drawn while the slot holds it
        again = w.loan(schema)  # a 1-slot ring: the next sample takes the same slot
        again.arrays["lidar"][:] = -1.0
        again.cancel()
        with pytest.raises(WrongState, match="being rewritten"):
            watch.preview((), None)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A media file of several 4-frame clips (a synthetic sample's video, 2 s at 10 fps)."""
    root = make_dataset(tmp_path_factory.mktemp("media") / "ds", per_class={"train": 1},
                        size=(32, 24), clip_seconds=2.0, extras=False)
    return next(root.rglob("video.mp4"))


def test_a_media_files_clips_are_written_into_the_slot_with_no_byte_copied(media):
    d = _run(media)
    try:
        c = wait_for(lambda: (c := _copies(d))["in_place_samples"] >= 3 and c,
                     what="clips made in place")
        assert c["copy_bytes_per_sample"] == 0 and c["copied_inputs"] == {}
    finally:
        d.stop()


def test_a_clip_written_into_its_slot_reads_back_equal_to_the_decoded_clip(media):
    from producer.sources import MediaSource
    from protocol.filters import FilterSpec

    d = _run(media)
    try:
        wait_for(lambda: _copies(d)["in_place_samples"] >= 2, what="clips made in place")
        s = first_sample_of(d.ring, 1, lambda s: not s.meta.source.endswith("@0.00s"))
        clips = {f"{c.start_s:.2f}": np.asarray(c.video)
                 for c in MediaSource(str(media)).clips(FilterSpec(), 4)}
        want = clips[s.meta.source.rsplit("@", 1)[1][:-1]]
        np.testing.assert_array_equal(s.arrays["video"], want)
    finally:
        d.stop()


def test_a_step_that_asks_for_no_view_holds_no_slot_and_one_that_does_loans_it(lidar_fill):
    _, fill = lidar_fill
    assert fill.loan(1, 1.0) is not None and fill.slot is None  # a waiting step: no slot
    fill.cancel()
    into = fill.loan(1, 1.0)
    view = into.get("lidar")
    assert fill.slot is not None and fill.slot.number == 1  # loaned at the first view
    view[:] = 2.0
    assert fill.finish(LIDAR, SampleMeta(generation=1, index=1), {"lidar": view})[0] \
        is Put.PUBLISHED
    assert fill.copy_bytes_last == 0 and fill.in_place_samples == 1
