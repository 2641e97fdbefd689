"""A supervised `ffmpeg` child that runs one GraphPlan and hands its raw frames to the producer.

The GPU route of the filter spec (producer/ffmpeg_graph.py): `ffmpeg -hwaccel cuda
-hwaccel_output_format cuda -i SRC -vf <scale_cuda graph> -f rawvideo -pix_fmt F pipe:1`, with
frames read from the pipe, one `frame_bytes` read per frame, into a new (C, H, W) array. The
same class runs the CPU plan (no -hwaccel), which is how the supervision is tested on a
machine without a GPU.

Supervision - no zombie and no orphan, ever:
- killed with its parent: the child is started through `setpriv --pdeathsig KILL` (util-linux;
  no Python runs between fork and exec, so spawning beside running codec threads cannot hang
  the way a Python `preexec_fn` can), else with a `preexec_fn` that calls
  prctl(PR_SET_PDEATHSIG). NOTE [death signal and threads]: Linux sends the signal when the
  *thread* that forked the child exits, so a child is always started on the thread that
  reads it (the reader thread of a live source), which lives exactly as long as the child is
  wanted. Second line: a child whose reader is gone gets EPIPE on its next write and exits.
- restarted with back-off on death (BACKOFF_START_S doubling to BACKOFF_MAX_S, reset by a
  frame): a crash, a kill or a stream that drops costs a gap, never the daemon. A recording
  that ends (exit 0 on a file) ends the frames instead, unless `loop`.
- its stderr in the daemon's log: a thread per child forwards lines, at most LOG_LINES per
  LOG_WINDOW_S (then one line saying how many were suppressed).
- every child is waited for: `close()` and `restart()` kill (SIGTERM, then SIGKILL after
  STOP_TIMEOUT_S) and reap the old child before anything else happens.
- a filter change is `restart(new_plan)`: a new child (a new pid) with the new graph; the
  caller tags what follows with the new generation.
"""
from __future__ import annotations

import collections
import ctypes
import logging
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator

import numpy as np

from .ffmpeg_graph import GraphPlan

log = logging.getLogger("producer.ffmpeg_child")

BACKOFF_START_S = 0.25
BACKOFF_MAX_S = 10.0
STOP_TIMEOUT_S = 3.0
LOG_LINES = 20          # stderr lines forwarded per window at most
LOG_WINDOW_S = 10.0
_PR_SET_PDEATHSIG = 1


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the forked child
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class ChildGone(Exception):
    """The frames ended: the recording finished, or the supervisor was closed."""


class _StderrForwarder(threading.Thread):
    """Forwards one child's stderr lines to the log, rate limited, and keeps the last few
    (for the line that says why a child died)."""

    def __init__(self, proc: subprocess.Popen, pid: int):
        super().__init__(name=f"ffmpeg-stderr-{pid}", daemon=True)
        self.proc, self.pid = proc, pid
        self.tail: collections.deque[str] = collections.deque(maxlen=5)

    def run(self) -> None:
        window_start, sent, suppressed = time.monotonic(), 0, 0
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            if not line:
                continue
            self.tail.append(line)
            now = time.monotonic()
            if now - window_start >= LOG_WINDOW_S:
                if suppressed:
                    log.warning("ffmpeg[%d]: %d more stderr lines suppressed", self.pid,
                                suppressed)
                window_start, sent, suppressed = now, 0, 0
            if sent < LOG_LINES:
                sent += 1
                log.warning("ffmpeg[%d]: %s", self.pid, line[:500])
            else:
                suppressed += 1


class FfmpegChild:
    """One ffmpeg process at a time for `source`, restarted when it dies (module doc).

    Not thread-safe: one thread starts, reads, restarts and closes it (NOTE [death signal and
    threads]); `stop_event` lets another thread end a back-off wait early.
    """

    def __init__(self, source: str, plan: GraphPlan, *, ffmpeg: str = "ffmpeg",
                 realtime: bool = False, loop: bool = False, live: bool = False,
                 start_s: float = 0.0):
        self.source = str(source)
        self.start_s = float(start_s)   # a recording's start (-ss before -i: a seek)
        self.plan = plan
        self.ffmpeg = ffmpeg
        self.realtime = realtime
        self.loop = loop
        self.live = live          # a stream: its end is a failure to retry, never "finished"
        self.proc: subprocess.Popen | None = None
        self.restarts = 0         # children started after the first
        self.deaths = 0           # children that died while frames were wanted
        self.last_exit: str | None = None
        self.stop_event = threading.Event()
        self._forwarder: _StderrForwarder | None = None
        self._backoff = BACKOFF_START_S
        self._started = 0

    # --- life cycle ------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def args(self) -> list[str]:
        args = self.plan.ffmpeg_args(self.source, ffmpeg=self.ffmpeg, realtime=self.realtime)
        i = args.index("-i")
        if self.loop:
            args[i:i] = ["-stream_loop", "-1"]
        if self.start_s > 0:
            args[i:i] = ["-ss", f"{self.start_s:.6f}"]
        return args

    def start(self) -> int:
        """Start a child for the current plan; returns its pid."""
        if self.proc is not None:
            raise RuntimeError("ffmpeg child already running; restart() replaces it")
        args = self.args()
        setpriv = shutil.which("setpriv")
        kwargs: dict = {}
        if setpriv:
            args = [setpriv, "--pdeathsig", "KILL", *args]
        else:
            kwargs["preexec_fn"] = _set_pdeathsig
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, close_fds=True, bufsize=0,
                                     **kwargs)
        if self._started:
            self.restarts += 1
        self._started += 1
        self._forwarder = _StderrForwarder(self.proc, self.proc.pid)
        self._forwarder.start()
        log.info("ffmpeg child started", extra={"pid": self.proc.pid, "backend":
                                                self.plan.backend, "vf": self.plan.vf})
        return self.proc.pid

    def _reap(self) -> int | None:
        """Kill (if still running) and wait for the current child; returns its exit code."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdout.close()
        if self._forwarder is not None:
            self._forwarder.join(STOP_TIMEOUT_S)
        proc.stderr.close()
        return proc.returncode

    def restart(self, plan: GraphPlan | None = None) -> int:
        """A new child (a new pid), with `plan` when given: what a filter change does."""
        self._reap()
        if plan is not None:
            self.plan = plan
        self._backoff = BACKOFF_START_S
        return self.start()

    def close(self) -> None:
        self.stop_event.set()
        self._reap()

    # --- frames ----------------------------------------------------------------------------

    def _read_frame(self) -> np.ndarray | None:
        """One frame of the current child, or None when its pipe ended."""
        n = self.plan.frame_bytes
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        out = self.proc.stdout
        while got < n:
            k = out.readinto(view[got:])
            if not k:
                return None
            got += k
        p = self.plan
        frame = np.frombuffer(buf, np.uint8).reshape(p.channels, p.height, p.width)
        return frame[[2, 0, 1]] if p.pix_fmt == "gbrp" else frame  # G,B,R planes -> R,G,B

    def frames(self) -> Iterator[np.ndarray]:
        """(C, H, W) uint8 frames, across child deaths and restarts, until the recording ends
        or `close()`/`stop_event`. Each frame is a new array (the consumer keeps it)."""
        while not self.stop_event.is_set():
            if self.proc is None:
                self.start()
            frame = self._read_frame()
            if frame is not None:
                self._backoff = BACKOFF_START_S
                yield frame
                continue
            tail = list(self._forwarder.tail) if self._forwarder is not None else []
            code = self._reap()
            if self.stop_event.is_set():
                break
            self.last_exit = f"exit {code}" + (f": {tail[-1]}" if tail else "")
            if code == 0 and not self.live and not self.loop:
                log.info("ffmpeg child finished the recording", extra={"source": self.source})
                return
            self.deaths += 1
            log.warning(f"ffmpeg child died ({self.last_exit}); restarting in "
                        f"{self._backoff:g} s", extra={"source": self.source})
            if self.stop_event.wait(self._backoff):
                break
            self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)

    def __enter__(self) -> "FfmpegChild":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def proc_state(pid: int) -> str | None:
    """The state letter of /proc/PID (R, S, Z, ...), or None when no such process exists."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def is_running(pid: int) -> bool:
    """True while PID is a live process (a zombie is dead, waiting to be reaped)."""
    return proc_state(pid) not in (None, "Z", "X")


__all__ = ["BACKOFF_MAX_S", "BACKOFF_START_S", "FfmpegChild", "is_running", "proc_state"]


# --- clips from a child ------------------------------------------------------------------------


def child_clips(source: str, settings, src_size: tuple[int, int], rate: float | None, *,
                backend: str = "cuda", codec: str = "h264", live: bool = False,
                loop: bool = False, ffmpeg: str = "ffmpeg", realtime: bool = False,
                start_s: float = 0.0):
    """(video (T, C, H, W), start_s, end_s, ClipSettings) clips of `source` from a supervised
    ffmpeg child: the media-source path of the `ffmpeg-cuda` route (video_route.py).

    `settings()` (media_clips.ClipSettings) is re-read at each clip boundary; a new spec is a new
    child with the new plan (`restart`). The child's frames are already selected by the plan's
    `fps=` stage, so frame i of a child is at start + i / rate, rate = spec.fps or the
    source's `rate` (25 when it does not say). Frames do not carry the source's timestamps
    through the pipe: a gap in a live stream shifts later clips' times (the wall clock
    anchoring in sources.py absorbs it).
    """
    from .ffmpeg_graph import plan as make_plan

    cur = settings()

    def plan_for(s):
        return make_plan(s.spec, *src_size, backend, codec=codec,
                         chain=getattr(s, "chain", None))

    child = FfmpegChild(source, plan_for(cur), ffmpeg=ffmpeg, live=live, loop=loop,
                        realtime=realtime, start_s=start_s)
    t = start_s
    try:
        frames = child.frames()
        while True:
            new = settings()
            if (new.spec, new.chain) != (cur.spec, cur.chain):
                child.restart(plan_for(new))   # a filter change: a new child
            cur = new
            period = 1.0 / (cur.spec.fps or rate or 25.0)
            p = child.plan
            buf = np.empty((cur.frames, p.channels, p.height, p.width), np.uint8)
            t0 = t
            for k in range(cur.frames):
                frame = next(frames, None)
                if frame is None:
                    return   # the recording ended: a partial clip is not a sample
                buf[k] = frame
                t += period
            yield buf, t0, t, cur
    finally:
        child.close()
