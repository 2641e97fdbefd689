"""Training progress for people: step/total, epoch, samples/s, ETA, loss, val accuracy.

On a terminal it is a bar redrawn in place (about twice a second); anywhere else (systemd's
journal, a log file, a pipe) it is one plain log line at a steady interval, so the journal
holds a readable history and never a carriage-return smear. Log records written while the
bar is shown clear it first and redraw it after (`_BarStream`), so the two never overlap.

It reads the trainer's `status()` dict (the same one `mmctl status` shows), only when a line
or a redraw is due: nothing here runs per step beyond one clock read.
"""
from __future__ import annotations

import collections
import logging
import math
import os
import sys
import time
from typing import IO, Callable

log = logging.getLogger("trainer.progress")

BAR_REFRESH_S = 0.5
BAR_WIDTH = 24
RATE_WINDOW_S = 30.0


def duration(seconds: float | None) -> str:
    """'1h02m', '3m05s', '42s'; '-' when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "-"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def attached_to_terminal(stream: IO) -> bool:
    """A person watches `stream`: a TTY, and not the journal (systemd sets JOURNAL_STREAM)."""
    try:
        return stream.isatty() and not os.environ.get("JOURNAL_STREAM")
    except (AttributeError, ValueError):
        return False


class Progress:
    """`maybe()` once per loop turn; `close()` at the end (leaves the last bar as a line)."""

    def __init__(self, status: Callable[[], dict], *, interval: float = 10.0,
                 stream: IO | None = None, tty: bool | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.status = status
        self.interval = interval
        self.stream = stream if stream is not None else sys.stderr
        self.tty = attached_to_terminal(self.stream) if tty is None else tty
        self.clock = clock
        self._steps: collections.deque[tuple[float, int, int]] = collections.deque()
        self._next = clock() + (BAR_REFRESH_S if self.tty else interval)
        self._bar = ""
        self._wrapped: list[logging.Handler] = []
        if self.tty:
            self._wrap_log_handlers()

    # --- what is said ------------------------------------------------------------------------

    def figures(self, st: dict, now: float) -> dict:
        """step, total_steps, epoch, samples_per_s, eta_s, loss, accuracy (None: unknown)."""
        step, total = st.get("step") or 0, st.get("total_steps")
        q = self._steps
        q.append((now, step, st.get("samples") or 0))
        while len(q) > 2 and now - q[0][0] > RATE_WINDOW_S:
            q.popleft()
        eta, rate = None, st.get("samples_per_s")
        span = q[-1][0] - q[0][0]
        if len(q) >= 2 and span > 0:
            if q[-1][2] > q[0][2]:
                rate = (q[-1][2] - q[0][2]) / span  # over the last RATE_WINDOW_S, not since start
            if total is not None and q[-1][1] > q[0][1]:
                eta = max(0, total - step) / ((q[-1][1] - q[0][1]) / span)
        return {"step": step, "total_steps": total, "epoch": st.get("epoch"),
                "samples_per_s": rate, "eta_s": eta,
                "loss": st.get("loss"), "accuracy": st.get("accuracy")}

    @staticmethod
    def line(f: dict) -> str:
        """'step 120/1000 (12%), epoch 2, 85.3 samples/s, ETA 1m45s, loss 0.5312, val acc
        0.812' - unknown figures are left out, never printed as None."""
        total = f.get("total_steps")
        parts = [f"step {f['step']}/{total} ({f['step'] / total:.0%})" if total
                 else f"step {f['step']}"]
        if f.get("epoch") is not None:
            parts.append(f"epoch {f['epoch']}")
        if f.get("samples_per_s") is not None:
            parts.append(f"{f['samples_per_s']:.1f} samples/s")
        if total:
            parts.append(f"ETA {duration(f.get('eta_s'))}")
        if f.get("loss") is not None:
            parts.append(f"loss {f['loss']:.4f}")
        if f.get("accuracy") is not None:
            parts.append(f"val acc {f['accuracy']:.3f}")
        return ", ".join(parts)

    def bar(self, f: dict) -> str:
        total = f.get("total_steps")
        frac = min(1.0, f["step"] / total) if total else 0.0
        filled = int(frac * BAR_WIDTH)
        body = "#" * filled + "-" * (BAR_WIDTH - filled) if total else "?" * BAR_WIDTH
        return f"[{body}] {self.line(f)}"

    # --- when ------------------------------------------------------------------------------

    def maybe(self) -> None:
        now = self.clock()
        if now < self._next:
            return
        self._next = now + (BAR_REFRESH_S if self.tty else self.interval)
        self.report(now)

    def report(self, now: float | None = None) -> None:
        f = self.figures(self.status(), self.clock() if now is None else now)
        if self.tty:
            self._bar = self.bar(f)
            self._draw()
        else:
            log.info(self.line(f), extra={k: round(v, 4) if isinstance(v, float) else v
                                          for k, v in f.items()})

    def close(self) -> None:
        if self.tty and self._bar:
            self._raw_write("\r\x1b[K" + self._bar + "\n")
            self._bar = ""
        for h in self._wrapped:
            stream = getattr(h, "stream", None)
            if isinstance(stream, _BarStream):
                h.setStream(stream.raw)
        self._wrapped = []

    # --- the bar on a terminal -------------------------------------------------------------

    def _raw_write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def _draw(self) -> None:
        self._raw_write("\r\x1b[K" + self._bar)

    def _wrap_log_handlers(self) -> None:
        """Log lines to our stream first clear the bar, then it is drawn again below them."""
        for h in logging.getLogger().handlers:
            if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is self.stream:
                h.setStream(_BarStream(self.stream, self))
                self._wrapped.append(h)


class _BarStream:
    """The terminal as a log handler sees it: every write lands above the progress bar."""

    def __init__(self, raw: IO, progress: Progress):
        self.raw = raw
        self.progress = progress

    def write(self, text: str) -> int:
        bar = self.progress._bar
        self.raw.write(("\r\x1b[K" if bar else "") + text + (bar if bar else ""))
        return len(text)

    def flush(self) -> None:
        self.raw.flush()

    def isatty(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.raw.fileno()
