"""producer/generation_store.py on real files: where the state lives, atomic 0600 writes, and
every kind of damaged file named and never trusted."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from producer.generation_store import (MAX_GENERATION, GenerationStore, default_state_dir,
                                       ring_header_generation)
from protocol.ring import RingConfig, RingWriter


def test_state_dir_is_the_explicit_one_then_systemds_then_xdg_then_home(monkeypatch, tmp_path):
    for var in ("MMFEED_STATE_DIR", "STATE_DIRECTORY", "XDG_STATE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_state_dir() == tmp_path / "home" / ".local" / "state" / "mmfeed"
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert default_state_dir() == tmp_path / "xdg" / "mmfeed"
    # systemd's StateDirectory=mmfeed (several directories are ':'-separated; ours is first)
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/mmfeed:/var/lib/other")
    assert default_state_dir() == Path("/var/lib/mmfeed")
    monkeypatch.setenv("MMFEED_STATE_DIR", str(tmp_path / "mine"))
    assert default_state_dir() == tmp_path / "mine"


def test_a_saved_generation_loads_back_and_the_file_is_0600_whatever_the_umask(tmp_path):
    store = GenerationStore(tmp_path / "state", "cams")
    assert store.load() == (0, None)  # no file yet: nothing to say
    old = os.umask(0)
    try:
        store.save(7)
        store.save(8)
    finally:
        os.umask(old)
    assert store.load() == (8, None)
    assert store.path == tmp_path / "state" / "generations" / "cams.json"
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.path.parent.stat().st_mode) == 0o700
    assert json.loads(store.path.read_text())["ring"] == "cams"
    assert sorted(p.name for p in store.path.parent.iterdir()) == ["cams.json"]  # no temporaries


DAMAGED = {
    "not_json": b"{\"generation\": 4",
    "empty": b"",
    "negative": b'{"generation": -3}',
    "bool": b'{"generation": true}',
    "float": b'{"generation": 2.5}',
    "past_u32": json.dumps({"generation": MAX_GENERATION}).encode(),
    "a_list": b"[1, 2]",
    "huge_digits": b'{"generation": ' + b"9" * 5000 + b"}",
    "deep_nesting": b"[" * 3000,
}


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_a_damaged_file_is_named_and_counts_as_no_generation(tmp_path, case):
    store = GenerationStore(tmp_path, "cams")
    store.path.parent.mkdir(parents=True)
    store.path.write_bytes(DAMAGED[case])
    last, problem = store.load()
    assert last == 0
    assert str(store.path) in problem and "corrupt" in problem, problem


def test_a_symlink_in_place_of_the_file_is_not_followed(tmp_path):
    store = GenerationStore(tmp_path, "cams")
    store.path.parent.mkdir(parents=True)
    target = tmp_path / "elsewhere.json"
    target.write_text('{"generation": 99}')
    store.path.symlink_to(target)
    last, problem = store.load()
    assert last == 0 and "symbolic link" in problem and str(store.path) in problem
    store.save(5)  # the link is replaced by a file of our own, never written through
    assert not store.path.is_symlink() and store.load() == (5, None)
    assert json.loads(target.read_text()) == {"generation": 99}


def test_save_into_a_folder_that_cannot_be_written_raises_oserror(tmp_path):
    blocker = tmp_path / "state"
    blocker.write_text("a file where the folder should be")
    with pytest.raises(OSError):
        GenerationStore(blocker, "cams").save(3)


def test_ring_header_generation_reads_a_left_ring_and_is_none_without_one(tmp_path):
    name = f"mmgs{os.getpid()}"
    assert ring_header_generation(name) is None
    w = RingWriter.create(RingConfig(name, slots=2, slot_bytes=4096))
    try:
        w.set_generation(41)
        assert ring_header_generation(name) == 41
    finally:
        w.close()
    assert ring_header_generation(name) is None


def test_ring_header_generation_reads_a_ring_whose_producer_was_killed():
    # The case the function exists for: a SIGKILLed producer leaves its ring (and its header's
    # generation) behind. RingReader.attach refuses such a ring (ProducerGone: a dead ring never
    # yields a sample), so reading the header must not go through attach.
    name = f"mmgsk{os.getpid()}"
    code = ("import os, sys, signal; from protocol.ring import RingConfig, RingWriter; "
            f"w = RingWriter.create(RingConfig({name!r}, slots=2, slot_bytes=4096)); "
            "w.set_generation(7); print('ready', flush=True); "
            "os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=60)
    try:
        assert proc.stdout.strip() == "ready", proc.stderr
        assert ring_header_generation(name) == 7
    finally:
        for leftover in Path("/dev/shm").glob(f"*{name}*"):
            leftover.unlink()
