"""What killed writers leave behind is removed at the next start; what live writers are
writing is kept (protocol/leftovers.py). Real writers killed with SIGKILL, real pids."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _trainer_data import build_cache  # noqa: E402
from _polling import wait_for  # noqa: E402

from producer.synth import make_sample
from protocol.leftovers import writer_alive

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

#: A checkpoint writer that blocks once some bytes reached its file, until it is killed.
WRITER = """
import os, sys, torch
from trainer import checkpoint
tmp = os.path.join(sys.argv[1], f".ckpt-00000005.pt.tmp-{os.getpid()}")
def hold():
    if os.path.exists(tmp) and os.path.getsize(tmp) > 0:
        print("writing", flush=True)
        sys.stdin.read()
checkpoint.save(sys.argv[1], 5, {"w": torch.zeros(1 << 22)}, keepalive=hold)
"""


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.fixture
def live_process():
    p = subprocess.Popen(["sleep", "600"])
    yield p
    p.kill()
    p.wait()


def test_a_pid_whose_process_is_gone_is_not_a_writer():
    assert not writer_alive(_dead_pid(), time.time())


def test_a_live_process_that_started_after_the_last_write_is_a_reused_pid(live_process):
    assert writer_alive(live_process.pid, time.time())
    assert not writer_alive(live_process.pid, time.time() - 3600)


# --- checkpoints: swept when a trainer starts ---------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return build_cache(tmp_path_factory.mktemp("lcache") / "c", n_train=12, n_val=6)


@pytest.fixture
def checkpoint_dir_with_leftovers(tmp_path, live_process):
    """A checkpoint dir holding: the partial file of a writer SIGKILLed mid-write, a
    temporary of a pid that is gone, one of a live writer, one whose pid was reused."""
    ck = tmp_path / "ck"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(ck)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=ENV)
    assert writer.stdout.readline() == "writing\n"
    writer.kill()  # SIGKILL between write and rename
    writer.wait()
    killed = ck / f".ckpt-00000005.pt.tmp-{writer.pid}"
    assert killed.stat().st_size > 0
    dead = ck / f".ckpt-00000003.pt.tmp-{_dead_pid()}"
    dead.write_bytes(b"x" * 1000)
    live = ck / f".ckpt-00000009.pt.tmp-{live_process.pid}"
    live.write_bytes(b"partial")
    reused = ck / f".ckpt-00000001.pt.tmp-{live_process.pid}"
    reused.write_bytes(b"old")
    hour_ago = time.time() - 3600
    os.utime(reused, (hour_ago, hour_ago))
    return ck, {"killed": killed, "dead": dead, "live": live, "reused": reused}


def test_trainer_start_removes_dead_writers_partial_checkpoints_keeps_live_ones_and_logs_it(
        cache, tmp_path, checkpoint_dir_with_leftovers):
    ck, files = checkpoint_dir_with_leftovers
    r = subprocess.run([str(BIN / "mm-trainer"), "run", "--cache", str(cache), "--steps", "1",
                        "--batch-size", "4", "--checkpoint-dir", str(ck), "--control",
                        f"ipc://{tmp_path}/t.sock", "--log-interval", "60"],
                       capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [n for n in ("killed", "dead", "reused") if files[n].exists()] == []
    assert files["live"].exists()
    for name in ("killed", "dead", "reused"):
        assert f"removed the partial checkpoint {files[name]}" in r.stderr, r.stderr[-3000:]
    assert f"kept the checkpoint temporary {files['live']}" in r.stderr
    assert (ck / "ckpt-00000001.pt").exists()  # and it trained and saved as usual


# --- preprocess: its scratch folder in TMPDIR ------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lds") / "ds"
    rng = np.random.default_rng(6)
    for i in range(6):
        make_sample(root / "train" / ("circle", "square")[i % 2] / f"{i:04d}", i % 2, rng,
                    index=i, clip_seconds=0.5, size=(32, 24))
    return root


def _preprocess(dataset: Path, cache: Path, tmpdir: Path, *args: str):
    return subprocess.run([str(BIN / "mm-producer"), "preprocess", str(dataset), "--cache",
                           str(cache), "--workers", "1", "--quiet", "--json", *args],
                          capture_output=True, text=True, timeout=300,
                          env={**ENV, "TMPDIR": str(tmpdir)})


def test_a_sigkilled_preprocess_scratch_folder_is_removed_by_the_next_run(dataset, tmp_path):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    proc = subprocess.Popen([str(BIN / "mm-producer"), "preprocess", str(dataset), "--cache",
                             str(tmp_path / "cache"), "--workers", "1", "--quiet"],
                            env={**ENV, "TMPDIR": str(tmpdir)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        chunk = wait_for(lambda: next(tmpdir.glob(f"mmfeed-preprocess-{proc.pid}-*/chunk-*"),
                                      None), what="the run's first scratch chunk", interval=0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    scratch = chunk.parent
    assert scratch.is_dir()  # left behind: a killed run never reaches its cleanup
    r = _preprocess(dataset, tmp_path / "cache", tmpdir)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not scratch.exists()
    assert f"removed {scratch}" in r.stderr and f"(pid {proc.pid}) that was killed" in r.stderr


def test_a_live_preprocess_scratch_folder_is_kept(dataset, tmp_path, live_process):
    tmpdir = tmp_path / "tmp"
    live = tmpdir / f"mmfeed-preprocess-{live_process.pid}-abc123"
    live.mkdir(parents=True)
    (live / "chunk-0.bin").write_bytes(b"payload")
    r = _preprocess(dataset, tmp_path / "cache", tmpdir, "--split", "train")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (live / "chunk-0.bin").read_bytes() == b"payload"
