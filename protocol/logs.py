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

Bounded on purpose (a control socket is an input anyone with access can flood): a record's
message, field values and traceback are clipped (`MAX_MSG_CHARS`, `MAX_FIELD_CHARS`,
`MAX_EXC_CHARS`), so 1,000 records in memory stay a few MiB whatever was logged; a `logs` reply
carries at most `LOGS_REPLY_MAX_BYTES` of records (newest first kept, `truncated` says so); and
`LogLimiter` lets a daemon log what clients get wrong without one line per bad request.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import sys
import threading
import time
from datetime import datetime, timezone
from typing import IO, Any, Iterator

import zmq

from .paths import check_connect_endpoint, ipc_path
from .sockets import bind_server, curve_client_socket

# LogRecord attributes that are not user fields (plus the ones Formatter adds).
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
# journald / syslog priorities (sd-daemon.h SD_DEBUG..SD_CRIT).
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}
PUB_HWM = 1000
_MARK = "_mmfeed_handler"
MAX_MSG_CHARS = 4096         # a record's message beyond this is clipped (the head is kept)
MAX_FIELD_CHARS = 1024       # each extra field's value, as text
MAX_EXC_CHARS = 16384        # a traceback keeps its head and its tail (where the error is)
LOGS_REPLY_MAX_BYTES = 512 * 1024  # records in one `logs` reply, as JSON


def clip(text: object, limit: int = 200) -> str:
    """`text` as a string of at most about `limit` characters: what a log line or an error
    message may quote of something a client sent.

        clip("x" * 70000, 20) -> 'xxxxxxxxxxxxxxxxxxxx... (70000 chars)'
    """
    s = text if isinstance(text, str) else str(text)
    if len(s) <= limit:
        return s
    return f"{s[:limit]}... ({len(s)} chars)"


def _clip_exc(text: str) -> str:
    if len(text) <= MAX_EXC_CHARS:
        return text
    half = MAX_EXC_CHARS // 2
    return f"{text[:half]}\n... ({len(text) - 2 * half} chars left out) ...\n{text[-half:]}"


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
    fields = {k: _field(v) for k, v in vars(record).items()
              if k not in _STANDARD and not k.startswith("_")}
    out = {
        "ts": _iso(record.created),
        "t": record.created,
        "level": record.levelname,
        "daemon": daemon,
        "logger": record.name,
        "msg": clip(record.getMessage(), MAX_MSG_CHARS),
        "fields": fields,
    }
    if record.exc_info:
        out["exc"] = _clip_exc(logging.Formatter().formatException(record.exc_info))
    return out


def _field(v: Any) -> Any:
    """A JSON-able field value of bounded size: scalars as they are, anything else as JSON
    (or its str) clipped to MAX_FIELD_CHARS, then parsed back when it was not clipped."""
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 64:
        return f"<an integer of {v.bit_length()} bits>"  # str() of a huge int raises
    if v is None or isinstance(v, (bool, int, float)):
        return v
    if isinstance(v, str):
        return clip(v, MAX_FIELD_CHARS)
    try:
        text = json.dumps(v, default=str)
    except (TypeError, ValueError, RecursionError):
        try:
            return clip(repr(v), MAX_FIELD_CHARS)
        except Exception:  # a huge int inside, a broken __repr__: say what it was
            return f"<{type(v).__name__}>"
    if len(text) > MAX_FIELD_CHARS:
        return clip(text, MAX_FIELD_CHARS)
    return json.loads(text)


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
        self._ctx = self._sock = self._binding = None
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
            self._binding = bind_server(self._ctx, self._sock, endpoint, curve=curve, group=group)
            self.endpoint = self._binding.endpoint
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
            if self._binding is not None:
                self._binding.release()
                self._binding = None
            if self._ctx is not None:
                self._ctx.term()
                self._ctx = None
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


def recent_bounded(n: int = 100, max_bytes: int = LOGS_REPLY_MAX_BYTES) -> dict:
    """The `logs` reply: the last `n` records that fit in `max_bytes` of JSON, oldest first.

    Newest records are kept and older ones left out when the bytes run out; the reply says
    so: `{"records": [...], "truncated": bool, "omitted": K, "max_bytes": B}`. One record
    larger than the whole budget is never sent (records are clipped when made, so it takes a
    tiny budget for that to happen)."""
    records = recent(n)
    kept: list[dict] = []
    used = 2
    for rec in reversed(records):
        size = len(json.dumps(rec, default=str)) + 2
        if used + size > max_bytes:
            break
        kept.append(rec)
        used += size
    kept.reverse()
    omitted = len(records) - len(kept)
    return {"records": kept, "truncated": omitted > 0, "omitted": omitted,
            "max_bytes": max_bytes}


class LogLimiter:
    """Log what clients get wrong without letting them write the log: per key (an error code,
    say), the first `burst` records of each `window_s` are logged as they come, the rest are
    counted, and once the window is over one line says how many were suppressed.

        limiter = LogLimiter(log, burst=10, window_s=60)
        limiter.log("bad_argument", logging.WARNING, "control request refused: %s", clip(msg))
        limiter.flush()   # from the daemon's loop: writes the due "suppressed K" lines

    WHY: each refused request used to be one WARNING with its whole payload; 1,100 refused
    63 KB requests wrote 139 MB of log in 2 s. At most `max_keys` keys are tracked (the
    oldest window is closed, and its summary written, to make room).
    """

    def __init__(self, logger: logging.Logger, *, burst: int = 10, window_s: float = 60.0,
                 max_keys: int = 64, clock=time.monotonic):
        self.logger, self.burst, self.window_s, self.max_keys = logger, burst, window_s, max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[Any, list] = {}   # key -> [window start, logged, suppressed, what]
        self._next_flush = float("inf")
        self.suppressed_total = 0

    def log(self, key: Any, level: int, msg: str, *args: Any, what: str | None = None,
            **kwargs: Any) -> bool:
        """Log now if `key` has budget left in its window (True), else count it (False).
        `what` names the kind of record in the summary line (default: `msg` unformatted)."""
        now = self._clock()
        due: list[tuple] = []
        with self._lock:
            w = self._windows.get(key)
            if w is not None and now - w[0] >= self.window_s:
                due.append((key, w))
                w = None
            if w is None:
                if len(self._windows) >= self.max_keys and key not in self._windows:
                    oldest = min(self._windows, key=lambda k: self._windows[k][0])
                    due.append((oldest, self._windows.pop(oldest)))
                w = self._windows[key] = [now, 0, 0, what or msg]
                self._next_flush = min(self._next_flush, now + self.window_s)
            if w[1] < self.burst:
                w[1] += 1
                emit = True
            else:
                w[2] += 1
                self.suppressed_total += 1
                emit = False
        self._summaries(due)
        if emit:
            self.logger.log(level, msg, *args, **kwargs)
        return emit

    def flush(self, now: float | None = None) -> None:
        """Close the windows that are over, writing their "suppressed K similar" lines. Cheap
        when nothing is due (one comparison), so a daemon may call it every loop turn."""
        now = self._clock() if now is None else now
        if now < self._next_flush:
            return
        with self._lock:
            due = [(k, w) for k, w in self._windows.items() if now - w[0] >= self.window_s]
            for k, _ in due:
                del self._windows[k]
            self._next_flush = min((w[0] + self.window_s for w in self._windows.values()),
                                   default=float("inf"))
        self._summaries(due)

    def _summaries(self, due: list[tuple]) -> None:
        for key, (start, logged, suppressed, what) in due:
            if suppressed:
                self.logger.warning("suppressed %d similar records in the last %.0f s: %s",
                                    suppressed, self.window_s, clip(what, 200),
                                    extra={"suppressed": suppressed, "key": clip(str(key), 100)})


def pub_endpoint() -> str | None:
    """The endpoint this process's log PUB socket is bound to (a `tcp://HOST:0` request
    resolved to its port), or None without one: what a daemon's ready line reports."""
    return _installed.endpoint if _installed is not None else None


def logs_command():
    """A ready `logs` control command: `{"logs": logs_command()}` in a daemon's command table
    answers `mmctl logs [-n N] DAEMON` with `{"ok": true, "records": [...], "truncated":
    bool, "omitted": K, "max_bytes": B}` (`recent_bounded`: at most LOGS_REPLY_MAX_BYTES)."""
    from .commands import WIRE_ARGS, Command

    return Command(_logs, args=WIRE_ARGS["logs"])


def _logs(n: int) -> dict:
    if n < 1:  # `logs n=-1` was answered ok with nothing, as if the log were empty
        from .errors import BadArgument

        raise BadArgument(f"logs: n must be 1 or more (how many recent records to return), "
                          f"got {n}")
    return recent_bounded(n)


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


__all__ = ["setup_daemon_logging", "close_daemon_logging", "recent", "recent_bounded",
           "pub_endpoint", "logs_command", "follow", "clip", "LogLimiter",
           "format_record", "to_record", "PubHandler", "LineFormatter"]
