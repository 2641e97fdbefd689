"""`mmctl record start [--split S] | stop`: live samples appended to the disk cache.

A recording is one new cache version made by `CacheWriter` (producer/cache_writer.py, the
format of protocol/cache.py): `carry_all()` takes the committed version over without copying
a byte (its shards are hard-linked), every live sample published while recording is added as
a record of the key `record/<split>/<ring>-<UTC start>` (a new shard: the new part), and
`stop` commits - atomically, so a trainer started afterwards reads the recorded samples with
the rest, and a crash mid-recording leaves the previous version as it was. Each record keeps
its generation, label, timestamp and source; what made each generation (filter, sensors,
methods, the change) goes into the version's generations.json.

The producer's loop only hands samples over (`offer`: a reference into a bounded queue, no
copy, never a wait); a thread of this module packs and writes them. A full queue (a disk slower
than the stream) drops the sample from the recording - counted in `dropped` and said once -
and never slows the ring. A label outside the cache's classes is recorded unlabelled (-1),
counted in `unlabelled_outside_classes`; the start refuses a producer whose class list is
not the cache's (labels would mean other classes).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from protocol.cache import CacheReader
from protocol.errors import BadArgument, CacheNotFound, MmfeedError
from protocol.schema import SampleMeta, SampleSchema, UNLABELLED

from .cache_writer import CacheWriter

log = logging.getLogger(__name__)

QUEUE_DEPTH = 64
_STOP = object()


@dataclass
class RecordCounts:
    offered: int = 0
    recorded: int = 0
    dropped: int = 0                      # queue full: left out of the recording
    unlabelled_outside_classes: int = 0
    generations: set[int] = field(default_factory=set)


class Recorder:
    """One recording: `Recorder.start(...)`, `offer(...)` per published sample, `stop()`."""

    def __init__(self, writer: CacheWriter, cache: Path, split: str, key: str,
                 classes: list[str]):
        self.writer, self.cache, self.split, self.key = writer, cache, split, key
        self.classes = classes
        self.counts = RecordCounts()
        self.started = time.time()
        self.error: str | None = None
        self._q: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH)
        self._noted: set[int] = set()
        self._thread = threading.Thread(target=self._run, name="recorder", daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, cache: str | Path, split: str, ring: str,
              producer_classes: tuple[str, ...]) -> "Recorder":
        """Open the cache for a new version; BadArgument says what does not fit (no cache and
        no class list, a class list that differs from the cache's, a cache another writer
        holds) and changes nothing."""
        cache = Path(cache)
        if not split or "/" in split:
            raise BadArgument(f"record: split {split!r}: expected a name like train or val")
        try:
            with CacheReader(cache) as r:
                classes = list(r.classes)
        except CacheNotFound:
            if not producer_classes:
                raise BadArgument(f"record: no cache at {cache} and this source has no class "
                                  f"list to start one with; preprocess a dataset into it first "
                                  f"(mm-producer preprocess DATASET --cache {cache}) or start "
                                  f"the producer with --classes") from None
            classes = list(producer_classes)
        if producer_classes and list(producer_classes) != classes:
            raise BadArgument(f"record: this producer's classes ({', '.join(producer_classes)}) "
                              f"are not the cache's ({', '.join(classes)}) in that order: labels "
                              f"would name other classes; start the producer with --classes "
                              f"DATASET (the dataset the cache was made from)")
        try:
            writer = CacheWriter(cache, classes=classes, config_hash=_config_hash(cache))
            writer.carry_all()
        except MmfeedError as e:
            raise BadArgument(f"record: {e}") from None
        except OSError as e:  # a folder that cannot be made or written: the operator's to fix
            raise BadArgument(f"record: cannot write a cache at {cache}: "
                              f"{e.strerror or e} ({e.filename or cache}); give a folder this "
                              f"producer's user can create or write (`mmctl record start "
                              f"--cache DIR`, or --record-cache DIR)") from None
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        key = f"record/{split}/{ring}-{stamp}"
        log.info("recording live samples", extra={"cache": str(cache), "split": split,
                                                  "key": key, "version": writer.version})
        return cls(writer, cache, split, key, classes)

    def offer(self, schema: SampleSchema, meta: SampleMeta, arrays: Mapping[str, Any],
              generation: Any) -> None:
        """Hand one published sample to the recording (the loop's only cost: a queue put).
        `generation.summary()` (called once per generation, on the recorder's thread) says
        what made it."""
        self.counts.offered += 1
        try:
            self._q.put_nowait((schema, meta, arrays, generation))
        except queue.Full:
            self.counts.dropped += 1
            if self.counts.dropped == 1:
                log.warning("recording: the disk keeps up with fewer samples than the stream "
                            "sends; samples are left out of the recording (counted in status "
                            "record.dropped), the ring is not slowed",
                            extra={"cache": str(self.cache)})

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is _STOP:
                return
            if self.error is not None:
                continue
            schema, meta, arrays, generation = item
            try:
                self._write(schema, meta, arrays, generation)
            except (MmfeedError, OSError, ValueError) as e:
                self.error = f"{type(e).__name__}: {e}"
                log.error("recording failed; stop it to keep nothing of it",
                          extra={"error": self.error})

    def _write(self, schema: SampleSchema, meta: SampleMeta, arrays: Mapping[str, Any],
               generation: Any) -> None:
        label = meta.label
        if not -1 <= label < len(self.classes):
            self.counts.unlabelled_outside_classes += 1
            label = UNLABELLED
            meta = SampleMeta(label=label, timestamp_ns=meta.timestamp_ns,
                              generation=meta.generation, source=meta.source, index=meta.index)
        host = {k: (v.cpu().numpy() if hasattr(v, "cpu") else np.asarray(v))
                for k, v in arrays.items()}
        self.writer.add(self.key, "", self.split, schema, meta, host)
        if meta.generation not in self._noted:
            self._noted.add(meta.generation)
            self.writer.note_generation(meta.generation, generation.summary())
            self.counts.generations.add(meta.generation)
        self.counts.recorded += 1

    def status(self) -> dict:
        c = self.counts
        return {"recording": True, "cache": str(self.cache), "split": self.split,
                "key": self.key, "recorded": c.recorded, "dropped": c.dropped,
                "unlabelled_outside_classes": c.unlabelled_outside_classes,
                "generations": sorted(c.generations), "error": self.error,
                "seconds": round(time.time() - self.started, 1)}

    def _drain(self) -> None:
        self._q.put(_STOP)
        self._thread.join()

    def stop(self) -> dict:
        """Write what is queued, commit the new version; its summary. A recording that
        failed is aborted (the previous version stays) and the error raised."""
        self._drain()
        if self.error is not None:
            self.writer.abort()
            raise MmfeedError(f"record: the recording failed ({self.error}); nothing of it was "
                              f"kept, {self.cache} is as it was")
        summary = self.writer.commit()
        reply = {**self.status(), "recording": False, "version": summary.version,
                 "records": summary.records, "counts": summary.counts}
        log.info("recording committed", extra={k: v for k, v in reply.items()
                                               if not isinstance(v, (list, dict))})
        return reply

    def abort(self) -> None:
        """Drop the recording: the cache stays as it was."""
        self._drain()
        self.writer.abort()


def _config_hash(cache: Path) -> str:
    """The cache's config hash, kept: a recording does not change what preprocess made."""
    from protocol.cache import open_version

    try:
        return open_version(cache).config_hash
    except MmfeedError:
        return ""


__all__ = ["QUEUE_DEPTH", "RecordCounts", "Recorder"]
