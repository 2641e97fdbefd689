"""Start the disk write of a file range now, without waiting for it (Linux sync_file_range).

WHY: a preprocess run writes its shard into the page cache, and the commit's fsync then
writes all of it while nothing else runs: 0.2 s of a 3.4 s 480-sample run on this machine's
disk, paid per sample in the steady state. Started as each few megabytes land, the disk
writes them while the workers decode the next samples, and the commit's fsync finds little
left. Where the call is missing (not Linux, no libc symbol) `start_writeback` does nothing:
fsync still writes everything at commit, as before.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start write-out of dirty pages, do not wait

#: Bytes written between two calls: large enough that the syscall is noise per record,
#: small enough that the disk starts soon after the first chunk.
WRITEBACK_EVERY = 8 << 20


#: Set to 0 to leave all of the write to the commit's fsync (the behaviour before): what
#: bench/preprocess.py compares against in the same run.
WRITEBACK_ENV = "MMFEED_EARLY_WRITEBACK"


def _bind():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _bind()


def start_writeback(fd: int, offset: int, nbytes: int) -> bool:
    """Ask the kernel to start writing [offset, offset + nbytes) of `fd` to disk; True when it
    was asked. Never raises: an fs that refuses (EINVAL, ESPIPE) is left to fsync."""
    if _sync_file_range is None or nbytes <= 0 or not available():
        return False
    return _sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE) == 0


def available() -> bool:
    """Whether start_writeback does anything here (Linux libc, not turned off by
    $MMFEED_EARLY_WRITEBACK=0; read when called: once per WRITEBACK_EVERY bytes)."""
    return _sync_file_range is not None and os.environ.get(WRITEBACK_ENV, "1") != "0"
