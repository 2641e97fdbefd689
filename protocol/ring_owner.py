"""Whose shared memory is at a ring's name, and whether this side may trust it.

/dev/shm is one directory for every local user (mode 1777): whoever creates a name first owns
it. Without these checks another user who creates the ring's name before the producer makes
the producer fail with a raw error, and a trainer that attaches trains on whatever that user
writes into it. The rules (the same shape as iceoryx2's: a segment is trusted by who made it):

* A reader trusts a segment owned by its own effective uid; with a group setting (the
  producer's `--group`), also one whose group is that group and whose mode is exactly 0660
  (only a member of the group, or root, can give a file that group). A segment that every
  local user may write (mode o+w) is never trusted, whoever owns it.
* A producer replaces only a stale ring of its own uid; anything else at the name is refused,
  naming its owner, and left alone.
* Nothing at a ring's name is followed: a symbolic link or a directory there is refused with
  what it is (glibc's shm_open and sem_open already open with O_NOFOLLOW; these checks use
  lstat and fstat, and chmod goes through an O_NOFOLLOW descriptor).

Every check here runs at attach or create, never per sample.
"""
from __future__ import annotations

import grp
import os
import pwd
import stat

from .errors import NotARing, RingNotOwned


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return "no such user"


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return "no such group"


def describe_owner(st: os.stat_result) -> str:
    return (f"owned by uid {st.st_uid} ({user_name(st.st_uid)}), group {st.st_gid} "
            f"({group_name(st.st_gid)}), mode {stat.S_IMODE(st.st_mode):04o}")


def group_gid(group: str | None) -> int | None:
    if group is None:
        return None
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f"ring group {group!r}: no such group") from None


def segment_stat(path: str) -> os.stat_result | None:
    """lstat of `path` (never follows a link); None when nothing is there."""
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def check_kind(st: os.stat_result, path: str, ring: str) -> None:
    """A ring's name must hold a regular file: refuse a link, a directory or anything else."""
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return
    if stat.S_ISLNK(mode):
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        what = f"a symbolic link to {target!r}"
    elif stat.S_ISDIR(mode):
        what = "a directory"
    else:
        what = f"not a regular file (mode {mode:o})"
    raise NotARing(
        f"ring {ring}: {path} is {what}, {describe_owner(st)}; mmfeed never follows links or "
        f"opens anything but a plain shared-memory file there. Remove it (`rm -r {path}`, as "
        f"its owner or root) or choose another ring name")


def check_reader_owner(st: os.stat_result, path: str, ring: str, gid: int | None) -> None:
    """Refuse a segment (or semaphore) that this reader cannot trust (module docstring)."""
    check_kind(st, path, ring)
    me = os.geteuid()
    mode = stat.S_IMODE(st.st_mode)
    if mode & stat.S_IWOTH:
        raise RingNotOwned(
            f"ring {ring}: {path} is {describe_owner(st)}: every local user may write into "
            f"it, so its samples cannot be trusted; mmfeed producers create rings 0600 (0660 "
            f"with --group). Stop whatever made it and remove it")
    if st.st_uid == me:
        return
    if gid is not None and st.st_gid == gid and mode == 0o660:
        return
    trusted = f"its own uid {me} ({user_name(me)})"
    if gid is not None:
        trusted += f" or group {gid} ({group_name(gid)}) with mode 0660"
    raise RingNotOwned(
        f"ring {ring}: {path} is {describe_owner(st)}; this reader trusts only segments of "
        f"{trusted}: another user may have created the name to feed you samples. Stop that "
        f"user's process and remove it, run the producer as this user or with --group, or "
        f"choose another ring name")


def check_writer_owner(st: os.stat_result, path: str, ring: str) -> None:
    """A producer takes over (replaces when stale) only its own uid's ring."""
    check_kind(st, path, ring)
    me = os.geteuid()
    if st.st_uid != me:
        raise RingNotOwned(
            f"ring {ring}: {path} already exists, {describe_owner(st)}, not by this producer's "
            f"uid {me} ({user_name(me)}); mmfeed replaces only its own user's stale rings. "
            f"Remove it (as {user_name(st.st_uid)} or root) or choose another ring name")


def chmod_nofollow(path: str, mode: int, gid: int | None) -> None:
    """chmod (and chgrp) `path` without following a link planted there (O_NOFOLLOW): the
    path-based os.chmod would change whatever a link points to."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotARing(f"{path} is not a regular file; refusing to change its mode")
        os.fchmod(fd, mode)
        if gid is not None:
            os.fchown(fd, -1, gid)
    finally:
        os.close(fd)
