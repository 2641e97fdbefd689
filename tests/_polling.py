"""`wait_for`: the suite's one way to wait for something - poll a condition until a generous
deadline, never sleep "long enough" (the project's testing rule). Test files import it
(`sys.path.insert(0, str(Path(__file__).parent))`, then `from _polling import wait_for`),
and a file that polls a fast thing (a ring slot) passes a shorter `interval`."""
from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_for(cond: Callable[[], T], timeout: float = 60.0, what: str = "condition", *,
             interval: float = 0.05, context: Callable[[], str] | None = None) -> T:
    """Call `cond()` every `interval` seconds until it returns something truthy, and return
    that. After `timeout` seconds an AssertionError names `what` (and `context()`, e.g. a
    daemon's stderr tail, when given)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}"
                                 + (f"\n{context()}" if context is not None else ""))
        time.sleep(interval)  # a poll interval, not a guess at how long anything takes
