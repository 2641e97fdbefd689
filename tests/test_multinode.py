"""Two machines on one: torchrun --nnodes 2 over a real network, one producer per node.

Each "node" is a network namespace with its own veth address, and a mount namespace with its
own tmpfs on /dev/shm, so each node's ring and semaphores are its own (both rings have the SAME
name, as on two real machines). The two namespaces are joined by a veth pair; torchrun's c10d
rendezvous and gloo run over it, mmctl reaches both producers over TCP with CURVE keys.

What it proves (issue 19): both nodes trained live samples from their OWN producer (each rank's
ring epoch is its node's producer's epoch) without throwing any away (no live sample skipped:
one rank per node keeps all of its node's ring; the old global split skipped half), `mmctl`
with both producers changes both, `mmctl wait` returns only when every rank trained on the new
generation, DDP kept the ranks in sync (equal weights on both), rank 0 alone wrote the
checkpoint, and the checkpoint of the two-node job resumes on one node.

Creating namespaces needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN): elsewhere it is skipped with
the reason. Namespaces, veths and processes are removed by finalizers, also when it fails; the
tmpfs mounts live only in the nodes' mount namespaces and go with their last process.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from producer.synth import make_dataset

sys.path.insert(0, str(Path(__file__).parent))
from _polling import wait_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
SUBNET = "10.203.7"          # inside our own namespaces only; nothing outside can see it
RDZV_PORT, PRODUCER_PORT, TRAINER_PORT = 29400, 7101, 7201
TOOLS = ("ip", "unshare", "nsenter")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _sh(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


class Node:
    """One machine: a network namespace, a veth address, a private /dev/shm, a runtime dir.

    `holder` is a process that keeps the node's mount namespace (with its tmpfs) alive;
    everything the node runs enters its namespaces with nsenter."""

    def __init__(self, index: int, netns: str, veth: str, base: Path):
        self.index, self.netns, self.veth = index, netns, veth
        self.addr = f"{SUBNET}.{index + 1}"
        self.dir = base / f"node{index}"
        (self.dir / "run").mkdir(parents=True)
        self.procs: list[subprocess.Popen] = []
        self.holder: subprocess.Popen | None = None

    def hold(self) -> None:
        self.holder = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, "unshare", "-m", "--propagation", "private",
             "sh", "-c", "mount -t tmpfs -o size=256m,mode=1777 mmfeed-node-shm /dev/shm "
                         "&& echo ready && exec sleep infinity"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.holder.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"node {self.index}: mount namespace with a private /dev/shm "
                               f"failed: {self.holder.stderr.read()[-500:]}")

    def env(self, **extra: str) -> dict:
        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "MMFEED_PRODUCER",
                            "MMFEED_TRAINER", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update({"MMFEED_RUNTIME_DIR": str(self.dir / "run"), "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": self.veth,
                    "MMFEED_CHECKPOINT_DIR": str(self.dir / "checkpoints"),
                    # each node its own state (the persisted generation numbers), as on two
                    # machines: one shared folder would make node 1 continue node 0's numbers
                    "MMFEED_STATE_DIR": str(self.dir / "state")})
        env.update(extra)
        return env

    def start(self, name: str, *cmd: str) -> subprocess.Popen:
        """A long-running process on this node (its own session: killed as a group)."""
        err = open(self.dir / f"{name}.stderr", "wb")
        p = subprocess.Popen(["nsenter", "-t", str(self.holder.pid), "-m", "-n", "--", *cmd],
                             stdout=subprocess.PIPE, stderr=err, text=True, env=self.env(),
                             start_new_session=True, cwd=self.dir)
        err.close()
        p.name = name  # type: ignore[attr-defined]
        self.procs.append(p)
        return p

    def run(self, *cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["nsenter", "-t", str(self.holder.pid), "-m", "-n", "--", *cmd],
                              capture_output=True, text=True, env=self.env(), timeout=timeout,
                              cwd=self.dir)

    def stderr(self, name: str) -> str:
        return (self.dir / f"{name}.stderr").read_text(errors="replace")[-3000:]

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(10)
        if self.holder is not None and self.holder.poll() is None:
            self.holder.kill()
            self.holder.wait(10)


@pytest.fixture(scope="module")
def two_nodes(request):
    """Two namespaced nodes joined by a veth pair; removed (processes, namespaces, veths)
    by finalizers registered as each piece is made, so a failure half-way cleans up too."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (iproute2, util-linux) to make network "
                    f"namespaces")
    if os.geteuid() != 0:
        pytest.skip("creating network and mount namespaces needs root (CAP_SYS_ADMIN, "
                    "CAP_NET_ADMIN); run the suite as root to include the two-node test")
    tag = f"{os.getpid() % 100000}{uuid.uuid4().hex[:3]}"
    base = Path(tempfile.mkdtemp(prefix=f"mmn{tag}-", dir="/tmp"))  # short: socket paths
    request.addfinalizer(lambda: shutil.rmtree(base, ignore_errors=True))
    nodes = [Node(i, f"mmfeed{tag}n{i}", f"mmv{tag}{i}", base) for i in range(2)]
    for n in nodes:
        r = _sh("ip", "netns", "add", n.netns)
        if r.returncode != 0:
            pytest.skip(f"cannot create a network namespace here (`ip netns add` said: "
                        f"{r.stderr.strip()})")
        request.addfinalizer(lambda n=n: _sh("ip", "netns", "del", n.netns))
    steps = [("ip", "link", "add", nodes[0].veth, "netns", nodes[0].netns, "type", "veth",
              "peer", "name", nodes[1].veth, "netns", nodes[1].netns)]
    for n in nodes:  # the veth pair goes with its namespaces
        steps += [("ip", "-n", n.netns, "addr", "add", f"{n.addr}/24", "dev", n.veth),
                  ("ip", "-n", n.netns, "link", "set", "lo", "up"),
                  ("ip", "-n", n.netns, "link", "set", n.veth, "up")]
    for cmd in steps:
        r = _sh(*cmd)
        if r.returncode != 0:  # e.g. no veth driver in this kernel or container
            pytest.skip(f"cannot link the two namespaces here (`{' '.join(cmd)}` said: "
                        f"{r.stderr.strip()})")
    for n in nodes:
        request.addfinalizer(n.stop_all)
        try:
            n.hold()
        except RuntimeError as e:  # no mount namespaces (CAP_SYS_ADMIN) or tmpfs mounts
            pytest.skip(str(e))
    return nodes


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A dataset both producers replay and its cache (on a file system both nodes see, as a
    shared mount would be)."""
    base = tmp_path_factory.mktemp("multinode")
    dataset = make_dataset(base / "dataset", per_class={"train": 2, "val": 1}, size=(32, 24),
                           clip_seconds=0.5)
    p = subprocess.run([str(VENV_BIN / "mm-producer"), "preprocess", str(dataset), "--cache",
                        str(base / "cache"), "--workers", "2", "--quiet"],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    keys = base / "keys"
    r = subprocess.run([str(VENV_BIN / "mmctl"), "keygen", str(keys)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return dataset, base / "cache", keys


def _torchrun(node: Node, cache: Path, keys: Path) -> subprocess.Popen:
    # rank 0 goes to the node whose --local-addr sorts first (node 0); its trainer binds the
    # control socket, the same command line on every node (as a unit file would have it).
    return node.start(
        "trainer", str(VENV_BIN / "torchrun"), "--nnodes", "2", "--nproc-per-node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{SUBNET}.1:{RDZV_PORT}",
        "--rdzv-id", "mmfeed-test", "--rdzv-conf", f"is_host={int(node.index == 0)}",
        "--local-addr", node.addr, "-m", "trainer.cli", "run", "--cache", str(cache),
        "--ring", "mmfeed", "--mix", "0.5", "--steps", "100000", "--batch-size", "4",
        "--log-interval", "1", "--control", f"tcp://0.0.0.0:{TRAINER_PORT}",
        "--curve-dir", str(keys), "--json")


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


def test_two_nodes_train_on_their_own_producers_in_step_and_resume_on_one(two_nodes, data):
    dataset, cache, keys = data
    a, b = two_nodes
    producers = ",".join(f"tcp://{n.addr}:{PRODUCER_PORT}" for n in two_nodes)
    epochs = {}
    for n in two_nodes:
        # lossless: the producer waits for its node's trainer (no CPU burnt ahead of it)
        p = n.start("producer", str(VENV_BIN / "mm-producer"), "run", "--source", str(dataset),
                    "--ring", "mmfeed", "--mode", "lossless", "--loop", "--rate", "max",
                    "--control", f"tcp://{n.addr}:{PRODUCER_PORT}", "--curve-dir", str(keys),
                    "--slots", "4", "--json")
        ready = p.stdout.readline()
        assert ready, f"node {n.index} producer did not start: {n.stderr('producer')}"
        epochs[n.index] = json.loads(ready)["ring_epoch"]
    trainers = [_torchrun(n, cache, keys) for n in two_nodes]

    def mmctl(*args: str) -> tuple[int, dict]:
        r = a.run(str(VENV_BIN / "mmctl"), "--json", "--keys", str(keys), "--producer",
                  producers, "--trainer", f"tcp://{a.addr}:{TRAINER_PORT}", *args)
        return r.returncode, (json.loads(r.stdout.splitlines()[-1]) if r.stdout.strip() else {})

    def logs() -> str:
        return "\n".join(f"--- node {n.index} {what}:\n{n.stderr(what)}"
                         for n in two_nodes for what in ("producer", "trainer"))

    last: list = [None]

    def trainer_steps() -> bool:
        for t in trainers:
            assert t.poll() is None, f"a trainer exited:\n{logs()}"
        rc, st = last[0] = mmctl("status", "trainer")
        return rc == 0 and (st.get("trainer") or {}).get("step", 0) >= 2

    wait_for(trainer_steps, 240, "the two-node job to train (rendezvous, gloo over the veths)",
             interval=0.1, context=lambda: f"last mmctl status: {last[0]}\n{logs()}")
    # One command, both nodes' producers (CURVE over TCP): each makes generation 2.
    rc, out = mmctl("filter", "gray")
    assert rc == 0 and out["generations"] == {f"tcp://{n.addr}:{PRODUCER_PORT}": 2
                                              for n in two_nodes}, out
    # ... and `wait` returns once EVERY rank (one per node) trained on it.
    rc, out = mmctl("wait", "2", "--timeout", "180")
    assert rc == 0 and out["generation"] >= 2, out
    rc, st = mmctl("status")
    assert rc == 0 and all(p["readers"] == 1 for p in st["producers"].values()), st
    assert st["trainer"]["world_size"] == 2 and min(st["trainer"]["rank_generations"]) >= 2

    # Stop as systemd would: SIGTERM to rank 0's process; all ranks stop at one step,
    # rank 0 writes the checkpoint, prints the summary, and both torchruns exit 0.
    rank0 = _children(trainers[0].pid)
    assert len(rank0) == 1, rank0
    os.kill(rank0[0], signal.SIGTERM)
    outs = [t.communicate(timeout=120)[0] for t in trainers]
    assert [t.returncode for t in trainers] == [0, 0], a.stderr("trainer") + b.stderr("trainer")
    summary = json.loads(outs[0].strip().splitlines()[-1])
    assert summary["world_size"] == 2
    rows = {r["node"]: r for r in summary["ranks"]}
    assert sorted(rows) == [0, 1] and rows[0]["rank"] == 0
    for node, r in rows.items():
        assert r["samples_live"] > 0, r                 # trained live samples ...
        assert r["ring_epoch"] == epochs[node], (r, epochs)  # ... from its own node's producer
        assert r["live_skipped"] == 0, r                # and threw none of them away
        assert r["generation"] >= 2 and math.isfinite(r["loss"]), r
    # DDP: every rank holds the same weights after the same steps (the loss each rank saw
    # differs with its data; the gradients were averaged, so the models are one).
    assert rows[0]["weights_sum"] == pytest.approx(rows[1]["weights_sum"], rel=1e-9, abs=1e-9)
    # Written once, by rank 0, on its node.
    ck = Path(summary["checkpoint"])
    assert ck.parent == a.dir / "checkpoints" and ck.exists()
    assert not list((b.dir / "checkpoints").glob("ckpt-*.pt"))

    # The two-node checkpoint resumes on one node (world size 1), disk position rescaled.
    r = a.run(str(VENV_BIN / "mm-trainer"), "run", "--cache", str(cache), "--steps",
              str(summary["steps"] + 2), "--batch-size", "4", "--control",
              f"ipc://{a.dir}/run/resumed.sock", "--json", timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = json.loads(r.stdout.strip().splitlines()[-1])
    assert resumed["resumed_from_step"] == summary["steps"]
    assert resumed["steps"] == summary["steps"] + 2 and resumed["world_size"] == 1
    assert re.search(r"resuming on 1 ranks with batches of \d+ from a checkpoint of 2 ranks", r.stderr)
