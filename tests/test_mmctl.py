"""mmctl through click's CliRunner against real REP servers (fake daemons made of the real
ControlServer with the wire argument specs), and against nothing at all."""
from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.mmctl import main
from protocol import logs, paths
from protocol.control import ControlServer, keygen, wire_command
from protocol.errors import BadArgument
from protocol.filters import FilterSpec


@pytest.fixture
def rundir(monkeypatch):
    d = Path(tempfile.mkdtemp(prefix=f"mmt{os.getpid()}-{uuid.uuid4().hex[:6]}-", dir="/tmp"))
    monkeypatch.setenv("MMFEED_RUNTIME_DIR", str(d))
    monkeypatch.delenv("MMFEED_PRODUCER", raising=False)
    monkeypatch.delenv("MMFEED_TRAINER", raising=False)
    yield d
    shutil.rmtree(d, ignore_errors=True)


class FakeProducer:
    """Records every call; makes a new generation per change, as the real producer must."""

    def __init__(self):
        self.generation = 1
        self.calls: list[tuple[str, dict]] = []
        self.paused = False

    def _change(self, cmd, **args):
        self.calls.append((cmd, args))
        self.generation += 1
        return {"generation": self.generation}

    def on_sensor(self, input, stem):
        if stem == "lidar_missing":
            raise BadArgument(f"sensor {input}: no files named {stem!r}; available: lidar, lidar_top")
        return self._change("sensor", input=input, stem=stem)

    def commands(self):
        c = {name: wire_command(name, lambda _cmd=name, **a: self._change(_cmd, **a))
             for name in ("filter", "method", "segment", "label")}
        c["sensor"] = wire_command("sensor", self.on_sensor)
        c["modalities"] = wire_command("modalities", self.on_modalities)
        c["status"] = wire_command("status", lambda: {
            "daemon": "producer", "state": "paused" if self.paused else "running",
            "generation": self.generation, "samples_per_s": 812.34, "ring_fill": 0.75,
            "readers": 2, "dropped": 5, "source": "dataset:/data"})
        c["pause"] = wire_command("pause", lambda: self._pause(True))
        c["resume"] = wire_command("resume", lambda: self._pause(False))
        c["logs"] = logs.logs_command()
        return c

    def on_modalities(self, enable, disable):
        if not enable and not disable:
            return {"enabled": ["audio", "video"]}
        return self._change("modalities", enable=enable, disable=disable)

    def _pause(self, paused):
        self.paused = paused
        return {"state": "paused" if paused else "running"}


class FakeTrainer:
    def __init__(self):
        self.fraction = 0.5
        self.trained = 0
        self.paused = False

    def on_status(self):
        self.trained += 1  # each status poll "trains" one more generation
        return {"daemon": "trainer", "state": "training", "generation": self.trained,
                "samples_per_s": 640.0, "stall": 0.021, "step": 120}

    def commands(self):
        return {
            "status": wire_command("status", self.on_status),
            "mix": wire_command("mix", lambda fraction: setattr(self, "fraction", fraction) or
                                {"fraction": fraction}),
            "checkpoint": wire_command("checkpoint", lambda: {"path": "/ck/step-120.pt", "step": 120}),
            "pause": wire_command("pause", lambda: setattr(self, "paused", True)),
            "resume": wire_command("resume", lambda: setattr(self, "paused", False)),
        }


def serve(daemon: str, fake) -> ControlServer:
    server = ControlServer(paths.control_endpoint(daemon), fake.commands())
    server.serve_in_thread(poll_ms=20)
    return server


@pytest.fixture
def producer(rundir):
    fake = FakeProducer()
    server = serve("producer", fake)
    yield fake
    server.close()


@pytest.fixture
def trainer(rundir):
    fake = FakeTrainer()
    server = serve("trainer", fake)
    yield fake
    server.close()


def run(*args: str):
    return CliRunner().invoke(main, ["--timeout", "2", *args], catch_exceptions=False)


def last_json(result) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- status -------------------------------------------------------------------------------


def test_status_shows_both_daemons_side_by_side(producer, trainer):
    r = run("status")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["producer", "trainer"]
    rows = {line.split("  ")[0].strip(): line.split()[-2:] for line in lines[1:]}
    assert rows["state"] == ["running", "training"]
    assert rows["samples/s"] == ["812.3", "640.0"]
    assert rows["stall"] == ["-", "2.1%"]
    assert rows["ring fill"][-2] == "75%" and rows["readers"][-2] == "2" and rows["dropped"][-2] == "5"
    assert any(line.startswith("source") and "dataset:/data" in line for line in lines)


def test_status_json_has_both_replies(producer, trainer):
    out = last_json(run("--json", "status"))
    assert out["ok"] is True
    assert out["producer"]["generation"] == 1 and out["trainer"]["stall"] == 0.021


def test_status_reports_whichever_daemon_answers(producer):
    r = run("status")
    assert r.exit_code == 0
    assert "not running" in r.stdout and "mm-trainer run" in r.stdout
    out = last_json(run("--json", "status"))
    assert out["producer"]["generation"] == 1 and out["trainer"] is None
    assert out["errors"]["trainer"]["code"] == "timeout"


def test_status_with_no_daemon_exits_3_naming_sockets_and_how_to_start(rundir):
    r = run("--json", "status")
    assert r.exit_code == 3
    out = last_json(r)
    assert out["ok"] is False and out["producer"] is None and out["trainer"] is None
    msg = out["errors"]["producer"]["message"]
    assert f"ipc://{rundir}/producer.sock" in msg and "mm-producer run" in msg
    assert "mm-trainer run" in out["errors"]["trainer"]["message"]


# --- producer commands ----------------------------------------------------------------------


@pytest.mark.parametrize("args, wire", [
    # The server parses the spec once (WIRE_ARGS): the handler gets the FilterSpec.
    (["filter", "resize=64x64,gray"], ("filter", {"spec": FilterSpec(True, 64, 64)})),
    (["sensor", "lidar", "lidar_top"], ("sensor", {"input": "lidar", "stem": "lidar_top"})),
    (["method", "radar", "range_doppler"], ("method", {"input": "radar", "name": "range_doppler"})),
    (["segment", "1.5", "4"], ("segment", {"start": 1.5, "end": 4.0})),
    (["label", "walking"], ("label", {"name": "walking"})),
    (["modalities", "-e", "lidar", "--disable", "audio"],
     ("modalities", {"enable": ["lidar"], "disable": ["audio"]})),
], ids=lambda v: v[0] if isinstance(v, list) else None)
def test_change_commands_print_the_new_generation(producer, args, wire):
    r = run(*args)
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("producer: generation 2")
    assert producer.calls == [wire]
    out = last_json(run("--json", *args))
    assert out == {"ok": True, "daemon": "producer", "generation": 3}


def test_json_after_the_command_means_the_same_as_before_it(producer, trainer):
    assert last_json(run("filter", "gray", "--json")) == {"ok": True, "daemon": "producer",
                                                         "generation": 2}
    assert last_json(run("status", "--json"))["trainer"]["stall"] == 0.021
    bad = run("filter", "sepia", "--json")
    assert bad.exit_code == 2 and last_json(bad)["error"]["code"] == "bad_filter"
    for name, cmd in main.commands.items():
        assert "--json" in [o for p in cmd.params for o in p.opts], name


def test_modalities_without_options_lists_enabled_inputs(producer):
    r = run("modalities")
    assert r.exit_code == 0 and "enabled audio, video" in r.stdout
    assert producer.calls == []


def test_bad_filter_is_a_usage_error_and_nothing_is_sent(producer):
    r = run("--json", "filter", "sepia")
    assert r.exit_code == 2
    assert "unknown operation 'sepia'" in last_json(r)["error"]["message"]
    assert producer.calls == []


def test_segment_end_before_start_is_a_usage_error(producer):
    r = run("segment", "5", "2")
    assert r.exit_code == 2 and "END (2) must be after START (5)" in r.output
    assert producer.calls == []


def test_daemon_error_reply_exits_1_with_its_message(producer):
    r = run("--json", "sensor", "lidar", "lidar_missing")
    assert r.exit_code == 1
    err = last_json(r)["error"]
    assert err["code"] == "bad_argument" and "available: lidar, lidar_top" in err["message"]
    assert producer.generation == 1


def test_pause_and_resume_go_to_the_producer_by_default(producer, trainer):
    assert run("pause").exit_code == 0 and producer.paused and not trainer.paused
    assert last_json(run("--json", "resume"))["state"] == "running" and not producer.paused


def test_pause_and_resume_the_trainer_by_name(producer, trainer):
    assert run("pause", "trainer").exit_code == 0 and trainer.paused and not producer.paused
    assert run("resume", "trainer").exit_code == 0 and not trainer.paused


# --- trainer commands -----------------------------------------------------------------------


def test_mix_sets_the_live_fraction(trainer):
    out = last_json(run("--json", "mix", "0.25"))
    assert out == {"ok": True, "daemon": "trainer", "fraction": 0.25} and trainer.fraction == 0.25


def test_mix_outside_0_1_is_a_usage_error(trainer):
    assert run("mix", "1.5").exit_code == 2 and trainer.fraction == 0.5


def test_mix_nan_is_a_usage_error_and_nothing_is_sent(trainer):
    # click's FloatRange(0, 1) lets nan through (every comparison with nan is false): mmctl
    # sent NaN, which is not JSON, and the daemon's "malformed message" blamed the wire.
    # Found by bench.faults.
    r = run("mix", "nan")
    assert r.exit_code == 2 and "'nan' is not a number" in r.output
    assert trainer.fraction == 0.5


@pytest.mark.parametrize("args", [("--timeout", "nan", "status"),
                                  ("wait", "1", "--timeout", "nan"),
                                  ("wait", "1", "--interval", "nan"),
                                  ("top", "--once", "--interval", "nan")])
def test_a_nan_duration_is_a_usage_error_not_a_traceback(rundir, args):
    r = run(*args)
    assert r.exit_code == 2 and "'nan' is not a number" in r.output, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)


def test_checkpoint_reports_where_it_wrote(trainer):
    r = run("checkpoint")
    assert r.exit_code == 0 and "path=/ck/step-120.pt" in r.stdout


def test_wait_returns_once_the_trainer_trained_on_the_generation(trainer):
    out = last_json(run("--json", "wait", "3", "--interval", "0.01"))
    assert out["ok"] is True and out["generation"] >= 3


def test_wait_gives_up_at_its_deadline_with_exit_3(rundir):
    r = run("--timeout", "0.2", "wait", "3", "--timeout", "0.3", "--interval", "0.05")
    assert r.exit_code == 3 and "gave up after 0.3 s" in r.output and "trainer.sock" in r.output


# --- no daemon, transports, logs, helpers ----------------------------------------------------


def test_command_against_no_daemon_exits_3_and_says_how_to_start_it(rundir):
    r = CliRunner().invoke(main, ["--timeout", "0.4", "label", "x"])
    assert r.exit_code == 3
    assert f"ipc://{rundir}/producer.sock" in r.output and "mm-producer run" in r.output


def test_tcp_endpoint_without_keys_is_a_usage_error(rundir):
    r = run("--producer", "tcp://127.0.0.1:5999", "label", "x")
    assert r.exit_code == 2 and "CURVE" in r.output


def test_tcp_with_keys_reaches_a_curve_daemon(rundir):
    from protocol.control import CurveServerKeys

    keys = rundir / "keys"
    assert run("keygen", str(keys)).exit_code == 0
    server = ControlServer("tcp://127.0.0.1:0", FakeProducer().commands(),
                           curve=CurveServerKeys(keys / "server.key_secret", keys / "clients"))
    server.serve_in_thread(poll_ms=20)
    try:
        out = last_json(run("--json", "--keys", str(keys), "--producer", server.endpoint, "label", "x"))
        assert out["generation"] == 2
    finally:
        server.close()


def test_logs_shows_recent_records(producer, rundir):
    log = logs.setup_daemon_logging("producer", None, stream=open(os.devnull, "w"))
    try:
        log.info("generation changed", extra={"generation": 7})
        r = run("logs", "-n", "5")
        assert r.exit_code == 0 and "INFO producer generation changed generation=7" in r.stdout
        assert last_json(run("--json", "logs"))["records"][-1]["fields"] == {"generation": 7}
    finally:
        logs.close_daemon_logging()


def test_logs_follow_reads_the_pub_socket(rundir):
    log = logs.setup_daemon_logging("trainer", paths.log_endpoint("trainer"), stream=open(os.devnull, "w"))
    stop = threading.Event()

    def keep_logging():  # slow joiner: log until the follower has what it needs
        while not stop.wait(0.05):
            log.warning("stall high", extra={"stall": 0.3})

    t = threading.Thread(target=keep_logging)
    t.start()
    try:
        r = run("--json", "logs", "-f", "trainer", "--count", "2")
    finally:
        stop.set()
        t.join()
        logs.close_daemon_logging()
    assert r.exit_code == 0
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(records) == 2 and records[-1]["msg"] == "stall high" and records[-1]["level"] == "WARNING"


def test_logs_follow_without_daemon_or_journal_exits_3(rundir, monkeypatch):
    monkeypatch.setenv("PATH", str(rundir))  # no journalctl to fall back to
    r = run("logs", "-f", "producer")
    assert r.exit_code == 3 and "producer.log.sock" in r.output and "mm-producer run" in r.output


def test_keygen_writes_keypairs_and_the_allowed_clients_folder(rundir):
    out = last_json(run("--json", "keygen", str(rundir / "k")))
    assert Path(out["server_secret"]).is_file() and Path(out["client_secret"]).is_file()
    assert (rundir / "k" / "clients" / "client.key").is_file()


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_prints_a_script_for_the_shell(shell):
    r = run("completion", shell)
    assert r.exit_code == 0 and "_MMCTL_COMPLETE" in r.stdout
    out = last_json(run("completion", shell, "--json"))
    assert out["ok"] and out["shell"] == shell and out["script"].strip() == r.stdout.strip()


def test_help_documents_the_exit_codes():
    r = run("--help")
    for line in ("0  ok", "1  the daemon answered with an error", "2  usage error", "3  no daemon answered"):
        assert line in r.stdout


def test_every_command_has_help():
    for name in main.commands:
        r = CliRunner().invoke(main, [name, "--help"])
        assert r.exit_code == 0 and "Usage: " in r.stdout, name


def test_keygen_helper_is_what_the_cli_uses(rundir):
    secrets = keygen(rundir / "k2")
    assert set(secrets) == {"server", "client"}


# --- finding daemons that systemd started (/run/mmfeed) -----------------------------------------


@pytest.fixture
def shell_and_system(monkeypatch):
    """An operator's shell (own runtime dir $XDG_RUNTIME_DIR/mmfeed, no MMFEED_RUNTIME_DIR)
    and a stand-in for the units' /run/mmfeed (MMFEED_SYSTEM_RUNTIME_DIR), both empty."""
    base = Path(tempfile.mkdtemp(prefix=f"mmt{os.getpid()}-{uuid.uuid4().hex[:6]}-", dir="/tmp"))
    for var in ("MMFEED_RUNTIME_DIR", "RUNTIME_DIRECTORY", "MMFEED_PRODUCER", "MMFEED_TRAINER"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(base / "xdg"))
    monkeypatch.setenv("MMFEED_SYSTEM_RUNTIME_DIR", str(base / "run"))
    (base / "xdg").mkdir()
    yield base / "xdg" / "mmfeed", base / "run"
    shutil.rmtree(base, ignore_errors=True)


def serve_at(directory: Path, fake) -> ControlServer:
    server = ControlServer(f"ipc://{directory}/producer.sock", fake.commands())
    server.serve_in_thread(poll_ms=20)
    return server


def test_daemon_in_the_system_runtime_dir_is_found_when_the_own_dir_has_none(shell_and_system):
    own, system = shell_and_system
    fake = FakeProducer()
    fake.generation = 7
    server = serve_at(system, fake)
    try:
        out = last_json(run("--json", "status", "producer"))
        assert out["ok"] and out["producer"]["generation"] == 7
        assert run("label", "x").exit_code == 0 and fake.calls == [("label", {"name": "x"})]
    finally:
        server.close()
    assert not own.exists()  # a client creates no runtime dir


def test_socket_in_the_own_runtime_dir_wins_over_the_system_one(shell_and_system):
    own, system = shell_and_system
    mine, systems = FakeProducer(), FakeProducer()
    mine.generation, systems.generation = 3, 7
    servers = [serve_at(own, mine), serve_at(system, systems)]
    try:
        assert last_json(run("--json", "status", "producer"))["producer"]["generation"] == 3
    finally:
        for s in servers:
            s.close()


def test_left_over_own_socket_does_not_hide_a_live_system_daemon(shell_and_system):
    own, system = shell_and_system
    own.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:  # a crashed daemon's file:
        dead.bind(str(own / "producer.sock"))                      # bound, then nobody listens
    fake = FakeProducer()
    fake.generation = 7
    server = serve_at(system, fake)
    try:
        assert last_json(run("--json", "status", "producer"))["producer"]["generation"] == 7
    finally:
        server.close()


def test_nothing_answering_names_every_socket_tried_and_creates_no_system_dir(shell_and_system):
    own, system = shell_and_system
    r = run("--json", "status", "producer")
    assert r.exit_code == 3
    msg = last_json(r)["errors"]["producer"]["message"]
    assert f"ipc://{own}/producer.sock" in msg and f"ipc://{system}/producer.sock" in msg, msg
    r = run("label", "x")
    assert r.exit_code == 3
    assert f"ipc://{own}/producer.sock" in r.output and f"ipc://{system}/producer.sock" in r.output
    assert not system.exists() and not own.exists()


def test_logs_follow_finds_the_log_socket_next_to_a_system_daemon(shell_and_system, monkeypatch):
    own, system = shell_and_system
    server = serve_at(system, FakeProducer())
    log = logs.setup_daemon_logging("producer", f"ipc://{system}/producer.log.sock",
                                    stream=open(os.devnull, "w"))
    stop = threading.Event()

    def keep_logging():  # slow joiner: log until the follower has what it needs
        while not stop.wait(0.05):
            log.info("from /run/mmfeed")

    t = threading.Thread(target=keep_logging)
    t.start()
    try:
        r = run("--json", "logs", "-f", "--count", "1")
    finally:
        stop.set()
        t.join()
        logs.close_daemon_logging()
        server.close()
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.splitlines()[-1])["msg"] == "from /run/mmfeed"


def test_logs_follow_without_a_log_socket_names_the_log_sockets_tried(shell_and_system,
                                                                      monkeypatch):
    own, system = shell_and_system
    monkeypatch.setenv("PATH", str(own.parent))  # no journalctl to fall back to
    r = run("logs", "-f", "producer")
    assert r.exit_code == 3
    assert f"ipc://{own}/producer.log.sock" in r.output
    assert f"ipc://{system}/producer.log.sock" in r.output


def test_logs_follow_over_tcp_without_keys_is_a_usage_error(rundir):
    r = run("--producer", "tcp://127.0.0.1:5999", "logs", "-f")
    assert r.exit_code == 2 and "tcp://127.0.0.1:6000" in r.output and "--keys" in r.output


def test_logs_says_when_older_records_were_left_out_of_a_bounded_reply(producer, rundir):
    log = logs.setup_daemon_logging("producer", None, stream=open(os.devnull, "w"))
    try:
        for i in range(400):
            log.warning("refused %s", "x" * 4000, extra={"i": i})
        r = CliRunner().invoke(main, ["--timeout", "5", "logs", "-n", "400"])
        assert r.exit_code == 0 and "older records left out" in r.stderr
        out = last_json(CliRunner().invoke(main, ["--timeout", "5", "--json", "logs", "-n", "400"]))
        assert out["truncated"] is True and out["omitted"] + len(out["records"]) == 400
        assert out["records"][-1]["fields"]["i"] == 399
    finally:
        logs.close_daemon_logging()


# --- request ids ------------------------------------------------------------------------------


class DroppingDaemon:
    """A ROUTER standing in for a daemon that is slow: it ignores the first `drop` requests it
    receives (their clients time out) and answers the rest, recording every request body."""

    def __init__(self, endpoint: str, drop: int):
        import zmq

        self.received: list[dict] = []
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(endpoint)
        self._drop = drop
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(20):
                continue
            ident, empty, body = self._sock.recv_multipart()
            msg = json.loads(body)
            self.received.append(msg)
            if len(self.received) > self._drop:
                reply = {"ok": True, "id": msg.get("id"), "generation": 2}
                self._sock.send_multipart([ident, empty, json.dumps(reply).encode()])

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close(linger=0)
        self._ctx.term()


def test_each_mmctl_command_sends_a_new_request_id(rundir):
    fake = DroppingDaemon(paths.control_endpoint("producer"), drop=0)
    try:
        for _ in range(2):
            assert run("--json", "label", "a").exit_code == 0
    finally:
        fake.close()
    ids = [m.get("id") for m in fake.received]
    assert len(ids) == 2 and ids[0] != ids[1]
    assert all(isinstance(i, str) and len(i) == 32 for i in ids)


def test_a_retry_after_a_timeout_repeats_the_request_id(rundir):
    # The daemon answers only the retry; the retry must be recognisable as the same request.
    fake = DroppingDaemon(paths.control_endpoint("producer"), drop=1)
    try:
        r = CliRunner().invoke(main, ["--json", "--timeout", "1", "label", "a"])
    finally:
        fake.close()
    assert r.exit_code == 0, r.output
    assert last_json(r)["generation"] == 2 and "id" not in last_json(r)
    first, retry = fake.received
    assert first == retry and first["id"]


def test_keygen_into_a_folder_that_cannot_be_made_is_a_usage_error_naming_it(tmp_path):
    # A file where a folder is expected: mmctl printed a NotADirectoryError traceback.
    # Found by bench.faults.
    (tmp_path / "file").write_text("x")
    target = tmp_path / "file" / "keys"
    r = run("--json", "keygen", str(target))
    assert r.exit_code == 2, r.output
    err = json.loads(r.output.strip().splitlines()[-1])["error"]
    assert err["code"] == "bad_argument" and str(target) in err["message"]
    assert "Not a directory" in err["message"]
