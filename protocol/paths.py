"""Where the daemons' sockets live, and how an ipc socket file is made safe to bind.

Both daemons and `mmctl` compute the same default endpoints from the same environment,
so `mmctl status` finds a daemon without being told where it is:

    $MMFEED_RUNTIME_DIR            explicit choice (tests, several installs side by side)
    $RUNTIME_DIRECTORY             set by systemd for `RuntimeDirectory=mmfeed`
    $XDG_RUNTIME_DIR/mmfeed        a logged-in user's private runtime dir
    /tmp/mmfeed-$UID               last resort

The directory is created with mode 0700: the socket files in it are the daemons' control
surface, and the directory's mode is what keeps other users away during the short window
between `bind()` and the `chmod()` of the socket file.
"""
from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path

from .errors import ControlError

# sockaddr_un.sun_path is 108 bytes on Linux (104 on macOS), including the NUL.
MAX_IPC_PATH = 107


class EndpointInUse(ControlError):
    """Another live process already serves this ipc endpoint; we refuse to steal it."""

    code = "endpoint_in_use"


def runtime_dir() -> Path:
    """The directory for control and log sockets, created 0700 if missing."""
    env = os.environ
    if env.get("MMFEED_RUNTIME_DIR"):
        path = Path(env["MMFEED_RUNTIME_DIR"])
    elif env.get("RUNTIME_DIRECTORY"):
        # systemd may list several directories separated by ':'; ours is the first.
        path = Path(env["RUNTIME_DIRECTORY"].split(":")[0])
    elif env.get("XDG_RUNTIME_DIR"):
        path = Path(env["XDG_RUNTIME_DIR"]) / "mmfeed"
    else:
        path = Path("/tmp") / f"mmfeed-{os.getuid()}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def control_endpoint(daemon: str) -> str:
    """Default control endpoint of `daemon` ("producer" or "trainer")."""
    return f"ipc://{runtime_dir() / daemon}.sock"


def log_endpoint(daemon: str) -> str:
    """Default endpoint of `daemon`'s log PUB socket, next to its control socket."""
    return f"ipc://{runtime_dir() / daemon}.log.sock"


def ipc_path(endpoint: str) -> Path | None:
    """The socket file behind an `ipc://` endpoint; None for other transports and for
    Linux abstract sockets (`ipc://@name`), which have no file."""
    if not endpoint.startswith("ipc://"):
        return None
    rest = endpoint[len("ipc://"):]
    if rest.startswith("@") or not rest:
        return None
    return Path(rest)


def someone_listens(path: Path) -> bool:
    """True when a process accepts connections on the unix socket file `path`.

    ZeroMQ's ipc transport is a SOCK_STREAM unix socket, so a plain connect tells a live
    daemon (connect succeeds) from a file left by a crashed one (ECONNREFUSED).
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def prepare_ipc_bind(endpoint: str) -> Path | None:
    """Make `endpoint`'s socket file ready to bind: create its directory (0700), check the
    path fits in sockaddr_un, and remove a stale file left by a dead process.

    A file that a live process still serves raises `EndpointInUse` instead: two daemons
    on one socket would each receive half of the commands.
    """
    path = ipc_path(endpoint)
    if path is None:
        return None
    if len(os.fsencode(str(path))) > MAX_IPC_PATH:
        raise ControlError(
            f"ipc socket path {path} is {len(str(path))} bytes; unix sockets allow at most "
            f"{MAX_IPC_PATH}: choose a shorter MMFEED_RUNTIME_DIR or endpoint"
        )
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return path
    if not stat.S_ISSOCK(mode):
        raise ControlError(f"{path} exists and is not a socket; refusing to replace it")
    if someone_listens(path):
        raise EndpointInUse(f"{endpoint} is served by another live process; stop it first")
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    return path


def bound_inode(path: Path | None) -> int | None:
    """Inode of the socket file we just bound, so that `remove_ipc_socket` later removes our
    file and never a successor's."""
    return None if path is None else path.stat().st_ino


def secure_ipc_socket(path: Path | None, group: str | None = None) -> None:
    """After bind: mode 0600, or 0660 and chgrp `group`."""
    if path is None:
        return
    if group is not None:
        import grp

        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ControlError(f"group {group!r} does not exist (socket {path})") from None
        os.chown(path, -1, gid)
        os.chmod(path, 0o660)
    else:
        os.chmod(path, 0o600)


def remove_ipc_socket(path: Path | None, inode: int | None) -> None:
    """Remove the socket file we bound, if it is still ours."""
    if path is None or inode is None:
        return
    try:
        if path.lstat().st_ino == inode:
            path.unlink()
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise
