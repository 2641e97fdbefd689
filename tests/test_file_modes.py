"""Cache and checkpoint files get explicit modes, whatever the umask: 0600 files and 0700
directories, or 0640 and 0750 of the group with --group / $MMFEED_GROUP
(protocol/filemodes.py). Real `mm-producer preprocess` and `mm-trainer run` processes."""
from __future__ import annotations

import grp
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _trainer_data import build_cache  # noqa: E402

from producer.synth import make_sample

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _a_group_we_may_use() -> grp.struct_group | None:
    """A group other than our own primary one that this user may give files to (root: any)."""
    mine = set(os.getgroups()) if os.geteuid() != 0 else {g.gr_gid for g in grp.getgrall()}
    for g in grp.getgrall():
        if g.gr_gid != os.getegid() and g.gr_gid in mine:
            return g
    return None


GROUP = _a_group_we_may_use()
needs_group = pytest.mark.skipif(GROUP is None, reason="this user is in no group besides its "
                                 "primary one, so --group cannot be shown to change anything")


def _modes(root: Path) -> dict[str, tuple[int, int]]:
    """relative path -> (permission bits, gid) of root and everything under it."""
    out = {".": (stat.S_IMODE(root.stat().st_mode), root.stat().st_gid)}
    for base, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(base, name)
            st = p.lstat()
            out[str(p.relative_to(root))] = (stat.S_IMODE(st.st_mode), st.st_gid)
    return out


def _with_umask(mask: int):
    return lambda: os.umask(mask)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("modes") / "ds"
    rng = np.random.default_rng(4)
    for k, cls in enumerate(("circle", "square")):
        make_sample(root / "train" / cls / "0000", k, rng, index=k, clip_seconds=0.5,
                    size=(32, 24), extras=False)
    return root


def _preprocess(dataset: Path, cache: Path, umask: int, *args: str, env=None):
    return subprocess.run([str(BIN / "mm-producer"), "preprocess", str(dataset), "--cache",
                           str(cache), "--workers", "1", "--quiet", *args],
                          capture_output=True, text=True, timeout=300,
                          preexec_fn=_with_umask(umask), env={**os.environ, **(env or {})})


@pytest.mark.parametrize("umask", [0o000, 0o022], ids=["umask000", "umask022"])
def test_cache_files_are_0600_and_its_folders_0700_whatever_the_umask(dataset, tmp_path,
                                                                      umask):
    cache = tmp_path / "cache"
    r = _preprocess(dataset, cache, umask)
    assert r.returncode == 0, r.stderr[-2000:]
    modes = _modes(cache)
    assert len(modes) >= 8  # ., .lock, CURRENT, v000001/, shard, index, schemas, keys, manifest
    for rel, (mode, _) in modes.items():
        want = 0o700 if (cache / rel).is_dir() else 0o600
        assert mode == want, f"{rel}: {mode:o}, expected {want:o} (umask {umask:03o})"


@needs_group
@pytest.mark.parametrize("how", ["option", "env"])
def test_with_a_group_cache_files_are_0640_and_its_folders_0750_of_that_group(dataset,
                                                                              tmp_path, how):
    cache = tmp_path / "cache"
    args, env = ((["--group", GROUP.gr_name], None) if how == "option"
                 else ([], {"MMFEED_GROUP": GROUP.gr_name}))
    r = _preprocess(dataset, cache, 0o000, *args, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    for rel, (mode, gid) in _modes(cache).items():
        want = 0o750 if (cache / rel).is_dir() else 0o640
        assert (mode, gid) == (want, GROUP.gr_gid), f"{rel}: {mode:o} gid {gid}"


def test_an_unknown_group_is_a_usage_error_naming_it(dataset, tmp_path):
    r = _preprocess(dataset, tmp_path / "cache", 0o022, "--group", "no-such-group-mmfeed")
    assert r.returncode == 2 and "no-such-group-mmfeed" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "cache").exists()


# --- checkpoints -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return build_cache(tmp_path_factory.mktemp("ckcache") / "c", n_train=12, n_val=6)


def _train(cache: Path, ck: Path, tmp_path: Path, umask: int, *args: str):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("MMFEED_GROUP", None)
    return subprocess.run([str(BIN / "mm-trainer"), "run", "--cache", str(cache), "--steps",
                           "2", "--batch-size", "4", "--checkpoint-dir", str(ck),
                           "--control", f"ipc://{tmp_path}/t.sock", "--log-interval", "60",
                           *args], capture_output=True, text=True, timeout=300,
                          preexec_fn=_with_umask(umask), env=env)


def test_checkpoints_are_0600_in_a_0700_folder_under_umask_000(cache, tmp_path):
    ck = tmp_path / "ck"
    r = _train(cache, ck, tmp_path, 0o000)
    assert r.returncode == 0, r.stderr[-2000:]
    modes = _modes(ck)
    assert modes["."][0] == 0o700 and any(k.startswith("ckpt-") for k in modes)
    assert all(mode == 0o600 for rel, (mode, _) in modes.items() if rel != "."), modes


@needs_group
def test_with_a_group_checkpoints_are_0640_of_that_group(cache, tmp_path):
    ck = tmp_path / "ck"
    r = _train(cache, ck, tmp_path, 0o000, "--group", GROUP.gr_name)
    assert r.returncode == 0, r.stderr[-2000:]
    modes = _modes(ck)
    assert modes["."] == (0o750, GROUP.gr_gid)
    assert all(m == (0o640, GROUP.gr_gid) for rel, m in modes.items() if rel != "."), modes
