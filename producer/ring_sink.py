"""The producer's ring sink: where made samples go, over a whole run. The ring is moved to
bigger slots when a sample outgrows them and replaced by a fresh segment when it is damaged.
The engine (engine.py) hands each sample to `put()`, which never waits on anyone's behalf: it
answers PUBLISHED, FULL (a lossless ring's slowest reader is behind: the engine keeps the
sample and offers it again after the daemon has answered control) or REFUSED with the reason
(counted, never a crash). `publish()` is the same with exceptions, RingWriter's surface
(publish, heartbeat, set_generation, stats, close), for code that holds a writer.

NOTE [ring layouts]: a ring is created with `--slot-bytes` (default 8 MiB) per slot, a floor,
not a cap. The first sample that does not fit - 8 frames of 1080p RGB are 47.5 MiB, a filter
change or a new source may make any size - moves the ring to a new layout under the same name
(`RingWriter.supersede`: a new segment and epoch renamed over the old one; readers finish the
old layout, get RingSuperseded and re-attach by name, which the trainer's loops do by
themselves). Slots grow to the sample's size plus 1/8, in whole MiB (`slot_bytes_for`), and
never shrink, so a run moves a handful of times at most. What bounds it is the cap on one
layout's shared memory, slots x slot stride (`--max-ring-bytes`, default 1 GiB, and never
more than /dev/shm has free): a sample beyond it is refused with RingTooLarge, said once per
schema, and counted; a control change whose samples would be beyond it is refused before it
is made (`check_fits`). While readers of the old layout still hold it, both layouts are in
memory.

What a move may lose: nothing in the old layout (readers drain it before they move). In the
new one a reader finds what the ring still holds when it re-attaches (start "oldest"): in
lossy mode, samples published before it re-attached are lost only if more than `slots` came
meanwhile; in lossless mode the keeper holds the producer back (RingFull, the daemon's
ordinary back-pressure path) until as many readers as the old layout had have registered on
the new one, for at most FOLLOW_WAIT_S, so a reader that follows within that time loses
nothing.

A damaged ring (RingDamaged: the segment truncated by another process, found by a page fault
or by heartbeat's size check) is replaced the same way with the same layout: the producer
never dies of it, the sample in hand is published into the fresh segment.
"""
from __future__ import annotations

import collections
import dataclasses
import enum
import logging
import time
from typing import Callable, Mapping

from protocol.errors import BadArgument, RingDamaged, RingError, RingFull, RingTooLarge
from protocol.ring import RingConfig, RingWriter
from protocol.schema import SampleMeta, SampleSchema

log = logging.getLogger("producer.ring")

SLOT_ROUND = 1 << 20     # slots grow in whole MiB
HEADROOM_DIV = 8         # ... to the sample's size plus 1/8
FOLLOW_WAIT_S = 2.0      # lossless: how long a move holds the producer for readers to follow
REPLACE_RETRY_S = 1.0    # a damaged ring whose replacement failed is tried again this often
SCHEMAS_LOGGED = 64      # (generation, schema) pairs remembered as already logged


class Put(enum.Enum):
    """What `RingSink.put` did with a sample."""

    PUBLISHED = "published"
    FULL = "full"          # lossless and no free slot in time: offer the same sample again
    REFUSED = "refused"    # beyond --max-ring-bytes, or a damaged ring not replaceable now


def slot_bytes_for(need: int, current: int) -> int:
    """Slot size for a sample of `need` bytes: `need` plus 1/8 (a slightly bigger sample -
    audio joining, a crop a few pixels wider - should not move the ring again), rounded up
    to a MiB, never below `current`."""
    grown = -(-(need + need // HEADROOM_DIV) // SLOT_ROUND) * SLOT_ROUND
    return max(current, grown)


class RingSink:
    """Owns the producer's current ring writer (host RingWriter or GpuSlotWriter).

    `open_writer(config)` makes a writer for a config (the daemon's choice of host or GPU
    slots). Counters for status: `relayouts` (moves to bigger slots), `replacements` (fresh
    segments for damaged ones), `refused` (samples beyond the cap).
    """

    @classmethod
    def open(cls, config: RingConfig, device: str = "cpu") -> "RingSink":
        """The ring for `--device`: "cpu" is the host ring (torch's CUDA state is never
        touched); "auto"/"cuda" go through producer.gpu_slot_writer.open_writer, which puts
        frames in GPU slots when CUDA is there and otherwise logs once that they go through
        host memory."""
        if device == "cpu":
            return cls(config, RingWriter.create)
        if device not in ("auto", "cuda"):
            raise BadArgument(f"device {device!r}: expected 'cpu', 'auto' or 'cuda'")
        from .gpu_slot_writer import open_writer

        return cls(config, lambda cfg: open_writer(cfg, gpu=device))

    def __init__(self, config: RingConfig, open_writer: Callable[[RingConfig], object]):
        self.config = config
        self._open = open_writer
        self.writer = open_writer(config)
        self.relayouts = 0
        self.replacements = 0
        self.refused = 0
        self._generation: int | None = None
        self._sizes: dict[int, int] = {}          # schema_id -> payload bytes
        self._refused_said: set[int] = set()      # schema ids whose refusal was logged
        self._follow: tuple[float, int] | None = None  # (deadline, readers) after a move
        self._last_stats = None                   # RingStats of the last healthy read
        self._retry_at = 0.0                      # no replacement attempt before this time
        self._failed_said: str | None = None      # the last replacement failure logged
        self.last_schema: SampleSchema | None = None  # of the last sample put
        # NOTE [schema log]: one "sample schema" line per (generation, schema id), not one
        # per change of schema: a dataset whose samples alternate between two schemas (an
        # unknown sensor with and without metadata dtype) would log every sample otherwise.
        self._schemas_logged: collections.OrderedDict[tuple[int, int], None] = \
            collections.OrderedDict()

    # --- what the daemon reads ------------------------------------------------------------

    @property
    def slot_bytes(self) -> int:
        return self.config.slot_bytes

    @property
    def total_bytes(self) -> int:
        """Shared memory of the current layout (slots x slot stride + header and table)."""
        return self.config.layout().total_bytes

    @property
    def memory(self) -> str:
        """"host" for a shared-memory ring, "gpu" when payloads live in CUDA IPC slots."""
        return "host" if isinstance(self.writer, RingWriter) else "gpu"

    @property
    def published(self) -> int:
        return self.writer.published

    def stats(self):
        """The writer's RingStats; on a damaged ring that cannot be replaced right now, the
        last ones read (status and shutdown still answer)."""
        try:
            self._last_stats = self.writer.stats()
        except RingDamaged as e:
            try:
                self._replace(e)
                self._last_stats = self.writer.stats()
            except RingDamaged:
                if self._last_stats is None:
                    raise
        return self._last_stats

    def check_fits(self, need: int, why: str = "") -> None:
        """RingTooLarge when no layout within the cap holds a sample of `need` bytes: a
        control change whose samples the ring could not carry is refused before it is made."""
        if need > self.config.slot_bytes:
            self._fit(need, why)

    # --- what the engine does ---------------------------------------------------------------

    def put(self, schema: SampleSchema, meta: SampleMeta, arrays: Mapping[str, object],
            timeout: float) -> tuple[Put, str]:
        """Offer one sample: (PUBLISHED, ""), (FULL, why) when a lossless ring had no free
        slot within `timeout` (the caller keeps the sample and offers it again), or
        (REFUSED, why) for a sample beyond --max-ring-bytes (said once per schema) or a
        damaged ring that could not be replaced (said once): counted by the caller."""
        self.note_schema(schema, meta)
        try:
            self.publish(schema, meta, arrays, timeout=timeout)
        except (RingTooLarge, RingDamaged) as e:
            return Put.REFUSED, str(e)
        except RingFull as e:
            return Put.FULL, str(e)
        return Put.PUBLISHED, ""

    def note_schema(self, schema: SampleSchema, meta: SampleMeta) -> None:
        """`last_schema`, and the "sample schema" line once per (generation, schema) (NOTE
        [schema log]); for every sample offered, by copy (`put`) or made in place."""
        self.last_schema = schema
        said = (meta.generation, schema.schema_id)
        if said not in self._schemas_logged:  # NOTE [schema log]
            self._schemas_logged[said] = None
            if len(self._schemas_logged) > SCHEMAS_LOGGED:
                self._schemas_logged.popitem(last=False)
            log.info("sample schema", extra={"generation": meta.generation,
                                             "schema": repr(schema)})

    def publish(self, schema: SampleSchema, meta: SampleMeta, arrays: Mapping[str, object],
                timeout: float | None = None) -> int:
        """Publish one sample, moving the ring first when it does not fit. RingTooLarge when
        it cannot fit within the cap (logged once per schema); RingFull as the writer's, or
        while a lossless move waits for its readers."""
        self._make_room(schema, timeout)
        try:
            return self.writer.publish(schema, meta, arrays, timeout)
        except RingDamaged as e:
            self._replace(e)
            return self.writer.publish(schema, meta, arrays, timeout)

    def next_slot_needed(self) -> bool:
        """RingWriter.next_slot_needed; False where this sink lends no slots."""
        return isinstance(self.writer, RingWriter) and self.writer.next_slot_needed()

    def loan(self, schema: SampleSchema, timeout: float | None = None):
        """A slot (protocol.ring_writer.Slot) to make the next sample of `schema` in place
        (producer/slot_fill.py), or None where this sink lends none (GPU slots). The ring is
        moved first when the schema outgrows its slots, as `publish` does; RingFull,
        RingTooLarge and RingDamaged as there. Nothing moves the ring while a loan is out
        (moves happen in here, in `publish` and between steps); a move that found one
        cancels it (RingWriter.supersede), and slot_fill redoes it in the new layout."""
        if not isinstance(self.writer, RingWriter):
            return None
        self._make_room(schema, timeout)
        try:
            return self.writer.loan(schema, timeout)
        except RingDamaged as e:
            self._replace(e)
            return self.writer.loan(schema, timeout)

    def commit(self, slot, meta: SampleMeta) -> tuple[Put, str]:
        """Publish a loaned slot: (PUBLISHED, "") or (REFUSED, why) when the segment was found
        damaged meanwhile (the sample made in it is lost, counted by the caller; the ring is
        replaced as for `put`)."""
        self.note_schema(slot.schema, meta)
        try:
            slot.commit(meta)
        except RingDamaged as e:
            try:
                self._replace(e)
            except RingDamaged:
                pass  # said by _replace; the next heartbeat tries again
            return Put.REFUSED, f"{e}; the sample made in place in it is lost"
        return Put.PUBLISHED, ""

    def _make_room(self, schema: SampleSchema, timeout: float | None) -> None:
        """Move the ring to bigger slots when `schema` outgrows them; after a lossless move,
        wait (RingFull) for its readers to follow."""
        sid = schema.schema_id
        need = self._sizes.get(sid)
        if need is None:
            need = self._sizes[sid] = schema.payload_nbytes
            if len(self._sizes) > 1024:
                self._sizes.clear()
        if need > self.config.slot_bytes:
            self._grow(need, schema)
        if self._follow is not None:
            self._wait_for_followers(timeout)

    def heartbeat(self) -> None:
        """The writer's heartbeat; a damaged ring found there is replaced. Never raises for
        damage: a replacement that fails (no room in /dev/shm) is logged and tried again."""
        try:
            self.writer.heartbeat()
        except RingDamaged as e:
            try:
                self._replace(e)
            except RingDamaged:
                pass  # said by _replace; the next heartbeat tries again

    def set_generation(self, generation: int) -> None:
        self._generation = int(generation)
        try:
            self.writer.set_generation(generation)
        except RingDamaged as e:
            try:
                self._replace(e)  # the new ring gets the generation
            except RingDamaged:
                pass

    def close(self) -> None:
        self.writer.close()

    # --- moving the ring --------------------------------------------------------------------

    def _fit(self, need: int, why: str = "") -> int:
        """The slot size a sample of `need` bytes moves the ring to; RingTooLarge if none."""
        why = why or f"a sample of {need} bytes"
        grown = slot_bytes_for(need, self.config.slot_bytes)
        try:
            self.config.check_size(grown, why)
            return grown
        except RingTooLarge:
            if grown == need:
                raise
        self.config.check_size(need, why)  # no room for headroom: the exact size, or refuse
        return need

    def _grow(self, need: int, schema: SampleSchema) -> None:
        try:
            slot_bytes = self._fit(need, f"a sample of {need} bytes: {schema!r}")
        except RingTooLarge as e:
            self.refused += 1
            if schema.schema_id not in self._refused_said:  # once per schema, not per clip
                self._refused_said.add(schema.schema_id)
                log.warning("sample too large for any ring layout within the cap; samples of "
                            "this schema are skipped (counted in status)", extra={
                                "error": str(e), "need": need})
            raise
        old = self.config
        self._move(dataclasses.replace(old, slot_bytes=slot_bytes),
                   f"a sample of {need} bytes")
        self.relayouts += 1
        log.info(f"ring moved to a new layout: {old.slots} slots x {slot_bytes} bytes "
                 f"({self.total_bytes} bytes of shared memory) for a sample of {need} bytes "
                 f"({schema!r}); readers follow by themselves", extra={
                     "slot_bytes": slot_bytes, "was": old.slot_bytes,
                     "ring_bytes": self.total_bytes, "epoch": f"{self.writer.stats().epoch:#x}"})

    def _replace(self, err: RingDamaged) -> None:
        """A fresh segment (same layout, new epoch) for a damaged one. RingDamaged when that
        is not possible now (tried at most every REPLACE_RETRY_S; the failure said once)."""
        now = time.monotonic()
        if now < self._retry_at:
            raise err
        self._retry_at = now + REPLACE_RETRY_S
        log.warning("ring damaged by another process; replacing it with a fresh segment (new "
                    "epoch); readers re-attach by themselves", extra={"error": str(err)})
        try:
            self._move(self.config, "a fresh segment for a damaged one")
        except (RingError, OSError) as e:
            if str(e) != self._failed_said:
                self._failed_said = str(e)
                log.error("the damaged ring could not be replaced; trying again",
                          extra={"error": str(e)})
            raise RingDamaged(f"{err}; replacing it failed: {e}") from e
        self.replacements += 1
        self._failed_said = None

    def _move(self, config: RingConfig, why: str) -> None:
        old = self.writer
        readers = 0
        if isinstance(old, RingWriter):
            try:
                readers = old.stats().readers
            except RingDamaged:
                readers = 0
            new = old.supersede(config, why=why)
        else:  # GPU slots: a new pool and ring; its readers see ProducerGone and re-attach
            config.check_size(why=why)
            old.close()
            new = self._open(config)
        self.writer, self.config = new, config
        if self._generation is not None:
            new.set_generation(self._generation)
        if config.mode == "lossless" and readers and isinstance(new, RingWriter):
            self._follow = (time.monotonic() + FOLLOW_WAIT_S, readers)

    def _wait_for_followers(self, timeout: float | None) -> None:
        """After a lossless move: RingFull (the daemon answers control and retries) until the
        old layout's readers registered on the new one, or FOLLOW_WAIT_S passed."""
        deadline, readers = self._follow
        end = time.monotonic() + (FOLLOW_WAIT_S if timeout is None else timeout)
        while True:
            now = time.monotonic()
            if now >= deadline or self.writer.stats().readers >= readers:
                self._follow = None
                return
            if now >= end:
                raise RingFull(f"ring {self.config.name}: waiting for {readers} reader(s) to "
                               f"follow the new layout (at most {FOLLOW_WAIT_S:.0f} s)")
            time.sleep(0.005)  # polls the reader table: a registration posts nothing to us
