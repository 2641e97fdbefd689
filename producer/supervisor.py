"""Opening a feed and getting it back after a source failure.

`open_feed(SRC)` is the one place the kind of source decides the kind of feed (a folder is a
dataset replay, anything else a media file or URL: sources.open_source). `Supervisor` holds
the open feed and, when the source fails (folder gone, stream dropped, file vanished), waits
with exponential back-off before recovering it; the waiting is a returned value (`retry()`),
never a sleep.

NOTE [no dead ends]: no failure leaves the producer where only a restart gets it out. A live
stream (a URL) never "finishes": its end is a source failure, retried with back-off; a
recording that finished is replayed by the next change that makes a generation (engine.py).
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from .feeds import DatasetFeed, Feed, FeedHooks
from .media_feed import MediaFeed
from .sources import WatchFolder, open_source

log = logging.getLogger("producer.feeds")

BACKOFF_START_S = 0.25
BACKOFF_MAX_S = 10.0


def open_feed(src: str, *, loop: bool, splits: tuple[str, ...] | None,
              timeouts: tuple[float, float], rate: str, watch: WatchFolder | None,
              hooks: FeedHooks) -> Feed:
    """The feed for SRC: a folder is a dataset replay, anything else a media file or URL
    (sources.open_source decides). Samples the replay leaves out are said here."""
    source = open_source(src, loop=loop, splits=list(splits) if splits else None,
                         timeouts=timeouts)
    for p in source.problems:
        log.warning("sample left out of the replay: %s", p, extra={"file": p.path})
    if source.kind == "dataset":
        return DatasetFeed(source, rate=rate, hooks=hooks)
    return MediaFeed(source, watch=watch, hooks=hooks)


class Supervisor:
    """Opens the feed and, after a source failure, waits with exponential back-off
    (BACKOFF_START_S doubling to BACKOFF_MAX_S) before recovering it: a failed replay is
    opened again, a media source is checked and reopened by its next step. The counters it
    keeps (`source_errors`, `retries`, `last_error`) are the engine's status."""

    def __init__(self, open_new: Callable[[], Feed], counters):
        self._open_new = open_new
        self.counters = counters
        self.feed: Feed | None = None
        self.backoff = BACKOFF_START_S
        self.retry_at = 0.0

    def open(self) -> Feed:
        self.feed = self._open_new()
        return self.feed

    def failed(self, err: Exception) -> None:
        c = self.counters
        c.source_errors += 1
        c.last_error = str(err)
        c.last_error_at = time.time()
        if self.feed is not None:
            self.feed.reset()
        self.retry_at = time.monotonic() + self.backoff
        log.warning("source failed; retrying", extra={"error": str(err),
                                                      "retry_in_s": round(self.backoff, 2),
                                                      "retries": c.retries})
        self.backoff = min(self.backoff * 2, BACKOFF_MAX_S)

    def retry(self) -> float:
        """Seconds still to wait, or 0.0 once the feed is back (SourceError: not yet)."""
        wait = self.retry_at - time.monotonic()
        if wait > 0:
            return wait
        self.counters.retries += 1
        recovered = self.feed.recover() if self.feed is not None else None
        self.feed = recovered if recovered is not None else self._open_new()
        return 0.0

    def published(self) -> None:
        """Data flows: the back-off starts over."""
        c = self.counters
        if c.retries:
            log.info("source recovered", extra={"after_retries": c.retries})
            c.retries = 0
            self.backoff = BACKOFF_START_S
