"""In-place samples: the producer makes a sample straight into a loaned ring slot instead of
into arrays of its own that `publish` then copies (docs/architecture.md "In place").

    step:  loan(generation)  -> lazy views of the next slot (or None: the copy path)
           feed.step(..., into=views)   the modalities write into the views (`out=`); the
                                        slot is loaned at the first view asked for
           finish(schema, meta, arrays) -> committed, or None (the copy path publishes)

The loan is taken when the pipeline asks for its first view, not before the feed steps: a
step that waits (recorded-speed pacing, a clip not decoded yet) holds no slot, so a lossy
ring keeps all its slots readable meanwhile. A loan that finds no free slot within the step's
timeout (lossless) or fails otherwise gives no views: the sample is made into arrays of its
own and goes the copy path, whose FULL keeps it for the next step (engine.py `_unpublished`).

The schema of a generation's samples is only known once one was made, so the first sample
of a generation (after a start or a change) is made into arrays of its own and published by
copy; it tells the schema that the next samples are loaned with. A sample whose schema turns
out different (a watched sensor joined, an unknown sensor whose metadata differs sample to
sample) keeps its slot: the loan is retyped to the sample's schema (`Slot.retype`: the same
bytes seen in the new layout), inputs already at their place stay, the others are copied
into their views (counted by name); one that does not fit the slot gives the loan back
(`Slot.cancel`: readers never see it) and goes the copy path, which grows the ring. The
schema loaned with switches to a new one once two samples in a row had it, so samples that
alternate between two schemas keep the first. Within a sample made in place, an input that
could not be written in its view (a clip from the ffmpeg child's pipe; yuv420 planes; NVDEC
frames) is copied into it and counted by name. A live clip's frames are converted on the clip
thread and written into the view by the step (media_clips.ClipFrames): in place.

What is counted (status `copies`): bytes copied into slots beyond the pipeline's own output,
per sample and in total; samples made in place and samples copied; per input, how many
samples had it copied. Bytes, not calls: a 47 MiB clip and a 1 KiB vector are not one copy
each.
"""
from __future__ import annotations

import os

import numpy as np

from protocol.errors import RingDamaged, RingFull, RingTooLarge, SchemaError
from protocol.stages import now_ns
from protocol.schema import SampleMeta, SampleSchema

from .ring_sink import Put, RingSink

#: Set to 1 to publish every sample by copy (the path before in-place samples): what
#: bench/producer.py compares against; a daemon started with it says so in status.
FORCE_COPY_ENV = "MMFEED_PRODUCER_COPY"


class _LazyViews:
    """The views `SlotFill.loan` hands the feed: the slot is loaned at the first `get`. One
    instance per SlotFill, reused every step (no per-sample allocation)."""

    __slots__ = ("_fill",)

    def __init__(self, fill: "SlotFill"):
        self._fill = fill

    def __bool__(self) -> bool:
        return True

    def get(self, name: str, default=None):
        views = self._fill._views()
        return default if views is None else views.get(name, default)


class SlotFill:
    """The loan of one step and the copy counters. One per producer (engine.py)."""

    def __init__(self, sink: RingSink, force_copy: bool | None = None):
        self.sink = sink
        if force_copy is None:
            force_copy = os.environ.get(FORCE_COPY_ENV, "") not in ("", "0")
        self.force_copy = force_copy
        self.slot = None                                     # the open loan of this step
        self._expect: tuple[int, SampleSchema] | None = None  # (generation, its schema)
        self._candidate: SampleSchema | None = None  # another schema seen once in a row
        self.in_place_samples = 0
        self.copied_samples = 0
        self.copy_bytes_total = 0
        self.copy_bytes_last = 0
        self.copied_inputs: dict[str, int] = {}   # input -> samples where it was copied
        self.behind = 0                           # copied: a reader still needed the slot
        self.redone = 0                           # loans redone after the ring moved
        self.retyped = 0                          # samples whose schema was not the loan's
        self.last_number = -1                     # ring sample number of the last commit
        self.loan_ns = 0                          # time the last loan took (ring_write)
        self._lazy = _LazyViews(self)
        self._want: tuple[SampleSchema, float] | None = None  # this step's loan, not taken

    def loan(self, generation: int, timeout: float):
        """Views (a mapping with `get`) of a slot to make the next sample of `generation`
        in, loaned at the first `get`; or None (copy path: its schema is not known yet, or
        copies are forced). Never raises: see the module doc."""
        expect = self._expect
        self.loan_ns = 0
        if self.force_copy or expect is None or expect[0] != generation:
            self._want = None
            return None
        self._want = (expect[1], timeout)
        return self._lazy

    def _views(self) -> dict | None:
        """The slot's views, loaning it on the first call of the step; None when no slot."""
        if self.slot is not None:
            return self.slot.arrays
        want, self._want = self._want, None
        if want is None:
            return None
        t0 = now_ns()
        if self.sink.next_slot_needed():
            # A reader is one ring behind: the slot still holds its next sample. Made
            # apart and published by copy, the reader keeps it for the whole making.
            self.behind += 1
            return None
        try:
            self.slot = self.sink.loan(*want)
        except (RingFull, RingTooLarge, RingDamaged, SchemaError):
            self.slot = None  # made apart, published by copy (which says and counts why)
        self.loan_ns = now_ns() - t0
        return self.slot.arrays if self.slot is not None else None

    def cancel(self) -> None:
        """Give back this step's loan if it is still open (no sample, an error, a Wait)."""
        self._want = None
        slot, self.slot = self.slot, None
        if slot is not None:
            slot.cancel()

    def finish(self, schema: SampleSchema, meta: SampleMeta, arrays: dict
               ) -> tuple[Put, str] | None:
        """Commit this step's loan with the made sample: the sink's (Put, why), or None when
        there is no loan or the sample's schema does not fit the loaned slot (the loan is
        given back; the caller publishes by copy, `copied`). Another schema that fits is
        committed by retyping the loan (module doc). A loan the ring's move cancelled is
        redone in the new layout (empty: no wait but the lossless follow of ring_sink)."""
        slot, self.slot = self.slot, None
        if slot is None:
            return None
        if not slot.open:  # the ring moved meanwhile: redo the loan in the new layout
            slot = self.sink.loan(schema, None)
            self.redone += 1
        copied = 0
        if schema.schema_id != slot.schema.schema_id:
            copied = self._retype(slot, schema, arrays)
            if copied is None:
                return None
        else:
            self._candidate = None
            for name, view in slot.arrays.items():
                a = arrays[name]
                if a is not view:
                    copied += self._copy(name, view, a)
        self.last_number = slot.number
        put = self.sink.commit(slot, meta)
        if put[0] is Put.PUBLISHED:
            self._count(copied)
        return put

    def _copy(self, name: str, view: np.ndarray, a) -> int:
        np.copyto(view, a, casting="no")
        self.copied_inputs[name] = self.copied_inputs.get(name, 0) + 1
        return view.nbytes

    def _retype(self, slot, schema: SampleSchema, arrays: dict) -> int | None:
        """The sample is of another schema than the loan's: see the module doc. Bytes copied,
        or None when the loan was given back (the copy path publishes it)."""
        old = slot.arrays
        try:
            slot.retype(schema)
        except SchemaError:
            slot.cancel()
            return None
        self.retyped += 1
        if self._candidate is not None and self._candidate.schema_id == schema.schema_id:
            self._expect = (self._expect[0], schema)  # two in a row: loan with it from now on
            self._candidate = None
        else:
            self._candidate = schema
        made = {id(v) for v in old.values()}
        place = {}  # inputs made in the slot: where each is, to know which are in place
        for name, a in arrays.items():
            if id(a) in made:
                place[name] = a.__array_interface__["data"][0]
        # Anything made in the slot but not at its new place is lifted out first, so that no
        # copy below writes over an input not yet moved (the two layouts may overlap).
        moving = {}
        for name, view in slot.arrays.items():
            if name in place and place[name] != view.__array_interface__["data"][0]:
                moving[name] = np.array(arrays[name])
        copied = sum(a.nbytes for a in moving.values())
        for name, view in slot.arrays.items():
            a = moving.get(name, arrays[name])
            if name in place and name not in moving and a.shape == view.shape \
                    and a.dtype == view.dtype:
                continue  # made in place at the same offset in both layouts
            copied += self._copy(name, view, a)
        return copied

    def copied(self, schema: SampleSchema, generation: int, current: int) -> None:
        """A sample published by copy (whole payload); its schema is the one the next samples
        of `generation` are loaned with when that is the `current` generation."""
        self._count(schema.payload_nbytes)
        if generation == current:
            self._expect = (generation, schema)

    def _count(self, nbytes: int) -> None:
        self.copy_bytes_last = nbytes
        self.copy_bytes_total += nbytes
        if nbytes:
            self.copied_samples += 1
        else:
            self.in_place_samples += 1

    def status(self) -> dict:
        """Status `copies` (docs/CONTRACTS.md)."""
        n = self.in_place_samples + self.copied_samples
        return {
            "path": "copy (forced by $" + FORCE_COPY_ENV + ")" if self.force_copy
            else "in place" if self.sink.memory == "host" else "copy (GPU slots)",
            "copy_bytes_per_sample": self.copy_bytes_last,
            "copy_bytes_mean": round(self.copy_bytes_total / n, 1) if n else 0.0,
            "copy_bytes_total": self.copy_bytes_total,
            "in_place_samples": self.in_place_samples,
            "copied_samples": self.copied_samples,
            "copied_inputs": dict(self.copied_inputs),
            "copied_reader_behind": self.behind,
        }
