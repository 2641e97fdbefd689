"""Other local users cannot get between mmctl and the daemons: the runtime directory is made
and checked safely on both sides, and abstract sockets are refused (protocol/paths.py).

Real daemons, real mmctl processes, real sockets. The squatting case needs a second local
user: as root the test creates a throwaway one (useradd) and removes it afterwards, and gives
the processes under test a private /tmp (a mount namespace) so that squatting
/tmp/mmfeed-0 never disturbs anything else on the machine; it is skipped, with the reason,
where that is impossible.
"""
from __future__ import annotations

import grp
import json
import os
import pwd
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import uuid
from pathlib import Path

import pytest
import zmq

from producer.synth import make_dataset
from protocol.control import ControlServer

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CLEAN = {k: v for k, v in os.environ.items()
         if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "MMFEED_PRODUCER",
                      "MMFEED_TRAINER", "MMFEED_GROUP")}


def _run(*argv: str, env: dict | None = None, umask: int | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          timeout=timeout, env={**CLEAN, **(env or {})}, cwd=ROOT,
                          preexec_fn=None if umask is None else (lambda: os.umask(umask)))


@pytest.fixture
def base():
    """A short private folder in /tmp (unix socket paths are limited to 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix=f"mml{os.getpid()}-{uuid.uuid4().hex[:6]}-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("lu") / "ds", per_class={"train": 1},
                        classes=("circle", "square"), size=(32, 24), clip_seconds=0.5)


def _producer(*args: str, env: dict, source: Path | str = "/nonexistent", ring=None,
              umask: int | None = None) -> subprocess.CompletedProcess:
    ring = ring or f"mml{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return _run(sys.executable, "-m", "producer.cli", "run", "--source", source, "--ring", ring,
                *args, env=env, umask=umask, timeout=90)


class FakeDaemon:
    """A ControlServer that answers `status` with generation 666 and counts what it got:
    what an impostor would be."""

    def __init__(self, endpoint: str):
        self.calls: list[str] = []
        self.server = ControlServer(endpoint, {
            "status": lambda: self.calls.append("status") or {"generation": 666},
            "filter": lambda spec="": self.calls.append(f"filter {spec}") or {"generation": 666}})
        self.server.serve_in_thread(poll_ms=20)

    def close(self) -> None:
        self.server.close()


# --- the runtime directory, daemon side ------------------------------------------------


def test_daemon_refuses_a_runtime_dir_that_is_a_symlink(base):
    (base / "real").mkdir(mode=0o700)
    (base / "link").symlink_to(base / "real")
    r = _producer(env={"MMFEED_RUNTIME_DIR": str(base / "link")})
    assert r.returncode == 1, r.stderr
    assert f"runtime directory {base / 'link'} is a symlink" in r.stderr
    assert "MMFEED_RUNTIME_DIR" in r.stderr  # what to do
    assert not list((base / "real").iterdir())  # nothing was bound through the link


@pytest.mark.parametrize("mode", [0o777, 0o772], ids=["mode0777", "mode0772"])
def test_daemon_refuses_a_runtime_dir_others_may_write_to(base, mode):
    run = base / "run"
    run.mkdir()
    run.chmod(mode)
    os.chown(run, -1, _foreign_gid())
    r = _producer(env={"MMFEED_RUNTIME_DIR": str(run)})
    assert r.returncode == 1, r.stderr
    assert f"runtime directory {run} is writable by" in r.stderr and f"{mode:04o}" in r.stderr
    assert not list(run.iterdir())


def _foreign_gid() -> int:
    """A group that is neither ours nor any --group: where group write means strangers."""
    ours = {os.getegid(), *os.getgroups()}
    if os.geteuid() == 0:
        return next((g.gr_gid for g in grp.getgrall() if g.gr_gid not in ours), 65534)
    return os.getegid()  # a user may only chgrp to its own groups: the mode 0777 case still holds


def test_trainer_refuses_an_unsafe_runtime_dir_with_a_message_not_a_traceback(base, tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from _trainer_data import build_cache

    cache = build_cache(tmp_path / "c", n_train=6, n_val=3)
    (base / "real").mkdir(mode=0o700)
    (base / "link").symlink_to(base / "real")
    r = _run(BIN / "mm-trainer", "run", "--cache", cache, "--steps", "1", "--checkpoint-dir",
             tmp_path / "ck", env={"MMFEED_RUNTIME_DIR": str(base / "link"),
                                   "OMP_NUM_THREADS": "1"})
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"runtime directory {base / 'link'} is a symlink" in r.stderr


@pytest.mark.parametrize("umask", [0o000, 0o022], ids=["umask000", "umask022"])
def test_daemon_creates_its_runtime_dir_0700_whatever_the_umask(base, dataset, umask):
    run = base / "new" / "run"
    env = {"MMFEED_RUNTIME_DIR": str(run)}
    ring = f"mml{os.getpid()}-{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen([sys.executable, "-m", "producer.cli", "run", "--source",
                             str(dataset), "--ring", ring, "--json", "--rate", "max"],
                            cwd=ROOT, env={**CLEAN, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: os.umask(umask))
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 90)
        line = proc.stdout.readline() if ready else ""
        assert line and json.loads(line)["event"] == "ready", proc.stderr.read()[-2000:] \
            if proc.poll() is not None else "no ready line"
        st = run.lstat()
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()
        assert stat.S_IMODE((run / "producer.sock").stat().st_mode) == 0o600
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


# --- the runtime directory, mmctl side ---------------------------------------------------


def test_mmctl_never_talks_to_a_socket_behind_a_symlinked_runtime_dir(base):
    (base / "real").mkdir(mode=0o700)
    (base / "link").symlink_to(base / "real")
    fake = FakeDaemon(f"ipc://{base / 'real'}/producer.sock")
    try:
        r = _run(BIN / "mmctl", "--json", "filter", "gray",
                 env={"MMFEED_RUNTIME_DIR": str(base / "link")})
    finally:
        fake.close()
    assert r.returncode == 2, r.stdout + r.stderr
    err = json.loads(r.stdout.strip().splitlines()[-1])["error"]
    assert err["code"] == "unsafe_runtime_dir" and "is a symlink" in err["message"]
    assert fake.calls == []


def test_mmctl_never_talks_to_a_socket_in_a_dir_everyone_may_write(base):
    run = base / "run"
    run.mkdir(mode=0o700)
    fake = FakeDaemon(f"ipc://{run}/producer.sock")
    run.chmod(0o777)  # opened up after the daemon bound: anyone could replace the socket now
    try:
        r = _run(BIN / "mmctl", "status", "producer", env={"MMFEED_RUNTIME_DIR": str(run)})
    finally:
        fake.close()
    assert r.returncode == 2 and "is writable by every user (mode 0777" in r.stderr, r.stderr
    assert fake.calls == []


# --- abstract sockets --------------------------------------------------------------------


def test_daemon_refuses_an_abstract_control_socket(base):
    r = _producer("--control", f"ipc://@mml-{uuid.uuid4().hex}",
                  env={"MMFEED_RUNTIME_DIR": str(base)})
    assert r.returncode == 1, r.stderr
    assert "abstract socket" in r.stderr and "any local user" in r.stderr
    assert "tcp://HOST:PORT with CURVE" in r.stderr and "a directory only you can write" in r.stderr


def test_mmctl_refuses_an_abstract_socket_and_sends_nothing():
    name = f"ipc://@mml-{uuid.uuid4().hex}"
    ctx = zmq.Context()
    rep = ctx.socket(zmq.REP)  # someone listening there, as another user could
    rep.bind(name)
    got: list[bytes] = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            if rep.poll(20):
                got.append(rep.recv())
                rep.send(b'{"ok": true, "generation": 666}')

    t = threading.Thread(target=serve)
    t.start()
    try:
        r = _run(BIN / "mmctl", "--producer", name, "--json", "pause", "producer")
    finally:
        stop.set()
        t.join()
        rep.close(linger=0)
        ctx.term()
    assert r.returncode == 2
    err = json.loads(r.stdout.strip().splitlines()[-1])["error"]
    assert err["code"] == "abstract_socket" and got == []


# --- a real second user squats /tmp/mmfeed-0 ----------------------------------------------


@pytest.fixture
def other_user():
    """A throwaway local user, removed afterwards: (name, uid, gid)."""
    if os.geteuid() != 0:
        pytest.skip("creating a second local user needs root")
    if shutil.which("useradd") is None or shutil.which("userdel") is None:
        pytest.skip("useradd/userdel are not installed")
    name = f"mmsq{uuid.uuid4().hex[:8]}"
    r = subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        "--user-group", name], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        pytest.skip(f"useradd failed: {r.stderr.strip()}")
    pw = pwd.getpwnam(name)
    try:
        yield name, pw.pw_uid, pw.pw_gid
    finally:
        subprocess.run(["userdel", name], capture_output=True, timeout=60)


@pytest.fixture
def private_tmp(base):
    """A folder that the processes under test see as /tmp (`in_private_tmp`), 1777 like it."""
    priv = base / "tmp"
    priv.mkdir()
    priv.chmod(0o1777)
    base.chmod(0o755)  # the other user must reach it
    # The venv's own path, not the interpreter it links to: the venv's scripts (mmctl) are
    # what the processes under test run, and a venv under /tmp links to a Python elsewhere.
    here = Path(sys.prefix).absolute()
    if here.is_relative_to("/tmp"):  # e.g. a CI clone under /tmp: hidden by the private /tmp
        pytest.skip(f"the Python under test ({here}) lives under /tmp, which these processes "
                    f"see replaced by a private folder; run the suite from a checkout elsewhere")
    probe = subprocess.run(["unshare", "-m", "sh", "-c", 'mount --bind "$0" /tmp', str(priv)],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"no private /tmp for the processes under test (unshare -m / mount "
                    f"--bind refused: {probe.stderr.strip()})")
    return priv


def in_private_tmp(priv: Path, *argv) -> list[str]:
    """argv run with `priv` mounted on /tmp and no runtime dir in its environment, as a
    shell without $XDG_RUNTIME_DIR: its runtime dir is the fallback /tmp/mmfeed-$UID."""
    return ["unshare", "-m", "sh", "-c",
            'mount --bind "$0" /tmp && exec env -u XDG_RUNTIME_DIR -u MMFEED_RUNTIME_DIR '
            '-u RUNTIME_DIRECTORY "$@"', str(priv), *map(str, argv)]


class Squatter:
    """Another user's process: makes `directory` (as the fallback runtime dir) and listens on
    `producer.sock` in it, counting every connection it gets."""

    def __init__(self, uid: int, gid: int, directory: Path, make_dir: bool = True):
        self.result_r, result_w = os.pipe()
        self.stop_r, stop_w = os.pipe()
        ready_r, ready_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the other user, from here on
            try:
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
                if make_dir:
                    os.mkdir(directory, 0o755)
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.bind(str(directory / "producer.sock"))
                s.listen(8)
                os.write(ready_w, b"1")
                accepted = 0
                while True:
                    r, _, _ = select.select([s, self.stop_r], [], [])
                    if self.stop_r in r:
                        break
                    s.accept()[0].close()
                    accepted += 1
                os.write(result_w, str(accepted).encode())
            finally:
                os._exit(0)
        os.close(result_w)
        os.close(ready_w)
        self.stop_w = stop_w
        assert os.read(ready_r, 1) == b"1", "the squatter did not start"
        os.close(ready_r)

    def connections(self) -> int:
        os.write(self.stop_w, b"x")
        n = int(os.read(self.result_r, 32) or b"-1")
        os.waitpid(self.pid, 0)
        return n


def test_a_runtime_dir_squatted_by_another_user_is_refused_by_mmctl_and_the_daemon(
        other_user, private_tmp):
    name, uid, gid = other_user
    squatted = private_tmp / f"mmfeed-{os.geteuid()}"  # /tmp/mmfeed-0 to the processes below
    squatter = Squatter(uid, gid, squatted)
    try:
        env = {"MMFEED_SYSTEM_RUNTIME_DIR": "/tmp/no-system-dir"}
        ctl = _run(*in_private_tmp(private_tmp, BIN / "mmctl", "--json", "filter", "gray"),
                   env=env)
        daemon = _run(*in_private_tmp(private_tmp, sys.executable, "-m", "producer.cli", "run",
                                      "--source", "/nonexistent", "--ring",
                                      f"mml{os.getpid()}-{uuid.uuid4().hex[:8]}"), env=env)
    finally:
        connections = squatter.connections()
    assert connections == 0  # mmctl did not even probe the impostor's socket
    assert ctl.returncode == 2, ctl.stdout + ctl.stderr
    msg = json.loads(ctl.stdout.strip().splitlines()[-1])["error"]["message"]
    here = f"/tmp/mmfeed-{os.geteuid()}"
    assert f"runtime directory {here} is owned by {name} (uid {uid})" in msg
    assert "MMFEED_RUNTIME_DIR" in msg
    assert daemon.returncode == 1, daemon.stderr
    assert f"runtime directory {here} is owned by {name} (uid {uid}), not by this user" \
        in daemon.stderr
    assert sorted(os.listdir(squatted)) == ["producer.sock"]  # the daemon bound nothing there


def test_mmctl_as_root_talks_to_a_daemon_of_the_user_root_gave_the_runtime_dir(other_user,
                                                                               base):
    """The systemd layout: /run/mmfeed made by root for the units' user, mode 0770 of its
    group; root's mmctl (not in that group) must still reach the daemon there."""
    name, uid, gid = other_user
    base.chmod(0o755)  # root's, nobody else may write: only root could have made run/
    run = base / "run"
    run.mkdir()
    os.chown(run, uid, gid)
    run.chmod(0o770)
    ready_r, ready_w = os.pipe()
    stop_r, stop_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon's user from here on
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            fake = FakeDaemon(f"ipc://{run}/producer.sock")
            os.write(ready_w, b"1")
            select.select([stop_r], [], [])
            fake.close()
        finally:
            os._exit(0)
    os.close(ready_w)  # so a child that died early reads as EOF, not a hang
    try:
        assert os.read(ready_r, 1) == b"1", "the daemon's user could not start its server"
        r = _run(BIN / "mmctl", "--json", "status", "producer",
                 env={"MMFEED_RUNTIME_DIR": str(run)})
    finally:
        os.write(stop_w, b"x")
        os.waitpid(pid, 0)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["producer"]["generation"] == 666


def test_mmctl_refuses_a_socket_another_user_put_in_a_shared_sticky_dir(other_user, base):
    """A /tmp-like directory (root's, 1777): anyone may add a name there; the socket file's
    owner is what tells the daemon's socket from an impostor's."""
    name, uid, gid = other_user
    base.chmod(0o755)
    shared = base / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    squatter = Squatter(uid, gid, shared, make_dir=False)
    try:
        r = _run(BIN / "mmctl", "status", "producer", env={"MMFEED_RUNTIME_DIR": str(shared)})
    finally:
        connections = squatter.connections()
    assert connections == 0
    assert r.returncode == 2, r.stderr
    assert f"socket {shared / 'producer.sock'} is owned by {name} (uid {uid})" in r.stderr
