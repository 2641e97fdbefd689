"""How many bytes a LiDAR, radar or unknown-sensor reader may take from one file.

WHY: those readers turn a whole file into arrays as big as the file (and a few times that
while they work): a 2 GiB sparse `lidar.bin` took preprocess to 6.8 GiB RSS, a 2 GiB
`radar.bin` or `imu.data` past 8 GiB, and a large enough file killed the run. A limit per
kind, checked against the size of the open file before anything is read, bounds what one
sample may cost; a file over it is a rejected sample naming the file, the limit and how to
raise it. The read itself takes exactly the bytes that fstat reported, so a file that grows
meanwhile cannot slip past the check.

Video and audio have no limit: FFmpeg reads them as streams, a packet at a time, so their
memory does not grow with the file (docs/dataset.md "Limits").

Settings, later ones win: the defaults below; $MMFEED_READ_LIMITS (`lidar=1G,radar=512M`, read
by both `mm-producer preprocess` and `mm-producer run`); `preprocess --read-limit KIND=SIZE`.
The limits are not part of the pipeline's config hash: they decide which files are read, not
what a file becomes, so raising one re-runs only the samples that were rejected.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protocol.errors import InputError

ENV = "MMFEED_READ_LIMITS"
KINDS = ("lidar", "radar", "unknown")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """`256M`, `1G`, `1048576`, `64KiB` -> bytes (powers of 1024). ValueError otherwise."""
    m = _SIZE.match(str(text))
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"{text!r} is not a size: expected a positive whole number of bytes, "
                         f"optionally with K, M, G or T (powers of 1024), e.g. 512M")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def format_size(n: int) -> str:
    """2147483648 -> `2 GiB`, 268435456 -> `256 MiB`, 1500 -> `1500 bytes`."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            v = n / scale
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n} bytes"


@dataclass(frozen=True)
class ReadLimits:
    """Most bytes one file of each kind may have (a `.pcd` is lidar)."""

    lidar: int = 256 << 20
    radar: int = 64 << 20
    unknown: int = 64 << 20

    def with_settings(self, settings: str | dict[str, int | str]) -> "ReadLimits":
        """A copy with `lidar=1G,radar=512M` (or a dict) applied. ValueError naming what
        is wrong."""
        if isinstance(settings, str):
            pairs = [p.partition("=") for p in settings.split(",") if p.strip()]
            if any(not sep for _, sep, _ in pairs):
                raise ValueError(f"read limits {settings!r}: expected KIND=SIZE[,KIND=SIZE] "
                                 f"with KIND one of {', '.join(KINDS)}, e.g. lidar=1G")
            settings = {k.strip(): v.strip() for k, _, v in pairs}
        changes = {}
        for kind, value in settings.items():
            if kind not in KINDS:
                raise ValueError(f"read limit for {kind!r}: the kinds with a limit are "
                                 f"{', '.join(KINDS)} (video and audio are read as streams)")
            try:
                changes[kind] = value if isinstance(value, int) and value > 0 \
                    else parse_size(value)
            except ValueError as e:
                raise ValueError(f"read limit {kind}={value}: {e}") from None
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls) -> "ReadLimits":
        """The defaults with $MMFEED_READ_LIMITS applied."""
        value = os.environ.get(ENV, "")
        try:
            return cls().with_settings(value)
        except ValueError as e:
            raise ValueError(f"${ENV}: {e}") from None

    def check(self, path: Path, kind: str, nbytes: int) -> None:
        """InputError when a `kind` file of `nbytes` is over its limit."""
        limit = getattr(self, kind)
        if nbytes > limit:
            raise InputError(path, "size", f"at most {format_size(limit)}, the {kind} read "
                             f"limit (raise it with `mm-producer preprocess --read-limit "
                             f"{kind}=SIZE` or ${ENV}={kind}=SIZE)",
                             f"{format_size(nbytes)} ({nbytes} bytes)")


def checked_size(path: Path, kind: str, limits: ReadLimits | None, *, readable: str,
                 nonempty: str) -> int:
    """The size of a file about to be read, or InputError naming it: it cannot be stat'ed
    (expected `readable`), it is empty (expected `nonempty`), or it is over the limit of
    `kind`."""
    try:
        nbytes = path.stat().st_size
    except OSError as e:
        raise InputError(path, "file", readable, e.strerror or str(e)) from None
    if nbytes == 0:
        raise InputError(path, "size", nonempty, "0 bytes (empty file)")
    (limits or ReadLimits()).check(path, kind, nbytes)
    return nbytes


def open_checked(path: Path, kind: str, limits: ReadLimits | None):
    """The file opened for reading and its size, after the size passed the `kind` limit."""
    f = open(path, "rb")
    try:
        size = os.fstat(f.fileno()).st_size
        (limits or ReadLimits()).check(path, kind, size)
    except BaseException:
        f.close()
        raise
    return f, size


def read_array(path: Path, kind: str, limits: ReadLimits | None, dtype,
               offset: int = 0) -> tuple[np.ndarray, int]:
    """(whole items of `dtype` from byte `offset` on, the file's size) after the size check;
    reads no more than the size fstat reported. OSError as open() raises it."""
    dt = np.dtype(dtype)
    f, size = open_checked(path, kind, limits)
    with f:
        f.seek(offset)
        return np.fromfile(f, dtype=dt, count=max(0, size - offset) // dt.itemsize), size


def read_bytes(path: Path, kind: str, limits: ReadLimits | None) -> bytes:
    """The file's bytes after the size check (at most what fstat reported)."""
    f, size = open_checked(path, kind, limits)
    with f:
        return f.read(size)


__all__ = ["ENV", "KINDS", "ReadLimits", "format_size", "open_checked", "parse_size",
           "read_array", "read_bytes"]
