"""A daemon thread that feeds a bounded queue, and a consumer that asks "is an item ready?"
(`get(0)`) or waits a little (`get(timeout)`): the one core of the trainer's loader threads
(prefetch.py) and of the mixer's wrapper around a plain iterable (`IterableThread`).

NOTE [shutdown order]: 1) set the stop event; 2) the thread notices it within one put timeout
(it never blocks without one, `_put`); 3) join it; 4) only then close what the thread was using
(a ring reader, a cache reader). Items still queued are handed to `_discard` (a pinned batch
goes back to its pool).

An exception inside the thread crosses to the consumer: the next `get` raises `LoaderError`
naming the thread, with the original as its cause (torch's worker loop does the same).
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import Generic, Iterable, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
POLL_S = 0.05            # the longest a put or a stop check waits
_END = object()          # put by the thread after its last item


class LoaderError(RuntimeError):
    """An exception inside a loader thread, re-raised in the consumer with where it happened."""


class QueueThread(Generic[T]):
    """Subclasses implement `_run()`, handing items to `_put(item)` (False: stopped, return)."""

    name = "loader"

    def __init__(self, depth: int = 2):
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self.finished = False  # ran out of items (a finite epoch count); no more will come
        self._ended = False
        self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)

    def start(self) -> "QueueThread[T]":
        self._thread.start()
        return self

    def _main(self) -> None:
        try:
            self._run()
        except BaseException as e:  # crosses to the consumer, which re-raises it with context
            self._error = e
            log.exception("%s thread failed", self.name)
        finally:
            self.finished = True
            # Wake a consumer blocked in get() now, rather than at the end of its timeout.
            while not self._stop.is_set():
                try:
                    self._q.put(_END, timeout=POLL_S)
                    break
                except queue.Full:
                    continue

    def _run(self) -> None:
        raise NotImplementedError

    def _put(self, item: T) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        self._discard(item)
        return False

    def _discard(self, item: T) -> None:
        """An item that will never be taken (stopped): nothing to give back by default."""

    def get(self, timeout: float | None = 0.0) -> T | None:
        """The next item, or None if none arrived within `timeout` (0 = only if ready)."""
        if self._ended:
            return self._fail_or_none()
        try:
            if timeout is not None and timeout <= 0:
                item = self._q.get_nowait()
            else:
                item = self._q.get(timeout=timeout)
        except queue.Empty:
            return self._fail_or_none()
        if item is _END:
            self._ended = True
            return self._fail_or_none()
        return item

    def _fail_or_none(self) -> None:
        if self._error is not None:
            raise LoaderError(f"{self.name} thread failed: {self._error!r}") from self._error
        return None

    def ready(self) -> bool:
        return not self._q.empty()

    @property
    def exhausted(self) -> bool:
        """No item will come any more (the thread ran to its end)."""
        return self._ended or (self.finished and self._q.empty())

    def close(self) -> None:
        """Stop and join (NOTE [shutdown order]); queued items go to `_discard`."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                break
            if item is not _END:
                self._discard(item)


class IterableThread(QueueThread[T]):
    """Runs a plain iterable in a thread so a consumer can ask "is an item ready now?"."""

    name = "mixer source"

    def __init__(self, iterable: Iterable[T], depth: int = 4):
        super().__init__(depth)
        self._it = iterable
        self.start()

    def _run(self) -> None:
        for item in self._it:
            if not self._put(item):
                return
