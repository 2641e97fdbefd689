"""Dataset files that used to stop a whole run: names that are not UTF-8, and a live
`mm-producer run` on a dataset holding every bad case. (The rejected cases themselves are
producer.synth.BAD_CASES, checked one by one through preprocess in test_preprocess.py.)"""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from producer.dataset import index_dataset
from producer.synth import BAD_CASES, NOTED_CASES, make_bad_samples, make_dataset
from protocol.names import escape_name, modality_name, printable, unescape_name
from protocol.ring import RingReader
from protocol.schema import SampleSchema

ROOT = Path(__file__).resolve().parents[1]


# --- names ---------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [b"0003", b"bad_\xff", b"caf\xc3\xa9", b"\xe9t\xe9", b"a\\b",
                                 b"a\\xff", b"line\nbreak", b"\\", b"\x7f\x80\xfe"])
def test_escaped_name_is_printable_utf8_and_maps_back_to_the_bytes(raw):
    text = escape_name(os.fsdecode(raw))
    text.encode("utf-8")  # no lone surrogates left
    assert text.isprintable() and unescape_name(text) == raw


def test_two_names_never_escape_to_one_key():
    # b"a\\xff" (backslash, x, f, f) and b"a\xff" (one byte) must stay apart.
    assert escape_name(os.fsdecode(b"a\\xff")) != escape_name(os.fsdecode(b"a\xff"))


@pytest.mark.parametrize("stem", ["imu\udcff", "2d scan", "café", "x" * 80, "-dash", ""])
def test_any_file_stem_becomes_an_input_name_the_schema_accepts(stem):
    import numpy as np

    name = modality_name(stem)
    SampleSchema.from_arrays({name: np.zeros(3, np.float32)})  # raises on a bad name


def test_printable_leaves_escaped_text_alone():
    once = printable("bad_\udcff\n")
    assert once == "bad_\\xff\\x0a" and printable(once) == once


def test_non_utf8_folder_key_maps_back_to_the_folder_on_disk(bad_dataset):
    root, made = bad_dataset
    case = "non_utf8_folder_name\\xff"
    if case not in made:
        pytest.skip("this filesystem refuses names that are not UTF-8")
    [sample] = [s for s in index_dataset(root).samples if s.dir == made[case]]
    assert sample.key == f"train/circle/bad_{case}"
    folder = unescape_name(sample.key.split("/")[-1])
    assert os.path.isdir(os.path.join(os.fsencode(root), b"train", b"circle", folder))


def test_a_class_folder_that_is_not_utf8_is_a_class_with_an_escaped_name(tmp_path):
    make_dataset(tmp_path / "ds", classes=("circle",), per_class={"train": 1}, seed=3)
    os.rename(tmp_path / "ds" / "train" / "circle",
              os.fsencode(tmp_path / "ds" / "train") + b"/caf\xe9")
    index = index_dataset(tmp_path / "ds")
    assert index.classes == ["caf\\xe9"] and not index.problems
    assert [s.key for s in index.samples] == ["train/caf\\xe9/0000"]


# --- mm-producer run on a dataset with every bad case ------------------------------------


def _json_line(proc: subprocess.Popen, deadline_s: float, log: Path) -> dict:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        r, _, _ = select.select([proc.stdout], [], [], 0.2)
        if r:
            line = proc.stdout.readline()
            if line:
                return json.loads(line)
        if proc.poll() is not None:
            break
    raise AssertionError(f"no JSON line from mm-producer run; stderr:\n"
                         f"{log.read_text(errors='replace')[-3000:]}")


def test_producer_run_on_a_dataset_with_every_bad_case_starts_and_replays_the_good_samples(
        tmp_path):
    root = make_dataset(tmp_path / "ds", per_class={"train": 1}, size=(32, 24),
                        clip_seconds=0.5, seed=5)
    made = make_bad_samples(root)
    cached = {f"train/circle/bad_{c}" for c in NOTED_CASES if c in made}
    good = {"train/circle/0000", "train/square/0000", "train/stripes/0000"} | cached
    runtime = tempfile.mkdtemp(prefix="mmh", dir="/tmp")
    ring = f"mmh{os.getpid()}-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "stderr.log"
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    env["MMFEED_RUNTIME_DIR"] = runtime
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "producer.cli", "run", "--source", str(root), "--ring", ring,
             "--rate", "max", "--loop", "--clip-frames", "2", "--slot-bytes", str(1 << 20),
             "--json"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err)
    try:
        ready = _json_line(proc, 90, log)
        assert ready["event"] == "ready", ready
        seen: set[str] = set()
        with RingReader.attach(ring, start="oldest") as reader:
            deadline = time.monotonic() + 90
            while not good <= seen and time.monotonic() < deadline:
                s = reader.receive(timeout=0.5)
                if s is not None:
                    seen.add(s.meta.source)
        assert good <= seen, f"replayed {sorted(seen)}; stderr:\n{log.read_text()[-2000:]}"
        assert not {f"train/circle/bad_{c}" for c in BAD_CASES} & seen
        assert proc.poll() is None  # still running
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        shutil.rmtree(runtime, ignore_errors=True)
    assert proc.returncode == 0, log.read_text()[-2000:]
    stderr = log.read_text(errors="replace")
    for case in ("video_symlink_loop", "metadata_nested_2000_deep", "timestamp_ns_2_pow_64"):
        assert f"bad_{case}" in stderr, f"{case} not reported:\n{stderr[-3000:]}"
