"""Daemon logs: one structured line per record, journal priorities under systemd, and the
same records over a real ZeroMQ PUB socket and in the in-memory ring."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
import zmq

from protocol import logs
from protocol.control import ControlClient, ControlServer, Timeouts

LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (INFO|WARNING|ERROR|DEBUG|CRITICAL) \w+ ")


@pytest.fixture
def sockdir():
    d = Path(tempfile.mkdtemp(prefix=f"mml{os.getpid()}-{uuid.uuid4().hex[:6]}-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def logfile(sockdir):
    # A real file as stderr, so fstat() gives the dev:inode that JOURNAL_STREAM compares.
    f = open(sockdir / "stderr.log", "w+")
    yield f
    logs.close_daemon_logging()
    f.close()


def lines(f) -> list[str]:
    f.flush()
    f.seek(0)
    return f.read().splitlines()


def test_records_are_one_structured_line_on_stderr(logfile, monkeypatch):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    log = logs.setup_daemon_logging("producer", None, stream=logfile)
    log.info("new generation", extra={"generation": 4, "filter": "resize=64x64,gray", "note": "a b"})
    try:
        raise ValueError("bad frame")
    except ValueError:
        log.exception("source failed")
    out = lines(logfile)
    assert len(out) == 2  # the traceback stays on the record's one line
    assert LINE.match(out[0])
    assert " INFO producer new generation generation=4 " in out[0]
    assert 'filter="resize=64x64,gray"' in out[0] and 'note="a b"' in out[0]
    assert LINE.match(out[1]) and " ERROR producer source failed exc=" in out[1]
    assert "ValueError: bad frame" in out[1]


def test_journal_gets_syslog_priority_prefixes(logfile, monkeypatch):
    st = os.fstat(logfile.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    log = logs.setup_daemon_logging("trainer", None, level="DEBUG", stream=logfile)
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    log.critical("c")
    prefixes = [line[: line.index(">") + 1] for line in lines(logfile)]
    assert prefixes == ["<7>", "<6>", "<4>", "<3>", "<2>"]
    assert LINE.match(lines(logfile)[1][3:])


def test_inherited_journal_stream_for_another_stream_adds_no_prefix(logfile, monkeypatch):
    # A child whose stderr was redirected inherits JOURNAL_STREAM but not the journal.
    monkeypatch.setenv("JOURNAL_STREAM", "1:1")
    logs.setup_daemon_logging("trainer", None, stream=logfile).info("hello")
    assert LINE.match(lines(logfile)[0])


def test_level_filters_records(logfile):
    log = logs.setup_daemon_logging("producer", None, level="WARNING", stream=logfile)
    log.info("quiet")
    log.warning("loud")
    assert [line.split(" ", 3)[3] for line in lines(logfile)] == ["loud"]


def test_recent_keeps_the_last_records_oldest_first(logfile):
    log = logs.setup_daemon_logging("producer", None, stream=logfile, keep=5)
    for i in range(8):
        log.info("tick", extra={"i": i})
    assert [r["fields"]["i"] for r in logs.recent(3)] == [5, 6, 7]
    assert [r["fields"]["i"] for r in logs.recent(100)] == [3, 4, 5, 6, 7]
    rec = logs.recent(1)[0]
    assert rec["daemon"] == "producer" and rec["level"] == "INFO" and rec["msg"] == "tick"
    assert logs.format_record(rec).endswith("INFO producer tick i=7")


def test_logs_command_serves_recent_records_over_control(logfile, sockdir):
    log = logs.setup_daemon_logging("producer", None, stream=logfile)
    log.warning("ring replaced", extra={"epoch": 9})
    with ControlServer(f"ipc://{sockdir}/c.sock", {"logs": logs.logs_command()}) as server:
        server.serve_in_thread(poll_ms=20)
        with ControlClient(server.endpoint, Timeouts(0.5, 0)) as c:
            records = c.request("logs", n=10)["records"]
    assert any(r["msg"] == "ring replaced" and r["fields"] == {"epoch": 9} for r in records)


def test_a_logs_reply_stays_under_its_byte_bound_and_says_it_was_truncated(logfile, sockdir):
    # 1,000 records of 4 KiB each are 4 MiB; the reply keeps the newest that fit in the bound.
    log = logs.setup_daemon_logging("producer", None, stream=logfile)
    for i in range(1000):
        log.warning("refused %s", "x" * 4000, extra={"i": i})
    with ControlServer(f"ipc://{sockdir}/c.sock", {"logs": logs.logs_command()}) as server:
        server.serve_in_thread(poll_ms=20)
        sock = zmq.Context.instance().socket(zmq.REQ)
        sock.connect(server.endpoint)
        sock.send(json.dumps({"v": 1, "cmd": "logs", "args": {"n": 1000}}).encode())
        assert sock.poll(5000)
        raw = sock.recv()
        sock.close(linger=0)
    reply = json.loads(raw)
    assert len(raw) <= logs.LOGS_REPLY_MAX_BYTES + 1024
    assert reply["truncated"] is True and reply["omitted"] > 0
    assert reply["omitted"] + len(reply["records"]) == 1000
    assert reply["records"][-1]["fields"]["i"] == 999  # the newest are the ones kept


def test_records_are_clipped_so_a_huge_message_cannot_fill_memory_or_the_log(logfile):
    log = logs.setup_daemon_logging("producer", None, stream=logfile)
    log.warning("refused: %s", "y" * 1_000_000, extra={"payload": "z" * 100_000,
                                                      "big": 10 ** 5000})
    rec = logs.recent(1)[0]
    assert len(rec["msg"]) < logs.MAX_MSG_CHARS + 100
    assert len(rec["fields"]["payload"]) < logs.MAX_FIELD_CHARS + 100
    assert rec["fields"]["big"].startswith("<an integer of")
    assert len(lines(logfile)[0]) < logs.MAX_MSG_CHARS + 3 * logs.MAX_FIELD_CHARS


def test_published_records_reach_a_subscriber(logfile, sockdir):
    endpoint = f"ipc://{sockdir}/producer.log.sock"
    log = logs.setup_daemon_logging("producer", endpoint, stream=logfile)
    assert stat.S_IMODE((sockdir / "producer.log.sock").stat().st_mode) == 0o600
    got: list[dict] = []

    def subscriber():
        for rec in logs.follow(endpoint, timeout=10):
            got.append(rec)
            return

    t = threading.Thread(target=subscriber)
    t.start()
    # Slow joiner: records published before the subscription lands are lost by design, so
    # keep logging until one arrives or the deadline passes.
    deadline = time.monotonic() + 10
    while t.is_alive() and time.monotonic() < deadline:
        log.info("heartbeat", extra={"seq": 1})
        t.join(0.05)
    t.join(11)
    assert got, "no record reached the subscriber within 10 s"
    rec = got[0]
    assert rec["daemon"] == "producer" and rec["msg"] == "heartbeat" and rec["fields"] == {"seq": 1}
    json.dumps(rec)  # plain JSON all the way


def test_follow_ends_after_its_idle_timeout(sockdir):
    endpoint = f"ipc://{sockdir}/silent.log.sock"
    assert list(logs.follow(endpoint, timeout=0.2)) == []


def test_publishing_never_blocks_without_subscribers(logfile, sockdir):
    log = logs.setup_daemon_logging("producer", f"ipc://{sockdir}/p.log.sock", stream=logfile)
    for i in range(5 * logs.PUB_HWM):
        log.info("burst", extra={"i": i})
    assert logs.recent(1)[0]["fields"]["i"] == 5 * logs.PUB_HWM - 1


def test_close_removes_the_pub_socket_file(logfile, sockdir):
    logs.setup_daemon_logging("producer", f"ipc://{sockdir}/q.log.sock", stream=logfile)
    assert (sockdir / "q.log.sock").exists()
    logs.close_daemon_logging()
    assert not (sockdir / "q.log.sock").exists()
    assert not any(getattr(h, "_mmfeed_handler", False) for h in logging.getLogger().handlers)
