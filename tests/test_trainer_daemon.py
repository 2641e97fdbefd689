"""`mm-trainer run` as a real process: control socket, signals, --json summary, torchrun."""
from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import zmq
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from _trainer_data import LiveProducer, build_cache, cleanup_ring, unique_name  # noqa: E402
from _polling import wait_for  # noqa: E402
from _control_wire import must_answer, raw_reply  # noqa: E402

from protocol.control import ControlClient, Timeouts  # noqa: E402
from protocol.errors import RemoteError  # noqa: E402
from trainer.cli import main  # noqa: E402

VENV_BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return build_cache(tmp_path_factory.mktemp("cache") / "c", n_train=60, n_val=30)


def _env(tmp_path: Path) -> dict:
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    return {**os.environ, "MMFEED_RUNTIME_DIR": str(run), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}


def _start_daemon(cache: Path, tmp_path: Path, *extra: str, env: dict | None = None):
    """A long `mm-trainer run` (disk only) with its control endpoint, once it has stepped.
    Its stderr goes to a file (`proc.stderr_file`): a pipe nobody reads would block it."""
    endpoint = f"ipc://{tmp_path}/t.sock"
    stderr_file = tmp_path / "stderr.log"
    with open(stderr_file, "wb") as err:
        proc = subprocess.Popen(
            [str(VENV_BIN / "mm-trainer"), "run", "--cache", str(cache), "--steps", "1000000",
             "--batch-size", "4", "--checkpoint-dir", str(tmp_path / "ck"), "--control", endpoint,
             "--log-interval", "0.2", *extra],  # the log socket goes next to --control
            env={**_env(tmp_path), **(env or {})}, stdout=subprocess.PIPE, stderr=err, text=True)
    proc.stderr_file = stderr_file
    client = ControlClient(endpoint, Timeouts(request=2.0, retries=0))

    def status():
        try:
            return client.request("status")
        except Exception:
            if proc.poll() is not None:
                raise AssertionError(f"trainer exited: {stderr_file.read_text()[-2000:]}")
            return None

    wait_for(lambda: (s := status()) and s["step"] >= 2 and s, what="trainer steps")
    return proc, client, endpoint


def _stop(proc, client) -> None:
    client.close()
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


@pytest.fixture
def daemon(cache, tmp_path):
    """A long `mm-trainer run` (disk only) with its control endpoint; killed at the end."""
    proc, client, endpoint = _start_daemon(cache, tmp_path)
    yield proc, client, endpoint, tmp_path / "ck"
    _stop(proc, client)


def test_sigterm_writes_a_checkpoint_and_exits_zero(daemon):
    proc, client, _, ck = daemon
    step = client.request("status")["step"]
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 0, proc.stderr_file.read_text()[-2000:]
    saved = sorted(ck.glob("ckpt-*.pt"))
    assert saved and int(saved[-1].stem.split("-")[1]) >= step


def test_control_commands_pause_resume_mix_checkpoint_and_status(daemon):
    proc, client, _, ck = daemon
    st = client.request("status")
    for key in ("step", "epoch", "loss", "samples_per_s", "stall_fraction", "live_fraction",
                "live_fraction_target", "generations_seen", "generation", "copies_per_sample",
                "state"):
        assert key in st, key
    assert client.request("pause")["state"] == "paused"
    s1 = wait_for(lambda: (s := client.request("status"))["state"] == "paused" and s, what="paused")
    s2 = client.request("status")
    assert s2["step"] == s1["step"]  # no step while paused
    client.request("resume")
    wait_for(lambda: client.request("status")["step"] > s2["step"], what="training again")
    reply = client.request("checkpoint")
    assert Path(reply["checkpoint"]).exists()
    assert client.request("mix", fraction=0.0)["fraction"] == 0.0
    with pytest.raises(RemoteError) as e:
        client.request("mix", fraction=0.5)  # no ring: only 0 is possible
    assert e.value.code == "bad_argument"
    with pytest.raises(RemoteError) as e:
        client.request("mix", fraction=2.0)
    assert e.value.code == "bad_argument"
    assert "records" in client.request("logs", n=5)


MALFORMED = [
    (b"not json", "malformed"),
    (b'["a list"]', "malformed"),
    (b'{"v": 1, "cmd": "mix", "args": {"fraction": "lots"}}', "bad_argument"),
    (b'{"v": 1, "cmd": "explode", "args": {}}', "unknown_command"),
    (b'{"v": 99, "cmd": "status", "args": {}}', "version_mismatch"),
    (b"[" * 2048, "malformed"),                                              # RecursionError
    (b'{"v": 1, "cmd": "mix", "args": {"fraction": ' + b"9" * 4301 + b"}}", "malformed"),
]


def test_malformed_control_messages_get_errors_and_the_trainer_keeps_training(daemon):
    # One daemon for every case (each start costs seconds); each case is checked on its own.
    proc, client, endpoint, _ = daemon
    for raw, code in MALFORMED:
        reply = must_answer(endpoint, raw)
        assert reply["ok"] is False and reply["error"]["code"] == code, (raw[:40], reply)
        step = client.request("status")["step"]
        wait_for(lambda: client.request("status")["step"] > step, what="training to go on")


def test_missing_cache_is_a_clear_error_and_exit_code_2(tmp_path):
    r = CliRunner().invoke(main, ["run", "--cache", str(tmp_path / "nope"), "--steps", "1"])
    assert r.exit_code == 2
    assert "no disk cache" in r.output and "mm-producer preprocess" in r.output


def test_corrupt_cache_is_refused_at_start_with_exit_code_2(tmp_path, cache):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(cache, broken)
    (broken / (broken / "CURRENT").read_text().strip() / "index.npy").write_bytes(b"junk")
    r = CliRunner().invoke(main, ["run", "--cache", str(broken), "--steps", "1"])
    assert r.exit_code == 2 and "index.npy" in r.output


def test_run_prints_a_json_summary_last(cache, tmp_path):
    p = subprocess.run(
        [str(VENV_BIN / "mm-trainer"), "run", "--cache", str(cache), "--steps", "4",
         "--batch-size", "4", "--checkpoint-dir", str(tmp_path / "ck"), "--json"],
        env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    for key in ("steps", "samples_disk", "samples_live", "generations", "accuracy",
                "samples_per_s", "stall_fraction", "copies_per_sample", "checkpoint"):
        assert key in summary, key
    assert summary["steps"] == 4 and Path(summary["checkpoint"]).exists()


def test_two_rank_torchrun_run_accumulates_and_every_rank_trains_on_its_own_ring_reader(
        cache, tmp_path):
    # One torchrun start for three things (each start costs seconds):
    # - --accum 2: a non-final micro-batch runs forward+backward inside one DDP no_sync()
    #   (entering one no_sync() object twice died with AttributeError on the first step);
    # - --ring: each rank attaches its own registered reader and keeps its own half of the
    #   samples (index % 2), so both ranks train on live samples;
    # - the checkpoint holds every rank's RNG state, not only rank 0's.
    name = unique_name()
    # Lossless: the writer waits for both registered readers, so neither rank starves.
    producer = LiveProducer(name, mode="lossless").start()
    port = 29500 + os.getpid() % 1000
    try:
        p = subprocess.run(
            [str(VENV_BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", str(port),
             "-m", "trainer.cli", "run", "--cache", str(cache), "--steps", "6", "--batch-size",
             "4", "--accum", "2", "--ring", name, "--mix", "0.5", "--ring-start", "oldest",
             "--checkpoint-dir", str(tmp_path / "ck"), "--control", f"ipc://{tmp_path}/t.sock",
             "--json"],
            env=_env(tmp_path), capture_output=True, text=True, timeout=240, cwd=ROOT)
    finally:
        producer.stop()
        cleanup_ring(name)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == 2 and summary["steps"] == 6
    assert summary["accuracy"] is not None
    ranks = summary["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        # 6 steps x 2 micro-batches x 4 samples, some from the ring and some from disk
        assert r["samples_live"] > 0, ranks
        assert r["samples_live"] + r["samples_disk"] <= 6 * 2 * 4, ranks
    saved = torch.load(summary["checkpoint"], weights_only=True)
    rng0, rng1 = saved["rng_ranks"]
    assert torch.equal(rng0["torch"], saved["rng"]["torch"])
    assert not torch.equal(rng0["torch"], rng1["torch"])  # seeded seed + rank


def _notify_socket(directory: Path):
    """A real AF_UNIX datagram socket standing in for systemd's notify socket."""
    import socket

    path = str(directory / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.5)
    return sock, path


def _datagrams_until(sock, wanted: str, timeout: float = 60.0) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got.extend(sock.recv(4096).decode().splitlines())
        except OSError:  # socket.timeout: keep waiting until the deadline
            continue
        if any(line.startswith(wanted) for line in got):
            return got
    raise AssertionError(f"no {wanted!r} from the trainer within {timeout} s; got {got}")


@contextlib.contextmanager
def _trainer_under_a_stand_in_systemd(cache: Path, tmp_path: Path, watchdog_usec: str,
                                      *args: str):
    """`mm-trainer run --cache CACHE ARGS` with NOTIFY_SOCKET and WATCHDOG_USEC set, as systemd
    starts it: yields (the process, the notify socket its datagrams arrive on); the process
    is killed and the socket's folder removed on the way out."""
    d = Path(tempfile.mkdtemp(prefix="mmtn", dir="/tmp"))  # AF_UNIX paths must stay short
    sock, path = _notify_socket(d)
    env = {**_env(tmp_path), "NOTIFY_SOCKET": path, "WATCHDOG_USEC": watchdog_usec}
    proc = subprocess.Popen(
        [str(VENV_BIN / "mm-trainer"), "run", "--cache", str(cache), *args,
         "--checkpoint-dir", str(tmp_path / "ck"),
         "--control", f"ipc://{d}/t.sock", "--log-endpoint", f"ipc://{d}/t.log.sock"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        yield proc, sock
    finally:
        sock.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(d, ignore_errors=True)


def test_sd_notify_ready_watchdog_and_stopping_under_a_stand_in_systemd(cache, tmp_path):
    # systemd's Type=notify + WatchdogSec contract (systemd/mm-trainer.service): READY=1 once the
    # control socket is up, WATCHDOG=1 at half of WATCHDOG_USEC, STOPPING=1 on SIGTERM.
    with _trainer_under_a_stand_in_systemd(cache, tmp_path, "400000", "--steps", "1000000",
                                           "--batch-size", "4") as (proc, sock):
        assert any(l.startswith("READY=1") for l in _datagrams_until(sock, "READY=1"))
        _datagrams_until(sock, "WATCHDOG=1")
        _datagrams_until(sock, "WATCHDOG=1")  # repeatedly, not once
        proc.send_signal(signal.SIGTERM)
        _datagrams_until(sock, "STOPPING=1")
        assert proc.wait(timeout=60) == 0


def _between(lines: list[str], start: str) -> list[str]:
    """The datagram lines after the first one starting with `start`, up to the next STATUS=."""
    i = next(k for k, line in enumerate(lines) if line.startswith(start))
    rest = lines[i + 1:]
    end = next((k for k, line in enumerate(rest) if line.startswith("STATUS=")), len(rest))
    return rest[:end]


def test_the_watchdog_is_fed_while_evaluating_and_while_writing_a_checkpoint(cache, tmp_path):
    # WatchdogSec=120 in the unit; a big val split or a big model's checkpoint outlasts it in
    # one loop turn. WATCHDOG_USEC=2 (a ping due every microsecond) makes every val batch and
    # every checkpoint write a moment a ping is due, whatever the machine's speed: pings must
    # come from inside evaluate() and save(), between their STATUS= lines.
    lines: list[str] = []
    with _trainer_under_a_stand_in_systemd(cache, tmp_path, "2", "--steps", "2",
                                           "--batch-size", "2") as (proc, sock):
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # drain until the trainer exited and sent its last
            try:
                lines.extend(sock.recv(4096).decode().splitlines())
            except OSError:  # socket.timeout
                if proc.poll() is not None:
                    break
        assert proc.wait(timeout=60) == 0, proc.stderr.read()[-2000:]
    # 30 val samples in batches of 2: one ping per batch is due, several are required.
    during_eval = _between(lines, "STATUS=evaluating")
    assert during_eval.count("WATCHDOG=1") >= 2, during_eval
    during_save = _between(lines, "STATUS=writing the checkpoint")
    assert during_save.count("WATCHDOG=1") >= 1, during_save
    # the final evaluation is done before STOPPING=1 (the stop timeout governs after it)
    assert lines.index("STOPPING=1") > lines.index(next(
        line for line in lines if line.startswith("STATUS=evaluating")))


def test_the_log_socket_sits_next_to_a_custom_control_socket(daemon):
    # `mmctl --trainer ipc://DIR/t.sock logs -f` looks for DIR/t.log.sock: the daemon must be there
    _, _, endpoint, _ = daemon
    from protocol import logs

    got = next(iter(logs.follow(endpoint.replace(".sock", ".log.sock"), timeout=10)), None)
    assert got is not None and got["daemon"] == "trainer"


def _free_port_pair() -> int:
    import socket

    for _ in range(100):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            try:
                with socket.socket() as b:
                    b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no two adjacent free ports on 127.0.0.1")


def test_tcp_control_needs_curve_keys_and_answers_mmctl_with_them(cache, tmp_path):
    from cli.mmctl import main as mmctl
    from protocol.control import keygen

    url = f"tcp://127.0.0.1:{_free_port_pair()}"
    args = [str(VENV_BIN / "mm-trainer"), "run", "--cache", str(cache), "--steps", "1000000",
            "--batch-size", "4", "--checkpoint-dir", str(tmp_path / "ck"), "--control", url]
    # without keys: refused before training starts, naming the option that fixes it
    refused = subprocess.run(args, env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "--curve-dir" in refused.stderr, refused.stderr[-2000:]
    keys = tmp_path / "keys"
    keygen(keys)
    proc = subprocess.Popen([*args, "--curve-dir", str(keys)], env=_env(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        def status():
            r = CliRunner().invoke(mmctl, ["--json", "--timeout", "2", "--keys", str(keys),
                                           "--trainer", url, "status", "trainer"])
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            return r.exit_code == 0 and json.loads(r.stdout.splitlines()[-1])["trainer"]
        st = wait_for(status, timeout=120, what="the trainer over CURVE")
        assert st["state"] in ("running", "starting")
        # a client keypair the trainer does not admit (knowing the server's public key) gets
        # no answer: exit 3, not a reply
        intruder = tmp_path / "intruder"
        keygen(intruder)
        shutil.copy(keys / "server.key", intruder / "server.key")
        r = CliRunner().invoke(mmctl, ["--json", "--timeout", "2", "--keys", str(intruder),
                                       "--trainer", url, "status", "trainer"])
        assert r.exit_code == 3, r.output
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 0


def test_messages_that_broke_the_json_parser_leave_sigterm_checkpointing_intact(daemon):
    # ~2 KB of nested [ (RecursionError) and a 4301-digit integer (ValueError) each made the
    # trainer exit 1 without its SIGTERM checkpoint.
    proc, client, endpoint, ck = daemon
    for payload in (b"[" * 2048, b"{" * 2048,
                    b'{"v": 1, "cmd": "mix", "args": {"fraction": ' + b"1" * 5000 + b"}}",
                    b'{"v": 1, "cmd": "mix", "args": {"fraction": 1e999}}'):
        reply = must_answer(endpoint, payload)
        assert reply["ok"] is False and reply["error"]["code"] == "malformed", reply
    step = client.request("status")["step"]
    wait_for(lambda: client.request("status")["step"] > step, what="training to go on")
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 0, proc.stderr_file.read_text()[-2000:]
    assert sorted(ck.glob("ckpt-*.pt")), "no SIGTERM checkpoint"


def test_a_checkpoint_request_slower_than_the_client_timeout_writes_one_checkpoint(cache,
                                                                                   tmp_path):
    # The model's state_dict takes 1.5 s; the client gives up on a socket after 0.3 s and
    # retries. The retries carry the request's id: one checkpoint, and the reply reaches us.
    proc, client, endpoint = _start_daemon(cache, tmp_path, "--model", "_slow_model:build",
                                           env={"MMFEED_TEST_SAVE_DELAY": "1.5"})
    try:
        patient = ControlClient(endpoint, Timeouts(request=0.3, retries=60))
        reply = patient.request("checkpoint")
        patient.close()
        assert Path(reply["checkpoint"]).exists()
        records = client.request("logs", n=1000)["records"]
    finally:
        _stop(proc, client)
    written = [r for r in records if r["msg"] == "checkpoint written"]
    assert len(written) == 1, written
    assert len(list((tmp_path / "ck").glob("ckpt-*.pt"))) == 1


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_flood_of_refused_large_requests_keeps_the_log_and_memory_bounded(daemon):
    # 1,100 refused 63 KB requests wrote 139 MB of log in 2 s and grew RSS by 120 MB; one
    # `logs` reply was 147 MB.
    from protocol import logs

    proc, client, endpoint, _ = daemon
    client.request("pause")  # paused, the loop answers each request as it comes
    err_before = proc.stderr_file.stat().st_size
    rss_before = _rss_kib(proc.pid)
    name = "x" * (63 * 1024)
    s = zmq.Context.instance().socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    try:
        for i in range(1100):
            s.send(json.dumps({"v": 1, "cmd": name[: len(name) - i], "args": {}}).encode())
            assert s.poll(10000), f"no reply to request {i}"
            assert json.loads(s.recv())["error"]["code"] == "unknown_command"
    finally:
        s.close()
    raw = raw_reply(endpoint, json.dumps({"v": 1, "cmd": "logs", "args": {"n": 1000}}).encode())
    assert raw is not None, "no reply to logs"
    reply = json.loads(raw)
    rss_growth_mib = (_rss_kib(proc.pid) - rss_before) / 1024
    client.request("resume")
    log_growth = proc.stderr_file.stat().st_size - err_before
    assert log_growth < 64 * 1024, f"{log_growth} bytes of log for 1,100 refused requests"
    assert rss_growth_mib < 32, f"RSS grew {rss_growth_mib:.0f} MiB"
    assert reply["ok"] and len(raw) <= logs.LOGS_REPLY_MAX_BYTES + 1024
    assert proc.poll() is None
