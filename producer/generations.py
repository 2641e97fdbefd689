"""Generations: the numbered configurations of a running producer.

A generation is everything that decides what a sample looks like - the pipeline config
(filter, clip length, segment, which file feeds which input, radar method, enabled inputs)
plus the live label - frozen under a number. Every control change that alters samples makes
the next number; readers see it in each slot (`SampleMeta.generation`) and in the ring
header, so a trainer knows which samples came after `mmctl filter gray` without guessing.

This module only checks and records changes; it owns no I/O. The checks that need the source
(which stems exist, which classes there are) take a `SourceFacts`; the one that needs a real
sample (does the new filter's output fit a ring slot?) is the daemon's, which calls
`Generations.propose()` first and `commit()` only once the new config has been proven.
Nothing is changed by a refused proposal.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field

from protocol.errors import BadArgument
from protocol.filters import FilterSpec

from .generation_store import MAX_GENERATION
from .modalities import radar
from .pipeline import PipelineConfig

#: Model inputs a `sensor` command may re-point, and the file kind each must be fed from.
SENSOR_INPUTS = ("video", "audio", "lidar", "radar")
#: Largest segment time (s) accepted: 115 days, far past any recording, and small enough
#: that time + segment start stays inside the int64 nanosecond timestamps of SampleMeta.
MAX_SEGMENT_S = 1e7
#: SampleMeta.label is an int32; -1 is "unlabelled", so a given label is 0..MAX_LABEL.
MAX_LABEL = 2**31 - 1
_INDEX = re.compile(r"[0-9]{1,10}")


@dataclass(frozen=True)
class SourceFacts:
    """What the daemon knows about its source, for checking control arguments."""

    stems: dict[str, frozenset[str]]      # kind -> stems present in the source
    classes: tuple[str, ...] = ()

    @property
    def inputs(self) -> tuple[str, ...]:
        """Model inputs the source can feed (kinds present, unknown sensors by stem)."""
        names = [k for k in SENSOR_INPUTS if self.stems.get(k)]
        names += sorted(self.stems.get("unknown", ()))
        return tuple(names)


@dataclass(frozen=True)
class Generation:
    number: int
    config: PipelineConfig
    label: str | None = None   # class name given to every sample; None: the sample's own
    reason: str = "start"
    created: float = field(default_factory=time.time)

    def summary(self) -> dict:
        """JSON-able view for `status` and logs."""
        c = self.config
        return {
            "generation": self.number,
            "filter": str(c.filter),
            "clip_frames": c.clip_frames,
            "segment": list(c.segment) if c.segment is not None else None,
            "sensors": dict(c.sensors),
            "methods": dict(c.methods),
            "enabled": sorted(c.enabled) if c.enabled is not None else "all",
            "label": self.label,
            "reason": self.reason,
        }


class Generations:
    """The current generation and the checked changes that make the next one."""

    def __init__(self, config: PipelineConfig, facts: SourceFacts, label: str | None = None,
                 first: int = 1):
        """`first`: the number of the first generation (one past the last this ring name
        ever had, generation_store.py: generations never go backwards across restarts)."""
        self.facts = facts
        if label is not None:
            self._check_label(label)
        if not 1 <= first <= MAX_GENERATION:
            raise BadArgument(f"generation {first}: expected 1..{MAX_GENERATION}")
        self.current = Generation(first, config, label)
        self.history: list[Generation] = [self.current]

    # --- proposals (pure; raise BadArgument, change nothing) ------------------------------

    def propose_filter(self, spec: FilterSpec) -> Generation:
        """`spec` as parsed once where it came in (the control server's `filter` argument,
        protocol/control.py WIRE_ARGS; `--filter` in run.py)."""
        if not isinstance(spec, FilterSpec):
            raise TypeError(f"propose_filter: expected a FilterSpec, got {type(spec).__name__}")
        return self._next(f"filter {spec}", filter=spec)

    def propose_sensor(self, input_name: str, stem: str) -> Generation:
        kind = input_name if input_name in SENSOR_INPUTS else None
        if kind is None:
            raise BadArgument(f"sensor: input {input_name[:80]!r} cannot be re-pointed; accepted "
                              f"inputs: {', '.join(SENSOR_INPUTS)}")
        have = sorted(self.facts.stems.get(kind, ()))
        if not have:
            raise BadArgument(f"sensor {input_name}: this source has no {kind} input; its "
                              f"inputs: {self._inputs_text()}")
        if stem not in have:
            raise BadArgument(f"sensor {input_name}: no {kind} file with stem {stem[:80]!r} in the "
                              f"source; {kind} stems that exist: {', '.join(have) or '(none)'}")
        sensors = {**self.current.config.sensors, input_name: stem}
        return self._next(f"sensor {input_name}={stem}", sensors=sensors)

    def propose_method(self, input_name: str, name: str) -> Generation:
        if input_name != "radar":
            raise BadArgument(f"method: input {input_name[:80]!r} has no processing methods; "
                              f"accepted inputs: radar")
        if name not in radar.METHODS:
            raise BadArgument(f"method radar: unknown method {name[:80]!r}; accepted: "
                              f"{', '.join(radar.METHODS)}")
        if input_name not in self.facts.inputs:
            raise BadArgument(f"method {input_name}: this source has no {input_name} input; "
                              f"its inputs: {self._inputs_text()}")
        methods = {**self.current.config.methods, input_name: name}
        return self._next(f"method {input_name}={name}", methods=methods)

    def propose_segment(self, start: float, end: float) -> Generation:
        """Range checks only; what the source holds (a file's duration, a stream that has
        no timeline) is the daemon's check."""
        if not (math.isfinite(start) and math.isfinite(end)):
            raise BadArgument(f"segment: START and END must be finite numbers of seconds, got "
                              f"{start:g}..{end:g}")
        if not (0 <= start < end <= MAX_SEGMENT_S):
            raise BadArgument(f"segment: expected 0 <= START < END <= {MAX_SEGMENT_S:g} "
                              f"seconds, got {start:g}..{end:g}")
        return self._next(f"segment {start:g}..{end:g}", segment=(float(start), float(end)))

    def propose_segment_clear(self) -> Generation | None:
        """The whole source again; None when no segment is set (nothing changes)."""
        if self.current.config.segment is None:
            return None
        return self._next("segment clear", segment=None)

    def propose_label(self, name: str) -> Generation:
        label = None if name in ("", "none", "auto") else name
        if label is not None:
            self._check_label(label)
        return self._next(f"label {label or 'auto'}", label=label)

    def propose_modalities(self, enable: list[str], disable: list[str]) -> Generation:
        both = sorted(set(enable) & set(disable))
        if both:
            raise BadArgument(f"modalities: {both[0]!r} is both enabled and disabled")
        known = self.facts.inputs
        bad = [m for m in (*enable, *disable) if m not in known]
        if bad:
            raise BadArgument(f"modalities: unknown input {bad[0]!r}; inputs of this source: "
                              f"{', '.join(known)}")
        now = set(self.enabled())
        enabled = (now | set(enable)) - set(disable)
        if not enabled:
            raise BadArgument(f"modalities: disabling {', '.join(sorted(disable))} leaves no "
                              f"input enabled")
        if enabled == now:
            raise BadArgument(f"modalities: nothing changes; enabled already: "
                              f"{', '.join(sorted(now))}")
        return self._next(f"modalities -{','.join(disable)} +{','.join(enable)}",
                          enabled=None if enabled == set(known) else frozenset(enabled))

    def enabled(self) -> list[str]:
        """Inputs of this source that samples carry now."""
        on = self.current.config.enabled
        return [m for m in self.facts.inputs if on is None or m in on]

    # --- commit ----------------------------------------------------------------------------

    def commit(self, gen: Generation) -> Generation:
        """Make a proven proposal current. Proposals made before another commit are stale."""
        if gen.number != self.current.number + 1:
            raise RuntimeError(f"generation {gen.number} proposed against "
                               f"{gen.number - 1}, current is {self.current.number}")
        self.current = gen
        self.history.append(gen)
        del self.history[:-64]
        return gen

    def label_index(self, gen: Generation, own: int) -> int:
        """The label to write: the override's class index, else the sample's own label.
        (`_check_label` let only a class name or an index 0..MAX_LABEL through.)"""
        if gen.label is None:
            return own
        try:
            return self.facts.classes.index(gen.label)
        except ValueError:
            return int(gen.label)

    # --- helpers ---------------------------------------------------------------------------

    def _check_label(self, name: str) -> None:
        """A class name of the source, or an index: 0..len(classes)-1 with a class list,
        0..MAX_LABEL (SampleMeta's int32) without one."""
        classes = self.facts.classes
        if classes:
            if name in classes:
                return
            listed = ", ".join(f"{i} {c}" for i, c in enumerate(classes[:50]))
            more = f" and {len(classes) - 50} more" if len(classes) > 50 else ""
            if _INDEX.fullmatch(name) and int(name) < len(classes):
                return
            raise BadArgument(f"label: {name[:80]!r} is not a class of this source; its "
                              f"{len(classes)} classes (index name): {listed}{more}")
        if not _INDEX.fullmatch(name) or int(name) > MAX_LABEL:
            raise BadArgument(f"label: this source has no class list (start the producer with "
                              f"--classes A,B,... to label by name); give a class index "
                              f"0..{MAX_LABEL}, got {name[:80]!r}")

    def _inputs_text(self) -> str:
        return ", ".join(self.facts.inputs) or "(none known yet: the source is not open)"

    def _next(self, reason: str, *, label: str | None | object = ..., **changes) -> Generation:
        cur = self.current
        if cur.number >= MAX_GENERATION:
            raise BadArgument(f"{reason}: refused, generation {cur.number} is the last one a "
                              f"sample can carry (u32)")
        config = cur.config.with_changes(**changes) if changes else cur.config
        return Generation(cur.number + 1, config, cur.label if label is ... else label, reason)
