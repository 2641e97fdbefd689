"""What the ring tests share: a unique ring name per test that leaves nothing in /dev/shm
(`ring_name_fixture`), the /dev/shm entries of a ring (`shm_entries`, `remove_shm`), and
`procs`, the fixture that kills what a test started. Test files import them after
`sys.path.insert(0, str(Path(__file__).parent))`."""
from __future__ import annotations

import multiprocessing as mp
import os
import uuid

import pytest

SHM = "/dev/shm"


def shm_entries(name: str) -> list[str]:
    """The /dev/shm entries whose name contains `name` (a ring's segment, its semaphores)."""
    return sorted(f for f in os.listdir(SHM) if name in f)


def remove_shm(name: str) -> None:
    """Remove every /dev/shm entry of `name` that a test left behind (a directory planted
    there by a hostile-ring test too); one already gone, or not ours to remove, is left."""
    for f in shm_entries(name):
        p = os.path.join(SHM, f)
        try:
            if os.path.isdir(p) and not os.path.islink(p):
                os.rmdir(p)
            else:
                os.unlink(p)
        except OSError:
            pass


def ring_name_fixture(prefix: str, hex_chars: int = 10):
    """A `ring_name` fixture for a test file: `{prefix}-{pid}-{random hex}`, its /dev/shm
    entries removed after the test (whatever a failing test left). The prefix tells whose a
    leftover is."""

    @pytest.fixture
    def ring_name():
        name = f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:hex_chars]}"
        yield name
        remove_shm(name)

    return ring_name


@pytest.fixture
def procs():
    """A list the test appends its processes to; each still alive at the end is killed."""
    started: list[mp.Process] = []
    yield started
    for p in started:
        if p.is_alive():
            p.kill()
        p.join(5)
