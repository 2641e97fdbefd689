"""The processes bench.faults runs, and the rules it judges them by.

A `Proc` is one supervised process (a daemon, the ffmpeg sender, the ring reader): started
again whenever it is down and wanted up, each start an "incarnation" with its own stderr file,
and every signal the bench sends it remembered, so its exit can be judged:

* a crash is an exit with a non-zero status, an exit by a signal the bench did not send, or
  (for a daemon, which has no reason to) an exit with status 0 that nothing asked for;
* an exit by a signal the bench sent (SIGKILL; SIGTERM before the handler is installed) or
  with status 0 after a SIGTERM is what was asked for.

`Failure` is one line of the report: what broke, where, the stderr tail of the process and the
bench's last actions before it - enough to reproduce it without the run's folder.
"""
from __future__ import annotations

import collections
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

STDERR_TAIL = 2000   # characters of a process's stderr quoted in a failure


@dataclass
class Failure:
    t: float          # seconds since the bench started
    process: str
    kind: str         # crash | hang | leak | cli | protocol
    detail: str
    evidence: str = ""
    before: list[str] = field(default_factory=list)  # the bench's last actions

    def as_dict(self) -> dict:
        return {"t_s": round(self.t, 1), "process": self.process, "kind": self.kind,
                "detail": self.detail, "evidence": self.evidence, "before": self.before}

    def line(self) -> str:
        return f"t={self.t:7.1f}s {self.kind:8s} {self.process}: {self.detail}"


class ActionLog:
    """The bench's recent actions (thread-safe), quoted in every failure."""

    def __init__(self, t0: float, keep: int = 12):
        self.t0 = t0
        self._items: collections.deque[str] = collections.deque(maxlen=keep)
        self._lock = threading.Lock()

    def add(self, text: str) -> None:
        with self._lock:
            self._items.append(f"t={time.monotonic() - self.t0:.1f}s {text}")

    def recent(self, n: int = 6) -> list[str]:
        with self._lock:
            return list(self._items)[-n:]


def judge_exit(rc: int, sent: set[int], daemon: bool) -> str | None:
    """None for an exit the bench caused; otherwise why the exit is a crash."""
    if rc < 0:
        sig = -rc
        if sig in sent:
            return None
        return f"killed by {signal.Signals(sig).name}, a signal the bench did not send"
    if rc > 0:
        return f"exited with status {rc}"
    if daemon and not sent:
        return "exited with status 0 although nothing asked it to stop"
    return None


class Proc:
    """One supervised process. `argv()` is called at every start (the trainer picks its ring
    then). Thread-safe where the watchdog needs it: `snapshot()` and `alive()`."""

    def __init__(self, name: str, argv: Callable[[], list[str]], env: dict, logdir: Path, *,
                 daemon: bool, stdout: bool = False):
        self.name, self._argv, self.env, self.logdir = name, argv, env, logdir
        self.daemon = daemon
        self.capture_stdout = stdout
        self.popen: subprocess.Popen | None = None
        self.incarnation = 0
        self.started_at = 0.0
        self.sent: set[int] = set()
        self.stopping_since: float | None = None   # SIGTERM sent, exit awaited
        self.restart_at: float | None = None       # down and due back then
        self.want_up = True
        self.lock = threading.Lock()
        self.last_argv: list[str] = []

    # --- life cycle (main thread) ------------------------------------------------------------

    def start(self) -> None:
        with self.lock:
            self.incarnation += 1
            self.sent = set()
            self.stopping_since = self.restart_at = None
            self.last_argv = self._argv()
            err = open(self.stderr_path, "wb")
            out = open(self.stdout_path, "wb") if self.capture_stdout else subprocess.DEVNULL
            try:
                self.popen = subprocess.Popen(self.last_argv, env=self.env, stdin=subprocess.DEVNULL,
                                              stdout=out, stderr=err, start_new_session=True)
            finally:
                err.close()
                if out is not subprocess.DEVNULL:
                    out.close()
            self.started_at = time.monotonic()

    @property
    def stderr_path(self) -> Path:
        return self.logdir / f"{self.name}.{self.incarnation}.stderr"

    @property
    def stdout_path(self) -> Path:
        return self.logdir / f"{self.name}.{self.incarnation}.stdout"

    def send(self, sig: int) -> bool:
        """Signal the running incarnation (remembered, so its exit is judged as caused)."""
        with self.lock:
            p = self.popen
            if p is None or p.poll() is not None:
                return False
            self.sent.add(sig)
            if sig == signal.SIGTERM:
                self.stopping_since = time.monotonic()
            try:
                p.send_signal(sig)
            except ProcessLookupError:
                return False
            return True

    def reap(self) -> tuple[int, set[int]] | None:
        """(returncode, signals sent) once the incarnation has exited, exactly once."""
        with self.lock:
            p = self.popen
            if p is None or p.poll() is None:
                return None
            self.popen = None
            self.stopping_since = None
            return p.returncode, set(self.sent)

    # --- what the watchdog reads -------------------------------------------------------------

    def snapshot(self) -> tuple[int, int | None, float, bool]:
        """(incarnation, pid or None when down, started_at, stopping)."""
        with self.lock:
            p = self.popen
            up = p is not None and p.poll() is None
            return (self.incarnation, p.pid if up else None, self.started_at,
                    self.stopping_since is not None)

    def stderr_tail(self, incarnation: int | None = None, chars: int = STDERR_TAIL) -> str:
        path = self.logdir / f"{self.name}.{incarnation or self.incarnation}.stderr"
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - chars))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float) -> tuple[int | None, set[int]]:
        """The end of the run: SIGTERM, wait, SIGKILL past `timeout` (a hang, then)."""
        self.want_up = False
        with self.lock:
            p = self.popen
        if p is None:
            return None, set()
        if p.poll() is None:
            self.send(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.send(signal.SIGKILL)
                p.wait()
        rc = self.reap()
        return rc if rc else (None, set())


def proc_state(pid: int) -> str:
    """What the kernel says a process is doing: state and wait channel (evidence of a hang)."""
    out = []
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("State:", "Threads:")):
                    out.append(" ".join(line.split()))
        with open(f"/proc/{pid}/wchan") as f:
            out.append(f"wchan: {f.read().strip() or '-'}")
    except OSError:
        pass
    return "; ".join(out)


def rss_anon_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def growth_per_hour(points: list[tuple[int, float, float]], warmup_s: float
                    ) -> tuple[float | None, int]:
    """RSS growth in MiB/h over samples (incarnation, seconds since that incarnation started,
    MiB), leaving out each incarnation's first `warmup_s`: a least-squares slope with one
    intercept per incarnation (a restarted daemon starts low again; only the growth within an
    incarnation says anything about a leak). (None, n) when fewer than two points per
    incarnation span any time."""
    groups: dict[int, list[tuple[float, float]]] = collections.defaultdict(list)
    for inc, t, mib in points:
        if t >= warmup_s:
            groups[inc].append((t, mib))
    sxy = sxx = 0.0
    n = 0
    for pts in groups.values():
        if len(pts) < 2:
            continue
        mt = sum(t for t, _ in pts) / len(pts)
        mm = sum(m for _, m in pts) / len(pts)
        sxy += sum((t - mt) * (m - mm) for t, m in pts)
        sxx += sum((t - mt) ** 2 for t, _ in pts)
        n += len(pts)
    if sxx <= 0:
        return None, n
    return sxy / sxx * 3600.0, n


def raw_tracebacks(path: Path, limit: int = 3) -> list[str]:
    """Tracebacks printed to stderr as they are (a crash, a thread that died), not those the
    daemons' log lines carry inline (`exc="Traceback..."`, a handled error): the last lines
    of each, at most `limit`."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    starts = ("Traceback (most recent call last):", "Exception in thread")
    found, i = [], 0
    while i < len(lines) and len(found) < limit:
        if not lines[i].startswith(starts):
            i += 1
            continue
        end = i + 1  # the frames (indented), chained tracebacks, up to the exception line
        while end < len(lines) and (lines[end].startswith((" ", "\t") + starts)
                                    or lines[end].startswith("During handling")
                                    or lines[end].startswith("The above exception")
                                    or not lines[end].strip()):
            end += 1
        found.append("\n".join(lines[max(i, end - 12):end + 1]))
        i = end + 1
    return found


def error_lines(path: Path) -> int:
    """How many ERROR records a daemon logged (its log format: 'TIME ERROR ...')."""
    try:
        with open(path, errors="replace") as f:
            return sum(1 for line in f if " ERROR " in line[:40])
    except OSError:
        return 0


def shm_entries(prefix: str) -> list[str]:
    """/dev/shm entries of this run: its rings (any layout) and their semaphores."""
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return []
    return sorted(n for n in names if n.startswith(prefix) or n.startswith(f"sem.{prefix}"))
