"""Control messages between `mmctl` and the daemons: ZeroMQ REQ/REP carrying JSON.

Wire format (version `CONTROL_VERSION`, at most `MAX_MESSAGE_BYTES` per message):

    request  {"v": 1, "id": "9f0c...", "cmd": "filter", "args": {"spec": "gray"}}
    reply    {"ok": true, "id": "9f0c...", ...}                     (e.g. "generation": 7)
             {"ok": false, "id": "9f0c...", "error": {"code": "bad_argument", "message": "..."}}

`id` (optional; 1 to `MAX_ID_CHARS` characters) names one logical request: a client sends a
new one per request and the same one with every retry of it. The server keeps the replies
to the last `REPLY_CACHE_ENTRIES` ids (at most `REPLY_CACHE_BYTES`) and answers a repeated
id from there without running the command again, so a command slower than the client's
timeout still runs once (the ZeroMQ guide's reliable request-reply). A request without an
id is run every time and never cached (older clients). Replies echo the id. The cache is
`ReplyCache` (reply_cache.py).

JSON only, never pickle: a control socket may be reachable by other users (group mode) or
other machines (CURVE over TCP), and unpickling is code execution.

Server side (`ControlServer`): each daemon declares its commands once,

    server = ControlServer(control_endpoint("producer"), {
        "filter": Command(self.on_filter, args={"spec": str}),
        "logs":   Command(self.on_logs, args={"n": Arg(int, required=False, default=100)}),
        "status": Command(self.on_status),
    })
    while running:
        server.poll(timeout_ms=50)       # from the main loop; or server.serve_in_thread()

and the server checks everything a client can get wrong (size, UTF-8, JSON, nesting depth,
number sizes, object, id, version, command, argument names and types) before a handler runs,
so a handler sees only valid arguments and a bad message changes nothing. A handler raises
`BadArgument` (or any `MmfeedError`) for what only it can judge - a sensor stem that does not
exist; anything else it raises becomes an `internal` error reply and a logged traceback (once
per kind and minute). The loop never dies: `poll()` is the daemons' last-resort catch.
Refusals are logged rate-limited and clipped, so a flood of bad requests cannot flood the log.

Client side (`ControlClient`) is the ZeroMQ guide's Lazy Pirate: a REQ socket that lost its
reply is stuck forever, so the client polls with a timeout, and on silence closes the socket
(linger 0) and opens a fresh one, a bounded number of times, then raises `ControlTimeout`.

Commands and their arguments: commands.py. TCP is opt-in and then authenticated with ZeroMQ
CURVE; binding or connecting `tcp://` without keys is refused with a clear error; a daemon
resolves its sockets and keys with `daemon_sockets()` (sockets.py).
"""
from __future__ import annotations

import json
import math
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import zmq

from .errors import (
    ControlTimeout,
    MalformedMessage,
    MessageTooLarge,
    MmfeedError,
    RemoteError,
    UnknownCommand,
    VersionMismatch,
)
from .logs import LogLimiter, clip
from .paths import check_connect_endpoint, ipc_path
# Command specs (commands.py) and where sockets are bound with which keys (sockets.py):
# re-exported here, the control API's one import for mmctl, the daemons and tests.
from .commands import WIRE_ARGS, Arg, Command, wire_command  # noqa: F401
# The at-most-once retry cache (reply_cache.py), re-exported likewise.
from .reply_cache import REPLY_CACHE_BYTES, REPLY_CACHE_ENTRIES, ReplyCache, request_digest  # noqa: F401
from .sockets import (  # noqa: F401
    Binding,
    CurveClientKeys,
    CurveServerKeys,
    DaemonSockets,
    _needs_curve,
    bind_server,
    curve_client_socket,
    curve_server_socket,
    daemon_sockets,
    keygen,
)

CONTROL_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024
# ZMQ_MAXMSGSIZE is a memory guard, not the protocol limit: ZeroMQ drops the *connection* of a
# peer that exceeds it, so that peer gets no reply at all. Between MAX_MESSAGE_BYTES and this
# ceiling a client gets a proper `too_large` error reply instead.
TRANSPORT_MAX_BYTES = 16 * MAX_MESSAGE_BYTES
MAX_REPLY_BYTES = 1024 * 1024       # a reply beyond this becomes an `internal` error
MAX_ID_CHARS = 64                   # request ids: a uuid4 hex is 32
MAX_NUMBER_DIGITS = 32              # JSON integers; ints beyond 64 bits are never arguments
MAX_ERROR_CHARS = 1000              # an error reply's message
LOG_PAYLOAD_CHARS = 200             # what a log line quotes of a refused request
REFUSED_LOG_BURST = 10              # refusals logged per error code and window, then counted
LOG_WINDOW_S = 60.0
_SHAPE = f'{{"v": {CONTROL_VERSION}, "id": "...", "cmd": ..., "args": {{...}}}}'

log = logging.getLogger(__name__)



# --- server --------------------------------------------------------------------------------


def _reject_constant(name: str) -> None:
    # Python's json accepts NaN/Infinity, which are not JSON and slip past range checks.
    raise MalformedMessage(f"message contains {name}, which is not valid JSON; send a finite number")


def _parse_int(text: str) -> int:
    # int() of more than 4300 digits raises ValueError (CPython's conversion limit); no
    # argument of any command needs more than a 64-bit integer's 20 digits.
    if len(text.lstrip("-")) > MAX_NUMBER_DIGITS:
        raise MalformedMessage(f"message contains an integer of {len(text.lstrip('-'))} digits; "
                               f"numbers have at most {MAX_NUMBER_DIGITS} digits")
    return int(text)


def _parse_float(text: str) -> float:
    # 1e999 is valid JSON that Python reads as inf: as bad as Infinity for a range check.
    if len(text) > 4 * MAX_NUMBER_DIGITS:
        raise MalformedMessage(f"message contains a number of {len(text)} characters; numbers "
                               f"have at most {4 * MAX_NUMBER_DIGITS}")
    value = float(text)
    if not math.isfinite(value):
        raise MalformedMessage(f"message contains the number {clip(text, 40)}, which is out of "
                               f"range for a double; send a finite number")
    return value


def _error(err: MmfeedError) -> dict:
    return {"ok": False, "error": {"code": err.code, "message": clip(str(err), MAX_ERROR_CHARS)}}


def _internal(what: str, e: BaseException) -> dict:
    return {"ok": False, "error": {"code": "internal", "message": clip(
        f"{what}: internal error: {type(e).__name__}: {e}", MAX_ERROR_CHARS)}}


class ControlServer:
    """A daemon's REP socket and the loop step that answers it.

    Bind-time checks: an ipc socket file left by a dead daemon is replaced, one served by a
    live process is refused (`EndpointInUse`); the file gets mode 0600 (0660 + chgrp with
    `group`); `tcp://` needs `curve`. Use `poll()` from the daemon's own loop (handlers then
    run on the daemon's thread, no locking needed) or `serve_in_thread()`.

    A request with an `id` is answered once: its reply is kept in a `ReplyCache` and a
    request repeating the id (a client's retry after a timeout) gets that reply again without
    running the handler. Refusals and internal errors are logged through `LogLimiter`s (the
    first few per kind and minute, then one "suppressed K" line), quoting at most
    `LOG_PAYLOAD_CHARS` of what the client sent.
    """

    def __init__(self, endpoint: str, commands: Mapping[str, Command | Callable], *,
                 curve: CurveServerKeys | None = None, group: str | None = None):
        _needs_curve(endpoint, curve, "control server")
        self.commands: dict[str, Command] = {
            name: c if isinstance(c, Command) else Command(c, args=None)
            for name, c in commands.items()
        }
        self._ctx = zmq.Context()  # own context: one ZAP authenticator per context
        self._binding: Binding | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._closed = False
        self.handled = 0
        self.internal_errors = 0
        self.replies = ReplyCache()
        self._refused_log = LogLimiter(log, burst=REFUSED_LOG_BURST, window_s=LOG_WINDOW_S)
        self._internal_log = LogLimiter(log, burst=1, window_s=LOG_WINDOW_S)
        try:
            self._sock = self._ctx.socket(zmq.REP)
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.setsockopt(zmq.MAXMSGSIZE, TRANSPORT_MAX_BYTES)
            self._binding = bind_server(self._ctx, self._sock, endpoint, curve=curve, group=group)
            self.endpoint = self._binding.endpoint
        except BaseException:
            self._teardown()
            raise

    def poll(self, timeout_ms: int = 0, max_requests: int = 64) -> int:
        """Wait up to `timeout_ms` for a request, answer it and whatever else is already
        queued (at most `max_requests`, so a flood of clients cannot starve the daemon's
        main loop), and return how many were answered. Never raises for anything a client
        sends, nor for a handler's bug: those become error replies (the daemon's last-resort
        catch is here). Only a closed context (shutdown) raises."""
        n = 0
        wait = timeout_ms
        self._refused_log.flush()
        self._internal_log.flush()
        while n < max_requests:
            try:
                if not self._sock.poll(wait, zmq.POLLIN):
                    break
                frames = self._sock.recv_multipart(copy=True)
            except zmq.ZMQError as e:
                if e.errno == zmq.ETERM:
                    raise
                self._internal_log.log(("recv", e.errno), logging.ERROR,
                                       "control socket could not receive: %s", e)
                break
            try:
                body = self._answer(frames)
            except Exception as e:  # a bug in the checks themselves: still one reply
                body = self._internal_body("request", e)
            try:
                self._sock.send(body)
            except zmq.ZMQError as e:
                if e.errno == zmq.ETERM:
                    raise
                self._internal_log.log(("send", e.errno), logging.ERROR,
                                       "control reply could not be sent: %s", e)
            n += 1
            wait = 0
        self.handled += n
        return n

    def _answer(self, frames: list[bytes]) -> bytes:
        """The reply bytes for one request: from the reply cache for a repeated id, else from
        checking and running it (and then kept in the cache when it carried an id)."""
        rid = digest = None
        try:
            msg = self._decode(frames)
            rid = self._request_id(msg)
            if rid is not None:
                digest = request_digest(msg)
                cached = self.replies.get(rid, digest)
                if cached is not None:
                    log.debug("answered a repeated request id from the reply cache",
                              extra={"id": clip(rid, 80)})
                    return cached
            cmd, args = self._check(msg)
            command = self.commands[cmd]
            kwargs = command.validate(cmd, args)
        except MmfeedError as e:
            self._refused(e)
            return self._encode(_error(e), rid, digest)
        try:
            result = command.handler(**kwargs)
        except MmfeedError as e:
            self._refused(e, cmd)
            return self._encode(_error(e), rid, digest)
        except Exception as e:  # the loop must survive any handler bug
            return self._encode(self._internal_reply(cmd, e), rid, digest)
        reply = {"ok": True}
        if result:
            reply.update(result)
        return self._encode(reply, rid, digest)

    def _encode(self, reply: dict, rid: str | None, digest: bytes | None) -> bytes:
        if rid is not None:
            reply = {**reply, "id": rid}
        try:
            body = json.dumps(reply, default=str).encode()
        except Exception as e:  # a handler returned something JSON cannot hold
            body = self._internal_body("reply", e, rid)
        if len(body) > MAX_REPLY_BYTES:
            body = self._internal_body("reply", ValueError(
                f"reply of {len(body)} bytes is over the {MAX_REPLY_BYTES}-byte limit"), rid)
        if rid is not None and digest is not None:
            self.replies.put(rid, digest, body)
        return body

    def _internal_reply(self, what: str, e: BaseException) -> dict:
        self.internal_errors += 1
        self._internal_log.log((what, type(e).__name__), logging.ERROR,
                               "control request %s failed inside the daemon: %s: %s", what,
                               type(e).__name__, clip(str(e), LOG_PAYLOAD_CHARS),
                               exc_info=(type(e), e, e.__traceback__),
                               what=f"internal errors in {what} ({type(e).__name__})")
        return _internal(what, e)

    def _internal_body(self, what: str, e: BaseException, rid: str | None = None) -> bytes:
        reply = self._internal_reply(what, e)
        if rid is not None:
            reply["id"] = rid
        return json.dumps(reply, default=str).encode()

    def _refused(self, e: MmfeedError, cmd: str | None = None) -> None:
        what = f"command {clip(cmd, 40)} refused" if cmd else "control request refused"
        self._refused_log.log(e.code, logging.WARNING, "%s: %s", what,
                              clip(str(e), LOG_PAYLOAD_CHARS), extra={"code": e.code},
                              what=f"refused requests ({e.code})")

    def _decode(self, frames: list[bytes]) -> dict:
        """One frame of at most MAX_MESSAGE_BYTES of UTF-8 JSON holding an object."""
        if len(frames) != 1:
            raise MalformedMessage(f"expected one message frame, got {len(frames)}")
        raw = frames[0]
        if len(raw) > MAX_MESSAGE_BYTES:
            raise MessageTooLarge(f"message of {len(raw)} bytes; the limit is {MAX_MESSAGE_BYTES}")
        try:
            msg = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant,
                             parse_int=_parse_int, parse_float=_parse_float)
        except UnicodeDecodeError as e:
            raise MalformedMessage(f"message is not UTF-8 text ({e.reason} at byte {e.start}); "
                                   f"expected a JSON object") from None
        except json.JSONDecodeError as e:
            raise MalformedMessage(f"message is not JSON ({e.msg} at char {e.pos}); expected "
                                   f'{_SHAPE}') from None
        except RecursionError:
            raise MalformedMessage(f"message nests lists or objects deeper than the parser "
                                   f"allows; expected {_SHAPE}") from None
        except ValueError as e:  # any other conversion limit of the parser
            raise MalformedMessage(f"message cannot be read: {clip(str(e), 120)}; expected "
                                   f"{_SHAPE}") from None
        if not isinstance(msg, dict):
            raise MalformedMessage(f"message is a JSON {type(msg).__name__}; expected an object "
                                   f"{_SHAPE}")
        return msg

    @staticmethod
    def _request_id(msg: dict) -> str | None:
        if "id" not in msg:
            return None
        rid = msg["id"]
        if not isinstance(rid, str) or not 0 < len(rid) <= MAX_ID_CHARS:
            raise MalformedMessage(f'"id" must be a string of 1 to {MAX_ID_CHARS} characters '
                                   f"(a new one per request, e.g. a uuid), got "
                                   f"{clip(json.dumps(rid), 60)}")
        return rid

    def _check(self, msg: dict) -> tuple[str, dict]:
        v = msg.get("v")
        if isinstance(v, bool) or not isinstance(v, int):
            raise MalformedMessage(f'message lacks an integer "v" (control protocol version '
                                   f"{CONTROL_VERSION})")
        if v != CONTROL_VERSION:
            raise VersionMismatch("the control client", v, CONTROL_VERSION)
        cmd = msg.get("cmd")
        if not isinstance(cmd, str) or not cmd:
            raise MalformedMessage('message lacks "cmd" (a command name string)')
        args = msg.get("args", {})
        if not isinstance(args, dict):
            raise MalformedMessage(f'"args" is a JSON {type(args).__name__}; expected an object')
        extra = sorted(set(msg) - {"v", "id", "cmd", "args"})
        if extra:
            raise MalformedMessage(f"unknown message field {clip(extra[0], 40)!r}; expected v, "
                                   f"id, cmd, args")
        if cmd not in self.commands:
            raise UnknownCommand(f"unknown command {clip(cmd, 40)!r}; known: "
                                 f"{', '.join(sorted(self.commands))}")
        return cmd, args

    def serve_in_thread(self, poll_ms: int = 100) -> threading.Thread:
        """Answer requests on a background thread until `close()`. Handlers then run on that
        thread: they must be safe to call concurrently with the daemon's own work."""
        if self._thread is not None:
            raise RuntimeError("serve_in_thread() called twice")

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.poll(poll_ms)
                except zmq.ZMQError as e:  # context terminated under us: nothing left to serve
                    if self._stop.is_set() or e.errno == zmq.ETERM:
                        return
                    log.exception("control socket error; continuing")

        self._thread = threading.Thread(target=loop, name=f"control {self.endpoint}", daemon=True)
        self._thread.start()
        return self._thread

    def close(self) -> None:
        """Stop the serving thread (if any), close the socket and remove our socket file."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._teardown()

    def _teardown(self) -> None:
        sock = getattr(self, "_sock", None)
        if sock is not None:
            sock.close(linger=0)
        if self._binding is not None:
            self._binding.release()
        self._ctx.term()

    def __enter__(self) -> "ControlServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ControlServer({getattr(self, 'endpoint', '?')!r}, commands={sorted(self.commands)})"


# --- client --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timeouts:
    """How long a client waits, in one place.

    request: seconds to wait for one reply before giving up on that socket.
    retries: fresh sockets to try after the first silent one (0 = a single attempt).

        Timeouts()                         # 2.5 s, then one retry: at most ~5 s
        Timeouts(request=0.2, retries=0)   # a quick probe
        Timeouts.within(10.0)              # ~10 s in all, split over the attempts
    """

    request: float = 2.5
    retries: int = 1

    def __post_init__(self) -> None:
        if not self.request > 0:
            raise ValueError(f"Timeouts.request must be > 0 seconds, got {self.request}")
        if self.retries < 0:
            raise ValueError(f"Timeouts.retries must be >= 0, got {self.retries}")

    @classmethod
    def within(cls, total: float, retries: int = 1) -> "Timeouts":
        return cls(request=total / (retries + 1), retries=retries)


_START_HINTS = {
    "producer": "mm-producer run --source SRC --ring NAME",
    "trainer": "mm-trainer run --cache DIR --ring NAME",
}


def _daemon_of(endpoint: str) -> str | None:
    path = ipc_path(endpoint)
    if path is not None and path.name.endswith(".sock"):
        return path.name[: -len(".sock")]
    return None


class ControlClient:
    """Send one command at a time to a daemon and return its reply (Lazy Pirate).

    `request("filter", spec="gray")` returns the reply dict of an `ok` reply, raises
    `RemoteError(code, message)` for an `ok: false` one and `ControlTimeout` when no reply
    came after `timeouts.retries + 1` attempts. Not thread-safe: one client per thread.
    """

    def __init__(self, endpoint: str, timeouts: Timeouts = Timeouts(),
                 curve: CurveClientKeys | None = None, *, daemon: str | None = None):
        _needs_curve(endpoint, curve, "control client")
        check_connect_endpoint(endpoint)  # never talk to a socket a stranger could have made
        self.endpoint = endpoint
        self.timeouts = timeouts
        self.curve = curve
        self.daemon = daemon or _daemon_of(endpoint)
        self._ctx = zmq.Context.instance()
        self._sock: zmq.Socket | None = None

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            s = self._ctx.socket(zmq.REQ)
            s.setsockopt(zmq.LINGER, 0)
            # A REQ socket blocks in send() while it has no ready peer: a tcp peer whose CURVE
            # handshake failed is dropped and re-dialled, and send waited forever (seen as a
            # hung test). The request timeout bounds the send as it bounds the reply.
            s.setsockopt(zmq.SNDTIMEO, max(1, int(self.timeouts.request * 1000)))
            if self.curve is not None:
                curve_client_socket(s, self.curve)
            s.connect(self.endpoint)
            self._sock = s
        return self._sock

    def _discard(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def request(self, cmd: str, /, **args: Any) -> dict:
        """Send `cmd` with `args`; return the daemon's `ok` reply as a dict.

        The request carries a new id (a uuid4) that every retry of it repeats, so a daemon
        that was only slow (a checkpoint, a filter change proved on a real sample) answers
        the retry from its reply cache and the command runs once."""
        rid = uuid.uuid4().hex
        body = json.dumps({"v": CONTROL_VERSION, "id": rid, "cmd": cmd, "args": args}).encode()
        if len(body) > MAX_MESSAGE_BYTES:
            raise MessageTooLarge(f"{cmd}: request of {len(body)} bytes; the limit is {MAX_MESSAGE_BYTES}")
        t0 = time.monotonic()
        for _ in range(self.timeouts.retries + 1):
            sock = self._socket()
            try:
                sock.send(body)
            except zmq.Again:  # no peer took it within the timeout: as good as no reply
                self._discard()
                continue
            if sock.poll(int(self.timeouts.request * 1000), zmq.POLLIN):
                return self._decode(sock.recv(), rid)
            self._discard()  # a REQ socket that lost its reply can never send again
        raise ControlTimeout(self._silence_message(cmd, time.monotonic() - t0))

    def _decode(self, raw: bytes, rid: str | None = None) -> dict:
        try:
            reply = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise MalformedMessage(f"{self.endpoint} replied with something that is not JSON "
                                   f"({raw[:60]!r}); is it an mmfeed daemon?") from None
        if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
            raise MalformedMessage(f'{self.endpoint} replied without a boolean "ok": {raw[:120]!r}')
        got = reply.pop("id", None)
        if got is not None and rid is not None and got != rid:
            raise MalformedMessage(f"{self.endpoint} replied to request {got!r}, not to {rid!r}")
        if not reply["ok"]:
            err = reply.get("error") or {}
            raise RemoteError(str(err.get("code", "error")), str(err.get("message", "(no message)")))
        return reply

    def _silence_message(self, cmd: str, elapsed: float) -> str:
        attempts = self.timeouts.retries + 1
        msg = (f"no reply to {cmd!r} from {self.endpoint} after {elapsed:.1f} s "
               f"({attempts} attempt{'s' if attempts > 1 else ''} of {self.timeouts.request:g} s)")
        path = ipc_path(self.endpoint)
        hint = _START_HINTS.get(self.daemon or "")
        start = f"; start one with `{hint}`" if hint else ""
        if path is not None and not path.exists():
            return (f"no daemon is listening at {self.endpoint} (socket file {path} does not "
                    f"exist){start}")
        if path is not None:
            from .paths import someone_listens

            if not someone_listens(path):
                return (f"no daemon is listening at {self.endpoint} (socket file {path} is left "
                        f"over from a daemon that is gone){start}")
            return msg + "; the daemon is there but busy or stuck"
        return msg + f"; is the daemon running and are the CURVE keys right?{start}"

    def listening(self) -> bool | None:
        """For ipc endpoints: whether a process accepts connections there (cheap, no request).
        None for other transports, where only a request can tell."""
        path = ipc_path(self.endpoint)
        if path is None:
            return None
        from .paths import someone_listens

        return path.exists() and someone_listens(path)

    def close(self) -> None:
        self._discard()

    def __enter__(self) -> "ControlClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ControlClient({self.endpoint!r}, {self.timeouts})"
