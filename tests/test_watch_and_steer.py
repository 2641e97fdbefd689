"""Issue 18's "done when", on real daemons: both metrics endpoints scraped, the TensorBoard
event file read, a preview PNG of every modality, the batch size changed mid-run, live
samples recorded and then trained on by a second run, status that names the bottleneck.

One producer (a dataset replay) and one trainer (ring + cache) run for the whole module, as
real processes with real sockets; each test drives them through mmctl or the control socket
and waits for a condition with a deadline (never a sleep).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import urllib.request
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from cli.mmctl import main as mmctl
from producer.pipeline import PipelineConfig
from producer.preprocess import run_preprocess
from producer.synth import make_dataset
from protocol.cache import CacheReader
from protocol.control import ControlClient, Timeouts

sys.path.insert(0, str(Path(__file__).parent))
from _polling import wait_for  # noqa: E402

pytestmark = pytest.mark.slow


class Run:
    """A producer and a trainer in one runtime dir, and the ways a test talks to them."""

    def __init__(self, base: Path):
        self.base = base
        self.runtime = tempfile.mkdtemp(prefix="mmw", dir="/tmp")
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
                                 "MMFEED_PRODUCER", "MMFEED_TRAINER")}
        self.env["MMFEED_RUNTIME_DIR"] = self.runtime
        self.ring = f"mmw{os.getpid()}-{uuid.uuid4().hex[:6]}"
        # 4 a class: each schema group of the train split holds 6 samples, so a disk batch of
        # 5 (the size test_batch_size... sets) is always possible
        self.dataset = make_dataset(base / "ds", per_class={"train": 4, "val": 1},
                                    size=(32, 24), clip_seconds=0.5)
        self.cache = base / "cache"
        run_preprocess(self.dataset, self.cache, PipelineConfig(), workers=0, progress=False)
        self.tensorboard = base / "tb"
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}

    def start(self, name: str, *args: str) -> subprocess.Popen:
        self.logs[name] = self.base / f"{name}.err"
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", f"{name}.cli", "run", *args], env=self.env,
            stdout=open(self.base / f"{name}.out", "w"), stderr=open(self.logs[name], "w"))
        return self.procs[name]

    def client(self, daemon: str) -> ControlClient:
        return ControlClient(f"ipc://{self.runtime}/{daemon}.sock", Timeouts(5.0, retries=1))

    def status(self, daemon: str) -> dict:
        with self.client(daemon) as c:
            return c.request("status")

    def mmctl(self, *args: str) -> dict:
        r = CliRunner().invoke(mmctl, ["--json", *args], env=self.env)
        assert r.exit_code == 0, r.output
        return json.loads(r.output.strip().splitlines()[-1])

    def mmctl_text(self, *args: str) -> str:
        r = CliRunner().invoke(mmctl, list(args), env=self.env)
        assert r.exit_code == 0, r.output
        return r.output

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    r = Run(tmp_path_factory.mktemp("watch"))
    r.start("producer", "--source", str(r.dataset), "--ring", r.ring, "--loop", "--rate", "max",
            "--clip-frames", "4", "--metrics", "127.0.0.1:0", "--record-cache", str(r.cache),
            "--json")
    wait_for(lambda: (r.base / "producer.out").read_text().strip(), 60, "the producer's ready line")
    r.ready = json.loads((r.base / "producer.out").read_text().splitlines()[0])
    r.start("trainer", "--cache", str(r.cache), "--ring", r.ring, "--mix", "0.5",
            "--checkpoint-dir", str(r.base / "ck"), "--steps", "100000", "--batch-size", "4",
            "--log-interval", "1", "--progress-interval", "1", "--metrics", "127.0.0.1:0",
            "--tensorboard", str(r.tensorboard), "--json")
    wait_for(lambda: r.procs["trainer"].poll() is None and _step(r) >= 3, 180,
             "the trainer's third step")
    yield r
    r.stop()


def _step(r: Run) -> int:
    try:
        return r.status("trainer")["step"]
    except Exception:  # not up yet
        return -1


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        return resp.read().decode()


def _value(text: str, name: str, **labels) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(r"^([a-z_]+)(\{[^}]*\})? (\S+)$", line)
        if m and m.group(1) == name:
            got = ",".join(sorted((m.group(2) or "{}")[1:-1].split(","))) if m.group(2) else ""
            if all(part in got.split(",") for part in want.split(",") if part):
                return float(m.group(3))
    return None


def test_both_daemons_serve_prometheus_metrics(run):
    producer = _scrape(run.ready["metrics"])
    assert _value(producer, "mmfeed_producer_samples_published_total") > 0
    assert _value(producer, "mmfeed_producer_generation") >= 1
    assert _value(producer, "mmfeed_stage_seconds_count", daemon="producer", stage="video") > 0
    assert _value(producer, "process_resident_memory_bytes") > 0
    trainer_url = run.status("trainer")["metrics"]
    trainer = wait_for(lambda: (t := _scrape(trainer_url))
                       and (_value(t, "mmfeed_trainer_steps_total") or 0) >= 3 and t,
                       60, "a trainer scrape after three steps")
    assert _value(trainer, "mmfeed_trainer_samples_total", source="disk") > 0
    assert _value(trainer, "mmfeed_trainer_batch_size") >= 1
    assert _value(trainer, "mmfeed_stage_seconds_count", daemon="trainer", stage="forward") >= 3
    assert "# TYPE mmfeed_stage_seconds histogram" in trainer


def test_status_groups_stage_times_and_names_the_bottleneck(run):
    st = wait_for(lambda: (s := run.status("trainer"))["stages"].get("compute") and s, 60,
                  "compute stages")
    assert set(st["stages"]["compute"]) >= {"forward", "backward", "optimizer"}
    assert "wait" in st["stages"]["data"]
    # Which one it is depends on the machine: a loaded one slows the producer until the trainer
    # is live-starved. Either way the sentence is the trainer's own, never empty.
    if st["live_starved"]:
        assert st["bottleneck"] == st["live_note"] and "mmctl mix" in st["bottleneck"]
    else:
        assert st["bottleneck"].startswith("trainer: ")
    assert "video" in run.status("producer")["stages"]["pipeline"]
    text = run.mmctl_text("status")
    assert "bottleneck: " in text and "stage times" in text and "None" not in text


def test_one_meaning_per_field_name_across_the_daemons(run):
    producer, trainer = run.status("producer"), run.status("trainer")
    assert "epoch" not in producer and producer["ring_epoch"] == run.ready["ring_epoch"]
    assert isinstance(trainer["epoch"], int)  # the training epoch over the disk shard


def test_tensorboard_gets_the_curves_and_a_marker_naming_the_filter_of_a_new_generation(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    gen = run.mmctl("filter", "gray")["generation"]
    run.mmctl("wait", str(gen), "--timeout", "120")

    def marker():
        ea = EventAccumulator(str(run.tensorboard))
        ea.Reload()
        texts = [e.tensor_proto.string_val[0].decode() for tag in ea.Tags()["tensors"]
                 for e in ea.Tensors(tag)]
        return ea if any(t.startswith(f"generation {gen}: filter gray") for t in texts) else None

    ea = wait_for(marker, 60, f"the generation {gen} marker in the event file")
    scalars = set(ea.Tags()["scalars"])
    assert {"train/loss", "train/stall_fraction", "live/fraction", "train/samples_per_s",
            "live/generation", "stages/forward_p50_ms"} <= scalars
    assert max(e.value for e in ea.Scalars("live/generation")) >= gen


def test_preview_draws_every_modality_of_the_newest_live_sample_captioned(run, tmp_path):
    out = tmp_path / "preview.png"
    res = run.mmctl("preview", "--out", str(out))
    img = Image.open(out)
    assert img.size == (res["width"], res["height"])
    assert {p["name"] for p in res["panels"]} == {"video", "audio", "lidar", "radar", "imu"}
    producer = run.status("producer")
    first = res["caption"][0]
    assert first.startswith("generation ") and f"filter {producer['config']['filter']}" in first
    assert "method radar range_doppler" in first and "sensors " in first
    assert img.text["Caption"].splitlines()[0] == first


def test_batch_size_changes_at_a_step_boundary_with_a_linear_lr_rule(run):
    before = run.status("trainer")
    reply = run.mmctl("batch", "5", "--lr-rule", "linear")
    assert reply["previous"] == before["batch_size"] == 4 and reply["batch_size"] == 5
    assert reply["lr"] == pytest.approx(before["lr"] * 1.25)
    # a batch of 5 can only come from the new size (old buffers hold 4 rows at most)
    st = wait_for(lambda: (s := run.status("trainer"))["batch_size_trained"] == 5 and s, 120,
                  "a batch of 5")
    assert st["batch_size"] == 5 and st["lr"] == pytest.approx(before["lr"] * 1.25)


def test_recorded_live_samples_are_read_by_a_second_training_run(run):
    fresh = run.base / "recorded"
    run.mmctl("record", "start", "--split", "train", "--cache", str(fresh))
    wait_for(lambda: (run.status("producer")["record"] or {}).get("recorded", 0) >= 6, 120,
             "six recorded samples")
    done = run.mmctl("record", "stop")
    assert done["recorded"] >= 6 and done["version"] == 1 and done["dropped"] == 0
    with CacheReader(fresh, "train") as r:
        assert len(r) == done["recorded"]
        gens = {r.meta(i).generation for i in range(len(r))}
        assert all(g >= 1 for g in gens)  # live generations, not preprocess's 0
        assert all(r.generation_settings(g)["filter"] for g in gens)
    # a user's model, its batch size found by --auto-batch within a memory budget
    second = subprocess.run(
        [sys.executable, "-m", "trainer.cli", "run", "--cache", str(fresh), "--steps", "2",
         "--model", "_big_activation_model:build",
         "--auto-batch", "--memory-budget", "4GiB", "--no-resume",
         "--control", f"ipc://{run.runtime}/second.sock",
         "--checkpoint-dir", str(run.base / "ck2"), "--json"],
        env={**run.env, "PYTHONPATH": str(Path(__file__).parent)},
        capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["samples_disk"] > 0 and summary["samples_live"] == 0
    assert "auto batch size" in second.stderr and summary["batch_size"] >= 1


def test_recording_appends_a_part_to_the_training_cache(run):
    with CacheReader(run.cache) as r:
        version, records = r.version, len(r)
    run.mmctl("record", "start")  # the producer's --record-cache: the trainer's own cache
    wait_for(lambda: (run.status("producer")["record"] or {}).get("recorded", 0) >= 3, 120,
             "three recorded samples")
    done = run.mmctl("record", "stop")
    assert done["version"] == version + 1 and done["records"] == records + done["recorded"]


def test_progress_lines_say_step_total_rate_and_eta(run):
    lines = wait_for(lambda: [l for l in run.logs["trainer"].read_text().splitlines()
                              if re.search(r" step \d+/100000 \(\d+%\)", l) and "ETA" in l
                              and "samples/s" in l], 60, "progress lines")
    assert "None" not in lines[-1]


def test_top_once_shows_both_daemons_with_stage_bars_and_the_bottleneck(run):
    text = run.mmctl_text("top", "--once")
    assert "producer" in text and "trainer" in text and "bottleneck: " in text
    assert "compute/forward" in text and "pipeline/video" in text and "None" not in text
    frame = run.mmctl("top")
    assert frame["ok"] and frame["producer"]["state"] and frame["trainer"]["step"] >= 0
