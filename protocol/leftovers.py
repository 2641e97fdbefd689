"""Temporaries that writers killed mid-write left behind, and when they are safe to remove.

WHY: a checkpoint is written as `.ckpt-NNNNNNNN.pt.tmp-PID` and renamed when complete; a
preprocess run packs payloads into `$TMPDIR/mmfeed-preprocess-PID-*/`. A writer killed in
between (SIGKILL, the OOM killer, a stop timeout) never reaches its cleanup, and nothing else
removed those files: three killed checkpoint writes left 130 MB. The name carries the writer's
pid, so the next start can tell a temporary whose writer is gone (remove it) from one a live
process is still writing (keep it) - SQLite's rule for its hot journals, by pid instead of by
lock.

A pid can be reused. A live process that started after the temporary was last written cannot
be its writer, so it counts as gone (the start time comes from /proc; where there is no /proc,
any live process with that pid keeps the file, the safe side). Only files and directories
owned by this user are touched; symlinks are never followed.
"""
from __future__ import annotations

import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

#: A writer's temporary may have been written this long after its start time as /proc tells it
#: (boot time has one-second resolution).
_CLOCK_SLACK_S = 2.0


@dataclass(frozen=True)
class Leftover:
    """One temporary removed (or kept): where, whose, how big."""

    path: Path
    pid: int
    nbytes: int


def _start_time(pid: int) -> float | None:
    """Wall-clock start of process `pid` (seconds since the epoch), None when unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        with open("/proc/stat", "rb") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith(b"btime "))
        return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, StopIteration):
        return None


def writer_alive(pid: int, last_write: float) -> bool:
    """Whether process `pid` may still be writing a temporary last modified at `last_write`
    (seconds since the epoch)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # gone, or a number no pid can be
        return False
    except PermissionError:
        pass  # alive, another user's
    started = _start_time(pid)
    return started is None or started <= last_write + _CLOCK_SLACK_S


def _size(path: Path, st: os.stat_result) -> int:
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size
    total = 0
    for base, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(base, name)).st_size
            except OSError:
                pass
    return total


def sweep(directory: str | Path, pattern: re.Pattern) -> tuple[list[Leftover], list[Leftover]]:
    """Remove the entries of `directory` whose name matches `pattern` (its group 1 is the
    writer's pid) and whose writer is gone. Returns (removed, kept: live writers').

    Entries of other users and anything that vanishes meanwhile are left alone; a missing
    directory has nothing to sweep.
    """
    removed: list[Leftover] = []
    kept: list[Leftover] = []
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return removed, kept
    for e in entries:
        m = pattern.match(e.name)
        if not m:
            continue
        path = Path(e.path)
        try:
            st = path.lstat()
        except FileNotFoundError:
            continue
        if st.st_uid != os.geteuid() or stat.S_ISLNK(st.st_mode):
            continue
        item = Leftover(path, int(m.group(1)), _size(path, st))
        if writer_alive(item.pid, st.st_mtime):
            kept.append(item)
            continue
        try:
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(path)  # fd-based on Linux: never follows a link inside
            else:
                path.unlink()
        except FileNotFoundError:
            continue
        removed.append(item)
    return removed, kept


__all__ = ["Leftover", "sweep", "writer_alive"]
