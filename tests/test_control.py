"""The control protocol over real ZeroMQ sockets: what a client can get wrong gets an error
reply naming it, changes nothing, and never ends the server loop."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import zmq

from protocol import paths
from protocol.control import (
    CONTROL_VERSION,
    MAX_MESSAGE_BYTES,
    TRANSPORT_MAX_BYTES,
    Arg,
    Command,
    ControlClient,
    ControlServer,
    CurveClientKeys,
    CurveServerKeys,
    DaemonSockets,
    Timeouts,
    daemon_sockets,
    keygen,
)
from protocol.errors import BadArgument, ControlError, ControlTimeout, RemoteError

sys.path.insert(0, str(Path(__file__).parent))
from _control_wire import raw_request  # noqa: E402

QUICK = Timeouts(request=0.5, retries=0)


@pytest.fixture
def sockdir():
    # Short and unique: unix socket paths are limited to 107 bytes, tmp_path can be longer.
    d = Path(tempfile.mkdtemp(prefix=f"mmc{os.getpid()}-{uuid.uuid4().hex[:6]}-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


class Daemon:
    """A tiny stand-in daemon: a generation counter with a filter command."""

    def __init__(self):
        self.generation = 0
        self.spec = "none"

    def on_filter(self, spec):
        if spec == "sepia":
            raise BadArgument(f"filter {spec!r}: unknown operation; accepted: gray, rgb")
        self.spec = spec
        self.generation += 1
        return {"generation": self.generation}

    def on_boom(self):
        raise ZeroDivisionError("handler bug")

    def commands(self):
        return {
            "filter": Command(self.on_filter, args={"spec": str}),
            "status": Command(lambda: {"generation": self.generation, "spec": self.spec}),
            "scale": Command(lambda factor, n: {"product": factor * n},
                             args={"factor": float, "n": Arg(int, required=False, default=2)}),
            "boom": Command(self.on_boom),
        }


@pytest.fixture
def served(sockdir):
    daemon = Daemon()
    server = ControlServer(f"ipc://{sockdir}/d.sock", daemon.commands())
    server.serve_in_thread(poll_ms=20)
    yield daemon, server
    server.close()


def still_answers(server: ControlServer, daemon: Daemon) -> None:
    with ControlClient(server.endpoint, QUICK) as c:
        assert c.request("status") == {"ok": True, "generation": daemon.generation, "spec": daemon.spec}


def test_command_reply_carries_the_handler_result(served):
    daemon, server = served
    with ControlClient(server.endpoint, QUICK) as c:
        assert c.request("filter", spec="gray") == {"ok": True, "generation": 1}
        assert c.request("status")["spec"] == "gray"


@pytest.mark.parametrize("payload, code, words", [
    (b"\xff\xfe\x00garbage", "malformed", "not UTF-8"),
    (b"{not json", "malformed", "not JSON"),
    (b'["filter", "gray"]', "malformed", "JSON list"),
    (b'{"cmd": "status", "args": {}}', "malformed", '"v"'),
    (b'{"v": 1, "args": {}}', "malformed", '"cmd"'),
    (b'{"v": 1, "cmd": "filter", "args": ["gray"]}', "malformed", '"args"'),
    (b'{"v": 1, "cmd": "status", "args": {}, "x": 1}', "malformed", "'x'"),
    (b'{"v": 1, "cmd": "scale", "args": {"factor": NaN}}', "malformed", "NaN"),
    (b'{"v": 1, "cmd": "scale", "args": {"factor": 1e999}}', "malformed", "out of range"),
    (b"[" * 2048, "malformed", "nests lists or objects deeper"),
    (b'{"v": 1, "cmd": "scale", "args": {"factor": ' + b"7" * 4301 + b"}}", "malformed",
     "integer of 4301 digits"),
    (b'{"v": 1, "id": 7, "cmd": "status", "args": {}}', "malformed", '"id" must be a string'),
    (b'{"v": 1, "id": "' + b"x" * 65 + b'", "cmd": "status"}', "malformed", "1 to 64 characters"),
], ids=["garbage", "not-json", "array", "no-version", "no-cmd", "args-list", "extra-field", "nan",
        "float-overflow", "nested-2kb", "int-4301-digits", "id-not-a-string", "id-too-long"])
def test_malformed_message_gets_an_error_and_changes_nothing(served, payload, code, words):
    daemon, server = served
    reply = raw_request(server.endpoint, payload)
    assert reply["ok"] is False and reply["error"]["code"] == code
    assert words in reply["error"]["message"]
    assert daemon.generation == 0
    still_answers(server, daemon)


def test_wrong_version_is_refused_naming_both_versions(served):
    daemon, server = served
    reply = raw_request(server.endpoint, json.dumps({"v": 99, "cmd": "filter", "args": {"spec": "gray"}}).encode())
    assert reply["error"]["code"] == "version_mismatch"
    assert "99" in reply["error"]["message"] and f"version {CONTROL_VERSION}" in reply["error"]["message"]
    assert daemon.generation == 0
    still_answers(server, daemon)


def test_oversized_message_gets_too_large_and_server_still_answers(served):
    daemon, server = served
    big = json.dumps({"v": 1, "cmd": "filter", "args": {"spec": "x" * (MAX_MESSAGE_BYTES + 10)}}).encode()
    reply = raw_request(server.endpoint, big)
    assert reply["error"]["code"] == "too_large"
    assert str(MAX_MESSAGE_BYTES) in reply["error"]["message"]
    assert daemon.generation == 0
    still_answers(server, daemon)


def test_message_beyond_transport_limit_drops_only_that_peer(served):
    # ZMQ_MAXMSGSIZE cuts the connection before the bytes are buffered: that peer gets no
    # reply (a memory guard), while every other client is still served.
    daemon, server = served
    huge = b"{" + b" " * (TRANSPORT_MAX_BYTES + 1) + b"}"
    assert raw_request(server.endpoint, huge, timeout_ms=500) is None
    still_answers(server, daemon)


def test_client_refuses_to_send_an_oversized_request(served):
    _, server = served
    with ControlClient(server.endpoint, QUICK) as c, pytest.raises(ControlError, match="limit"):
        c.request("filter", spec="x" * MAX_MESSAGE_BYTES)


def test_unknown_command_changes_nothing_and_lists_known_commands(served):
    daemon, server = served
    with ControlClient(server.endpoint, QUICK) as c:
        with pytest.raises(RemoteError) as e:
            c.request("reboot")
    assert e.value.code == "unknown_command"
    assert "reboot" in str(e.value) and "filter, scale, status" in str(e.value)
    assert daemon.generation == 0
    still_answers(server, daemon)


@pytest.mark.parametrize("args, words", [
    ({"spec": 3}, "'spec' must be a string, got int"),
    ({}, "missing argument 'spec'"),
    ({"spec": "gray", "speed": 2}, "unknown argument 'speed'; accepted: spec (a string)"),
], ids=["wrong-type", "missing", "unknown"])
def test_bad_argument_names_the_argument_and_what_is_accepted(served, args, words):
    daemon, server = served
    with ControlClient(server.endpoint, QUICK) as c, pytest.raises(RemoteError) as e:
        c.request("filter", **args)
    assert e.value.code == "bad_argument" and words in str(e.value)
    assert daemon.generation == 0
    still_answers(server, daemon)


def test_numbers_follow_json_types(served):
    # An int is a fine float; a bool is never a number; defaults fill optional arguments.
    _, server = served
    with ControlClient(server.endpoint, QUICK) as c:
        assert c.request("scale", factor=3)["product"] == 6
        assert c.request("scale", factor=0.5, n=4)["product"] == 2.0
        with pytest.raises(RemoteError, match="'factor' must be a number"):
            c.request("scale", factor=True)
        with pytest.raises(RemoteError, match="'n' must be an integer"):
            c.request("scale", factor=1.0, n=2.5)


def test_handler_refusal_is_an_error_reply_and_changes_nothing(served):
    daemon, server = served
    with ControlClient(server.endpoint, QUICK) as c, pytest.raises(RemoteError) as e:
        c.request("filter", spec="sepia")
    assert e.value.code == "bad_argument" and "accepted: gray, rgb" in str(e.value)
    assert daemon.generation == 0


def test_handler_exception_becomes_internal_error_and_is_logged(served, caplog):
    daemon, server = served
    with ControlClient(server.endpoint, QUICK) as c, pytest.raises(RemoteError) as e:
        c.request("boom")
    assert e.value.code == "internal" and "ZeroDivisionError: handler bug" in str(e.value)
    assert any(r.exc_info and r.exc_info[0] is ZeroDivisionError for r in caplog.records)
    still_answers(server, daemon)


def test_handler_failures_are_logged_once_however_often_they_happen(served, caplog):
    # Each failure still gets its own `internal` reply; the log gets one traceback per kind
    # and window (the rest are counted, then summarised), and the server goes on.
    daemon, server = served
    with ControlClient(server.endpoint, QUICK) as c:
        for _ in range(30):
            with pytest.raises(RemoteError) as e:
                c.request("boom")
            assert e.value.code == "internal"
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and server.internal_errors == 30
    still_answers(server, daemon)


def test_refused_requests_are_logged_rate_limited_and_clipped(served, caplog):
    from protocol.control import LOG_PAYLOAD_CHARS, REFUSED_LOG_BURST

    daemon, server = served
    name = "n" * 20000
    with ControlClient(server.endpoint, QUICK) as c:
        for _ in range(200):
            with pytest.raises(RemoteError) as e:
                c.request(name)
            assert e.value.code == "unknown_command" and len(str(e.value)) < 400
    refused = [r for r in caplog.records if r.name == "protocol.control"]
    assert len(refused) == REFUSED_LOG_BURST
    assert all(len(r.getMessage()) < LOG_PAYLOAD_CHARS + 200 for r in refused)
    still_answers(server, daemon)


def test_the_log_limiter_writes_one_suppressed_line_when_its_window_ends(caplog):
    import logging

    from protocol.logs import LogLimiter

    now = [0.0]
    limiter = LogLimiter(logging.getLogger("mmfeed.test.limiter"), burst=3, window_s=60,
                         clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="mmfeed.test.limiter"):
        logged = [limiter.log("bad_argument", logging.WARNING, "refused %d", i) for i in range(50)]
        assert logged == [True] * 3 + [False] * 47 and len(caplog.records) == 3
        limiter.flush()  # the window is not over: nothing yet
        assert len(caplog.records) == 3
        now[0] = 61.0
        limiter.flush()
        assert len(caplog.records) == 4 and "suppressed 47 similar" in caplog.records[-1].getMessage()
        assert limiter.log("bad_argument", logging.WARNING, "refused again")  # a new window
        now[0] = 200.0
        limiter.flush()  # nothing was suppressed in that window: no summary line
        assert [r.getMessage() for r in caplog.records][-1] == "refused again"


# --- request ids: a retry is answered, never run twice ----------------------------------------


def _with_id(rid: str, cmd: str, **args) -> bytes:
    return json.dumps({"v": CONTROL_VERSION, "id": rid, "cmd": cmd, "args": args}).encode()


def test_a_repeated_request_id_is_answered_from_the_cache_without_running_again(served):
    daemon, server = served
    first = raw_request(server.endpoint, _with_id("req-1", "filter", spec="gray"))
    again = raw_request(server.endpoint, _with_id("req-1", "filter", spec="gray"))
    assert first == again == {"ok": True, "generation": 1, "id": "req-1"}
    assert daemon.generation == 1 and server.replies.hits == 1
    assert raw_request(server.endpoint, _with_id("req-2", "filter", spec="gray"))["generation"] == 2


def test_a_request_without_an_id_still_works_and_is_never_cached(served):
    daemon, server = served
    body = json.dumps({"v": CONTROL_VERSION, "cmd": "filter", "args": {"spec": "gray"}}).encode()
    assert raw_request(server.endpoint, body) == {"ok": True, "generation": 1}
    assert raw_request(server.endpoint, body) == {"ok": True, "generation": 2}
    assert len(server.replies) == 0


def test_an_id_reused_for_another_request_is_refused_and_changes_nothing(served):
    daemon, server = served
    raw_request(server.endpoint, _with_id("same", "filter", spec="gray"))
    reply = raw_request(server.endpoint, _with_id("same", "filter", spec="rgb"))
    assert reply["ok"] is False and reply["error"]["code"] == "malformed"
    assert "already used for another request" in reply["error"]["message"]
    assert daemon.generation == 1 and daemon.spec == "gray"


def test_the_reply_cache_is_bounded_in_entries_and_in_bytes():
    from protocol.control import ReplyCache

    cache = ReplyCache(entries=256, max_bytes=64 * 1024)
    for i in range(1000):
        cache.put(f"id{i}", b"d", b"x" * 100)
    assert len(cache) == 256 and cache.get("id999", b"d") is not None and cache.get("id0", b"d") is None
    for i in range(1000):
        cache.put(f"big{i}", b"d", b"y" * 10000)
    assert cache.bytes <= 64 * 1024 and len(cache) == 6
    cache.put("huge", b"d", b"z" * 20000)  # over a quarter of the budget: not kept
    assert cache.get("huge", b"d") is None


SLOW_SERVER_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from protocol.control import ControlServer, Command
    runs = Path(sys.argv[2])
    def create():
        time.sleep(float(sys.argv[3]))   # a handler slower than the client's timeout
        with runs.open("a") as f:
            f.write("run\\n")
        return {"generation": len(runs.read_text().splitlines())}
    server = ControlServer(sys.argv[1], {
        "create": Command(create),
        "stats": Command(lambda: {"cache_hits": server.replies.hits,
                                  "runs": len(runs.read_text().splitlines())}),
    })
    print("ready", flush=True)
    while True:
        server.poll(100)
""")


def test_a_command_slower_than_the_client_timeout_runs_exactly_once(sockdir):
    # The client gives up on its first socket after 0.25 s and retries on fresh ones; the
    # handler takes 1 s. Every retry carries the request's id: the daemon runs the command
    # once and answers the retry waiting when it is done from its reply cache.
    runs = sockdir / "runs.txt"
    runs.write_text("")
    endpoint = f"ipc://{sockdir}/slow.sock"
    p = subprocess.Popen([sys.executable, "-c", SLOW_SERVER_SCRIPT, endpoint, str(runs), "1.0"],
                         stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        assert p.stdout.readline().strip() == "ready"
        with ControlClient(endpoint, Timeouts(request=0.25, retries=80)) as c:
            assert c.request("create") == {"ok": True, "generation": 1}
            stats = c.request("stats")
        assert stats["runs"] == 1 and runs.read_text() == "run\n"
        assert stats["cache_hits"] >= 1  # the reply came from the cache, to a retry
    finally:
        p.kill()
        p.wait()


def test_plain_callable_takes_its_spec_from_the_signature(sockdir):
    def on_segment(start: float, end: float, loop: bool = False):
        return {"span": end - start, "loop": loop}

    with ControlServer(f"ipc://{sockdir}/sig.sock", {"segment": on_segment}) as server:
        server.serve_in_thread(poll_ms=20)
        with ControlClient(server.endpoint, QUICK) as c:
            assert c.request("segment", start=1, end=3.5) == {"ok": True, "span": 2.5, "loop": False}
            with pytest.raises(RemoteError, match="'end' must be a number"):
                c.request("segment", start=1, end="soon")


def test_poll_from_a_main_loop_answers_pending_requests(sockdir):
    # The daemon-main-loop style: no thread, poll() between units of work.
    server = ControlServer(f"ipc://{sockdir}/p.sock", {"ping": Command(lambda: {"pong": 1})})
    try:
        assert server.poll(0) == 0
        ctx = zmq.Context.instance()
        req = ctx.socket(zmq.REQ)
        req.connect(server.endpoint)
        req.send(json.dumps({"v": 1, "cmd": "ping", "args": {}}).encode())
        deadline = time.monotonic() + 5
        while server.handled == 0 and time.monotonic() < deadline:
            server.poll(50)
        assert json.loads(req.recv()) == {"ok": True, "pong": 1}
        req.close(linger=0)
    finally:
        server.close()


def test_ipc_socket_is_private_and_removed_on_close(sockdir):
    server = ControlServer(f"ipc://{sockdir}/m.sock", {})
    path = sockdir / "m.sock"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    server.close()
    assert not path.exists()


def test_group_setting_makes_the_socket_group_readable(sockdir):
    import grp

    group = grp.getgrgid(os.getgid()).gr_name  # a group this process may chgrp to
    with ControlServer(f"ipc://{sockdir}/g.sock", {}, group=group):
        st = (sockdir / "g.sock").stat()
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == os.getgid()


def test_unknown_group_is_a_clear_error(sockdir):
    with pytest.raises(ControlError, match="group 'no-such-group-mmfeed' does not exist"):
        ControlServer(f"ipc://{sockdir}/g.sock", {}, group="no-such-group-mmfeed")
    assert not (sockdir / "g.sock").exists()


def test_second_server_on_a_live_socket_is_refused(sockdir):
    with ControlServer(f"ipc://{sockdir}/x.sock", {}):
        with pytest.raises(paths.EndpointInUse, match="live process"):
            ControlServer(f"ipc://{sockdir}/x.sock", {})


def test_tcp_without_curve_keys_is_refused():
    with pytest.raises(ControlError, match="CURVE"):
        ControlServer("tcp://127.0.0.1:0", {})
    with pytest.raises(ControlError, match="mmctl keygen"):
        ControlClient("tcp://127.0.0.1:5555")


def test_client_times_out_against_a_socket_nobody_serves(sockdir):
    endpoint = f"ipc://{sockdir}/producer.sock"
    with ControlClient(endpoint, Timeouts(request=0.2, retries=1)) as c:
        with pytest.raises(ControlTimeout) as e:
            c.request("status")
    msg = str(e.value)
    assert endpoint in msg and "does not exist" in msg and "mm-producer run" in msg


def test_client_timeout_reports_elapsed_time_and_attempts(sockdir):
    # A bound socket nobody answers: the daemon is there but stuck.
    ctx = zmq.Context.instance()
    rep = ctx.socket(zmq.REP)
    endpoint = f"ipc://{sockdir}/trainer.sock"
    rep.bind(endpoint)
    try:
        with ControlClient(endpoint, Timeouts(request=0.2, retries=1)) as c:
            with pytest.raises(ControlTimeout, match=r"after \d+\.\d s \(2 attempts of 0.2 s\).*busy or stuck"):
                c.request("status")
    finally:
        rep.close(linger=0)


SERVER_SCRIPT = textwrap.dedent("""
    import os, sys
    from protocol.control import ControlServer, Command
    server = ControlServer(sys.argv[1], {
        "ping": Command(lambda: {"pid": os.getpid()}),
        "die": Command(lambda: os._exit(1)),   # dies holding the request: no reply ever
    })
    print("ready", flush=True)
    while True:
        server.poll(100)
""")


def start_server(endpoint: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", SERVER_SCRIPT, endpoint], stdout=subprocess.PIPE,
                         text=True, cwd=Path(__file__).resolve().parents[1])
    assert p.stdout.readline().strip() == "ready"
    return p


def test_client_recovers_after_the_daemon_restarts(sockdir):
    endpoint = f"ipc://{sockdir}/r.sock"
    first = start_server(endpoint)
    second = None
    try:
        with ControlClient(endpoint, Timeouts(request=1.0, retries=0)) as c:
            assert c.request("ping")["pid"] == first.pid
            # The daemon dies while holding our request: our REQ socket now waits for a reply
            # that never comes, and could never send again if it were kept.
            with pytest.raises(ControlTimeout):
                c.request("die")
            first.wait(timeout=10)
            second = start_server(endpoint)  # replaces the stale socket file
            assert c.request("ping")["pid"] == second.pid
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


# --- CURVE ------------------------------------------------------------------------------


@pytest.fixture
def curve_server(sockdir):
    keygen(sockdir / "keys")
    keys = sockdir / "keys"
    server = ControlServer("tcp://127.0.0.1:0", {"ping": Command(lambda: {"pong": True})},
                           curve=CurveServerKeys(keys / "server.key_secret", keys / "clients"))
    server.serve_in_thread(poll_ms=20)
    yield server, keys
    server.close()


def test_curve_client_with_an_allowed_key_gets_replies(curve_server):
    server, keys = curve_server
    assert stat.S_IMODE((keys / "client.key_secret").stat().st_mode) == 0o600
    with ControlClient(server.endpoint, QUICK, curve=CurveClientKeys.from_dir(keys)) as c:
        assert c.request("ping") == {"ok": True, "pong": True}


def test_curve_client_with_an_unknown_key_gets_no_reply(curve_server, sockdir):
    server, keys = curve_server
    other = sockdir / "other"
    keygen(other, names=("client",))  # a well-formed key the server was never given
    curve = CurveClientKeys(keys / "server.key", other / "client.key_secret")
    with ControlClient(server.endpoint, Timeouts(request=0.5, retries=0), curve=curve) as c:
        with pytest.raises(ControlTimeout, match="CURVE keys"):
            c.request("ping")


def test_plain_client_without_keys_gets_no_reply_from_curve_server(curve_server):
    server, _ = curve_server
    assert raw_request(server.endpoint, b'{"v": 1, "cmd": "ping", "args": {}}', timeout_ms=500) is None


def test_curve_server_keys_from_a_keygen_folder_serve_its_client(sockdir):
    keys = sockdir / "keys"
    keygen(keys)
    server_keys = CurveServerKeys.from_dir(keys)
    assert server_keys == CurveServerKeys(keys / "server.key_secret", keys / "clients")
    with ControlServer("tcp://127.0.0.1:0", {"ping": Command(lambda: {"pong": True})},
                       curve=server_keys) as server:
        server.serve_in_thread(poll_ms=20)
        with ControlClient(server.endpoint, QUICK, curve=CurveClientKeys.from_dir(keys)) as c:
            assert c.request("ping") == {"ok": True, "pong": True}


@pytest.mark.parametrize("damage, words", [
    (lambda d: shutil.rmtree(d), "does not exist"),
    (lambda d: (d / "server.key_secret").unlink(), "no server.key_secret"),
    (lambda d: (d / "server.key_secret").write_text("not a key\n"), "server.key_secret"),
    (lambda d: shutil.copy(d / "server.key", d / "server.key_secret"), "holds no secret key"),
    (lambda d: (d / "clients" / "client.key").unlink(), "clients/ holds no *.key"),
], ids=["no-folder", "no-secret", "garbled-secret", "public-as-secret", "no-clients"])
def test_curve_key_folder_that_is_not_keygens_layout_is_refused_naming_the_file(sockdir, damage,
                                                                                 words):
    keys = sockdir / "keys"
    keygen(keys)
    damage(keys)
    with pytest.raises(ControlError) as e:
        CurveServerKeys.from_dir(keys)
    assert words in str(e.value) and str(keys) in str(e.value), e.value


# --- where a daemon binds (protocol.control.daemon_sockets, protocol.paths) ------------------


@pytest.mark.parametrize("control, logs", [
    ("ipc:///run/mmfeed/producer.sock", "ipc:///run/mmfeed/producer.log.sock"),
    ("ipc:///tmp/x/ctl.sock", "ipc:///tmp/x/ctl.log.sock"),
    ("ipc:///tmp/x/ctl", "ipc:///tmp/x/ctl.log.sock"),
    ("tcp://10.0.0.5:6000", "tcp://10.0.0.5:6001"),
    ("tcp://*:6000", "tcp://*:6001"),
    ("tcp://127.0.0.1:0", "tcp://127.0.0.1:0"),
])
def test_log_socket_sits_next_to_the_control_socket(control, logs):
    assert paths.log_endpoint_for(control) == logs


@pytest.mark.parametrize("control, words", [
    ("tcp://127.0.0.1:65535", "last one"),
    ("inproc://producer", "give the log endpoint explicitly"),
])
def test_log_socket_that_cannot_go_next_to_the_control_socket_is_an_error(control, words):
    with pytest.raises(ControlError, match=words):
        paths.log_endpoint_for(control)


def test_daemon_sockets_default_to_the_runtime_dir(sockdir, monkeypatch):
    monkeypatch.setenv("MMFEED_RUNTIME_DIR", str(sockdir))
    socks = daemon_sockets("trainer")
    assert socks == DaemonSockets(f"ipc://{sockdir}/trainer.sock",
                                  f"ipc://{sockdir}/trainer.log.sock")


def test_daemon_sockets_refuse_tcp_without_a_curve_dir_naming_the_option():
    with pytest.raises(ControlError, match="--curve-dir") as e:
        daemon_sockets("producer", control="tcp://127.0.0.1:6000")
    assert "tcp://127.0.0.1:6000" in str(e.value)
    with pytest.raises(ControlError, match="--curve-dir"):  # the log socket alone is TCP
        daemon_sockets("producer", control="ipc:///tmp/x.sock", logs="tcp://127.0.0.1:6001")


def test_daemon_sockets_put_curve_keys_on_the_tcp_sockets_only(sockdir):
    keygen(sockdir / "keys")
    keys = CurveServerKeys.from_dir(sockdir / "keys")
    socks = daemon_sockets("producer", control="tcp://127.0.0.1:6000", curve_dir=sockdir / "keys")
    assert socks == DaemonSockets("tcp://127.0.0.1:6000", "tcp://127.0.0.1:6001", keys, keys)
    socks = daemon_sockets("producer", control="tcp://127.0.0.1:6000",
                           logs=f"ipc://{sockdir}/p.log.sock", curve_dir=sockdir / "keys")
    assert socks.control_curve == keys and socks.logs_curve is None
