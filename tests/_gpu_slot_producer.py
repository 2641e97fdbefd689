"""A producer process for the GPU slot tests and bench: a real GpuSlotWriter in its own process.

    python tests/_gpu_slot_producer.py RING --backend cuda|shm --count N --mode lossless
        [--nbytes B] [--slots S] [--schemas 1|2]

Prints "ready" once the ring and its GPU slot table exist, waits for "go" on stdin, publishes
`count` samples (0 = until stdin says "stop"), prints "done", and closes on "stop" / EOF: the
pool must outlive the readers' copies (CUDA memory dies with its process).
Sample i's payload is `payload_bytes(nbytes, i)`, so a reader can check every byte.
"""
from __future__ import annotations

import argparse
import os
import select
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from producer.gpu_slot_writer import GpuSlotWriter  # noqa: E402
from protocol.ring import RingConfig  # noqa: E402
from protocol.schema import ModalitySpec, SampleMeta, SampleSchema  # noqa: E402


def payload_bytes(nbytes: int, i: int, device="cpu") -> torch.Tensor:
    """(k * 7 + i) mod 256: every byte depends on the sample, so a torn copy cannot pass."""
    return ((torch.arange(nbytes, device=device, dtype=torch.int64) * 7 + i) % 256).to(torch.uint8)


def schema_for(nbytes: int, variant: int = 0) -> SampleSchema:
    return SampleSchema((ModalitySpec("video" if variant == 0 else "other", "uint8", (nbytes,)),))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ring")
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--mode", default="lossless")
    ap.add_argument("--nbytes", type=int, default=1 << 16)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--schemas", type=int, default=1)
    a = ap.parse_args()
    device = "cuda" if a.backend == "cuda" else "cpu"
    cfg = RingConfig(name=a.ring, slots=a.slots, slot_bytes=a.nbytes, mode=a.mode)
    with GpuSlotWriter.create(cfg, backend=a.backend, device=device) as w:
        base = payload_bytes(a.nbytes, 0, device).to(torch.int64)
        schemas = [schema_for(a.nbytes, v) for v in range(a.schemas)]
        print("ready", flush=True)
        if sys.stdin.readline().strip() != "go":
            return
        i = 0
        while a.count == 0 or i < a.count:
            v = (i // 5) % len(schemas)   # schema switches every 5 samples when 2 are asked for
            arr = ((base + i) % 256).to(torch.uint8)
            w.publish(schemas[v], SampleMeta(label=v, index=i, generation=1 + v),
                      {schemas[v].names[0]: arr}, timeout=30)
            i += 1
            if a.count == 0 and i % 64 == 0 and select.select([sys.stdin], [], [], 0)[0]:
                break
        print(f"done {i}", flush=True)
        sys.stdin.readline()


if __name__ == "__main__":
    main()
