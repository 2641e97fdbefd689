"""sd_notify against a real AF_UNIX datagram socket standing in for systemd."""
from __future__ import annotations

import os
import socket
import tempfile
import uuid
from pathlib import Path

import pytest

from protocol.notify import Notifier, watchdog_interval


@pytest.fixture
def systemd(monkeypatch):
    """A bound datagram socket at a unique path, named by NOTIFY_SOCKET."""
    path = Path(tempfile.gettempdir()) / f"mmn-{os.getpid()}-{uuid.uuid4().hex[:8]}.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield s
    s.close()
    path.unlink(missing_ok=True)


def test_ready_watchdog_status_stopping_arrive_as_datagrams(systemd):
    n = Notifier()
    assert n.enabled
    assert n.ready(status="ring up")
    assert systemd.recv(4096) == b"READY=1\nSTATUS=ring up"
    assert n.watchdog()
    assert systemd.recv(4096) == b"WATCHDOG=1"
    assert n.status("generation 3\nsecond line")
    assert systemd.recv(4096) == b"STATUS=generation 3 second line"  # one assignment, not two
    assert n.stopping()
    assert systemd.recv(4096) == b"STOPPING=1"
    assert n.reloading()
    msg = systemd.recv(4096).decode().split("\n")
    assert msg[0] == "RELOADING=1" and msg[1].startswith("MONOTONIC_USEC=") and int(msg[1][15:]) > 0
    n.close()


def test_abstract_namespace_socket(monkeypatch):
    name = f"mmfeed-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    s.settimeout(5)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert Notifier().ready()
        assert s.recv(4096) == b"READY=1"
    finally:
        s.close()


def test_without_notify_socket_every_call_is_a_noop(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled
    assert (n.ready(), n.watchdog(), n.status("x"), n.stopping()) == (False,) * 4


def test_vanished_systemd_socket_is_reported_not_raised(systemd, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/mmfeed/notify.sock")
    assert Notifier().watchdog() is False


def test_watchdog_interval_is_half_of_watchdog_usec(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() == 5.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 5.0


def test_watchdog_meant_for_another_process_is_ignored(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert watchdog_interval() is None


@pytest.mark.parametrize("value", [None, "", "0", "soon"])
def test_no_or_bad_watchdog_usec_means_no_watchdog(monkeypatch, value):
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    if value is None:
        monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    else:
        monkeypatch.setenv("WATCHDOG_USEC", value)
    assert watchdog_interval() is None
