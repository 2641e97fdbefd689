"""Run a command and print one JSON line: its exit status and the peak RSS of every process
it started (its workers, their forkserver), in KiB.

    python tests/_peak_rss.py CMD [ARGS...]

WHY a wrapper: ru_maxrss of RUSAGE_CHILDREN counts only children that were waited for, and is
a maximum over the caller's whole life. This fresh process waits for the command and, as a
child subreaper (prctl PR_SET_CHILD_SUBREAPER), also for the processes that the command's exit
orphaned (a forkserver outlives the run that started it), so every descendant is counted and
nothing from earlier tests is.
"""
from __future__ import annotations

import ctypes
import json
import os
import resource
import subprocess
import sys

PR_SET_CHILD_SUBREAPER = 36


def main() -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    proc = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE)
    while True:  # the orphans: reap them so their peaks count
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
    sys.stdout.buffer.write(proc.stdout)
    print(json.dumps({"rc": proc.returncode,
                      "max_rss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
