"""What an operator sees of a running producer and keeps of it: the newest sample
(`mmctl preview`), what made a generation (`mmctl generation N`, the trainer's TensorBoard
marker), a recording of live samples into the disk cache (`mmctl record`), and the figures
`--metrics` exports. Kept apart from the engine (engine.py), which only makes samples: the
engine hands each published sample to `RunWatch.published` and nothing here runs otherwise.

Hot path: `published` stores a reference to the pipeline's own arrays (no copy) and, only
while a recording runs, offers them to the recorder; a preview is drawn from that reference
when asked for, never per sample. A sample made in place (slot_fill.py) is a view of its ring
slot: the preview reads it between steps, when no loan is open, and checks that the slot
still holds it (a 1-slot ring reuses it at once); the recorder, which writes on its own
thread later, is handed a copy (only while recording).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from protocol.errors import BadArgument, ControlError, MmfeedError
from protocol.schema import SampleMeta, SampleSchema

from .generations import Generation, Generations

log = logging.getLogger("producer.watching")


class WrongState(ControlError):
    """A command that cannot apply in the producer's present state (e.g. `resume` of a source
    that has finished); the message says what the state is and what would work."""

    code = "wrong_state"


class RunWatch:
    """The newest published sample and the recording in progress, for the control handlers."""

    def __init__(self, ring: str, record_cache: Path | None):
        self.ring = ring
        self.record_cache = record_cache
        self.newest: tuple[Mapping[str, Any], SampleMeta, Generation] | None = None
        self.newest_slot: tuple[Any, int] | None = None  # (ring writer, sample) of a view
        self.recorder = None          # producer/recorder.py Recorder while `mmctl record` runs
        self.recorded_total = 0       # samples of finished recordings (metrics)

    def published(self, schema: SampleSchema, meta: SampleMeta, arrays: Mapping[str, Any],
                  gen: Generation, slot: tuple[Any, int] | None = None) -> None:
        """Called once per published sample: a reference kept, a recording fed. `slot`:
        (writer, sample number) when `arrays` are views of that ring slot."""
        self.newest = (arrays, meta, gen)
        self.newest_slot = slot
        if self.recorder is not None:
            if slot is not None:
                arrays = {k: v.copy() for k, v in arrays.items()}
            self.recorder.offer(schema, meta, arrays, gen)

    # --- mmctl generation / preview ----------------------------------------------------------

    @staticmethod
    def generation(gens: Generations, number: int) -> dict:
        """What made generation `number` (filter, sensors, methods, the change). The newest 64
        are kept."""
        for gen in gens.history:
            if gen.number == number:
                return {"generation": number, "created": gen.created, **gen.summary()}
        kept = [g.number for g in gens.history]
        raise BadArgument(f"generation {number}: not among the {len(kept)} this producer keeps "
                          f"({kept[0]}..{kept[-1]})")

    def preview(self, classes: tuple[str, ...] | list[str], idle_reason: str | None) -> dict:
        """The newest published sample as the ring carried it, thinned to fit a reply
        (protocol/preview.py), with the generation, filter, sensors and method that made it."""
        from protocol.preview import encode_sample

        if self.newest is None:
            raise WrongState(f"preview: nothing published yet ({idle_reason or 'starting'})")
        arrays, meta, gen = self.newest
        if self.newest_slot is not None and not self.newest_slot[0].holds(self.newest_slot[1]):
            raise WrongState("preview: the newest sample's ring slot is being rewritten; ask "
                             "again after the next sample")
        info = {**gen.summary(), "source": meta.source, "label": meta.label,
                "label_name": classes[meta.label] if 0 <= meta.label < len(classes) else None,
                "timestamp_ns": meta.timestamp_ns, "index": meta.index,
                "made_by": "mm-producer run (the ring)"}
        from protocol.video_store import pictured

        host = {k: (v.cpu().numpy() if hasattr(v, "cpu") else v) for k, v in arrays.items()}
        return encode_sample(pictured(host), info)  # yuv420 planes drawn as their RGB

    # --- mmctl record ----------------------------------------------------------------------------

    def record(self, action: str, split: str, cache: str, classes: tuple[str, ...]) -> dict:
        """`mmctl record start|stop|status` (producer/recorder.py)."""
        from .recorder import Recorder

        rec = self.recorder
        if action == "status":
            return rec.status() if rec is not None else {"recording": False}
        if action == "stop":
            if rec is None:
                raise WrongState("record stop: nothing is being recorded (`mmctl record start`)")
            self.recorder = None
            self.recorded_total += rec.counts.recorded
            return rec.stop()
        if action != "start":
            raise BadArgument(f"record: action {action[:40]!r}: expected start, stop or status")
        if rec is not None:
            raise WrongState(f"record start: already recording into {rec.cache} "
                             f"(split {rec.split}); `mmctl record stop` first")
        where = cache or self.record_cache
        if not where:
            raise BadArgument("record start: no cache to record into; give one (`mmctl record "
                              "start --cache DIR`) or start the producer with --record-cache DIR")
        self.recorder = Recorder.start(where, split, self.ring, tuple(classes))
        return self.recorder.status()

    def record_status(self) -> dict | None:
        return self.recorder.status() if self.recorder is not None else None

    def recorded(self) -> int:
        """Samples recorded by this producer so far, finished recordings and the open one."""
        return self.recorded_total + (self.recorder.counts.recorded
                                      if self.recorder is not None else 0)

    def close(self) -> None:
        """At shutdown: what was recorded is good data, so it is kept (committed)."""
        if self.recorder is None:
            return
        try:
            self.recorder.stop()
        except MmfeedError as e:
            log.error("the recording could not be kept: %s", e)
        self.recorder = None
