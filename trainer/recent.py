"""A bounded set of generation numbers: the newest ones a trainer has seen or trained on."""
from __future__ import annotations

from collections.abc import Iterable


class RecentGenerations(set):
    """Generation numbers, keeping only the newest `KEEP` of them.

    WHY bounded: `status` lists these, and generations only grow - a trainer whose filter is
    switched every few seconds for weeks would grow this set and every status reply without end,
    until a reply outgrew the control transport's cap and `mmctl status` stopped answering.
    `mmctl wait` needs only the newest generation trained (`status.generation`), not the history.
    """

    KEEP = 256

    def add(self, generation: int) -> None:
        if generation in self:
            return
        super().add(generation)
        if len(self) > self.KEEP:
            self.discard(min(self))

    def update(self, *more: Iterable[int]) -> None:
        for items in more:
            for g in items:
                self.add(g)
