"""mmctl with one producer per node: every producer gets the command, the reply says each one's.

Fake daemons made of the real ControlServer (as tests/test_mmctl.py); the real daemons on two
network namespaces are in tests/test_multinode.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_mmctl import FakeProducer, last_json, rundir, run  # noqa: E402,F401

from protocol.control import ControlServer  # noqa: E402
from protocol.filters import FilterSpec  # noqa: E402


class Node:
    def __init__(self, endpoint: str, generation: int = 1):
        self.fake = FakeProducer()
        self.fake.generation = generation
        self.endpoint = endpoint
        self.server = ControlServer(endpoint, self.fake.commands())
        self.server.serve_in_thread(poll_ms=20)


@pytest.fixture
def nodes(rundir):
    made = [Node(f"ipc://{rundir}/node0.sock"), Node(f"ipc://{rundir}/node1.sock")]
    yield made
    for n in made:
        n.server.close()


def _both(nodes) -> str:
    return ",".join(n.endpoint for n in nodes)


def test_a_change_goes_to_every_nodes_producer(nodes):
    out = last_json(run("--json", "--producer", _both(nodes), "filter", "gray"))
    assert out["ok"] is True and out["generation"] == 2
    assert out["generations"] == {n.endpoint: 2 for n in nodes}
    assert "generations_differ" not in out
    for n in nodes:
        # the daemon side parses the spec once (protocol/commands.py): handlers get a FilterSpec
        assert n.fake.calls == [("filter", {"spec": FilterSpec.parse("gray")})]


def test_the_producer_option_repeated_is_the_same_as_a_comma_list(nodes):
    r = run("--producer", nodes[0].endpoint, "--producer", nodes[1].endpoint, "label", "b")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("2 producers: generation 2")
    assert all(n.fake.calls == [("label", {"name": "b"})] for n in nodes)


def test_the_producers_come_from_the_environment_too(nodes, monkeypatch):
    monkeypatch.setenv("MMFEED_PRODUCER", _both(nodes))
    assert run("pause").exit_code == 0
    assert all(n.fake.paused for n in nodes)


def test_producers_that_number_generations_apart_are_flagged_and_said(nodes):
    nodes[1].fake.generation = 6  # e.g. node 1's producer ran changes node 0's never saw
    out = last_json(run("--json", "--producer", _both(nodes), "filter", "gray"))
    assert out["generations"] == {nodes[0].endpoint: 2, nodes[1].endpoint: 7}
    assert out["generation"] == 7 and out["generations_differ"] is True
    r = run("--producer", _both(nodes), "filter", "rgb")
    assert r.exit_code == 0 and "number generations apart" in r.stderr
    assert "restart the producers together" in r.stderr


def test_a_producer_that_does_not_answer_is_named_with_where_the_change_applied(nodes, rundir):
    gone = f"ipc://{rundir}/node2.sock"  # nobody there
    r = run("--json", "--producer", f"{_both(nodes)},{gone}", "filter", "gray")
    assert r.exit_code == 3
    err = last_json(r)["error"]
    assert gone in err["message"] and err["code"] == "timeout"
    assert f"applied on: {nodes[0].endpoint} (generation 2), {nodes[1].endpoint} " \
           f"(generation 2)" in err["message"]


def test_a_refusal_is_the_refusing_producers_and_exits_1(nodes):
    r = run("--json", "--producer", _both(nodes), "sensor", "lidar", "lidar_missing")
    assert r.exit_code == 1
    msg = last_json(r)["error"]["message"]
    assert f"producer {nodes[0].endpoint}: refused sensor" in msg and "applied on: none" in msg


def test_status_shows_every_nodes_producer(nodes):
    nodes[1].fake.paused = True
    out = last_json(run("--json", "--producer", _both(nodes), "status", "producer"))
    assert out["ok"] is True and set(out["producers"]) == {n.endpoint for n in nodes}
    assert out["producer"]["state"] == "running"
    assert out["producers"][nodes[1].endpoint]["state"] == "paused"
    table = run("--producer", _both(nodes), "status", "producer").stdout.splitlines()
    assert table[0].split() == ["producer", nodes[0].endpoint, "producer", nodes[1].endpoint]
    assert table[1].split() == ["state", "running", "paused"]


def test_the_trainers_status_alone_needs_no_producer(nodes, rundir):
    from test_mmctl import FakeTrainer, serve

    server = serve("trainer", FakeTrainer())
    try:
        out = last_json(run("--json", "--producer", _both(nodes), "status", "trainer"))
    finally:
        server.close()
    assert out["ok"] is True and out["trainer"]["step"] == 120 and "producer" not in out


def test_logs_with_several_producers_asks_for_one(nodes):
    r = run("--producer", _both(nodes), "logs")
    assert r.exit_code == 2 and "name the node's with --producer ADDR" in r.stderr


def test_trainer_status_under_torchrun_reports_what_every_rank_trained_on(tmp_path):
    # The trainer daemon's status: `generation` is the lowest rank's (what `mmctl wait` needs),
    # `rank_generations` each rank's; null while a rank has trained on no live sample.
    from _trainer_data import build_cache

    from trainer.daemon import DaemonConfig, TrainerDaemon
    from trainer.loop import Trainer, TrainConfig
    from trainer.topology import Dist

    cfg = TrainConfig(cache=build_cache(tmp_path / "c", n_train=8, n_val=0), device="cpu")
    tr = Trainer(cfg)
    try:
        d = TrainerDaemon(cfg, DaemonConfig(), tr, Dist(rank=0, world_size=2,
                                                        local_world_size=1))
        d.rank_generations = [4, 2]
        st = d.on_status()
        assert st["generation"] == 2 and st["rank_generations"] == [4, 2]
        d.rank_generations = [4, None]
        assert d.on_status()["generation"] is None
    finally:
        tr.close()
