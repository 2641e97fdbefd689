"""Evaluation on the val split: the accuracy of the model over every val sample, each rank
reading its own shard and the counts summed over ranks (a collective under torchrun).

`keepalive` is called after every val batch: a big val split takes longer than the unit's
WatchdogSec, and the daemon's main loop sends no WATCHDOG=1 meanwhile. It is called only when
a batch was evaluated (progress), never while waiting for one, so a stuck loader still starves
the watchdog. The callee rate-limits (it is per batch).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from .prefetch import DevicePrefetcher, DiskLoader


def val_accuracy(model, reader, prepare: Callable, device: torch.device,
                 amp_dtype: torch.dtype | None, batch_size: int, dist_info,
                 keepalive: Callable[[], None] | None = None, *,
                 defer_video: bool = False) -> float | None:
    """Share of `reader`'s samples whose argmax is their label (None with no sample);
    `prepare(batch) -> (inputs, labels)` is the training step's own conversion (without its
    augmentations); `defer_video`: the training loader's (NV12 converted on the device)."""
    model.eval()
    loader = DiskLoader(reader, batch_size, shuffle=False, epochs=1,
                        rank=dist_info.rank, world_size=dist_info.world_size,
                        defer_video=defer_video).start()
    pf = DevicePrefetcher(loader.get, device)
    correct = total = 0
    try:
        while True:
            b = pf.get(0.2)
            if b is None:
                if loader.exhausted:
                    break
                continue
            inputs, labels = prepare(b)
            with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16,
                                enabled=amp_dtype is not None):
                pred = model(inputs).argmax(dim=1)
            correct += int((pred == labels).sum())
            total += b.n
            if keepalive is not None:
                keepalive()
    finally:
        pf.close()
        loader.close()
    t = torch.tensor([correct, total], dtype=torch.float64)
    if dist_info.enabled:
        dist.all_reduce(t)
    return float(t[0] / t[1]) if t[1] else None
