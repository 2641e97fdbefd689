"""`--device` on the daemons: where frames live (GPU ring slots or host shared memory) is picked
at start, falls back to the host ring without a GPU (said once), and a trainer that cannot
read a ring's frames refuses clearly. Real daemon processes, real rings, real sockets.

The CUDA tests run the same flows over CUDA IPC and skip without a GPU (docs/gpu.md lists them
among the checks to run on one)."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _gpu_slot_producer import payload_bytes  # noqa: E402
from _trainer_data import build_cache  # noqa: E402
from test_gpu_slots import Producer  # noqa: E402
from _polling import wait_for  # noqa: E402
from test_producer_daemon import Daemon, _unique  # noqa: E402

from producer.gpu_slot_writer import NO_CUDA_MESSAGE  # noqa: E402
from producer.synth import make_dataset  # noqa: E402
from protocol.gpu_slots import is_descriptor, table_name  # noqa: E402
from protocol.ring import RingReader  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs an NVIDIA GPU with CUDA (GPU ring slots, NVDEC)")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(),
                             reason="checks the fallback of a machine without CUDA")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpuwire") / "ds"
    make_dataset(root, per_class={"train": 2}, size=(32, 24), clip_seconds=0.5)
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return build_cache(tmp_path_factory.mktemp("gpucache") / "c", n_train=16, n_val=8)


def _env(runtime: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    return {**env, "MMFEED_RUNTIME_DIR": runtime, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT)}


def _first_sample(ring: str):
    with RingReader.attach(ring, start="oldest") as r:
        s = r.receive(timeout=30)
    assert s is not None, f"no sample in ring {ring}"
    return s


# --- producer: --device ----------------------------------------------------------------------

@no_cuda
def test_producer_device_cuda_without_a_gpu_exits_2_naming_the_flag_and_leaves_nothing(dataset):
    ring = _unique("mmgw")
    runtime = tempfile.mkdtemp(prefix="mmf", dir="/tmp")
    p = subprocess.run([sys.executable, "-m", "producer.cli", "run", "--source", str(dataset),
                        "--ring", ring, "--device", "cuda"], cwd=ROOT, env=_env(runtime),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "--device" in p.stderr and "no CUDA device" in p.stderr, p.stderr
    assert not Path("/dev/shm/" + ring).exists()
    assert not Path("/dev/shm" + table_name(ring)).exists()


@no_cuda
def test_producer_device_auto_without_a_gpu_fills_the_host_ring_and_says_so_once(dataset):
    d = Daemon(dataset, "--loop", "--rate", "max", "--clip-frames", "2", "--device", "auto")
    try:
        assert d.ready["ring_memory"] == "host"
        wait_for(lambda: d.status()["published"] > 3, what="samples published")
        assert d.status()["ring_memory"] == "host"
        assert d.status()["video_decode"] == "cpu"                  # no NVDEC without a GPU
        s = _first_sample(d.ring)
        assert not is_descriptor(s.schema) and "video" in s.arrays   # frames in the ring itself
        assert d.stderr_tail().count(NO_CUDA_MESSAGE) == 1
        assert not Path("/dev/shm" + table_name(d.ring)).exists()
    finally:
        assert d.stop() == 0


def test_producer_device_cpu_keeps_the_host_ring_and_never_mentions_cuda(dataset):
    d = Daemon(dataset, "--loop", "--rate", "max", "--clip-frames", "2", "--device", "cpu")
    try:
        assert d.ready["ring_memory"] == "host"
        s = _first_sample(d.ring)
        assert not is_descriptor(s.schema)
        assert NO_CUDA_MESSAGE not in d.stderr_tail()
    finally:
        assert d.stop() == 0


# --- trainer: a ring whose frames are not in the ring -----------------------------------------

@no_cuda
def test_cpu_trainer_refuses_a_ring_whose_frames_live_in_a_slot_pool(cache, tmp_path):
    # The producer publishes slot descriptors (the "shm" pool backend: the GPU-slot protocol
    # over host memory). A trainer that reads frames from host ring slots must not train on
    # descriptors as if they were samples: it stops with a message naming both sides.
    ring = _unique("mmgw")
    prod = Producer(ring, backend="shm", count=0, mode="lossy", nbytes=4096)
    try:
        prod.go()
        p = subprocess.run(
            [str(Path(sys.executable).parent / "mm-trainer"), "run", "--cache", str(cache),
             "--ring", ring, "--mix", "1.0", "--steps", "3", "--batch-size", "2",
             "--device", "cpu", "--checkpoint-dir", str(tmp_path / "ck"),
             "--control", f"ipc://{tmp_path}/t.sock",
             "--log-endpoint", f"ipc://{tmp_path}/t.log.sock"],
            env=_env(str(tmp_path)), capture_output=True, text=True, timeout=180)
        assert p.returncode != 0
        assert "carries only slot descriptors" in p.stderr, p.stderr[-3000:]
        assert "--device cpu" in p.stderr            # says what to change
    finally:
        prod.stop()


def test_host_ring_loader_refuses_descriptors_that_arrive_after_it_attached(tmp_path):
    # A GPU-slot producer creates its ring a moment before its slot table: a loader that
    # attached in between sees no table, so the first descriptor sample must stop it too.
    from protocol.gpu_slots import DESCRIPTOR_SCHEMA
    from protocol.ring import RingConfig, RingWriter
    from protocol.schema import SampleMeta
    from trainer.prefetch import LoaderError, RingLoader

    ring = _unique("mmgw")
    with RingWriter.create(RingConfig(name=ring, slots=4, slot_bytes=4096)) as w:
        loader = RingLoader(ring, 2, start="oldest", max_wait_s=0.05).start()
        try:
            wait_for(lambda: loader.attached, what="loader attached")
            w.publish(DESCRIPTOR_SCHEMA, SampleMeta(index=0),
                      {DESCRIPTOR_SCHEMA.names[0]: np.zeros(4096, np.uint8)})
            with pytest.raises(LoaderError, match="GPU slot descriptors"):
                wait_for(lambda: loader.get(0.1) is not None, timeout=30,
                         what="the loader to fail")
        finally:
            loader.close()


# --- CUDA: the same flows with GPU slots (run on a GPU machine; docs/gpu.md) -----------------

@needs_cuda
def test_producer_device_cuda_puts_frames_in_gpu_slots(dataset):
    d = Daemon(dataset, "--loop", "--rate", "max", "--clip-frames", "2", "--device", "cuda")
    try:
        assert d.ready["ring_memory"] == "gpu"
        assert d.status()["video_decode"] == "nvdec"   # bitstream -> GPU memory, no host frame
        with RingReader.attach(d.ring, start="oldest") as r:
            s = r.receive(timeout=30)
        assert is_descriptor(s.schema)                 # the ring carries only the descriptor
        assert Path("/dev/shm" + table_name(d.ring)).exists()
    finally:
        assert d.stop() == 0
    assert not Path("/dev/shm" + table_name(d.ring)).exists()


@needs_cuda
def test_cuda_trainer_trains_from_gpu_slots_with_no_host_copy(dataset, cache, tmp_path):
    from protocol.control import ControlClient, Timeouts

    d = Daemon(dataset, "--loop", "--rate", "max", "--clip-frames", "2", "--device", "cuda")
    endpoint = f"ipc://{tmp_path}/t.sock"
    p = subprocess.Popen(
        [str(Path(sys.executable).parent / "mm-trainer"), "run", "--cache", str(cache),
         "--ring", d.ring, "--mix", "1.0", "--steps", "1000000", "--batch-size", "2",
         "--device", "cuda", "--checkpoint-dir", str(tmp_path / "ck"), "--control", endpoint,
         "--log-endpoint", f"ipc://{tmp_path}/t.log.sock", "--log-interval", "0.2"],
        env=_env(str(tmp_path)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client = ControlClient(endpoint, Timeouts(request=2.0, retries=0))
    try:
        def trained():
            try:
                st = client.request("status")
            except Exception:
                assert p.poll() is None, p.communicate()[1][-3000:]
                return None
            return st if st["step"] >= 3 and st["live_fraction"] > 0 else None
        st = wait_for(trained, timeout=120, what="steps on live GPU-slot batches")
        assert st["copies_per_sample"] == 0            # slot -> batch on the GPU, no host copy
    finally:
        client.close()
        p.terminate()
        p.wait(60)
        d.stop()


@needs_cuda
def test_gpu_ring_loader_batches_hold_exactly_the_producers_bytes_on_the_gpu():
    from trainer.gpu_slot_loader import GpuRingLoader

    ring = _unique("mmgw")
    prod = Producer(ring, backend="cuda", count=64, mode="lossless", nbytes=1 << 16)
    loader = GpuRingLoader(ring, 8, device=torch.device("cuda"), start="oldest").start()
    try:
        wait_for(lambda: loader.attached, what="loader attached")
        prod.go()
        seen = 0
        while seen < 64:
            hb = wait_for(lambda: loader.get(0.5), timeout=60, what="a GPU batch")
            assert hb.buf.is_cuda and hb.copies == 0 and loader.path == "gpu-slots"
            for row in range(hb.n):
                i = seen + row
                assert torch.equal(hb.data[row, :1 << 16], payload_bytes(1 << 16, i, "cuda"))
            seen += hb.n
            hb.release()
    finally:
        loader.close()
        prod.stop()


@no_cuda
@pytest.mark.parametrize("bench", ["decode", "stall", "ring_cuda"])
def test_cuda_benchmarks_without_a_gpu_say_why_and_exit_2(bench, capsys):
    import importlib
    import json

    main = importlib.import_module(f"bench.{bench}").main
    assert main(["--device", "cuda", "--json"]) == 2
    lines = capsys.readouterr().out.strip().splitlines()
    assert "skipped: no CUDA device" in lines[0]
    assert json.loads(lines[-1])["skipped"].startswith("no CUDA device")
