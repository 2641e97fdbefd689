"""Where this trainer process sits in a torchrun job, and what follows for its data.

torchrun (c10d rendezvous) starts `--nproc-per-node` ranks on each of `--nnodes` machines and
tells each one RANK/WORLD_SIZE (the job) and LOCAL_RANK/LOCAL_WORLD_SIZE (its machine), plus
GROUP_RANK (its machine's place among the nodes).

NOTE [live split]: each node runs its own `mm-producer run`, writing a ring in that node's
/dev/shm, and every rank of the node reads that ring. A live sample must therefore be kept by
exactly one rank OF ITS NODE: the ring's samples are split by `meta.index % LOCAL_WORLD_SIZE ==
LOCAL_RANK`. Splitting by the global rank instead (as before) made each node discard
(nodes - 1) / nodes of its own producer's samples: with two nodes of one rank each, the rank on
node 1 kept only odd indices and the even ones went to a rank on another machine that never
sees this ring. Disk samples are split by the global rank: every node reads the same cache
(a shared file system or a copy per node), and the job as a whole goes through it once per
epoch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class Dist:
    """This process's place in the job; the defaults are a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int | None = None  # ranks on this node; None = world_size (one node)
    node: int = 0                        # torchrun's GROUP_RANK: this node's index

    def __post_init__(self) -> None:
        if self.local_world_size is None:
            self.local_world_size = self.world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"RANK {self.rank} is outside 0..{self.world_size - 1} (WORLD_SIZE "
                             f"{self.world_size}); start the trainer with torchrun")
        if not 0 <= self.local_rank < self.local_world_size:
            raise ValueError(f"LOCAL_RANK {self.local_rank} is outside "
                             f"0..{self.local_world_size - 1} (LOCAL_WORLD_SIZE "
                             f"{self.local_world_size}); start the trainer with torchrun")
        if self.local_world_size > self.world_size:
            raise ValueError(f"LOCAL_WORLD_SIZE {self.local_world_size} is larger than "
                             f"WORLD_SIZE {self.world_size}")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def nodes(self) -> int:
        """Nodes in the job (torchrun gives every node the same --nproc-per-node)."""
        return max(1, self.world_size // self.local_world_size)

    @property
    def live_shard(self) -> tuple[int, int]:
        """(reader, readers) of this node's ring: NOTE [live split]."""
        return self.local_rank, self.local_world_size

    @property
    def disk_shard(self) -> tuple[int, int]:
        """(shard, shards) of the disk cache: the global rank."""
        return self.rank, self.world_size

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Dist":
        """From torchrun's variables; a plain process (none set) is rank 0 of 1."""
        env = os.environ if env is None else env

        def number(name: str, default: int) -> int:
            value = env.get(name)
            if value is None or value == "":
                return default
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"{name}={value!r}: expected an integer (torchrun sets it)") \
                    from None

        world = number("WORLD_SIZE", 1)
        return cls(rank=number("RANK", 0), world_size=world, local_rank=number("LOCAL_RANK", 0),
                   local_world_size=number("LOCAL_WORLD_SIZE", world),
                   node=number("GROUP_RANK", 0))


def rescale_disk_position(position: tuple[int, int], saved_batches: int,
                          batches: int) -> tuple[int, int]:
    """(epoch, batch) of a checkpoint written with `saved_batches` batches per epoch per rank,
    for a job that has `batches` per epoch per rank (another world size, on another number of
    nodes). The shards differ, so no exact position exists; the epoch and the fraction of it
    already trained on are kept, so a resumed job neither repeats nor skips most of an epoch
    (the batch index alone would: 2 -> 4 ranks halves every rank's epoch)."""
    epoch, k = int(position[0]), int(position[1])
    if saved_batches <= 0 or batches <= 0 or saved_batches == batches:
        return epoch, k
    return epoch, min(batches, round(k * batches / saved_batches))
