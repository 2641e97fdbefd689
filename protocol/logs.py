"""Daemon logging: one structured line per record on stderr, the same record as JSON on a
ZeroMQ PUB socket, and the last records kept in memory for `mmctl logs`.

    2026-11-25T10:00:00.123Z INFO producer new generation generation=4 filter=gray

Why three outputs: stderr is what the journal keeps under systemd (and what a person sees in
a terminal); the PUB socket lets `mmctl logs -f producer` follow a daemon from anywhere it can
reach the socket, without journal access; the ring buffer answers `mmctl logs` (no -f) even
for records published before anyone subscribed (PUB drops what nobody receives).

Under systemd (`JOURNAL_STREAM` names our stderr) each line starts with `<N>`, the syslog
priority that journald's SyslogLevelPrefix= strips and stores, so `journalctl -p warning`
works. The PUB handler never blocks the daemon: a bounded send queue (SNDHWM) and
non-blocking sends, dropping and counting records when full. Logging is for changes and
intervals, never a per-sample path.

Extra fields: `log.info("new generation", extra={"generation": 4})` becomes `generation=4`.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import sys
from datetime import datetime, timezone
from typing import IO, Any, Iterator

import zmq

from .paths import (
    bound_inode,
    check_connect_endpoint,
    ipc_path,
    prepare_ipc_bind,
    remove_ipc_socket,
    secure_ipc_socket,
)

# LogRecord attributes that are not user fields (plus the ones Formatter adds).
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
# journald / syslog priorities (sd-daemon.h SD_DEBUG..SD_CRIT).
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}
PUB_HWM = 1000
_MARK = "_mmfeed_handler"


def _iso(t: float) -> str:
    d = datetime.fromtimestamp(t, tz=timezone.utc)
    return d.strftime("%Y-%m-%dT%H:%M:%S.") + f"{d.microsecond // 1000:03d}Z"


def _value(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    if s == "" or any(c in s for c in ' "=\n\t\\'):
        return json.dumps(s)  # quoted and escaped: the line stays one line
    return s


def to_record(record: logging.LogRecord, daemon: str) -> dict:
    """The JSON-able form of a log record (what the PUB socket and `mmctl logs` carry)."""
    fields = {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}
    out = {
        "ts": _iso(record.created),
        "t": record.created,
        "level": record.levelname,
        "daemon": daemon,
        "logger": record.name,
        "msg": record.getMessage(),
        "fields": json.loads(json.dumps(fields, default=str)),
    }
    if record.exc_info:
        out["exc"] = logging.Formatter().formatException(record.exc_info)
    return out


def format_record(rec: dict) -> str:
    """One human line for a record dict (the stderr format; `mmctl logs` prints these)."""
    parts = [rec.get("ts", "?"), rec.get("level", "?"), rec.get("daemon", "?"), rec.get("msg", "")]
    parts += [f"{k}={_value(v)}" for k, v in (rec.get("fields") or {}).items()]
    if rec.get("exc"):
        parts.append(f"exc={_value(rec['exc'])}")
    return " ".join(str(p) for p in parts)


def _journal_stream_is(stream: IO) -> bool:
    """True when stderr is the journal's stream (systemd sets JOURNAL_STREAM=dev:inode of it;
    a child whose stderr was redirected inherits the variable but not the stream)."""
    want = os.environ.get("JOURNAL_STREAM")
    if not want:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return want == f"{st.st_dev}:{st.st_ino}"


class LineFormatter(logging.Formatter):
    def __init__(self, daemon: str, journal: bool):
        super().__init__()
        self.daemon = daemon
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        line = format_record(to_record(record, self.daemon))
        if self.journal:
            return f"<{_PRIORITY.get(record.levelno, 6 if record.levelno < 30 else 3)}>{line}"
        return line


class PubHandler(logging.Handler):
    """Publishes each record as JSON on a PUB socket and keeps the last `keep` in memory.

    `endpoint=None` keeps only the memory ring (no socket). Sends never block: a full queue
    (slow or absent subscribers beyond SNDHWM) drops the record and counts it in `dropped`.
    """

    def __init__(self, daemon: str, endpoint: str | None, keep: int = 1000, group: str | None = None,
                 curve=None):
        super().__init__()
        self.daemon = daemon
        self.endpoint = endpoint
        self.dropped = 0
        self._recent: collections.deque[dict] = collections.deque(maxlen=keep)
        self._ctx = self._sock = self._auth = None
        self._path = self._inode = None
        if endpoint is None:
            return
        if endpoint.startswith("tcp://") and curve is None:
            from .errors import ControlError

            raise ControlError(f"log PUB {endpoint}: TCP is only allowed with CURVE keys "
                               f"(`mmctl keygen DIR`), or use the default ipc:// socket")
        self._ctx = zmq.Context()
        try:
            self._sock = self._ctx.socket(zmq.PUB)
            self._sock.setsockopt(zmq.SNDHWM, PUB_HWM)
            self._sock.setsockopt(zmq.LINGER, 0)
            if curve is not None:
                from .control import curve_server_socket

                self._auth = curve_server_socket(self._ctx, self._sock, curve)
            self._path = prepare_ipc_bind(endpoint, group)
            self._sock.bind(endpoint)
            self._inode = bound_inode(self._path)  # from here on, a failure removes our file
            self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
            secure_ipc_socket(self._path, group)
        except BaseException:
            self.close()
            raise

    def emit(self, record: logging.LogRecord) -> None:
        try:
            rec = to_record(record, self.daemon)
            self._recent.append(rec)
            if self._sock is not None:
                # Called under the handler's lock (Handler.handle), so the socket is used
                # by one thread at a time.
                self._sock.send(json.dumps(rec).encode(), zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1
        except Exception:
            self.handleError(record)

    def recent(self, n: int = 100) -> list[dict]:
        """The last `n` records, oldest first."""
        with self.lock:
            items = list(self._recent)
        return items[-n:] if n > 0 else []

    def close(self) -> None:
        with self.lock:
            if self._sock is not None:
                self._sock.close(linger=0)
                self._sock = None
            if self._auth is not None:
                self._auth.stop()
                self._auth = None
            if self._ctx is not None:
                self._ctx.term()
                self._ctx = None
            remove_ipc_socket(self._path, self._inode)
            self._path = None
        super().close()


_installed: PubHandler | None = None


def setup_daemon_logging(daemon: str, pub_endpoint: str | None, level: str | int = "INFO", *,
                         stream: IO | None = None, keep: int = 1000, group: str | None = None,
                         curve=None) -> logging.Logger:
    """Send this process's logging to stderr lines, the PUB socket and the memory ring.

    Installs on the root logger (a daemon owns its process, and records from every module -
    `producer.pipeline`, `protocol.control` - belong in its log). Calling it again replaces
    what an earlier call installed. Returns `logging.getLogger(daemon)`.
    """
    global _installed
    close_daemon_logging()
    root = logging.getLogger()
    stream = stream if stream is not None else sys.stderr
    line = logging.StreamHandler(stream)
    line.setFormatter(LineFormatter(daemon, _journal_stream_is(stream)))
    pub = PubHandler(daemon, pub_endpoint, keep=keep, group=group, curve=curve)
    for h in (line, pub):
        setattr(h, _MARK, True)
        root.addHandler(h)
    root.setLevel(level if isinstance(level, int) else level.upper())
    _installed = pub
    return logging.getLogger(daemon)


def close_daemon_logging() -> None:
    """Remove and close what `setup_daemon_logging` installed (PUB socket file included)."""
    global _installed
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, _MARK, False):
            root.removeHandler(h)
            h.close()
    _installed = None


def recent(n: int = 100) -> list[dict]:
    """The last `n` records of this process's daemon log (for a `logs` control command)."""
    return _installed.recent(n) if _installed is not None else []


def pub_endpoint() -> str | None:
    """The endpoint this process's log PUB socket is bound to (a `tcp://HOST:0` request
    resolved to its port), or None without one: what a daemon's ready line reports."""
    return _installed.endpoint if _installed is not None else None


def logs_command():
    """A ready `logs` control command: `{"logs": logs_command()}` in a daemon's command table
    answers `mmctl logs [-n N] DAEMON` with `{"ok": true, "records": [...]}`."""
    from .control import WIRE_ARGS, Command

    return Command(lambda n: {"records": recent(n)}, args=WIRE_ARGS["logs"])


def follow(endpoint: str, *, timeout: float | None = None, curve=None) -> Iterator[dict]:
    """Yield the records a daemon publishes at `endpoint`, as they come.

    Ends after `timeout` seconds without a record (None: never). PUB/SUB has no history:
    records published before the subscription reached the daemon are not seen (the "slow
    joiner"); `recent()` through the control socket covers those. Frames that are not JSON
    objects are skipped.
    """
    check_connect_endpoint(endpoint)  # no abstract socket, no directory a stranger controls
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        if curve is not None:
            from .control import curve_client_socket

            curve_client_socket(sock, curve)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(endpoint)
        wait_ms = None if timeout is None else int(timeout * 1000)
        while sock.poll(wait_ms, zmq.POLLIN):
            raw = sock.recv()
            try:
                rec = json.loads(raw)
            except ValueError:
                continue
            if isinstance(rec, dict):
                yield rec
    finally:
        sock.close(linger=0)


def log_socket_exists(endpoint: str) -> bool | None:
    """Whether an ipc log endpoint's socket file exists (None for other transports)."""
    path = ipc_path(endpoint)
    return None if path is None else path.exists()


__all__ = ["setup_daemon_logging", "close_daemon_logging", "recent", "pub_endpoint",
           "logs_command", "follow",
           "format_record", "to_record", "PubHandler", "LineFormatter"]
