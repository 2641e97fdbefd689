"""The fault-injection soak (bench/faults.py), CI-sized: the same bench as the 30-minute run,
for about half a minute of faults with a fixed seed. Behaviour, not timing: whatever the
machine's speed, no daemon may crash, hang or leak shared memory, and nothing else the bench
judges (mmctl, protocol replies, internal errors, tracebacks) may fail.

Real processes throughout: two mm-producer daemons (a dataset replay and a UDP stream sent
by the ffmpeg command line), mm-trainer, a ring reader, mmctl, raw ZeroMQ, real signals.
"""
from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench._fault_menu import METRICS_REQUESTS, Menu
from bench._fault_rig import growth_per_hour, judge_exit
from cli.mmctl import main as mmctl_main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(shutil.which("ffmpeg") is None,
                    reason="the ffmpeg command line sends the bench's live stream; install ffmpeg")
def test_a_short_fault_soak_has_no_crash_no_hang_and_no_leak():
    done = subprocess.run(
        [sys.executable, "-m", "bench.faults", "--minutes", "0.6", "--seed", "7",
         "--baseline-s", "5", "--fault-interval", "2.5", "--command-interval", "0.5",
         "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=840)
    lines = done.stdout.strip().splitlines()
    assert lines, f"no output; stderr:\n{done.stderr[-3000:]}"
    out = json.loads(lines[-1])
    failures = "\n".join(f"{f['kind']} {f['process']}: {f['detail']}\n{f['evidence'][-1500:]}"
                         for f in out["failures"])
    assert out["crashes"] == 0, failures
    assert out["hangs"] == 0, failures
    assert out["leaks"] == 0 and out["leaked_shm"] == 0, failures
    assert out["leftover_runtime_files"] == [], failures
    assert out["failures"] == [], failures
    assert done.returncode == 0, done.stderr[-3000:]
    # It did what it says: every kind of fault, commands of each kind, training throughout.
    assert all(n >= 1 for n in out["faults"].values()), out["faults"]
    c = out["commands"]
    assert c["mmctl_valid"] + c["mmctl_invalid"] >= 1 and c["raw"] >= 1, c
    assert out["samples_trained"] > 0
    assert out["bench"] == "faults" and out["unit"] == "samples/min" and out["machine"]


def test_an_exit_is_a_crash_unless_the_bench_caused_it():
    sigkill, sigterm, sigsegv = 9, 15, 11
    assert judge_exit(-sigkill, {sigkill}, daemon=True) is None
    assert judge_exit(0, {sigterm}, daemon=True) is None
    assert judge_exit(-sigterm, {sigterm}, daemon=True) is None  # before its handler existed
    assert "SIGSEGV" in judge_exit(-sigsegv, set(), daemon=True)
    assert "status 1" in judge_exit(1, {sigterm}, daemon=True)
    assert "nothing asked" in judge_exit(0, set(), daemon=True)
    assert judge_exit(0, set(), daemon=False) is None  # the sender may end on its own


def test_rss_growth_is_fitted_within_each_incarnation_after_its_warm_up():
    # Two incarnations, each growing 1 MiB per 10 s after a warm-up jump, each restart low
    # again: 360 MiB/h, which one line through all points would not say.
    pts = [(1, 0.0, 500.0)] + [(1, t, 100 + t / 10) for t in (40.0, 50.0, 60.0)] + \
          [(2, t, 50 + t / 10) for t in (40.0, 50.0, 60.0, 70.0)]
    slope, n = growth_per_hour(pts, warmup_s=30.0)
    assert slope == pytest.approx(360.0) and n == 7
    assert growth_per_hour([(1, 40.0, 1.0)], warmup_s=30.0) == (None, 0)


def test_the_fault_menu_sends_every_mmctl_command_valid_and_invalid(tmp_path):
    # Derived from the CLI itself: a new mmctl command without an entry in the menu fails here.
    menu = Menu(random.Random(0), tmp_path)
    valid = {c.args[0] for c in menu.commands() if c.valid}
    invalid = {c.args[0] for c in menu.commands() if not c.valid}
    commands = set(mmctl_main.commands)
    assert commands - valid == set(), "commands the bench never sends valid"
    assert commands - invalid == set(), "commands the bench never sends invalid"


def test_the_fault_menu_writes_nothing_outside_its_folder(tmp_path):
    menu = Menu(random.Random(0), tmp_path)
    for c in menu.commands():
        for a in c.args:
            if a.startswith("/"):
                assert a.startswith(str(tmp_path)), c.text()
    units = [c for c in menu.commands() if c.args[0] == "install-units" and c.valid]
    assert units and all("--dry-run" in c.args for c in units)


def test_the_fault_menu_is_repeatable_from_its_seed(tmp_path):
    def draws(seed: int) -> list:
        menu = Menu(random.Random(seed), tmp_path)
        return [(menu.cli(3).args, menu.raw()[0], menu.metrics()[0]) for _ in range(20)]

    assert draws(5) == draws(5) != draws(6)


def test_every_metrics_request_has_a_scrape_and_garbage():
    assert any(scrape for _, scrape in METRICS_REQUESTS.values())
    assert any(not scrape for _, scrape in METRICS_REQUESTS.values())
