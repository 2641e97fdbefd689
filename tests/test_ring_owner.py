"""Who owns the ring's name (issue 13 item 3): a second, throwaway local user creates
segments in /dev/shm, and readers and producers of this user must refuse them by name.

The other user is real: `useradd` makes it for the test, a forked child drops to its uid and
gid (os.setgid/os.setuid, the same system calls runuser makes) and creates the segment - a
real RingWriter publishing samples - and `userdel` removes the user afterwards. Skipped, with
the reason, where that is impossible (not root, no useradd).
"""
from __future__ import annotations

import grp
import multiprocessing as mp
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from protocol.errors import RingNotOwned
from protocol.ring import RingConfig, RingReader, RingWriter
from protocol.schema import ModalitySpec, SampleMeta, SampleSchema

sys.path.insert(0, str(Path(__file__).parent))
from _rings import ring_name_fixture  # noqa: E402

CTX = mp.get_context("fork")
SCHEMA = SampleSchema((ModalitySpec("x", "uint8", (64,)),))


def _root_with_useradd() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create a throwaway second user"
    for tool in ("useradd", "userdel", "groupadd", "groupdel"):
        if shutil.which(tool) is None:
            return f"needs {tool} to create a throwaway second user"
    return None


@pytest.fixture
def other_user():
    """(name, uid, gid, group name): a new local user in a new group of its own; removed after."""
    why = _root_with_useradd()
    if why:
        pytest.skip(why)
    name = f"mmft{uuid.uuid4().hex[:8]}"
    group = f"{name}g"
    made = subprocess.run(["groupadd", group], capture_output=True, text=True)
    if made.returncode:
        pytest.skip(f"groupadd failed: {made.stderr.strip()}")
    made = subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin",
                           "--gid", group, name], capture_output=True, text=True)
    if made.returncode:
        subprocess.run(["groupdel", group], capture_output=True)
        pytest.skip(f"useradd failed: {made.stderr.strip()}")
    pw = pwd.getpwnam(name)
    try:
        yield name, pw.pw_uid, pw.pw_gid, group
    finally:
        subprocess.run(["userdel", name], capture_output=True)
        subprocess.run(["groupdel", group], capture_output=True)


ring_name = ring_name_fixture("mmfo")


def _as_user_producer(name, uid, gid, group, ready, stop):
    """A real producer running as another user: drops root like runuser, then creates and
    fills the ring (`group`: the producer's --group setting)."""
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    with RingWriter.create(RingConfig(name, slots=2, slot_bytes=4096, group=group)) as w:
        for n in range(3):
            w.publish(SCHEMA, SampleMeta(label=n, index=n), {"x": np.full(64, n, np.uint8)})
        ready.set()
        stop.wait(60)


@pytest.fixture
def foreign_ring(ring_name, other_user):
    """Start a producer as the other user; yields (ring name, user, uid, group)."""
    procs = []

    def start(group: str | None = None):
        user, uid, gid, _ = other_user
        ready, stop = CTX.Event(), CTX.Event()
        p = CTX.Process(target=_as_user_producer,
                        args=(ring_name, uid, gid, group, ready, stop), daemon=True)
        p.start()
        procs.append((p, stop))
        assert ready.wait(20), "the other user's producer did not start"
        return p

    yield start
    for p, stop in procs:
        if p.is_alive():  # (an Event set for a SIGKILLed sleeper would wait for it forever)
            stop.set()
            p.join(10)
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
            p.join(5)


def test_a_reader_refuses_another_users_ring_naming_the_owner(foreign_ring, other_user,
                                                              ring_name):
    user, uid, _, _ = other_user
    foreign_ring()
    assert os.stat(f"/dev/shm/{ring_name}").st_uid == uid  # really the other user's
    with pytest.raises(RingNotOwned, match=rf"owned by uid {uid} \({user}\).*trusts only "
                                           rf"segments of its own uid 0 \(root\)"):
        RingReader.attach(ring_name)  # root could read it: it must not want to


def test_a_reader_with_the_group_setting_accepts_the_groups_0660_ring(foreign_ring, other_user,
                                                                      ring_name):
    user, uid, gid, group = other_user
    foreign_ring(group=group)
    st = os.stat(f"/dev/shm/{ring_name}")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (uid, gid, 0o660)
    with pytest.raises(RingNotOwned):
        RingReader.attach(ring_name)  # without the setting: not trusted
    out = np.empty(SCHEMA.payload_nbytes, np.uint8)
    with RingReader.attach(ring_name, start="oldest", group=group) as r:
        assert [r.receive_into(out, timeout=5)[1].index for _ in range(2)] == [1, 2]


def test_a_reader_with_the_group_setting_still_refuses_a_ring_of_another_group(
        foreign_ring, other_user, ring_name):
    foreign_ring()  # the other user's own 0600 ring
    with pytest.raises(RingNotOwned, match="or group .* with mode 0660"):
        RingReader.attach(ring_name, group=grp.getgrgid(0).gr_name)


def test_the_producer_refuses_another_users_segment_at_its_name_and_leaves_it(
        foreign_ring, other_user, ring_name):
    user, uid, _, _ = other_user
    p = foreign_ring()
    inode = os.stat(f"/dev/shm/{ring_name}").st_ino
    os.kill(p.pid, signal.SIGKILL)  # even stale: another user's ring is not ours to replace
    p.join(10)
    with pytest.raises(RingNotOwned, match=rf"owned by uid {uid} \({user}\).*not by this "
                                           rf"producer's uid 0 \(root\).*Remove it"):
        RingWriter.create(RingConfig(ring_name, slots=2, slot_bytes=4096))
    assert os.stat(f"/dev/shm/{ring_name}").st_ino == inode


def test_a_reader_refuses_a_world_writable_ring_even_of_its_own_user(ring_name):
    with RingWriter.create(RingConfig(ring_name, slots=2, slot_bytes=4096)):
        os.chmod(f"/dev/shm/{ring_name}", 0o666)
        with pytest.raises(RingNotOwned, match="every local user may write into it"):
            RingReader.attach(ring_name)


def _as_user_attach(name, uid, gid, q):
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    try:
        RingReader.attach(name)
        q.put(("attached", ""))
    except Exception as e:  # what the other user is told
        q.put((type(e).__name__, str(e)))


def test_another_user_cannot_open_a_private_ring_and_is_told_whose_it_is(other_user,
                                                                         ring_name):
    user, uid, gid, _ = other_user
    with RingWriter.create(RingConfig(ring_name, slots=2, slot_bytes=4096)):
        q = CTX.Queue()
        p = CTX.Process(target=_as_user_attach, args=(ring_name, uid, gid, q), daemon=True)
        p.start()
        kind, msg = q.get(timeout=20)
        p.join(10)
    assert kind == "RingNotOwned", msg
    assert "permission denied" in msg and "owned by uid 0 (root)" in msg and "mode 0600" in msg


def test_the_trainers_ring_loader_reads_another_users_group_ring_only_with_ring_group(
        foreign_ring, other_user, ring_name, caplog):
    from trainer.loop import TrainConfig
    from trainer.prefetch import RingLoader

    _, _, _, group = other_user
    foreign_ring(group=group)
    with pytest.raises(ValueError, match="no such group"):
        TrainConfig(cache="c", ring=ring_name, ring_group="no-such-group-here")
    for trusted in (None, group):
        loader = RingLoader(ring_name, 2, start="oldest", group=trusted, max_wait_s=0.05).start()
        try:
            deadline = time.monotonic() + 20
            while (b := loader.get(0.1)) is None and trusted and time.monotonic() < deadline:
                pass
            if trusted:
                assert b is not None and b.n >= 1 and loader.stats.samples >= 2
            else:  # refused (and said), never trained on: the loader waits, alive
                while not any("trusts only" in r.getMessage() for r in caplog.records):
                    assert time.monotonic() < deadline, "the refusal was never logged"
                    time.sleep(0.01)
                assert not loader.attached and loader.stats.samples == 0
                assert not loader.finished
        finally:
            loader.close()
