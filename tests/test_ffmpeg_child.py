"""The supervised ffmpeg child (producer/ffmpeg_child.py), run here with the CPU graph: the
GPU route differs only in the plan (-hwaccel cuda, scale_cuda), not in the supervision."""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from producer import ffmpeg_child
from producer.ffmpeg_child import FfmpegChild, is_running, proc_state
from producer.ffmpeg_graph import cpu_plan
from producer.modalities import video
from producer.synth import _frames, write_video
from protocol.filters import FilterSpec

sys.path.insert(0, str(Path(__file__).parent))
from _polling import wait_for  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="no ffmpeg command line")
REPO = Path(__file__).resolve().parents[1]
DEADLINE_S = 60.0


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("child") / "c.mp4"
    write_video(path, _frames(2, np.random.default_rng(5), (160, 120), 20))
    return path


def _plan(text="resize=32x24,gray"):
    return cpu_plan(FilterSpec.parse(text), 160, 120)


def test_child_frames_are_mmfeeds_cpu_frames(clip):
    spec = FilterSpec.parse("resize=32x24")
    with FfmpegChild(str(clip), cpu_plan(spec, 160, 120)) as child:
        got = np.stack(list(child.frames()))
    ours = video.decode_clip(clip, spec, 20)
    assert got.shape == ours.shape == (20, 3, 24, 32)
    assert np.abs(got.astype(int) - ours).max() <= 1
    assert child.deaths == 0 and child.proc is None  # finished and reaped


def test_a_killed_child_is_restarted_and_frames_keep_flowing(clip, monkeypatch):
    monkeypatch.setattr(ffmpeg_child, "BACKOFF_START_S", 0.01)
    child = FfmpegChild(str(clip), _plan(), realtime=True, loop=True)
    try:
        frames = child.frames()
        next(frames)
        first = child.pid
        os.kill(first, signal.SIGKILL)
        while child.pid in (first, None):  # the killed child's pipe ends, a new one starts
            next(frames)
        for _ in range(3):
            assert next(frames).shape == (1, 24, 32)
        assert child.restarts == 1 and child.deaths == 1 and "exit -9" in child.last_exit
        assert proc_state(first) is None  # reaped, not a zombie
    finally:
        child.close()


def test_a_filter_change_is_a_new_child_with_the_new_graph(clip):
    child = FfmpegChild(str(clip), _plan(), realtime=True, loop=True)
    try:
        frames = child.frames()
        assert next(frames).shape == (1, 24, 32)
        old = child.pid
        new = child.restart(_plan("resize=16x8"))
        assert new != old and proc_state(old) is None
        assert next(frames).shape == (3, 8, 16)
        assert child.deaths == 0
    finally:
        child.close()
    assert not is_running(new)


def _kill_parent_and_see_child_go(source: str, *, wait_frame: bool):
    parent = subprocess.Popen([sys.executable, str(REPO / "tests" / "_ffmpeg_child_parent.py"),
                               source], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        line = parent.stdout.readline()
        assert line.startswith("pid "), line
        pid = int(line.split()[1])
        if wait_frame:
            assert parent.stdout.readline().startswith("frame ")
        assert is_running(pid)
        parent.kill()
        parent.wait()
        wait_for(lambda: not is_running(pid), DEADLINE_S, f"ffmpeg child {pid} to die with its parent",
                 interval=0.02)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        parent.stdout.close()


def test_killing_the_parent_with_sigkill_takes_the_child_with_it(clip):
    _kill_parent_and_see_child_go(str(clip), wait_frame=True)


def test_a_child_blocked_on_a_silent_source_dies_with_its_parent_too(tmp_path):
    """A child that writes nothing never sees the closed pipe (EPIPE); only the death signal
    (setpriv --pdeathsig / prctl) ends it: without it this child outlives its parent."""
    fifo = tmp_path / "silent.ts"
    os.mkfifo(fifo)
    keep = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # a writer that never writes
    try:
        _kill_parent_and_see_child_go(str(fifo), wait_frame=False)
    finally:
        os.close(keep)


def test_a_broken_source_is_retried_with_back_off_and_its_stderr_logged(tmp_path, monkeypatch,
                                                                         caplog):
    monkeypatch.setattr(ffmpeg_child, "BACKOFF_START_S", 0.01)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all" * 100)
    child = FfmpegChild(str(bad), _plan(), live=True)
    caplog.set_level(logging.WARNING, logger="producer.ffmpeg_child")
    frames = child.frames()

    def stop_after_three_deaths():
        wait_for(lambda: child.deaths >= 3, DEADLINE_S, "three restarts", interval=0.02)
        child.stop_event.set()

    import threading
    t = threading.Thread(target=stop_after_three_deaths)
    t.start()
    assert list(frames) == []
    t.join()
    child.close()
    assert child.restarts >= 2
    assert any("ffmpeg[" in r.getMessage() and "bad.mp4" in r.getMessage()
               for r in caplog.records)
    assert any("restarting in" in r.getMessage() for r in caplog.records)
