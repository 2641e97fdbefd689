"""Modes of the files mmfeed writes to disk (cache, checkpoints): private, or shared with one
group, never whatever the umask happens to allow.

WHY: cache shards, indexes and checkpoints were created with open()'s default 0666 cut by the
umask: 0644 (world-readable training data and model weights) under the usual umask 022, 0666
(world-writable) under umask 000, while the ring and the sockets were 0600. Now:

    without a group          files 0600   directories 0700
    with the group setting   files 0640   directories 0750, and chgrp to that group

set with fchmod/fchown on the open descriptor right after creation, so the umask cannot cut or
widen them and no window exists where another user could open the file. The group setting is
spelled like the producer's: `--group NAME`, default $MMFEED_GROUP (GROUP_ENV), on
`mm-producer preprocess`, `mm-producer run` and `mm-trainer run`. Readers in that group (a
trainer under another user, an operator) may read; only the owner writes.
"""
from __future__ import annotations

import grp
import os
from pathlib import Path

from .errors import MmfeedError

#: The environment variable behind every daemon's and preprocess's --group.
GROUP_ENV = "MMFEED_GROUP"


class GroupError(MmfeedError):
    """The group setting names no group, or one this user may not hand files to."""

    code = "bad_group"


def group_id(group: str | None) -> int | None:
    """The gid of `group` (a name, or a number), None for no group. GroupError naming it
    when it does not exist."""
    if group is None or group == "":
        return None
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if group.isdigit():
            return int(group)
        raise GroupError(f"group {group!r} does not exist (--group / ${GROUP_ENV}); create it "
                         f"(groupadd {group}) or name an existing one") from None


def file_mode(gid: int | None) -> int:
    return 0o600 if gid is None else 0o640


def dir_mode(gid: int | None) -> int:
    return 0o700 if gid is None else 0o750


def secure_fd(fd: int, mode: int, gid: int | None, path: str | Path = "") -> None:
    """Give an open file or directory exactly `mode` (and group `gid`)."""
    if gid is not None:
        try:
            os.fchown(fd, -1, gid)
        except PermissionError:
            raise GroupError(f"{path}: cannot give it to group {gid} "
                             f"({_group_name(gid)}): this user ({os.geteuid()}) is not a "
                             f"member; add it to the group or drop --group") from None
    os.fchmod(fd, mode)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return "no name"


def create_file(path: str | Path, gid: int | None, *, exclusive: bool = True) -> int:
    """Open `path` for writing, created (exclusive: must not exist; else truncated), never
    following a symlink, with exactly file_mode(gid). Returns the descriptor."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    flags |= os.O_EXCL if exclusive else os.O_TRUNC
    fd = os.open(path, flags, file_mode(gid))
    try:
        secure_fd(fd, file_mode(gid), gid, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_file(path: str | Path, data: bytes, gid: int | None, *, fsync: bool = True) -> None:
    """Write `data` to a new (or truncated) file of file_mode(gid); fsync unless told not to."""
    fd = create_file(path, gid, exclusive=False)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def make_dir(path: str | Path, gid: int | None, *, exist_ok: bool = False) -> bool:
    """Create directory `path` (parents as mkdir -p would) with exactly dir_mode(gid).
    An existing one is left as it is (it is the user's) when exist_ok; returns whether it
    was created here."""
    path = Path(path)
    if exist_ok and path.is_dir():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, dir_mode(gid))
    except FileExistsError:
        if exist_ok and path.is_dir():
            return False
        raise
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        secure_fd(fd, dir_mode(gid), gid, path)
    finally:
        os.close(fd)
    return True


__all__ = ["GROUP_ENV", "GroupError", "create_file", "dir_mode", "file_mode", "group_id",
           "make_dir", "secure_fd", "write_file"]


def fsync_dir(path: str | Path) -> None:
    """fsync a directory: a file created or renamed in it is durable only once its folder is
    (POSIX; ext4 and xfs agree). The last step of every atomic replace mmfeed does (cache
    versions, checkpoints, the generation file): temp file, fsync, rename, fsync_dir."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
