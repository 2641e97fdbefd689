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

Clients look in more than one place (`find_control_endpoint`). A daemon under systemd binds in
/run/mmfeed (`RuntimeDirectory=mmfeed` sets $RUNTIME_DIRECTORY for the unit only), while an
operator's shell resolves $XDG_RUNTIME_DIR/mmfeed: without a second place to look, `mmctl`
would never find a daemon the units started. So a client without $MMFEED_RUNTIME_DIR tries its
own runtime dir first and then `SYSTEM_RUNTIME_DIR`, and creates neither.

The log PUB socket sits next to the control socket by one rule (`log_endpoint_for`) that the
daemons use to bind and `mmctl logs -f` uses to connect, so `--control` alone says both.
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
#: Where the systemd units' `RuntimeDirectory=mmfeed` puts the daemons' sockets; clients look
#: here after their own runtime dir. $MMFEED_SYSTEM_RUNTIME_DIR replaces it (tests, units with
#: another RuntimeDirectory=).
SYSTEM_RUNTIME_DIR = "/run/mmfeed"


class EndpointInUse(ControlError):
    """Another live process already serves this ipc endpoint; we refuse to steal it."""

    code = "endpoint_in_use"


def _own_runtime_dir() -> Path:
    """This process's runtime dir by the table in the module docstring; creates nothing."""
    env = os.environ
    if env.get("MMFEED_RUNTIME_DIR"):
        return Path(env["MMFEED_RUNTIME_DIR"])
    if env.get("RUNTIME_DIRECTORY"):
        # systemd may list several directories separated by ':'; ours is the first.
        return Path(env["RUNTIME_DIRECTORY"].split(":")[0])
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "mmfeed"
    return Path("/tmp") / f"mmfeed-{os.getuid()}"


def runtime_dir() -> Path:
    """The directory a daemon binds its control and log sockets in, created 0700 if missing."""
    path = _own_runtime_dir()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def system_runtime_dir() -> Path:
    """`SYSTEM_RUNTIME_DIR`, or $MMFEED_SYSTEM_RUNTIME_DIR when set."""
    return Path(os.environ.get("MMFEED_SYSTEM_RUNTIME_DIR") or SYSTEM_RUNTIME_DIR)


def control_endpoint(daemon: str) -> str:
    """Default control endpoint of `daemon` ("producer" or "trainer"), where a daemon binds."""
    return f"ipc://{runtime_dir() / daemon}.sock"


def log_endpoint(daemon: str) -> str:
    """Default endpoint of `daemon`'s log PUB socket, next to its default control socket."""
    return log_endpoint_for(control_endpoint(daemon))


def log_endpoint_for(control: str) -> str:
    """The log PUB endpoint next to the control endpoint `control`: the one rule by which a
    daemon binds its log socket and `mmctl logs -f` finds it.

        ipc:///run/mmfeed/producer.sock  -> ipc:///run/mmfeed/producer.log.sock
        ipc:///tmp/x/ctl                 -> ipc:///tmp/x/ctl.log.sock
        ipc://@name  (abstract)          -> ipc://@name.log
        tcp://HOST:PORT                  -> tcp://HOST:PORT+1
        tcp://HOST:0 or tcp://HOST:*     -> the same: an ephemeral port of its own (the
                                            daemon's ready line names the one it got)

    Any other transport raises ControlError: pass the log endpoint explicitly.
    """
    if control.startswith("ipc://@"):
        return control + ".log"
    path = ipc_path(control)
    if path is not None:
        base = path.name[: -len(".sock")] if path.name.endswith(".sock") else path.name
        return f"ipc://{path.with_name(base + '.log.sock')}"
    if control.startswith("tcp://") and ":" in control[len("tcp://"):]:
        host, port = control.rsplit(":", 1)
        if port in ("0", "*"):
            return control
        if port.isdigit():
            if int(port) >= 65535:
                raise ControlError(f"control endpoint {control}: the log socket goes on the next "
                                   f"port, and {port} is the last one; choose a lower port or "
                                   f"give the log endpoint explicitly")
            return f"{host}:{int(port) + 1}"
    raise ControlError(f"cannot place a log socket next to control endpoint {control!r} "
                       f"(known: ipc://PATH.sock, ipc://@NAME, tcp://HOST:PORT); give the log "
                       f"endpoint explicitly")


def control_candidates(daemon: str) -> list[str]:
    """The control endpoints a client tries for `daemon`, in order (module docstring):
    exactly $MMFEED_RUNTIME_DIR's when set, else its own runtime dir's, then the system one's."""
    own = _own_runtime_dir()
    dirs = [own]
    if not os.environ.get("MMFEED_RUNTIME_DIR") and system_runtime_dir() != own:
        dirs.append(system_runtime_dir())
    return [f"ipc://{d / daemon}.sock" for d in dirs]


def find_control_endpoint(daemon: str) -> tuple[str, list[str]]:
    """Where a client should talk to `daemon`, and every endpoint it considered.

    The first candidate with a live listener wins; failing that, the first whose socket file
    exists (the client's error then says it is left over); failing that, the first candidate
    (the client's error says no file exists). Creates no directory: a client must never make
    /run/mmfeed, which systemd owns.
    """
    tried = control_candidates(daemon)
    files = [e for e in tried if (p := ipc_path(e)) is not None and _exists(p)]
    for e in files:
        if someone_listens(ipc_path(e)):  # type: ignore[arg-type]
            return e, tried
    return (files or tried)[0], tried


def _exists(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.lstat().st_mode)
    except OSError:  # missing, or a directory we may not search
        return False


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
