"""`mm-producer preprocess --ray`: a real two-node Ray cluster on this machine (`ray start
--head` plus `ray start --address`, one CPU each), and the cache it makes compared with the
local process pool's, record for record and byte for byte.

Skipped where Ray is not installed (`pip install 'mmfeed[ray]'`; `make test` installs it);
the test of `--ray` WITHOUT Ray runs everywhere.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from protocol.cache import INDEX_FILE, KEYS_FILE, SCHEMAS_FILE, CacheReader, open_version

VENV_BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
#: Clusters of these tests live on this machine for seconds: no token (a token that an earlier
#: local `ray.init()` left in ~/.ray would turn auth on for the cluster, not for every driver).
RAY_ENV = {"RAY_AUTH_MODE": "disabled"}


def test_ray_without_ray_installed_says_how_to_install_it_and_exits_2(synth_dataset, tmp_path,
                                                                      monkeypatch):
    from producer.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets without the package
    r = CliRunner().invoke(main, ["preprocess", str(synth_dataset), "--cache",
                                  str(tmp_path / "c"), "--ray"])
    assert r.exit_code == 2, r.output
    assert "pip install 'mmfeed[ray]'" in r.output and "--ray needs Ray" in r.output
    assert not (tmp_path / "c").exists()  # refused before any work


def test_ray_with_an_address_where_no_cluster_answers_exits_1_at_once(synth_dataset, tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'mmfeed[ray]'")
    port = _free_ports(1)[0]  # nothing listens there
    rc, _, err = _preprocess(synth_dataset, tmp_path / "c", "--ray", f"127.0.0.1:{port}")
    assert rc == 1, err[-2000:]
    assert f"--ray 127.0.0.1:{port}: no Ray cluster answers there" in err
    assert "ray start --head" in err
    assert not list((tmp_path / "c").glob("v*"))  # nothing committed


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class RayNode:
    """One `ray start --block` process (its own session: stopped as a group)."""

    def __init__(self, log: Path, *args: str):
        self.log = log
        ports = _free_ports(7)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [str(VENV_BIN / "ray"), "start", *args, "--num-cpus", "1", "--block",
                 "--node-ip-address", "127.0.0.1", "--disable-usage-stats",
                 "--object-store-memory", str(80 << 20),
                 "--node-manager-port", str(ports[0]), "--object-manager-port", str(ports[1]),
                 "--dashboard-agent-listen-port", str(ports[2]),
                 "--dashboard-agent-grpc-port", str(ports[3]),
                 "--runtime-env-agent-port", str(ports[4]),
                 "--metrics-export-port", str(ports[5])],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, **RAY_ENV, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "1",
                     "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})

    def wait_started(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in self.log.read_text(errors="replace"):
            assert self.proc.poll() is None, f"ray start exited: {self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"ray start: {self.log.read_text()[-3000:]}"
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(45)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever it started and left behind in its group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)


@pytest.fixture(scope="module")
def ray_cluster(request):
    """Two Ray nodes on this machine (one CPU each); their address. Stopped at the end."""
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'mmfeed[ray]'")
    base = Path(tempfile.mkdtemp(prefix=f"mmray{os.getpid()}-{uuid.uuid4().hex[:4]}-",
                                 dir="/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(base, ignore_errors=True))  # after the nodes
    port = _free_ports(1)[0]
    head = RayNode(base / "head.log", "--head", "--port", str(port), "--include-dashboard",
                   "false", "--temp-dir", str(base / "ray"))
    request.addfinalizer(head.stop)
    head.wait_started()
    worker = RayNode(base / "worker.log", "--address", f"127.0.0.1:{port}")
    request.addfinalizer(worker.stop)
    worker.wait_started()
    return f"127.0.0.1:{port}"


def _preprocess(dataset: Path, cache: Path, *extra: str, env: dict | None = None
                ) -> tuple[int, dict, str]:
    p = subprocess.run([str(VENV_BIN / "mm-producer"), "preprocess", str(dataset), "--cache",
                        str(cache), "--json", "--quiet", *extra], capture_output=True, text=True,
                       timeout=400, env={**os.environ, **RAY_ENV, "OMP_NUM_THREADS": "1",
                                         "PYTHONPATH": str(ROOT), **(env or {})})
    lines = p.stdout.strip().splitlines()
    return p.returncode, (json.loads(lines[-1]) if lines else {}), p.stderr


def _same_cache(a: Path, b: Path) -> None:
    """Record for record: index rows (but where each record lies: a local pool's workers write
    shard files of their own, producer/worker_shard.py), keys and fingerprints, schemas, and
    every record's bytes read through the index."""
    va, vb = open_version(a), open_version(b)
    assert va.classes == vb.classes and va.splits == vb.splits
    ia, ib = np.load(va.path / INDEX_FILE), np.load(vb.path / INDEX_FILE)
    assert ia.dtype == ib.dtype and len(ia) == len(ib) > 0
    for name in ia.dtype.names:
        if name not in ("offset", "shard"):
            assert np.array_equal(ia[name], ib[name]), name
    for f in (KEYS_FILE, SCHEMAS_FILE):
        assert json.loads((va.path / f).read_bytes()) == json.loads((vb.path / f).read_bytes()), f
    with CacheReader(a) as ra, CacheReader(b) as rb:
        buf_a = np.empty(ra.max_payload_nbytes, np.uint8)
        buf_b = np.empty(rb.max_payload_nbytes, np.uint8)
        assert len(ra) == len(rb) == len(ia)
        for i in range(len(ra)):
            (sa, ma), (sb, mb) = ra.read_into(i, buf_a), rb.read_into(i, buf_b)
            n = sa.payload_nbytes
            assert sa == sb and ma == mb and np.array_equal(buf_a[:n], buf_b[:n]), i


def test_ray_on_two_nodes_makes_the_local_pools_cache_record_for_record(
        ray_cluster, bad_dataset, copy_dataset, tmp_path):
    dataset = copy_dataset(bad_dataset[0])  # good samples, one folder per bad-input case
    rc_local, local, _ = _preprocess(dataset, tmp_path / "local", "--workers", "2")
    rc_ray, remote, err = _preprocess(dataset, tmp_path / "ray", "--ray", ray_cluster)
    assert rc_local == rc_ray == 3, err[-3000:]  # some rejected, the rest cached
    assert remote["ray"] == {"address": ray_cluster, "cpus": 2, "nodes": 2}, remote["ray"]
    for key in ("cached", "reused", "processed", "rejected", "notes", "classes", "splits"):
        assert remote[key] == local[key], key
    _same_cache(tmp_path / "local", tmp_path / "ray")
    assert not list((tmp_path / "ray").glob(".ray-scratch-*"))  # chunk files cleaned up

    # Incremental: a rerun through Ray redoes only what changed, as the local pool does.
    os.utime(dataset / "train" / "circle" / "0000" / "metadata.json")
    rc, third, err = _preprocess(dataset, tmp_path / "ray", "--ray", ray_cluster)
    rc_l, third_local, _ = _preprocess(dataset, tmp_path / "local", "--workers", "2")
    assert rc == rc_l == 3 and third["processed"] == third_local["processed"] == 1, err
    assert third["reused"] == third_local["reused"] == remote["cached"] - 1
    _same_cache(tmp_path / "local", tmp_path / "ray")


def test_a_sample_that_kills_its_ray_worker_is_rejected_alone(ray_cluster, synth_dataset,
                                                            tmp_path):
    victim = "train/square/0001"
    rc, out, err = _preprocess(synth_dataset, tmp_path / "c", "--ray", ray_cluster,
                               env={"MMFEED_TEST_CRASH_ON": f"{victim}:segv"})
    assert rc == 3, err[-3000:]
    assert [r["sample"] for r in out["rejected"]] == [victim]
    rej = out["rejected"][0]
    assert rej["field"] == "worker" and rej["found"].startswith("worker exited (Ray ")
    assert out["cached"] == 17 and out["pool_restarts"] >= 1  # 3 classes x (4 + 2) - 1
