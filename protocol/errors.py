"""One exception tree for every part of mmfeed, each class with a stable error code.

The code is what crosses a wire (`{"ok": false, "error": {"code": ..., "message": ...}}`)
and what tests and tools match on; the message is for people and always names the file,
field or endpoint involved and what was expected.
"""
from __future__ import annotations

from pathlib import Path

from .names import printable


class MmfeedError(Exception):
    """Base of every error mmfeed raises on purpose."""

    code = "error"

    def to_dict(self) -> dict:
        return {"code": self.code, "message": str(self)}


# --- ring -------------------------------------------------------------------------------


class RingError(MmfeedError):
    code = "ring_error"


class NotARing(RingError):
    """The shared-memory segment exists but does not start with the mmfeed magic."""

    code = "not_a_ring"


class VersionMismatch(RingError):
    """The ring (or a control peer) speaks another protocol version; names both."""

    code = "version_mismatch"

    def __init__(self, what: str, found: int, expected: int):
        self.found = found
        self.expected = expected
        super().__init__(
            f"{what} speaks protocol version {found}, this mmfeed speaks version {expected}; "
            f"run a producer and readers of the same mmfeed release"
        )


class RingInUse(RingError):
    """A live producer already owns a ring of that name."""

    code = "ring_in_use"


class RingNotFound(RingError):
    code = "ring_not_found"


class ProducerGone(RingError):
    """The producer that owned the ring died or was replaced; re-attach to continue."""

    code = "producer_gone"


class RingDamaged(ProducerGone):
    """The ring's memory is not what a producer wrote: the segment was truncated under the
    mapping, or a header counter or slot holds what no producer writes. The reader detaches
    with this error (naming the ring and what is wrong) and, like after ProducerGone,
    re-attaches when a healthy producer serves the ring again."""

    code = "ring_damaged"


class RingSuperseded(ProducerGone):
    """The producer moved the ring to a new layout (bigger slots for a bigger sample, or a
    fresh segment replacing a damaged one) under the same name: re-attach by name. Raised
    only once every sample of the old layout was read."""

    code = "ring_superseded"


class RingNotOwned(RingError):
    """The segment (or semaphore) at the ring's name belongs to a user this side does not
    trust; names its owner. Never read, never replaced."""

    code = "ring_not_owned"


class RingTooLarge(RingError):
    """A ring layout would need more shared memory than the cap (or /dev/shm) allows."""

    code = "ring_too_large"


class RingFull(RingError):
    """Lossless mode and no slot freed before the writer's timeout."""

    code = "ring_full"


class SchemaError(MmfeedError):
    """A schema or sample does not match its declared modalities, dtypes or shapes."""

    code = "bad_schema"


# --- disk cache ---------------------------------------------------------------------------


class CacheError(MmfeedError):
    code = "cache_error"


class CacheNotFound(CacheError):
    """No committed cache at that directory; the message says how to create one."""

    code = "cache_not_found"

    def __init__(self, directory: str | Path, why: str):
        self.directory = str(directory)
        super().__init__(
            f"{self.directory}: no disk cache ({why}); create one with "
            f"`mm-producer preprocess DATASET --cache {self.directory}`"
        )


class CacheCorrupt(CacheError):
    """A cache file is missing, truncated or not what the format says; names the file."""

    code = "cache_corrupt"

    def __init__(self, path: str | Path, what: str):
        self.path = str(path)
        super().__init__(
            f"{self.path}: {what}; the cache is damaged, rebuild it with `mm-producer preprocess`"
        )


class CorruptRecord(CacheError):
    """One record's bytes are damaged (a compressed clip whose CRC or decode failed). Loaders
    skip and count it; the message names the record, its sample key and its shard file."""

    code = "corrupt_record"

    def __init__(self, path: str | Path, record: int, source: str, offset: int, what: str):
        self.path, self.record, self.source, self.offset = str(path), record, source, offset
        super().__init__(f"{self.path}: record {record} ({source}) at offset {offset}: {what}; "
                         f"it is skipped (rebuild the cache with `mm-producer preprocess` to "
                         f"restore it)")


class CacheLocked(CacheError):
    """Another writer holds the cache directory's lock."""

    code = "cache_locked"


# --- input data ---------------------------------------------------------------------------


class InputError(MmfeedError):
    """A raw input file is unusable. Names the file, the field and what was expected.

    `path` is kept as given (it may hold bytes that are not UTF-8, as Python's lone
    surrogates); the message and `to_dict()["file"]` show it escaped (protocol/names.py), so a
    report can always be printed and written as JSON.
    """

    code = "bad_input"

    def __init__(self, path: str | Path, field: str, expected: str, found: str | None = None):
        self.path = str(path)
        self.field = field
        self.expected = expected
        self.found = found
        msg = f"{printable(self.path)}: {field}: expected {expected}"
        if found is not None:
            msg += f", found {found}"
        super().__init__(printable(msg))

    def to_dict(self) -> dict:
        d = super().to_dict()
        d.update(file=printable(self.path), field=self.field, expected=self.expected,
                 found=None if self.found is None else printable(str(self.found)))
        return d


class FilterSpecError(MmfeedError, ValueError):
    code = "bad_filter"


# --- control ------------------------------------------------------------------------------


class ControlError(MmfeedError):
    code = "control_error"


class MalformedMessage(ControlError):
    code = "malformed"


class MessageTooLarge(ControlError):
    code = "too_large"


class UnknownCommand(ControlError):
    code = "unknown_command"


class BadArgument(ControlError):
    code = "bad_argument"


class ControlTimeout(ControlError):
    """No reply from a daemon in time; names the endpoint and the time waited."""

    code = "timeout"


class RemoteError(ControlError):
    """The daemon answered `ok: false`; carries its code and message."""

    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(message)
