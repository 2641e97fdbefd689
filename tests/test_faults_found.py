"""Bugs the fault-injection soak (bench/faults.py) found, each reproduced with real processes:
a real `mm-producer run` subprocess, real ZeroMQ control requests, real shared memory.

Each test names the request that went wrong and what the daemon must do instead; the
daemon must go on publishing afterwards.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _polling import wait_for  # noqa: E402
from test_producer_daemon import Daemon  # noqa: E402

from producer.synth import make_dataset  # noqa: E402
from protocol.errors import RemoteError  # noqa: E402


@pytest.fixture(scope="module")
def replay(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults-found") / "ds"
    return make_dataset(root, per_class={"train": 1}, size=(32, 24), clip_seconds=0.5,
                        extras=False)


@pytest.fixture(scope="module")
def producer(replay):
    d = Daemon(replay, "--loop")
    yield d
    assert d.stop() == 0


def _still_publishing(d: Daemon) -> None:
    before = d.status()["published"]
    wait_for(lambda: d.status()["published"] > before, what="the producer publishing on")


def test_record_start_into_a_folder_that_cannot_be_made_is_a_bad_argument_naming_it(
        producer, tmp_path):
    # `mmctl record start --cache /proc/nope` was an `internal` error (FileNotFoundError from
    # mkdir, with a traceback in the log) instead of a refusal saying what to change.
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    where = blocker / "cache"
    with pytest.raises(RemoteError) as e:
        producer.request("record", action="start", cache=str(where))
    assert e.value.code == "bad_argument", str(e.value)
    assert str(where) in str(e.value) and "--cache DIR" in str(e.value)
    assert producer.request("record", action="status")["recording"] is False
    assert not any("failed inside the daemon" in line for line in producer.stderr_lines())
    _still_publishing(producer)


@pytest.mark.parametrize("n", [0, -1])
def test_logs_with_fewer_than_one_record_is_a_bad_argument_not_an_empty_log(producer, n):
    # `{"cmd": "logs", "args": {"n": -1}}` was answered ok with no records, as if the log were
    # empty (mmctl refuses -n 0 itself; the daemon must too).
    with pytest.raises(RemoteError) as e:
        producer.request("logs", n=n)
    assert e.value.code == "bad_argument" and "n must be 1 or more" in str(e.value)
    assert producer.request("logs", n=1)["records"]
