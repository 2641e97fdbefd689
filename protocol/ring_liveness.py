"""Who is still there on a ring, and how long each side waits for the other.

A ring outlives nobody's word: the header's `state` can be written by anyone who can write the
segment, so whether a producer or a reader is running is judged from the process table alone:
a pid AND its start time (/proc/PID/stat), since a pid is reused after a SIGKILL (a restarted
container starts its pids over). `_producer_alive` is the whole rule. The waiting constants
here bound how long a dead peer can go unnoticed (`_SLICE_S`) and how long a waiting side spins
before it sleeps ("Convoys" in ring.py).
"""
from __future__ import annotations

import os
import time

_SLICE_S = 0.1          # longest single sleep: how soon a dead peer is noticed
# How long a waiting side spins before it sleeps (see "Convoys"): about two 1 MiB copies.
# `_spin_budget_ns()` makes it zero on one CPU, where the peer cannot run while we spin.
_SPIN_NS = 50_000
# Pause-probes between sched_yield() calls inside a spin (about 5 us): when more processes
# than cores want to run (4 readers + a writer on 2 cores), a spinner hands its core to the
# runnable peer instead of holding it for the whole budget.
_SPIN_YIELD = 256
_STARTUP_WAIT_S = 2.0   # how long attach/create wait for a producer that is still starting
# Where /proc cannot tell a producer from a new process that reuses its pid (no /proc, hidepid,
# a ring from a build that did not record the start time), a producer whose pid is alive but
# whose heartbeat is older than this counts as gone. Generous on purpose: replacing a live
# ring is far worse than a restart that waits for it. The daemon heartbeats every loop, a
# writer blocked in lossless mode every `_SLICE_S`; an idle library writer should call
# `heartbeat()` well within this.
_HEARTBEAT_STALE_S = 30.0


# Bumped in every forked child: a reader compares it with the value at attach instead of
# calling getpid() (a system call) on every receive.
_fork_count = 0


def _after_fork_in_child() -> None:
    global _fork_count
    _fork_count += 1


os.register_at_fork(after_in_child=_after_fork_in_child)


def _cpus_allowed() -> int:
    """How many CPUs this process may run on (taskset, cgroup cpuset). Asked at
    create/attach, not at import, so a process pinned after import is seen."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux: trust the core count
        return os.cpu_count() or 1


def _spin_budget_ns(cpus: int) -> int:
    """`_SPIN_NS`, or 0 on one CPU: there the peer we wait for cannot run while we spin, so
    every spin would be pure loss."""
    return _SPIN_NS if cpus > 1 else 0



def forks() -> int:
    """How many times this process's ancestry forked into it (bumped in every child): a
    reader compares it with the value at attach instead of calling getpid() per receive."""
    return _fork_count


def _proc_stat(pid: int) -> tuple[bytes, int] | None:
    """(state letter, start time) of `pid` from /proc/PID/stat, or None where it cannot be read
    (no such process, no /proc, /proc mounted hidepid). The start time is field 22, clock
    ticks since boot: with the pid it names one process, as a reused pid starts later."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # the name (field 2) may hold ")"
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _own_start() -> int:
    """This process's start time for the header; 0 (= unknown) where /proc cannot tell."""
    st = _proc_stat(os.getpid())
    return 0 if st is None else st[1]


def _pid_exists(pid: int) -> bool:
    if not 0 < pid < 1 << 31:  # a pid the kernel could never hand out (damaged header)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    return True


def _pid_alive(pid: int) -> bool:
    """True when `pid` is a running process. A zombie (killed, not yet reaped) counts as dead:
    it will never read or write again. (Readers' entries: a reader's pid reused while its
    entry is registered keeps that entry until the new process exits.)"""
    if not _pid_exists(pid):
        return False
    st = _proc_stat(pid)
    return st is None or st[0] not in (b"Z", b"X")


# Epochs of the RingWriters open in this process: with them a header naming our own pid is
# told apart from one left by an earlier process that had our pid (see `_producer_alive`).
_own_epochs: set[int] = set()


def _producer_alive(pid: int, start: int, epoch: int | None,
                    heartbeat_ns: int | None) -> tuple[bool, str]:
    """Is the producer that wrote a ring header still running? Returns (verdict, why), `why`
    worded for an error message.

    The rule, most certain first:

    1. Our own pid: alive exactly when this process has an open writer of that epoch. A
       ring of our pid and another epoch was left by an earlier process that had our pid (a
       restarted container) or by this process before an exec; `epoch` None (a ring of
       another protocol version, which this process never writes) is never ours.
    2. No process with that pid, or a zombie: gone.
    3. Start time recorded and /proc readable: alive exactly when the running process
       started when the producer did; a later start is a new process reusing the pid.
    4. Otherwise the pid is alive but may be reused, and only the heartbeat can tell: gone
       once it is older than `_HEARTBEAT_STALE_S`, alive before (and when `heartbeat_ns` is
       None - another version's header, whose heartbeat we cannot find).
    """
    if pid == os.getpid():
        if epoch is not None and epoch in _own_epochs:
            return True, f"it is this process's own open writer (pid {pid})"
        return False, (f"pid {pid} is this process, which has no writer of that ring: the "
                       f"pid was reused")
    if not _pid_exists(pid):
        return False, f"no process has pid {pid}"
    st = _proc_stat(pid)
    if st is not None and st[0] in (b"Z", b"X"):
        return False, f"pid {pid} is a zombie"
    if st is not None and start:
        if st[1] == start:
            return True, f"pid {pid} is running since clock tick {start}"
        return False, (f"pid {pid} is now another process (started at clock tick {st[1]}, "
                       f"the producer at {start}): the pid was reused")
    unsure = (f"pid {pid} is alive but cannot be told from a new process reusing the pid ("
              + ("no start time in the ring header" if st is not None else
                 f"/proc/{pid}/stat unreadable") + ")")
    if heartbeat_ns is None:
        return True, f"{unsure} and its heartbeat cannot be read"
    age = (time.monotonic_ns() - heartbeat_ns) / 1e9
    if age < _HEARTBEAT_STALE_S:
        return True, (f"{unsure}; its last heartbeat is {max(age, 0.0):.1f} s old, a ring "
                      f"counts as abandoned after {_HEARTBEAT_STALE_S:.0f} s without one")
    return False, f"{unsure}, and its heartbeat stopped {age:.0f} s ago"
