"""`make demo`, in its shorter setting, end to end: both daemons, a filter switch, a summary.

This is the first thing a user runs, so it is in the suite: if it breaks, CI is red.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli.demo import REAL_DATA
from protocol.cache import CacheReader

REPO = Path(__file__).resolve().parent.parent


def _demo(workdir: Path) -> tuple[dict, str]:
    r = subprocess.run([sys.executable, "-m", "cli.demo", "--quick", "--workdir", str(workdir), "--json"],
                       cwd=REPO, capture_output=True, text=True, timeout=580)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stdout + "\n" + r.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_trains_through_a_filter_switch_leaves_nothing_behind_and_runs_again(tmp_path):
    summary, text = _demo(tmp_path)
    assert "mmfeed demo summary" in text
    # both daemons stopped cleanly on SIGTERM; nothing is left in /dev/shm or running
    assert summary["exit_codes"] == {"producer": 0, "trainer": 0}
    assert summary["leftover_shm"] == []
    assert summary["leftover_processes"] == []
    # the live mix `mmctl mix` set is the trainer's mix at the end
    assert summary["status"]["trainer"]["live_fraction_target"] == summary["mix"] == 0.75
    tr = summary["trainer"]
    # the trainer trained on the grayscale generation `mmctl filter gray` made, from both sides
    assert summary["filter_generation"] in tr["generations"]
    assert tr["samples_live"] > 0 and tr["samples_disk"] > 0
    assert tr["copies_per_sample"] == 1.0
    assert Path(tr["checkpoint"]).exists()  # written on SIGTERM
    assert summary["status"]["producer"]["generation"] == summary["filter_generation"]
    assert summary["preprocess"]["cached"] > 0 and summary["preprocess"]["rejected"] == []
    # it ends by drawing a live sample and saying where the TensorBoard logs are
    from PIL import Image

    assert Image.open(summary["preview"]["path"]).format == "PNG"
    assert summary["preview"]["caption"][0].startswith(f"generation {summary['filter_generation']}")
    assert list(Path(summary["tensorboard"]).glob("events.out.tfevents.*"))
    assert f"TensorBoard logs           {summary['tensorboard']}" in text
    # while it waits it says how training goes (step, rate, ETA), not nothing
    assert "[demo] trainer: step " in text
    if REAL_DATA.is_dir():
        # the real recordings went through the same pipeline into the cache (test split)
        assert summary["real_recordings"], "real recordings present but not in the demo dataset"
        test_split = CacheReader(tmp_path / "cache", split="test")
        keys = {test_split.meta(i).source for i in range(len(test_split))}
        assert {f"test/real/{n}" for n in summary["real_recordings"]} <= keys

    # A second run in the same folder works too: the cache is reused, not rebuilt.
    again, _ = _demo(tmp_path)
    assert again["exit_codes"] == {"producer": 0, "trainer": 0}
    assert again["preprocess"]["reused"] == summary["preprocess"]["cached"]


def _daemons_of(demo_pid: int) -> list[int]:
    """Pids of the mm-producer/mm-trainer processes the demo with pid `demo_pid` started (its
    ring is named after it)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"mmfeed-demo-{demo_pid}".encode() in args and b"run" in args:
            found.append(int(proc.name))
    return found


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_demo_killed_with_sigkill_takes_its_daemons_with_it(tmp_path):
    import os
    import signal
    import time

    demo = subprocess.Popen([sys.executable, "-m", "cli.demo", "--quick", "--workdir",
                             str(tmp_path), "--json"], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 400
        while len(_daemons_of(demo.pid)) < 2:  # both daemons up (preprocess comes first)
            assert demo.poll() is None, f"the demo ended early ({demo.returncode})"
            assert time.monotonic() < deadline, "the demo never started both daemons"
            time.sleep(0.5)
        daemons = _daemons_of(demo.pid)
        os.kill(demo.pid, signal.SIGKILL)
        demo.wait()
        deadline = time.monotonic() + 120  # the trainer writes its checkpoint on SIGTERM
        while any(Path(f"/proc/{p}").exists() and b"zombie" not in _state(p) for p in daemons):
            assert time.monotonic() < deadline, f"daemons {daemons} outlived the demo"
            time.sleep(0.5)
    finally:
        if demo.poll() is None:
            demo.kill()
        for p in _daemons_of(demo.pid):
            os.kill(p, signal.SIGKILL)


def _state(pid: int) -> bytes:
    """The State line of /proc/PID/status ('Z (zombie)' once it exited unreaped)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_bytes().splitlines():
            if line.startswith(b"State:"):
                return line
    except OSError:
        pass
    return b"zombie"
