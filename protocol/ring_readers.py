"""What the ring's writer reads of its registered readers: the slowest position (the lossless
wait), whether the next slot still holds a reader's next sample (the in-place writer's
choice between a loan and a copy), and the eviction of readers whose process is gone.

The reader table's layout is ring_layout.py's (`R`); readers write their own entries
(ring_reader.py), the writer only loads them here, apart from evicting a dead one.
"""
from __future__ import annotations

from . import _seqlock as sl
from .ring_layout import H, R
from .ring_liveness import _pid_alive
from .ring_segment import _bits, _release_entry

# next_slot_needed: a reader lapped within this many rings' worth of samples is a slower one,
# not one lagging for a moment. At the edge of the ring a reader r times slower than the
# writer is lapped every r/(r-1) samples (every 11 at r = 1.1), so 4 rings of 8 slots tell
# the two apart down to a writer ~3% faster than its reader.
LAPPED_WINDOW = 4

_NEVER = -(1 << 62)  # "not lapped in living memory"


class ReaderTable:
    """The registered readers of one ring segment, as its writer sees them."""

    def __init__(self, mm, reader_offsets: list[int], slots: int):
        self._mm = mm
        self._off = reader_offsets
        self._slots = slots
        self._drops: dict[int, tuple[int, int, int]] = {}  # entry -> (start, dropped, at n)

    def slowest(self) -> tuple[int | None, int]:
        """The smallest position over registered readers (None when there are none), and the
        offset of that reader's position word (what a spin waits on)."""
        mm = self._mm
        lo, where = None, 0
        for i in _bits(sl.load_seq_cst(mm, H["active_mask"])):
            off = self._off[i] + R["position"]
            p = sl.load_seq_cst(mm, off)
            if lo is None or p < lo:
                lo, where = p, off
        return lo, where

    def next_slot_needed(self, n: int) -> bool:
        """True when a registered reader that keeps up has not yet passed the sample that the
        slot of sample `n` holds: loaning that slot now would take it from the reader for as
        long as the new sample takes to make (a lossy reader loses it sooner; a lossless
        writer would wait before making anything). `publish` overwrites it only once the
        sample is made, so in place writers (producer/slot_fill.py) take the copy path then.

        Only a reader exactly one ring behind is counted: its next sample is the one in that
        slot. One further behind has lost its next sample already (it is lapped, whether or
        not it has looked yet: a reader held up by its own consumer), and neither is one the
        writer has lapped within the last LAPPED_WINDOW rings: such readers are slower than
        the writer, and a slower lossy reader loses the same number of samples whichever
        slot a write takes (written - read), so copying for it would cost bandwidth and save
        it nothing. Only a reader that lags for a moment is protected. Call once a sample:
        the drop counters are sampled here."""
        mm, needed = self._mm, False
        for i in _bits(sl.load_seq_cst(mm, H["active_mask"])):
            base = self._off[i]
            start = sl.load_acquire(mm, base + R["start"])
            dropped = sl.load_acquire(mm, base + R["dropped"])
            seen = self._drops.get(i)
            if seen is None or seen[0] != start:      # a reader new to this entry
                seen = self._drops[i] = (start, dropped, _NEVER)
            elif seen[1] != dropped:                  # lapped since the last look
                seen = self._drops[i] = (start, dropped, n)
            if n == sl.load_seq_cst(mm, base + R["position"]) + self._slots \
                    and n - seen[2] > LAPPED_WINDOW * self._slots:
                needed = True
        return needed

    def evict_dead(self) -> list[int]:
        """Unregister readers whose process is gone, so they stop holding the writer back."""
        mm, evicted = self._mm, []
        for i in _bits(sl.load_seq_cst(mm, H["active_mask"])):
            off = self._off[i]
            pid = sl.load_acquire(mm, off + R["pid"])
            if not _pid_alive(pid):
                _release_entry(mm, i, off, pid)
                evicted.append(i)
        return evicted
