"""Following a live ring across producer restarts, new layouts and damage: the one
attach/re-attach core of the trainer's two ring readers (`RingLoader` in prefetch.py, the
daemon's thread; `RingDataset` in datasets.py, a user's own loop).

A ring ends for a reader in three ways, all `ProducerGone` (RingReader): its producer closed,
died or was replaced (re-attach by name, going on after the last sample read when it is the
same ring), it moved to a new layout (`RingSuperseded`: read the new one from its oldest
sample, nothing lost in the move), or it was found damaged (`RingDamaged`: wait a moment, the
producer replaces it). None of these is an exception to the caller: `lost(e)` says why (once
per kind), counts it and sets where the next reader starts; `attach()` waits, never raising,
while there is nothing to attach to.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from protocol.errors import (NotARing, ProducerGone, RingDamaged, RingError, RingNotFound,
                             RingNotOwned, RingSuperseded)

log = logging.getLogger(__name__)

# After a damaged ring, wait this long before attaching again: the damage may still be there
# (a slot the producer has not rewritten yet), and attach/detach must not spin.
DAMAGE_BACKOFF_S = 0.2
ATTACH_POLL_S = 0.05     # polling for a producer to appear: there is no event to wait on


@dataclass
class FollowCounts:
    reattached: int = 0      # every re-attach, whatever the cause (the two below included)
    relayouts: int = 0       # the producer moved the ring to a new layout (bigger slots)
    damaged: int = 0         # the ring was found damaged and left (RingDamaged)


class RingFollower:
    """One reader of ring `name` at a time (`reader`), re-attached as the ring comes and goes.

    `stop`: an event that ends every wait (a loader thread's); `counts`: where re-attaches are
    counted (an object with the FollowCounts fields: a loader's stats); `on_attach(reader)`:
    called with each new reader, may close it and raise to refuse it (a GPU-slot ring on a
    host loader); `note`: what the caller does while a damaged ring is replaced, for the log.
    """

    def __init__(self, ring: str, *, start: str = "newest", group: str | None = None,
                 stop: threading.Event | None = None, counts=None,
                 on_attach: Callable[[object], None] | None = None,
                 note: str = "re-attaching once it is replaced"):
        self.ring = ring
        self.start = start
        self.group = group    # also trust a ring of this group with mode 0660 (RingReader.attach)
        self.stop = stop if stop is not None else threading.Event()
        self.counts = counts if counts is not None else FollowCounts()
        self.on_attach = on_attach
        self.note = note
        self.reader = None
        self._resume: tuple[int, int] | None = None  # (epoch, position) of the last reader
        self._next_start = start
        self._damaged_epoch: int | None = None       # the last epoch found damaged (said once)
        self._lapped_before = 0                      # lapped samples of the readers dropped

    @property
    def attached(self) -> bool:
        return self.reader is not None

    def attach(self, deadline: float | None = None):
        """Attach, waiting (never raising) while the ring is missing, dead, not a ring (a link,
        a directory, a producer half-way through create) or another user's: the caller goes
        on without it meanwhile. Each kind of wait is logged once. None once `stop` is set or
        `deadline` (time.monotonic) passed."""
        from protocol.ring import RingReader

        said: type | None = None
        while not self.stop.is_set() and (deadline is None or time.monotonic() < deadline):
            try:
                r = RingReader.attach(self.ring, start=self._next_start, resume=self._resume,
                                      group=self.group)
            except (RingNotFound, ProducerGone, NotARing, RingNotOwned) as e:
                if type(e) is not said:
                    log.warning("ring %s not available (%s); waiting for a producer", self.ring, e)
                    said = type(e)
                self.stop.wait(ATTACH_POLL_S)
                continue
            if said is not None or self.counts.reattached:
                log.warning("ring %s: attached (epoch %#x)", self.ring, r.epoch)
            if self.on_attach is not None:
                self.on_attach(r)
            self.reader = r
            return r
        return None

    def lost(self, e: ProducerGone) -> None:
        """The reader's ring ended (ProducerGone and its kinds): say why, count it, and set
        where the next reader starts. A dead ring is never attached to again (attach refuses
        it), a same-epoch re-attach goes on from the last sample read (no sample twice), and
        a new layout is read from its oldest sample (nothing lost in the move)."""
        self.counts.reattached += 1
        r = self.reader
        self._resume = r.mark() if r is not None else None
        self._next_start = self.start
        if isinstance(e, RingSuperseded):
            self.counts.relayouts += 1
            self._next_start, self._resume = "oldest", None
            log.info("ring %s: %s; following it", self.ring, e)
        elif isinstance(e, RingDamaged):
            self.counts.damaged += 1
            epoch = self._resume[0] if self._resume else None
            if epoch != self._damaged_epoch:  # once per ring, not per attempt
                log.warning("ring %s: %s; %s", self.ring, e, self.note)
            self._damaged_epoch = epoch
            self.drop()
            self.stop.wait(DAMAGE_BACKOFF_S)
            return
        else:
            log.warning("ring %s: %s; re-attaching", self.ring, e)
        self.drop()

    @property
    def lapped(self) -> int:
        """Samples the ring moved past before they were read, over every reader so far: on
        a lossy ring, what a reader slower than the producer loses (and the gap a re-attach
        could not resume over). Counted by the ring reader itself (ReaderStats.dropped)."""
        r = self.reader
        return self._lapped_before + (_ring_drops(r) if r is not None else 0)

    def drop(self) -> None:
        """Close the current reader (never raising: it may be on a damaged ring)."""
        r, self.reader = self.reader, None
        if r is not None:
            self._lapped_before += _ring_drops(r)
            try:
                r.close()
            except (RingError, OSError):
                pass


def _ring_drops(reader) -> int:
    """The ring-level drops of a RingReader, or of the RingReader inside a GPU-slot reader
    (whose own `dropped` counts GPU slots rewritten under a copy, reported apart)."""
    inner = getattr(reader, "ring", reader)
    stats = getattr(inner, "stats", None)
    return stats().dropped if callable(stats) else 0
