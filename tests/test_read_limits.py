"""A modality reads at most its kind's limit: a huge file is a rejected sample named with the
limit and how to raise it, and memory does not grow with the file (producer/modalities/
_limits.py). Real sparse files of 2 GiB, a real `mm-producer preprocess`, its peak RSS
measured over every process it started (tests/_peak_rss.py)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from producer.modalities._limits import ReadLimits, format_size, parse_size
from producer.synth import make_dataset, make_sample
from protocol.cache import CacheReader

MM_PRODUCER = Path(sys.executable).parent / "mm-producer"
PEAK_RSS = Path(__file__).parent / "_peak_rss.py"
GIB = 1 << 30
#: A generous bound: the run itself (torch, PyAV, numpy) is ~0.4 GiB; a 2 GiB file read whole
#: took it to 6.8-8 GiB.
MAX_PEAK_RSS = 1 * GIB


def _giant_samples(root: Path) -> dict[str, str]:
    """Three samples, each with one 2 GiB sparse file (a hole, no disk used): case -> file."""
    cdir = root / "train" / "circle"
    rng = np.random.default_rng(7)
    made = {}
    for case, file in (("lidar_2g", "lidar.bin"), ("radar_2g", "radar.bin"),
                       ("imu_2g", "imu.data")):
        d = make_sample(cdir / f"giant_{case}", 0, rng, index=1, clip_seconds=0.5,
                        size=(32, 24))
        os.truncate(d / file, 2 * GIB)
        if case == "radar_2g":  # metadata that fits the size: only the limit can refuse it
            meta = json.loads((d / "metadata.json").read_text())
            meta["radar"]["shape"] = [4096, 1024, 128]  # complex int16: 4 bytes each = 2 GiB
            (d / "metadata.json").write_text(json.dumps(meta))
        made[f"train/circle/giant_{case}"] = file
    return made


def _preprocess(*args: str, env: dict | None = None) -> tuple[int, dict | None, str]:
    r = subprocess.run([str(MM_PRODUCER), "preprocess", *args, "--quiet", "--json"],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, **(env or {})})
    lines = r.stdout.strip().splitlines()
    return r.returncode, json.loads(lines[-1]) if lines else None, r.stderr


def test_2gib_sparse_files_are_rejected_by_name_and_memory_stays_bounded(tmp_path):
    root = make_dataset(tmp_path / "ds", per_class={"train": 1}, size=(32, 24),
                        clip_seconds=0.5, seed=2)
    giants = _giant_samples(root)
    r = subprocess.run([sys.executable, str(PEAK_RSS), str(MM_PRODUCER), "preprocess",
                        str(root), "--cache", str(tmp_path / "cache"), "--workers", "1",
                        "--quiet", "--json"], capture_output=True, text=True, timeout=600)
    *out, peak_line = r.stdout.strip().splitlines()
    peak = json.loads(peak_line)
    assert peak["rc"] == 3 and out, \
        f"rc {peak['rc']}, peak RSS {peak['max_rss_kib'] >> 10} MiB:\n{r.stderr[-3000:]}"
    summary = json.loads(out[-1])
    rejected = {x["sample"]: x for x in summary["rejected"]}
    assert set(rejected) == set(giants)
    for key, file in giants.items():
        kind = {"lidar.bin": "lidar", "radar.bin": "radar", "imu.data": "unknown"}[file]
        x = rejected[key]
        assert x["file"].endswith(f"{key.split('/')[-1]}/{file}") and x["field"] == "size"
        assert f"--read-limit {kind}=SIZE" in x["expected"] and "2 GiB" in x["found"]
    with CacheReader(tmp_path / "cache") as reader:
        assert {reader.meta(i).source for i in range(len(reader))} == {
            "train/circle/0000", "train/square/0000", "train/stripes/0000"}
    assert peak["max_rss_kib"] * 1024 < MAX_PEAK_RSS, \
        f"peak RSS {peak['max_rss_kib'] / 1024:.0f} MiB"


@pytest.fixture(scope="module")
def one_sample(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("limits") / "ds"
    make_sample(root / "train" / "circle" / "0000", 0, np.random.default_rng(1), index=1,
                clip_seconds=0.5, size=(32, 24))
    return root  # its imu.data is 1200 bytes, without metadata


@pytest.mark.parametrize("how", ["option", "env"])
def test_a_file_over_a_lowered_limit_is_rejected_naming_the_limit(one_sample, tmp_path, how):
    args, env = ((["--read-limit", "unknown=1K"], None) if how == "option"
                 else ([], {"MMFEED_READ_LIMITS": "unknown=1K"}))
    rc, summary, stderr = _preprocess(str(one_sample), "--cache", str(tmp_path / "c"),
                                      "--workers", "1", *args, env=env)
    assert rc == 3, stderr[-2000:]
    [x] = summary["rejected"]
    assert x["file"].endswith("imu.data") and x["field"] == "size"
    assert "at most 1 KiB, the unknown read limit" in x["expected"]
    assert x["found"] == "1.2 KiB (1200 bytes)"


def test_a_raised_limit_admits_the_file(one_sample, tmp_path):
    rc, summary, stderr = _preprocess(str(one_sample), "--cache", str(tmp_path / "c"),
                                      "--workers", "1", "--read-limit", "unknown=2K",
                                      env={"MMFEED_READ_LIMITS": "unknown=1K"})
    assert rc == 0 and summary["cached"] == 1, stderr[-2000:]


@pytest.mark.parametrize("value", ["lidar=lots", "video=1G", "lidar", "radar=0"])
def test_a_bad_read_limit_is_a_usage_error_naming_it(one_sample, tmp_path, value):
    rc, _, stderr = _preprocess(str(one_sample), "--cache", str(tmp_path / "c"),
                                "--read-limit", value)
    assert rc == 2 and value.split("=")[0] in stderr, stderr[-2000:]


@pytest.mark.parametrize("text, n", [("512M", 512 << 20), ("1G", GIB), ("64KiB", 65536),
                                     ("1048576", 1 << 20), ("2 GB", 2 * GIB)])
def test_sizes_are_read_in_powers_of_1024(text, n):
    assert parse_size(text) == n


def test_limits_print_as_the_user_would_write_them():
    assert ReadLimits().with_settings("lidar=1G").lidar == GIB
    assert format_size(2 * GIB) == "2 GiB" and format_size(1500) == "1.5 KiB"


def test_the_pipeline_config_takes_the_limits_from_the_environment(monkeypatch):
    # How `mm-producer run` gets them: its PipelineConfig is built with the defaults.
    from producer.pipeline import PipelineConfig

    monkeypatch.setenv("MMFEED_READ_LIMITS", "lidar=1G, radar=128M")
    cfg = PipelineConfig()
    assert (cfg.read_limits.lidar, cfg.read_limits.radar) == (GIB, 128 << 20)
    assert cfg.config_hash() == PipelineConfig(read_limits=ReadLimits()).config_hash()


def test_a_bad_limit_in_the_environment_stops_producer_run_as_a_usage_error():
    r = subprocess.run([sys.executable, "-m", "producer.cli", "run", "--source", "/nonexistent",
                        "--ring", f"mmrl{os.getpid()}"], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "MMFEED_READ_LIMITS": "lidar=lots"},
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 2 and "$MMFEED_READ_LIMITS" in r.stderr and "lots" in r.stderr


def test_producer_run_skips_a_file_over_the_limit_naming_it(one_sample, tmp_path):
    runtime = tempfile.mkdtemp(prefix="mmrl", dir="/tmp")
    log = tmp_path / "stderr.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))}
    env.update(MMFEED_READ_LIMITS="unknown=1K", MMFEED_RUNTIME_DIR=runtime)
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "producer.cli", "run", "--source",
                                 str(one_sample), "--ring", f"mmrl{uuid.uuid4().hex[:10]}",
                                 "--rate", "max", "--loop"], stdout=subprocess.DEVNULL,
                                stderr=err, env=env, cwd=Path(__file__).resolve().parents[1])
    try:
        deadline = time.monotonic() + 90
        while "the unknown read limit" not in log.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.05)  # polling a condition with a deadline
        assert "imu.data" in log.read_text(errors="replace")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        shutil.rmtree(runtime, ignore_errors=True)
