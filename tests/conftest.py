"""Shared fixtures: small synthetic datasets of real encoded files, made once per session.

They are read-only by convention: a test that changes files (touch, truncate, chmod) copies
the dataset into its own tmp_path first (`copy_dataset`), so tests never depend on order.
"""
from __future__ import annotations

import shutil
import os
from pathlib import Path

import pytest

from producer.synth import make_bad_samples, make_dataset

#: The fast tier (`make test-fast`, `pytest -m unit`): files of unit tests that start no daemon
#: and no command, each a few seconds at most, for the edit-run loop. `make test` runs them
#: with everything else. A new test file of that kind belongs here.
UNIT_FILES = frozenset({
    "test_align.py", "test_audio.py", "test_cache.py", "test_control.py", "test_dataset.py",
    "test_filters.py", "test_generation_store.py", "test_heap.py", "test_lidar.py",
    "test_logs.py", "test_metadata.py", "test_mmctl.py", "test_notify.py", "test_pipeline.py",
    "test_radar.py", "test_ring_layout.py", "test_schema.py", "test_sources.py",
    "test_systemd_units.py", "test_trainer_batching.py", "test_unknown.py", "test_video.py",
    "test_stages.py", "test_status_view.py", "test_layouts.py", "test_video_store.py",
    "test_metrics.py", "test_progress.py", "test_ffmpeg_chain.py",
    "test_in_place_modalities.py",
})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in UNIT_FILES:
            item.add_marker(pytest.mark.unit)



@pytest.fixture(scope="session", autouse=True)
def private_state_dir(tmp_path_factory):
    """Every producer the suite starts keeps its generations (producer/generation_store.py)
    in a folder of this run, not in the user's ~/.local/state/mmfeed."""
    path = tmp_path_factory.mktemp("state")
    old = os.environ.get("MMFEED_STATE_DIR")
    os.environ["MMFEED_STATE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("MMFEED_STATE_DIR", None)
    else:
        os.environ["MMFEED_STATE_DIR"] = old


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory) -> Path:
    """3 classes x (4 train + 2 val) good samples: video, audio, lidar (+lidar_front in every
    third), radar ADC cube, imu.data (with metadata dtype/shape in even samples)."""
    root = tmp_path_factory.mktemp("synth") / "dataset"
    return make_dataset(root, per_class={"train": 4, "val": 2}, seed=0)


@pytest.fixture(scope="session")
def bad_dataset(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """Good samples plus one folder per bad-input case (producer.synth.BAD_CASES/NOTED_CASES)."""
    root = tmp_path_factory.mktemp("bad") / "dataset"
    make_dataset(root, per_class={"train": 2, "val": 1}, seed=1)
    return root, make_bad_samples(root)


@pytest.fixture
def copy_dataset(tmp_path):
    """copy_dataset(src) -> a private copy under tmp_path (symlinks kept as links)."""
    def copy(src: Path) -> Path:
        dst = tmp_path / "dataset"
        shutil.copytree(src, dst, symlinks=True)
        return dst
    return copy
