"""The benchmark harness: every benchmark explains itself, and no figure is printed without its limit.

Benchmarks are not timed tests; these check only their interface, never a speed.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench._common import report

ROOT = Path(__file__).resolve().parents[1]
BENCHES = sorted(p.stem for p in (ROOT / "bench").glob("*.py") if not p.stem.startswith("_"))


def test_the_bench_folder_has_the_hot_path_benchmarks():
    assert {"ring", "decode", "cache", "loader", "stall", "producer", "preprocess"} <= set(BENCHES)


@pytest.mark.parametrize("name", BENCHES)
def test_every_benchmark_prints_help_and_runs_nothing(name):
    done = subprocess.run([sys.executable, "-m", f"bench.{name}", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout
    assert "--json" in done.stdout


def test_report_prints_the_figure_beside_its_limit_as_a_ratio(capsys):
    obj = report("demo", 8.0, "GB/s", "memcpy", 10.0, as_json=True, note="x")
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("demo  8.000 GB/s | memcpy 10.000 GB/s | ratio 0.80")
    assert json.loads(lines[-1]) == obj
    assert obj["ratio"] == 0.8 and obj["limit_name"] == "memcpy" and obj["note"] == "x"
    assert obj["machine"]


@pytest.mark.parametrize("limit", [0, -1.0, None])
def test_report_refuses_a_figure_without_a_measured_limit(limit):
    with pytest.raises(ValueError, match="needs its measured limit"):
        report("demo", 1.0, "GB/s", "memcpy", limit, as_json=False)
