"""The ring's hardening seen from the daemons (issue 13 items 5-9): a real `mm-trainer run`
(and a real `mm-producer run`) while another process damages the ring, links it, forges its
header or kills its producer. Nobody crashes, nobody waits forever, a dead ring is never
re-read, and training goes on from disk meanwhile.

The trainer's producer is a RingWriter in a forked process that publishes cache-like samples
on command (so a test knows what the ring holds when it damages it).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _trainer_data import CLASSES, build_cache, make_sample  # noqa: E402
from _polling import wait_for  # noqa: E402
from _rings import ring_name_fixture  # noqa: E402

from producer.synth import make_dataset  # noqa: E402
from protocol.control import ControlClient, Timeouts  # noqa: E402
from protocol.errors import NotARing, ProducerGone  # noqa: E402
from protocol.ring import RingConfig, RingReader, RingWriter  # noqa: E402
from protocol.ring_layout import H, S, SLOT_HEADER_BYTES, SCHEMA_MAX, STATE_CLOSED, RingHeader  # noqa: E402
from protocol.schema import SampleMeta, SampleSchema  # noqa: E402

CTX = mp.get_context("fork")
ROOT = Path(__file__).resolve().parents[1]
SLOTS = 16


def damage(name: str, offset: int, data: bytes) -> None:
    """Write `data` at `offset` of the segment from another process (a real `python -c`)."""
    code = ("import os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
            "os.pwrite(fd, bytes.fromhex(sys.argv[3]), int(sys.argv[2]))")
    subprocess.run([sys.executable, "-c", code, f"/dev/shm/{name}", str(offset), data.hex()],
                   check=True)


def header(name: str) -> RingHeader:
    with open(f"/dev/shm/{name}", "rb") as f:
        return RingHeader.unpack(f.read(256))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return build_cache(tmp_path_factory.mktemp("cache") / "c", n_train=60, n_val=12)


ring_name = ring_name_fixture("mmfd")


# --- a producer on command ------------------------------------------------------------------


def _commanded(name, cmds, acks):
    rng = np.random.default_rng(0)
    w = RingWriter.create(RingConfig(name, slots=SLOTS, slot_bytes=64 << 10))
    w.set_generation(1)
    acks.put("ready")
    n = 0
    try:
        while (k := cmds.get()) is not None:
            for _ in range(k):
                label = n % len(CLASSES)
                arrays = make_sample(rng, label)
                w.publish(SampleSchema.from_arrays(arrays),
                          SampleMeta(label=label, index=n, generation=1, source="live"), arrays)
                n += 1
            acks.put(n)
    finally:
        w.close()


class Producer:
    def __init__(self, name: str):
        self.cmds, self.acks = CTX.Queue(), CTX.Queue()
        self.proc = CTX.Process(target=_commanded, args=(name, self.cmds, self.acks),
                                daemon=True)
        self.proc.start()
        assert self.acks.get(timeout=20) == "ready"

    def publish(self, k: int) -> int:
        self.cmds.put(k)
        return self.acks.get(timeout=30)

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(10)

    def stop(self) -> None:
        if self.proc.is_alive():
            self.cmds.put(None)
            self.proc.join(20)


@pytest.fixture
def producers():
    made: list[Producer] = []

    def start(name: str) -> Producer:
        made.append(Producer(name))
        return made[-1]

    yield start
    for p in made:
        if p.proc.is_alive():
            p.kill()


# --- a real mm-trainer run ----------------------------------------------------------------------


class Trainer:
    def __init__(self, cache: Path, ring: str, tmp: Path, *args: str):
        self.log = tmp / "trainer.log"
        env = {**os.environ, "MMFEED_RUNTIME_DIR": str(tmp), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "trainer.cli", "run", "--cache", str(cache), "--ring", ring,
             "--batch-size", "4", "--steps", "1000000", "--checkpoint-dir", str(tmp / "ck"),
             "--control", f"ipc://{tmp}/t.sock", "--log-interval", "0.5", *args],
            env=env, stdout=subprocess.DEVNULL, stderr=open(self.log, "wb"), cwd=ROOT)
        self.client = ControlClient(f"ipc://{tmp}/t.sock", Timeouts(request=5.0, retries=0))

    def status(self) -> dict | None:
        try:
            return self.client.request("status")
        except Exception:
            if self.proc.poll() is not None:
                raise AssertionError(f"mm-trainer exited rc {self.proc.returncode}:\n"
                                     f"{self.text()[-3000:]}")
            return None

    def until(self, cond, what: str, timeout: float = 90.0) -> dict:
        return wait_for(lambda: (s := self.status()) is not None and cond(s) and s,
                        timeout, what)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


@pytest.fixture
def trainers():
    made: list[Trainer] = []

    def start(*args, **kw) -> Trainer:
        made.append(Trainer(*args, **kw))
        return made[-1]

    yield start
    for t in made:
        t.stop()


# --- 13.6: garbage in the header or a slot while mm-trainer trains ----------------------------


def test_garbage_in_a_slot_and_the_header_never_stops_a_training_trainer(
        cache, ring_name, tmp_path, producers, trainers):
    p = producers(ring_name)
    p.publish(3)
    off0, off1 = header(ring_name).slot_offset(0), header(ring_name).slot_offset(1)
    damage(ring_name, off0 + SLOT_HEADER_BYTES - SCHEMA_MAX, b"\xff\xfe not a schema \x00")
    damage(ring_name, off1 + S["payload_nbytes"], struct.pack("<Q", 1 << 40))
    t = trainers(cache, ring_name, tmp_path, "--ring-start", "oldest")
    # It meets the damaged slot, detaches, trains on disk, tries again (and again) ...
    s = t.until(lambda s: s["ring_reattached"] >= 2 and s["step"] >= 5,
                "training on disk while the ring is damaged")
    assert s["samples_live"] == 0  # nothing of the damaged ring was trained on
    assert "damaged" in t.text() and "does not decode" in t.text(), t.text()
    # ... and once the producer has rewritten every slot (one lap), reads it again.
    p.publish(SLOTS)
    s = t.until(lambda s: s["samples_live"] >= 8, "live samples after the slots healed")
    # Now a forged `published` counter in the header: detached again, then back.
    before = s["ring_reattached"]
    damage(ring_name, H["published"], struct.pack("<Q", 1 << 62))
    s = t.until(lambda s: s["ring_reattached"] > before, "the forged counter noticed")
    live = s["samples_live"]
    p.publish(8)
    t.until(lambda s: s["samples_live"] >= live + 8 and s["ring_attached"],
            "live samples after the counter was written again")
    assert t.stop() == 0
    p.stop()


# --- 13.8: a killed producer's ring is never read again -------------------------------------------


def test_after_the_producer_is_sigkilled_the_trainers_live_count_stops_growing(
        cache, ring_name, tmp_path, producers, trainers):
    p = producers(ring_name)
    t = trainers(cache, ring_name, tmp_path)
    t.until(lambda s: s["ring_attached"], "the trainer attached")
    p.publish(4)
    t.until(lambda s: s["samples_live"] >= 4, "the live samples trained on")
    p.kill()
    s = t.until(lambda s: not s["ring_attached"], "the trainer noticed the producer died")
    live, step = s["samples_live"], s["step"]
    # Many re-attach attempts later (0.1 s apart; the disk keeps training meanwhile) ...
    s = t.until(lambda s: s["step"] >= step + 30, "more training from disk")
    assert s["samples_live"] == live  # ... not one more "live" sample from the dead ring
    assert t.stop() == 0


# --- 13.7: a link or a directory at the ring name: the trainer waits, then attaches -----------


@pytest.mark.parametrize("what", ["symbolic link", "directory"])
def test_a_trainer_waiting_on_a_link_or_directory_at_the_ring_name_keeps_training(
        cache, ring_name, tmp_path, producers, trainers, what):
    path = f"/dev/shm/{ring_name}"
    if what == "directory":
        os.mkdir(path)
    else:
        os.symlink(tmp_path / "elsewhere", path)
    t = trainers(cache, ring_name, tmp_path)
    t.until(lambda s: s["step"] >= 5 and not s["ring_attached"], "disk training, no ring")
    assert f"is a {what}" in t.text()
    os.rmdir(path) if what == "directory" else os.unlink(path)
    p = producers(ring_name)
    t.until(lambda s: s["ring_attached"], "attached once a real ring is there")
    p.publish(4)
    t.until(lambda s: s["samples_live"] >= 4, "live samples")
    assert t.stop() == 0


# --- 13.9: "closed" forged into a live ring's header -------------------------------------------


def test_a_forged_closed_state_does_not_leave_the_trainer_waiting(cache, ring_name, tmp_path,
                                                                  producers, trainers):
    p = producers(ring_name)
    t = trainers(cache, ring_name, tmp_path)
    t.until(lambda s: s["ring_attached"], "the trainer attached")
    p.publish(4)
    t.until(lambda s: s["samples_live"] >= 4, "the first live samples")
    damage(ring_name, H["state"], struct.pack("<Q", STATE_CLOSED))
    p.publish(8)
    s = t.until(lambda s: s["samples_live"] >= 12, "live samples after the forged state")
    assert s["ring_reattached"] == 0  # read on, not even a re-attach
    assert t.stop() == 0


# --- 13.5: truncating the ring of a real mm-producer run -----------------------------------------


def _following_reader(name, q):
    """Reads, re-attaching like the trainer, until it has read a sample of a second epoch."""
    seen, epochs = [], []
    deadline = time.monotonic() + 90
    r = None
    while time.monotonic() < deadline:
        if r is None:
            try:
                r = RingReader.attach(name, start="next")
            except (ProducerGone, NotARing):
                time.sleep(0.05)
                continue
            if r.epoch not in epochs:
                epochs.append(r.epoch)
                q.put(("attached", r.epoch))
        try:
            s = r.receive(timeout=1)
        except ProducerGone as e:
            seen.append(type(e).__name__)
            r.close()
            r = None
            continue
        if s is not None and len(epochs) > 1:
            q.put(("read", epochs, seen))
            r.close()
            return
    q.put(("timeout", epochs, seen))


def test_truncating_the_ring_of_a_running_producer_daemon_kills_nothing_and_leaks_nothing(
        ring_name, tmp_path):
    data = make_dataset(tmp_path / "ds", per_class={"train": 2})
    env = {**os.environ, "MMFEED_RUNTIME_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    log = tmp_path / "producer.log"
    producer = subprocess.Popen(
        [sys.executable, "-m", "producer.cli", "run", "--source", str(data), "--ring", ring_name,
         "--loop", "--rate", "max", "--clip-frames", "2", "--device", "cpu",
         "--control", f"ipc://{tmp_path}/p.sock"],
        env=env, stdout=subprocess.DEVNULL, stderr=open(log, "wb"), cwd=ROOT)
    client = ControlClient(f"ipc://{tmp_path}/p.sock", Timeouts(request=5.0, retries=0))
    q = CTX.Queue()
    reader = None
    try:
        st = wait_for(lambda: _try(client.request, "status"), what="the producer's status")
        reader = CTX.Process(target=_following_reader, args=(ring_name, q), daemon=True)
        reader.start()
        assert q.get(timeout=30)[0] == "attached"
        wait_for(lambda: client.request("status")["published"] > st["published"] + 3,
                 what="samples flowing")
        code = "import os, sys; fd = os.open(sys.argv[1], os.O_RDWR); os.ftruncate(fd, 4096)"
        subprocess.run([sys.executable, "-c", code, f"/dev/shm/{ring_name}"], check=True)
        got = q.get(timeout=120)
        while got[0] == "attached":
            got = q.get(timeout=120)
        reader.join(20)
        assert reader.exitcode == 0, f"reader died (rc {reader.exitcode}; -7 is SIGBUS)"
        assert got[0] == "read", got
        st2 = client.request("status")  # the producer answers: it lives
        assert st2["ring_replaced"] == 1 and st2["ring_epoch"] != st["ring_epoch"]
        assert "ring damaged by another process" in log.read_text(errors="replace")
    finally:
        client.close()
        producer.send_signal(signal.SIGTERM)
        producer.wait(60)
        if reader is not None and reader.is_alive():
            reader.kill()
    assert producer.returncode == 0, log.read_text(errors="replace")[-3000:]
    assert [f for f in os.listdir("/dev/shm") if ring_name in f] == []


def _try(fn, *args):
    try:
        return fn(*args)
    except Exception:
        return None
