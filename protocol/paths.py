"""Where the daemons' sockets live, and how an ipc socket file is made safe to bind.

Both daemons and `mmctl` compute the same default endpoints from the same environment,
so `mmctl status` finds a daemon without being told where it is:

    $MMFEED_RUNTIME_DIR            explicit choice (tests, several installs side by side)
    $RUNTIME_DIRECTORY             set by systemd for `RuntimeDirectory=mmfeed`
    $XDG_RUNTIME_DIR/mmfeed        a logged-in user's private runtime dir
    /tmp/mmfeed-$UID               last resort

The directory is the daemons' control surface: whoever can put a socket file in it can
impersonate a daemon to `mmctl`, and another user who creates `/tmp/mmfeed-$UID` first owns
it. So, as OpenSSH and systemd treat runtime directories:

- A daemon creates it with mode 0700 (0750 and chgrp with its --group: group members may
  reach the sockets, not replace them), exactly, whatever the umask, and then checks it with
  lstat; an existing one is checked the same way. It must be a directory (not a symlink),
  owned by this user, not writable by others, group-writable only by our own group or the
  --group one (systemd's RuntimeDirectoryMode=0770 of the unit's group) - or sticky like
  /tmp, where others may add names but not replace ours - in a parent that others cannot
  rename it out of (not world-writable without the sticky bit). Otherwise the
  daemon refuses to start (`UnsafeRuntimeDir`), naming the path, its owner (name and uid),
  its mode and what was expected, and what to do.
- A client (`mmctl`, any `ControlClient`, `mmctl logs -f`) checks the socket's directory
  before it connects: a symlink, a directory every user may write to (unless sticky), or one
  owned by another user is refused - unless that user got it from root (its parent is root's
  and writable by root only: /run/mmfeed, made by systemd for the units' user). Group write
  is accepted (the units' 0770): the socket file itself must belong to us, root or the
  directory's owner, which a group member's planted socket does not. A client never probes
  a socket it would refuse.
- Linux abstract sockets (`ipc://@name`) have no file and so no permissions: any local user
  can connect to one (and command the daemon) or bind one first (and impersonate it). Both
  sides refuse them (`AbstractSocketRefused`); use a path in a private directory, or
  tcp:// with CURVE keys.

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
import pwd
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


class UnsafeRuntimeDir(ControlError):
    """The socket directory could let another user impersonate or reach a daemon."""

    code = "unsafe_runtime_dir"


class AbstractSocketRefused(ControlError):
    """`ipc://@name`: an abstract socket, which no file permission protects."""

    code = "abstract_socket"


def _user(uid: int) -> str:
    """`alice (uid 1000)`, or `uid 1234 (no such user)`."""
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid} (no such user)"


def refuse_abstract(endpoint: str, side: str) -> None:
    """AbstractSocketRefused for `ipc://@name`; `side` is "bind" or "connect"."""
    if endpoint.startswith("ipc://@"):
        risk = ("any local user could connect to it and command the daemon" if side == "bind"
                else "any local user could have bound it first and be answering as the daemon")
        raise AbstractSocketRefused(
            f"{endpoint} is a Linux abstract socket: it has no file, so no permission guards "
            f"it and {risk}. Use a path in a directory only you can write (the default, "
            f"ipc://$XDG_RUNTIME_DIR/mmfeed/<daemon>.sock, or ipc:///run/mmfeed/...) or "
            f"tcp://HOST:PORT with CURVE keys (`mmctl keygen DIR`, then --curve-dir/--keys)")


def _mode(st: os.stat_result) -> str:
    return f"{stat.S_IMODE(st.st_mode):04o}"


def _unsafe(path: Path, problem: str, expected: str) -> UnsafeRuntimeDir:
    return UnsafeRuntimeDir(
        f"runtime directory {path} {problem}; expected {expected}. Another user may have made "
        f"it to intercept mmfeed's control sockets: check it (ls -ld {path}), remove it, or "
        f"set MMFEED_RUNTIME_DIR to a directory of yours with mode 0700")


def _check_parent(path: Path) -> None:
    """Others must not be able to rename `path` away and put their own in its place."""
    try:
        st = path.parent.stat()
    except OSError:
        return
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        raise _unsafe(path, f"is in {path.parent} (mode {_mode(st)}), which every user may "
                      f"write to and which has no sticky bit",
                      "a parent directory that only its owner (or the sticky bit) controls")


def _check_dir(path: Path, trusted_gids: set[int] | None) -> os.stat_result:
    """lstat checks every side shares: a directory, not a symlink, others cannot write,
    the group only when it is a trusted one (None: any group). Returns the lstat result."""
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        raise _unsafe(path, f"is a symlink (to {os.readlink(path)})",
                      "a real directory, never a link (it could be re-pointed at any time)")
    if not stat.S_ISDIR(st.st_mode):
        raise _unsafe(path, "is not a directory", "a directory")
    if st.st_mode & stat.S_ISVTX:
        # /tmp-like: others may add names but not remove or replace ours; a client checks
        # the socket file's owner, a daemon's bind refuses a name someone took first.
        return st
    if st.st_mode & stat.S_IWOTH:
        raise _unsafe(path, f"is writable by every user (mode {_mode(st)}, owner "
                      f"{_user(st.st_uid)})", "mode 0700 (0750/0770 for a group)")
    if st.st_mode & stat.S_IWGRP and trusted_gids is not None and st.st_gid not in trusted_gids:
        raise _unsafe(path, f"is writable by group {st.st_gid} (mode {_mode(st)}, owner "
                      f"{_user(st.st_uid)})", "mode 0700, or group write for our own group "
                      "or the --group one only")
    return st


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


def secure_runtime_dir(path: str | Path, group: str | None = None) -> Path:
    """Create `path` 0700 (0750 of `group`) if missing, then check it (module docstring):
    where a daemon may bind. UnsafeRuntimeDir names what is wrong and what to do."""
    from .filemodes import GroupError, dir_mode, group_id, secure_fd

    path = Path(path)
    try:
        gid = group_id(group)
    except GroupError as e:
        raise ControlError(f"{e} (runtime directory {path})") from None
    try:
        path.lstat()
    except FileNotFoundError:
        _make_parents(path.parent)
        _check_parent(path)
        try:
            os.mkdir(path, dir_mode(gid))
        except FileExistsError:
            pass  # made meanwhile by someone else: the checks below judge it
        else:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                secure_fd(fd, dir_mode(gid), gid, path)  # exact, whatever the umask
            finally:
                os.close(fd)
    _check_parent(path)
    st = _check_dir(path, {os.getegid()} | ({gid} if gid is not None else set()))
    if st.st_uid != os.geteuid():
        raise _unsafe(path, f"is owned by {_user(st.st_uid)}, not by this user "
                      f"{_user(os.geteuid())}", f"a directory owned by {_user(os.geteuid())}")
    return path


def _make_parents(path: Path) -> None:
    """mkdir -p with mode 0700 whatever the umask (pathlib's parents get 0777 - umask)."""
    missing = []
    while not os.path.lexists(path) and path != path.parent:
        missing.append(path)
        path = path.parent
    for p in reversed(missing):
        try:
            os.mkdir(p, 0o700)
        except FileExistsError:
            continue
        os.chmod(p, 0o700)


def runtime_dir(group: str | None = None) -> Path:
    """The directory a daemon binds its control and log sockets in: created 0700 if missing,
    checked either way (`secure_runtime_dir`)."""
    return secure_runtime_dir(_own_runtime_dir(), group)


def check_bind_endpoint(endpoint: str, group: str | None = None) -> None:
    """Before a daemon binds `endpoint`: refuse an abstract socket, and an existing socket
    directory that fails the checks (a missing one is created safely at bind time)."""
    refuse_abstract(endpoint, "bind")
    path = ipc_path(endpoint)
    if path is not None and os.path.lexists(path.parent):
        secure_runtime_dir(path.parent, group)


def check_connect_endpoint(endpoint: str) -> None:
    """Before a client connects to `endpoint`: refuse an abstract socket, a socket directory
    another user could control, and a socket file of a stranger (module docstring). A missing
    directory passes: there is nothing there to talk to, and the client says so."""
    refuse_abstract(endpoint, "connect")
    path = ipc_path(endpoint)
    if path is None:
        return
    d = path.parent
    try:
        # Any group may write (systemd's 0770 /run/mmfeed: root's mmctl is not in group
        # mmfeed): the group is root's to fill, and a member's socket fails the owner check.
        st = _check_dir(d, None)
    except FileNotFoundError:
        return
    me = os.geteuid()
    if st.st_uid not in (me, 0) and not _given_by_root(d):
        raise _unsafe(d, f"is owned by {_user(st.st_uid)}, not by this user {_user(me)} or "
                      f"root, in {d.parent}, where any user may create it",
                      f"a directory owned by {_user(me)} or root, or one that root gave to "
                      f"its owner (/run/mmfeed by systemd)")
    try:
        sock = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISLNK(sock.st_mode) or sock.st_uid not in (me, 0, st.st_uid):
        what = "a symlink" if stat.S_ISLNK(sock.st_mode) else f"owned by {_user(sock.st_uid)}"
        raise UnsafeRuntimeDir(
            f"socket {path} is {what}; expected a socket of {_user(me)}, root or the "
            f"directory's owner {_user(st.st_uid)}. Someone else put it there: do not talk to "
            f"it; remove it (rm {path}) and restart the daemon")


def _given_by_root(path: Path) -> bool:
    """True when only root could have created `path` (its parent is root's and no one else
    may write there), so its owner was chosen by root: systemd's RuntimeDirectory=."""
    try:
        st = path.parent.stat()
    except OSError:
        return False
    return st.st_uid == 0 and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def system_runtime_dir() -> Path:
    """`SYSTEM_RUNTIME_DIR`, or $MMFEED_SYSTEM_RUNTIME_DIR when set."""
    return Path(os.environ.get("MMFEED_SYSTEM_RUNTIME_DIR") or SYSTEM_RUNTIME_DIR)


def control_endpoint(daemon: str) -> str:
    """Default control endpoint of `daemon` ("producer" or "trainer"), where a daemon binds.
    Creates nothing: binding does (`prepare_ipc_bind`, with the daemon's group)."""
    return f"ipc://{_own_runtime_dir() / daemon}.sock"


def log_endpoint(daemon: str) -> str:
    """Default endpoint of `daemon`'s log PUB socket, next to its default control socket."""
    return log_endpoint_for(control_endpoint(daemon))


def log_endpoint_for(control: str) -> str:
    """The log PUB endpoint next to the control endpoint `control`: the one rule by which a
    daemon binds its log socket and `mmctl logs -f` finds it.

        ipc:///run/mmfeed/producer.sock  -> ipc:///run/mmfeed/producer.log.sock
        ipc:///tmp/x/ctl                 -> ipc:///tmp/x/ctl.log.sock
        ipc://@name  (abstract)          -> refused (AbstractSocketRefused)
        tcp://HOST:PORT                  -> tcp://HOST:PORT+1
        tcp://HOST:0 or tcp://HOST:*     -> the same: an ephemeral port of its own (the
                                            daemon's ready line names the one it got)

    Any other transport raises ControlError: pass the log endpoint explicitly.
    """
    refuse_abstract(control, "bind")
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
                       f"(known: ipc://PATH.sock, tcp://HOST:PORT); give the log "
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
    (the client's error says no file exists). A candidate whose directory or socket fails
    `check_connect_endpoint` is returned at once, unprobed, so the client refuses it loudly
    instead of quietly talking to the next one. Creates no directory: a client must never make
    /run/mmfeed, which systemd owns.
    """
    tried = control_candidates(daemon)
    for e in tried:
        try:
            check_connect_endpoint(e)
        except UnsafeRuntimeDir:
            return e, tried
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


def prepare_ipc_bind(endpoint: str, group: str | None = None) -> Path | None:
    """Make `endpoint`'s socket file ready to bind: refuse an abstract socket, create or check
    its directory (`secure_runtime_dir`: 0700, 0750 of `group`), check the path fits in
    sockaddr_un, and remove a stale file left by a dead process.

    A file that a live process still serves raises `EndpointInUse` instead: two daemons
    on one socket would each receive half of the commands.
    """
    refuse_abstract(endpoint, "bind")
    path = ipc_path(endpoint)
    if path is None:
        return None
    if len(os.fsencode(str(path))) > MAX_IPC_PATH:
        raise ControlError(
            f"ipc socket path {path} is {len(str(path))} bytes; unix sockets allow at most "
            f"{MAX_IPC_PATH}: choose a shorter MMFEED_RUNTIME_DIR or endpoint"
        )
    secure_runtime_dir(path.parent, group)
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
