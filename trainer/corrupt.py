"""Corrupt cache records on the trainer's data path: skipped, counted, said once each.

A compressed record whose bytes are damaged (its CRC or its decode fails;
protocol/cache.py `RecordFailure`) must never stop training and never train on garbage. The
loaders call `drop_failed` right after `read_batch_into`: the failed rows are dropped from the
batch in place (the last good rows move into their places, labels with them), each record is
logged ONCE per process as a WARNING naming the record, its sample and its shard file (an epoch
loop meets the same record again every epoch), and the count goes into the loader's stats
(`records_corrupt` in the trainer's status and summary).
"""
from __future__ import annotations

import logging


from protocol.cache import compact_rows

log = logging.getLogger("trainer.cache")

#: Distinct corrupt records remembered (and so logged once); past it each is logged again.
REMEMBER = 4096


class CorruptRecords:
    """What one loader has skipped: `count` (every skip) and the records already reported."""

    def __init__(self) -> None:
        self.count = 0
        self._reported: set[tuple[int, int]] = set()

    def report(self, record: int, error: object, *, key: int = 0) -> None:
        """Count one skip of `record`; log `error` (its text names record, sample and file)
        the first time this record is met."""
        self.count += 1
        if (key, record) in self._reported:
            return
        if len(self._reported) < REMEMBER:
            self._reported.add((key, record))
        log.warning("%s", error, extra={"record": record, "corrupt_records": self.count})

    def drop_failed(self, rows, labels, n: int, failed, *, key: int = 0) -> int:
        """Remove `failed` (RecordFailure list) from the first n rows of `rows` (a (B, row)
        array or tensor) and `labels` in place; returns the new row count."""
        if not failed:
            return n
        for f in failed:
            self.report(f.record, f.error, key=key)
        keep = compact_rows(rows, n, failed, extra=(labels,))
        return len(keep)


__all__ = ["CorruptRecords", "REMEMBER"]
