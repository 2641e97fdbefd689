"""The live path as a new user meets it: the README's live recipe against a stream sent by the
ffmpeg command line, and the producer daemon's control socket under messages that used to
kill it. Real processes, real sockets, a real UDP stream; every wait polls with a deadline."""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from producer.synth import make_dataset
from protocol.control import ControlClient, Timeouts

sys.path.insert(0, str(Path(__file__).parent))
from _polling import wait_for  # noqa: E402
from _control_wire import must_answer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
FFMPEG = shutil.which("ffmpeg")


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def workdir():
    # Short: the daemons' unix sockets live in it (107-byte path limit).
    d = Path(tempfile.mkdtemp(prefix=f"mml{os.getpid()}-{uuid.uuid4().hex[:6]}-", dir="/tmp"))
    (d / "run").mkdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _env(workdir: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    env.update({"MMFEED_RUNTIME_DIR": str(workdir / "run"), "OMP_NUM_THREADS": "1",
                "PYTHONPATH": str(ROOT)})
    return env


class Proc:
    """A console script of the package as the README runs it, stderr to a file."""

    def __init__(self, workdir: Path, name: str, *args: str):
        self.err_path = workdir / f"{name}.stderr"
        with open(self.err_path, "wb") as err:
            self.p = subprocess.Popen([str(VENV_BIN / name), *args], cwd=workdir,
                                      env=_env(workdir), stdout=subprocess.PIPE, stderr=err)

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.p.poll() is None:
            self.p.send_signal(sig)
            try:
                self.p.wait(30)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        return self.p.returncode


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """The README's steps 1-2: a dataset laid out as documented, preprocessed by the CLI."""
    base = tmp_path_factory.mktemp("recipe")
    dataset = make_dataset(base / "dataset", per_class={"train": 2, "val": 1}, size=(64, 48),
                           clip_seconds=0.5)
    p = subprocess.run([str(VENV_BIN / "mm-producer"), "preprocess", str(dataset), "--cache",
                        str(base / "cache"), "--workers", "2"],
                       capture_output=True, text=True, timeout=300, env=_env(base))
    assert p.returncode == 0, p.stderr[-2000:]
    return base / "cache"


@pytest.mark.skipif(FFMPEG is None, reason="the ffmpeg command line is not installed")
def test_the_readme_live_recipe_trains_on_an_unlabelled_ffmpeg_udp_stream(cache, workdir):
    # README "From the demo to your own data", steps 3 and 4, as written, against a stream
    # from the ffmpeg command line. The stream has no label: its samples must be counted as
    # unlabelled, left out of the loss, and never crash the trainer (IndexError before).
    port = _free_udp_port()
    ring = f"mml{os.getpid()}{uuid.uuid4().hex[:6]}"
    sender = subprocess.Popen([FFMPEG, "-nostdin", "-loglevel", "error", "-re", "-f", "lavfi",
                               "-i", "testsrc=size=320x240:rate=25", "-t", "120", "-f", "mpegts",
                               f"udp://127.0.0.1:{port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    producer = Proc(workdir, "mm-producer", "run", "--source", f"udp://127.0.0.1:{port}",
                    "--ring", ring)
    trainer = None
    try:
        client = ControlClient(f"ipc://{workdir}/run/producer.sock", Timeouts(2.0, 0))

        def published():
            assert producer.p.poll() is None, producer.stderr()[-2000:]
            try:
                return client.request("status")["published"] >= 1
            except Exception:
                return False

        wait_for(published, timeout=90, what="the producer publishing the stream")
        client.close()
        trainer = Proc(workdir, "mm-trainer", "run", "--cache", str(cache), "--ring", ring,
                       "--mix", "0.3", "--checkpoint-dir", "ckpt", "--epochs", "10", "--json")
        # Step 5, steering: pause the trainer as soon as it answers (at its first or second
        # step), let its ring reader receive the stream, resume. Without the pause the ten
        # epochs of a tiny cache could end before the first live clip, whatever the speed.
        wait_for(lambda: _mmctl(workdir, "pause", "trainer").returncode == 0, timeout=120,
              what="the trainer's control socket")
        wait_for(lambda: _trainer_status(workdir).get("generations_seen"), timeout=60,
              what="the trainer's ring reader receiving the stream")
        assert _mmctl(workdir, "resume", "trainer").returncode == 0
        out, _ = trainer.p.communicate(timeout=300)
        assert trainer.p.returncode == 0, trainer.stderr()[-3000:]
        summary = json.loads(out.decode().strip().splitlines()[-1])
    finally:
        if trainer is not None:
            trainer.stop(signal.SIGKILL)
        producer_rc = producer.stop()
        sender.kill()
        sender.wait()
    assert summary["samples_live"] > 0 and summary["samples_unlabelled"] == summary["samples_live"]
    assert summary["samples_disk"] > 0 and summary["steps"] > 0 and summary["accuracy"] is not None
    assert (workdir / summary["checkpoint"]).exists()  # --checkpoint-dir ckpt: in the cwd
    assert "Traceback" not in trainer.stderr()
    said = [line for line in producer.stderr().splitlines() if "is unlabelled" in line]
    assert len(said) == 1 and "--label NAME" in said[0] and "mmctl label" in said[0]
    assert producer_rc == 0 and not list(Path("/dev/shm").glob(f"*{ring}*"))


def _mmctl(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "mmctl"), "--json", *args], capture_output=True,
                          text=True, timeout=60, env=_env(workdir))


def _trainer_status(workdir: Path) -> dict:
    r = _mmctl(workdir, "status", "trainer")
    return (json.loads(r.stdout.splitlines()[-1]).get("trainer") or {}) if r.stdout else {}


@pytest.fixture(scope="module")
def replay(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("replay") / "ds"
    return make_dataset(root, per_class={"train": 1}, size=(32, 24), clip_seconds=0.5,
                        extras=False)


def test_messages_that_killed_the_producer_get_malformed_and_it_keeps_publishing(replay,
                                                                                workdir):
    # ~2 KB of nested [ (RecursionError) and a 4301-digit integer (ValueError) made
    # mm-producer exit 1.
    ring = f"mml{os.getpid()}{uuid.uuid4().hex[:6]}"
    producer = Proc(workdir, "mm-producer", "run", "--source", str(replay), "--ring", ring,
                    "--loop", "--json")
    endpoint = f"ipc://{workdir}/run/producer.sock"
    try:
        r, _, _ = select.select([producer.p.stdout], [], [], 60)
        assert r and json.loads(producer.p.stdout.readline())["event"] == "ready", \
            producer.stderr()[-2000:]
        client = ControlClient(endpoint, Timeouts(5.0, 0))
        for payload in (b"[" * 2048, b"{" * 2048,
                        b'{"v": 1, "cmd": "segment", "args": {"start": 0, "end": '
                        + b"9" * 4301 + b"}}",
                        b'{"v": 1, "cmd": "segment", "args": {"start": 0, "end": 1e999}}'):
            reply = must_answer(endpoint, payload)
            assert reply["ok"] is False and reply["error"]["code"] == "malformed", reply
        before = client.request("status")["published"]
        wait_for(lambda: client.request("status")["published"] > before, what="publishing on")
        assert client.request("status")["generation"] == 1  # nothing was changed
        client.close()
    finally:
        rc = producer.stop()
    assert rc == 0, producer.stderr()[-2000:]
    assert "Traceback" not in producer.stderr()
