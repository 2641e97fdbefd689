"""Where a daemon's sockets are bound, and with which keys: the control REP socket
(control.py) and the log PUB socket (logs.py) are bound by the one routine here
(`bind_server`), so what protects them - CURVE on tcp://, the socket file's mode and owner on
ipc:// (paths.py) - is written once.

TCP is opt-in and then authenticated with ZeroMQ CURVE (`CurveServerKeys`, `CurveClientKeys`,
`keygen`); binding or connecting `tcp://` without keys is refused with a clear error. A daemon
resolves its sockets and keys with `daemon_sockets()` (`--control`, `--logs`, `--curve-dir`).
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import zmq

from .errors import ControlError
from .paths import (bound_inode, check_bind_endpoint, prepare_ipc_bind, remove_ipc_socket,
                    secure_ipc_socket)


@dataclass(frozen=True)
class CurveServerKeys:
    """A server's CURVE identity and the clients it lets in.

    secret_key_file: the server's `*.key_secret` from `keygen`.
    clients_dir:     folder of allowed clients' public `*.key` files; any other key is refused.
    """

    secret_key_file: Path
    clients_dir: Path

    @classmethod
    def from_dir(cls, directory: str | Path) -> "CurveServerKeys":
        """The server side of what `keygen(directory)` lays out: `server.key_secret` and the
        `clients/` folder of allowed public keys. Checked now, so that a daemon started with a
        wrong folder says which file is missing before it binds anything."""
        d = Path(directory)
        if not d.is_dir():
            raise ControlError(f"CURVE key folder {d} does not exist; create it with "
                               f"`mmctl keygen {d}`")
        secret, clients = d / "server.key_secret", d / "clients"
        if not secret.is_file():
            raise ControlError(f"CURVE key folder {d}: no server.key_secret (the server's secret "
                               f"key, as `mmctl keygen` writes it)")
        _, key = _load_keypair(secret, "server")
        if key is None:
            raise ControlError(f"{secret} holds no secret key (expected `mmctl keygen`'s "
                               f"server.key_secret)")
        if not clients.is_dir() or not any(clients.glob("*.key")):
            raise ControlError(f"CURVE key folder {d}: clients/ holds no *.key file; it must hold "
                               f"the public key of every client allowed in (keygen puts "
                               f"client.key there)")
        return cls(secret, clients)


@dataclass(frozen=True)
class CurveClientKeys:
    """A client's CURVE identity: the server's public key and the client's own keypair."""

    server_public_file: Path
    secret_key_file: Path

    @classmethod
    def from_dir(cls, directory: str | Path) -> "CurveClientKeys":
        """Keys as `keygen(directory)` lays them out (server.key, client.key_secret)."""
        d = Path(directory)
        return cls(d / "server.key", d / "client.key_secret")


def keygen(directory: str | Path, names: tuple[str, ...] = ("server", "client")) -> dict[str, Path]:
    """Write a CURVE keypair per name into `directory` (secret files mode 0600), and copy each
    non-server public key into `directory/clients/` so that folder can be the server's
    `clients_dir` as is. Returns name -> secret key file."""
    import zmq.auth

    d = Path(directory)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    (d / "clients").mkdir(mode=0o700, exist_ok=True)
    out = {}
    for name in names:
        public, secret = zmq.auth.create_certificates(str(d), name)
        os.chmod(secret, 0o600)
        if name != "server":
            shutil.copy(public, d / "clients" / Path(public).name)
        out[name] = Path(secret)
    return out


def _load_keypair(path: Path, what: str) -> tuple[bytes, bytes | None]:
    import zmq.auth

    try:
        return zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as e:
        raise ControlError(f"{what}: cannot read CURVE key file {path}: {e}") from None


@dataclass(frozen=True)
class DaemonSockets:
    """Where a daemon binds its control REP and log PUB sockets, with each one's CURVE keys
    (None for ipc, where the socket file's mode is the access control)."""

    control: str
    logs: str
    control_curve: CurveServerKeys | None = None
    logs_curve: CurveServerKeys | None = None


def daemon_sockets(daemon: str, control: str | None = None, logs: str | None = None,
                   curve_dir: str | Path | None = None) -> DaemonSockets:
    """The one place both daemons resolve their `--control`, `--logs` and `--curve-dir`:

        socks = daemon_sockets("producer", opts.control, opts.log_endpoint, opts.curve_dir)
        setup_daemon_logging("producer", socks.logs, curve=socks.logs_curve)
        server = ControlServer(socks.control, commands, curve=socks.control_curve)

    control: None = the default ipc socket (`paths.control_endpoint`).
    logs:    None = next to the control socket (`paths.log_endpoint_for`: X.sock ->
             X.log.sock, tcp port + 1), the same rule `mmctl logs -f` follows.
    curve_dir: a `mmctl keygen` folder (server.key_secret, clients/*.key); its keys protect
             whichever of the two sockets is tcp://. A tcp:// socket without it is refused
             here, naming the option, before anything is bound.
    """
    from .paths import control_endpoint, log_endpoint_for

    ctl = control or control_endpoint(daemon)
    pub = logs or log_endpoint_for(ctl)
    for e in (ctl, pub):  # abstract sockets, a squatted runtime dir: refused before anything
        check_bind_endpoint(e)
    tcp = [e for e in (ctl, pub) if e.startswith("tcp://")]
    if tcp and curve_dir is None:
        raise ControlError(
            f"{daemon}: {tcp[0]} is TCP, which is only allowed with CURVE authentication; "
            f"create keys with `mmctl keygen DIR` and start with --curve-dir DIR (or use the "
            f"default ipc:// socket)")
    keys = CurveServerKeys.from_dir(curve_dir) if curve_dir is not None else None
    return DaemonSockets(ctl, pub, keys if ctl.startswith("tcp://") else None,
                         keys if pub.startswith("tcp://") else None)


def _needs_curve(endpoint: str, curve: object | None, side: str) -> None:
    if endpoint.startswith("tcp://") and curve is None:
        raise ControlError(
            f"{side} {endpoint}: TCP control is only allowed with CURVE authentication; "
            f"create keys with `mmctl keygen DIR` and pass them (or use the default ipc:// socket)"
        )


def _start_authenticator(ctx: zmq.Context, curve: CurveServerKeys):
    from zmq.auth.thread import ThreadAuthenticator

    clients = Path(curve.clients_dir)
    if not clients.is_dir():
        raise ControlError(f"CURVE clients folder {clients} does not exist; it must hold the "
                           f"allowed clients' public *.key files (see `mmctl keygen`)")
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(clients))
    return auth


def curve_server_socket(ctx: zmq.Context, sock: zmq.Socket, curve: CurveServerKeys):
    """Make `sock` a CURVE server that admits only `curve.clients_dir`'s keys. Returns the
    authenticator, which the caller stops when done (used by the log PUB socket)."""
    _, secret = _load_keypair(Path(curve.secret_key_file), "server")
    if secret is None:
        raise ControlError(f"{curve.secret_key_file} holds no secret key (use the *.key_secret file)")
    auth = _start_authenticator(ctx, curve)
    sock.curve_secretkey = secret
    sock.curve_publickey = zmq.curve_public(secret)
    sock.curve_server = True
    return auth


def curve_client_socket(sock: zmq.Socket, curve: CurveClientKeys) -> None:
    """Give `sock` the client's keypair and the server key it must talk to."""
    server_public, _ = _load_keypair(Path(curve.server_public_file), "client: server key")
    public, secret = _load_keypair(Path(curve.secret_key_file), "client: own key")
    if secret is None:
        raise ControlError(f"{curve.secret_key_file} holds no secret key")
    sock.curve_serverkey = server_public
    sock.curve_publickey = public
    sock.curve_secretkey = secret


@dataclass
class Binding:
    """A bound server socket's side things: the CURVE authenticator (None on ipc) and the
    socket file with its inode (None on tcp), removed only while it is still ours."""

    endpoint: str
    auth: object | None = None
    path: Path | None = None
    inode: int | None = None

    def release(self) -> None:
        """Stop the authenticator and remove our socket file (call after closing the socket,
        before terminating its context). Idempotent."""
        if self.auth is not None:
            self.auth.stop()
            self.auth = None
        remove_ipc_socket(self.path, self.inode)
        self.path = self.inode = None


def bind_server(ctx: zmq.Context, sock: zmq.Socket, endpoint: str, *,
                curve: CurveServerKeys | None = None, group: str | None = None) -> Binding:
    """Bind `sock` (of `ctx`) at `endpoint` the way every daemon socket is bound: a CURVE
    server admitting only `curve.clients_dir`'s keys when keys are given, an ipc:// socket
    file prepared (folder checked, a stale file removed: paths.prepare_ipc_bind), bound, and
    then given the mode of `group` (0660) or the owner's only (0600). On failure whatever was
    done is undone (the authenticator stopped, our file removed) and the error raised."""
    b = Binding(endpoint)
    try:
        if curve is not None:
            b.auth = curve_server_socket(ctx, sock, curve)
        b.path = prepare_ipc_bind(endpoint, group)
        sock.bind(endpoint)
        b.inode = bound_inode(b.path)  # from here on, a failure removes our file
        b.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        secure_ipc_socket(b.path, group)
    except BaseException:
        b.release()
        raise
    return b
