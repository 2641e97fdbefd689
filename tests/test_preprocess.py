"""`mm-producer preprocess` end to end through the real CLI: report, exit status, cache
contents, incremental re-runs, and an interrupted run that must not damage the cache."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from producer.cli import main
from producer.synth import BAD_CASES, NOTED_CASES
from protocol.cache import CacheReader

MM_PRODUCER = Path(sys.executable).parent / "mm-producer"


def _run(*args: str, check_rc: int | None = None) -> tuple[int, dict | None, str]:
    r = subprocess.run([str(MM_PRODUCER), "preprocess", *args], capture_output=True, text=True,
                       timeout=240)
    if check_rc is not None:
        assert r.returncode == check_rc, r.stderr[-3000:]
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    summary = json.loads(last) if last.startswith("{") else None
    return r.returncode, summary, r.stderr


@pytest.fixture(scope="module")
def bad_run(bad_dataset, tmp_path_factory):
    root, made = bad_dataset
    cache = tmp_path_factory.mktemp("bad_cache") / "cache"
    rc, summary, stderr = _run(str(root), "--cache", str(cache), "--workers", "2", "--json")
    return rc, summary, stderr, cache, root, made


def test_some_rejected_exits_3_and_the_json_summary_is_the_last_line(bad_run):
    rc, summary, stderr, *_ = bad_run
    assert rc == 3, stderr[-3000:]
    assert {"cached", "reused", "rejected", "notes", "classes", "seconds",
            "samples_per_s"} <= set(summary)
    assert summary["classes"] == ["circle", "square", "stripes"]


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_every_bad_case_is_reported_with_file_and_field(bad_run, case):
    _, summary, _, _, _, made = bad_run
    file, field = BAD_CASES[case]
    [r] = [r for r in summary["rejected"] if r["sample"] == f"train/circle/bad_{case}"]
    assert r["file"] == str(made[case] / file).rstrip("/")
    assert r["field"] == field
    assert r["expected"]


@pytest.mark.parametrize("case", sorted(NOTED_CASES))
def test_resampled_audio_and_missing_modality_are_cached_and_noted(bad_run, case):
    _, summary, _, cache, _, _ = bad_run
    key = f"train/circle/bad_{case}"
    assert all(r["sample"] != key for r in summary["rejected"])
    assert any(n.startswith(key) and NOTED_CASES[case] in n for n in summary["notes"])
    with CacheReader(cache) as reader:
        assert key in {reader.meta(i).source for i in range(len(reader))}


def test_every_good_sample_is_cached_with_its_label(bad_run):
    _, summary, _, cache, root, made = bad_run
    good = [p for p in root.glob("*/*/*") if p.is_dir() and not p.name.startswith("bad_")]
    expected = {f"{p.parts[-3]}/{p.parts[-2]}/{p.name}": p.parts[-2] for p in good}
    expected.update({f"train/circle/bad_{c}": "circle" for c in NOTED_CASES})
    with CacheReader(cache) as reader:
        assert reader.classes == ["circle", "square", "stripes"]
        got = {}
        for i in range(len(reader)):
            meta = reader.meta(i)
            got[meta.source] = reader.classes[meta.label]
            arrays = reader.view(i).arrays
            assert arrays["video"].shape == (8, 3, 48, 64)
        assert got == expected
    assert summary["cached"] == len(expected)


def test_the_human_report_names_every_rejected_sample(bad_run):
    _, summary, stderr, *_ = bad_run
    assert f"rejected {len(summary['rejected'])} sample(s):" in stderr
    for r in summary["rejected"]:
        assert r["message"] in stderr


def test_progress_lines_go_to_stderr_when_it_is_not_a_tty(bad_run):
    stderr = bad_run[2]
    assert "preprocess [" in stderr and "samples/s" in stderr and "ETA" in stderr


def test_every_sample_cached_exits_0(synth_dataset, tmp_path):
    rc, summary, _ = _run(str(synth_dataset), "--cache", str(tmp_path / "c"), "--workers", "1",
                          "--json", "--split", "val", check_rc=0)
    assert summary["rejected"] == [] and summary["cached"] == 6 == summary["processed"]


def test_rerun_reuses_every_sample_and_a_touched_one_is_redone(synth_dataset, copy_dataset,
                                                              tmp_path):
    root = copy_dataset(synth_dataset)
    cache = str(tmp_path / "cache")
    _, first, _ = _run(str(root), "--cache", cache, "--workers", "2", "--json", check_rc=0)
    _, again, _ = _run(str(root), "--cache", cache, "--workers", "2", "--json", check_rc=0)
    assert again["reused"] == again["cached"] == first["cached"] and again["processed"] == 0
    wav = root / "train" / "square" / "0001" / "audio.wav"
    st = wav.stat()
    os.utime(wav, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    _, third, _ = _run(str(root), "--cache", cache, "--workers", "2", "--json", check_rc=0)
    assert third["processed"] == 1 and third["reused"] == first["cached"] - 1
    with CacheReader(cache) as reader:
        assert len(reader) == first["cached"]


def test_a_config_change_redoes_every_sample(synth_dataset, tmp_path):
    cache = str(tmp_path / "cache")
    _run(str(synth_dataset), "--cache", cache, "--split", "val", "--workers", "1", check_rc=0)
    _, s, _ = _run(str(synth_dataset), "--cache", cache, "--split", "val", "--workers", "1",
                   "--clip-frames", "3", "--filter", "gray", "--json", check_rc=0)
    assert s["reused"] == 0 and s["processed"] == 6
    with CacheReader(cache) as reader:
        assert reader.view(0).arrays["video"].shape == (3, 1, 48, 64)


def test_sigkill_mid_run_leaves_the_previous_cache_readable(synth_dataset, tmp_path):
    cache = tmp_path / "cache"
    _, first, _ = _run(str(synth_dataset), "--cache", str(cache), "--workers", "1", "--json",
                       check_rc=0)
    # A changed config redoes every sample, so the second run writes v000002 for a while.
    proc = subprocess.Popen([str(MM_PRODUCER), "preprocess", str(synth_dataset), "--cache",
                             str(cache), "--workers", "1", "--clip-frames", "16", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    def writing() -> bool:
        """Records of v000002 on disk: a worker's own shard file (producer/worker_shard.py;
        it becomes shard-*.bin only at commit) or a shard the run writes itself."""
        try:
            return any(p.name.startswith(("worker-", "shard-")) and p.stat().st_size > 0
                       for p in (cache / "v000002").iterdir())
        except FileNotFoundError:  # not created yet, or a file renamed while we looked
            return False

    deadline = time.monotonic() + 120
    try:
        while not writing():
            assert proc.poll() is None, "the run ended before it could be interrupted"
            assert time.monotonic() < deadline, "the second run never started writing"
            time.sleep(0.002)
        helpers = _descendants(proc.pid)  # forkserver, resource tracker, the worker
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # Nothing of the killed run lives on: its worker notices and exits, then the forkserver
    # and the resource tracker (which unlinks the run's semaphores) follow.
    assert helpers, "the run had no helper processes to check"
    deadline = time.monotonic() + 60
    while (alive := [p for p in helpers if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert alive == [], f"processes outlived the killed run: {alive}"
    with CacheReader(cache) as reader:  # still the first version, complete
        assert reader.version == 1 and len(reader) == first["cached"]
        assert reader.view(len(reader) - 1).arrays["video"].shape[0] == 8
    # ...and the next run removes the half-written leftover and commits in its place.
    _, after, _ = _run(str(synth_dataset), "--cache", str(cache), "--workers", "1", "--json",
                       check_rc=0)
    assert after["reused"] == first["cached"] and after["version"] == 2
    with CacheReader(cache) as reader:
        assert reader.version == 2 and len(reader) == first["cached"]


def _descendants(pid: int) -> list[int]:
    """Every live descendant of `pid`, read from /proc (children of children included)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            parent[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, frontier = [], [pid]
    while frontier:
        kids = [c for c, p in parent.items() if p in frontier]
        out += kids
        frontier = kids
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _run_env(env: dict, *args: str) -> tuple[int, dict | None, str]:
    r = subprocess.run([str(MM_PRODUCER), "preprocess", *args], capture_output=True, text=True,
                       timeout=240, env={**os.environ, **env})
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    return r.returncode, json.loads(last) if last.startswith("{") else None, r.stderr


@pytest.mark.parametrize("how, workers, found", [
    ("segv", "2", f"worker exited with signal {int(signal.SIGSEGV)} (SIGSEGV)"),
    ("exit", "1", "worker exited with status 1"),
])
def test_a_sample_that_kills_its_worker_is_the_only_one_rejected(synth_dataset, tmp_path, how,
                                                                   workers, found):
    # The test hook (producer.preprocess_workers.CRASH_ENV) kills whichever worker process takes this
    # sample - a stand-in for a segfault inside FFmpeg or the OOM killer. The run must rebuild
    # its pool, find the culprit by re-running the suspects alone, and cache everything else.
    samples = sorted(p for p in synth_dataset.glob("*/*/*") if p.is_dir())
    culprit = samples[1]
    key = "/".join(culprit.parts[-3:])
    cache = tmp_path / "cache"
    rc, summary, stderr = _run_env({"MMFEED_TEST_CRASH_ON": f"{key}:{how}"}, str(synth_dataset),
                                   "--cache", str(cache), "--workers", workers, "--json")
    assert rc == 3, stderr[-3000:]
    assert summary["rejected"] == [{
        "sample": key, "file": str(culprit), "field": "worker",
        "expected": "a sample the pipeline can process without crashing", "found": found,
        "message": f"{culprit}: worker: expected a sample the pipeline can process without "
                   f"crashing, found {found}"}]
    assert summary["pool_restarts"] >= 1
    with CacheReader(cache) as reader:
        cached = sorted(reader.meta(i).source for i in range(len(reader)))
    assert cached == sorted("/".join(p.parts[-3:]) for p in samples if p != culprit)
    assert summary["cached"] == len(samples) - 1


@pytest.mark.parametrize("args, message", [
    (["{missing}", "--cache", "{tmp}/c"], "does not exist"),
    (["{data}", "--cache", "{tmp}/c", "--filter", "sepia"], "sepia"),
    (["{data}", "--cache", "{tmp}/c", "--method", "radar", "fft9"], "fft9"),
    (["{data}", "--cache", "{tmp}/c", "--sensor", "sonar", "sonar"], "sonar"),
    (["{empty}", "--cache", "{tmp}/c"], "no split folders"),
    (["{data}"], "--cache"),
])
def test_usage_errors_exit_2_and_say_what_is_wrong(synth_dataset, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    fill = {"missing": tmp_path / "nope", "tmp": tmp_path, "data": synth_dataset,
            "empty": tmp_path / "empty"}
    result = CliRunner().invoke(main, ["preprocess", *[a.format(**fill) for a in args]])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "c").exists()


def test_a_long_recording_is_cached_with_its_aligned_frame_and_one_without_times_rejected(
        tmp_path):
    from producer.modalities import lidar
    from producer.synth import make_dataset, make_long_recording

    root = make_dataset(tmp_path / "ds", classes=("circle",), per_class={"train": 1})
    make_long_recording(root / "train" / "circle" / "long", rate=4.0)
    bad = root / "train" / "circle" / "unstamped"
    make_long_recording(bad, rate=4.0, stamps="none")
    rc, summary, stderr = _run(str(root), "--cache", str(tmp_path / "c"), "--workers", "1",
                               "--json")
    assert rc == 3, stderr[-3000:]
    [r] = summary["rejected"]
    assert (r["sample"], r["file"], r["field"]) == ("train/circle/unstamped",
                                                   str(bad / "metadata.json"), "timestamps.lidar")
    with CacheReader(tmp_path / "c") as reader:
        [i] = [i for i in range(len(reader)) if reader.meta(i).source == "train/circle/long"]
        arrays = reader.view(i).arrays
        # clip 0.0..0.7 s: its centre 0.35 s is nearest the lidar frame at 0.25 s
        expected = lidar.bev(lidar.load_points(root / "train/circle/long/lidar_0002.bin"))
        assert set(arrays) == {"video", "lidar"}
        np.testing.assert_array_equal(arrays["lidar"], expected)
