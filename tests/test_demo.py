"""`make demo`, in its shorter setting, end to end: both daemons, a filter switch, a summary.

This is the first thing a user runs, so it is in the suite: if it breaks, CI is red.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli.demo import REAL_DATA
from protocol.cache import CacheReader

REPO = Path(__file__).resolve().parent.parent


def _demo(workdir: Path) -> tuple[dict, str]:
    r = subprocess.run([sys.executable, "-m", "cli.demo", "--quick", "--workdir", str(workdir), "--json"],
                       cwd=REPO, capture_output=True, text=True, timeout=580)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stdout + "\n" + r.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_trains_through_a_filter_switch_leaves_nothing_behind_and_runs_again(tmp_path):
    summary, text = _demo(tmp_path)
    assert "mmfeed demo summary" in text
    # both daemons stopped cleanly on SIGTERM; nothing is left in /dev/shm or running
    assert summary["exit_codes"] == {"producer": 0, "trainer": 0}
    assert summary["leftover_shm"] == []
    assert summary["leftover_processes"] == []
    # the live mix `mmctl mix` set is the trainer's mix at the end
    assert summary["status"]["trainer"]["live_fraction_target"] == summary["mix"] == 0.75
    tr = summary["trainer"]
    # the trainer trained on the grayscale generation `mmctl filter gray` made, from both sides
    assert summary["filter_generation"] in tr["generations"]
    assert tr["samples_live"] > 0 and tr["samples_disk"] > 0
    assert tr["copies_per_sample"] == 1.0
    assert Path(tr["checkpoint"]).exists()  # written on SIGTERM
    assert summary["status"]["producer"]["generation"] == summary["filter_generation"]
    assert summary["preprocess"]["cached"] > 0 and summary["preprocess"]["rejected"] == []
    # it ends by drawing a live sample and saying where the TensorBoard logs are
    from PIL import Image

    assert Image.open(summary["preview"]["path"]).format == "PNG"
    assert summary["preview"]["caption"][0].startswith(f"generation {summary['filter_generation']}")
    assert list(Path(summary["tensorboard"]).glob("events.out.tfevents.*"))
    assert f"TensorBoard logs           {summary['tensorboard']}" in text
    # while it waits it says how training goes (step, rate, ETA), not nothing
    assert "[demo] trainer: step " in text
    if REAL_DATA.is_dir():
        # the real recordings went through the same pipeline into the cache (test split)
        assert summary["real_recordings"], "real recordings present but not in the demo dataset"
        test_split = CacheReader(tmp_path / "cache", split="test")
        keys = {test_split.meta(i).source for i in range(len(test_split))}
        assert {f"test/real/{n}" for n in summary["real_recordings"]} <= keys

    # A second run in the same folder works too: the cache is reused, not rebuilt.
    again, _ = _demo(tmp_path)
    assert again["exit_codes"] == {"producer": 0, "trainer": 0}
    assert again["preprocess"]["reused"] == summary["preprocess"]["cached"]
