"""What every benchmark shares: the machine's name, repeat-and-median timing, the output line.

A figure without its limit is unfinished: `report()` refuses to print one.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable


def machine() -> str:
    """CPU model, core count, memory and kernel: enough to compare runs across machines."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = 0.0
    try:
        with open("/proc/meminfo") as f:
            mem_gib = int(f.readline().split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = ", " + torch.cuda.get_device_name(0)
    except Exception:  # torch absent or broken: the CPU description is still right
        pass
    return f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB, Linux {platform.release()}{gpu}"


@dataclass
class Timing:
    """Seconds per repeat; the median is the figure, min/max the spread."""

    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> tuple[float, float]:
        return min(self.seconds), max(self.seconds)


def repeat(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> Timing:
    for _ in range(warmup):
        fn()
    t = Timing()
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        t.seconds.append(time.perf_counter() - t0)
    return t


def want_json(argv: list[str] | None = None) -> bool:
    return "--json" in (sys.argv[1:] if argv is None else argv)


def report(bench: str, figure: float, unit: str, limit_name: str, limit: float,
           as_json: bool, **extra) -> dict:
    """Print `bench  figure unit | limit_name limit unit | ratio r`, and with --json the object
    docs/architecture.md fixes (bench, figure, unit, limit_name, limit, ratio, machine) as the
    last line. Returns the object."""
    if not limit or limit <= 0:
        raise ValueError(f"{bench}: a figure needs its measured limit, got {limit!r}")
    ratio = figure / limit
    obj = {
        "bench": bench,
        "figure": round(figure, 4),
        "unit": unit,
        "limit_name": limit_name,
        "limit": round(limit, 4),
        "ratio": round(ratio, 4),
        "machine": machine(),
        **extra,
    }
    print(f"{bench}  {figure:.3f} {unit} | {limit_name} {limit:.3f} {unit} | ratio {ratio:.2f}")
    if as_json:
        print(json.dumps(obj))
    return obj


def cuda_variant(argv: list[str], prog: str, cuda_main: Callable[[list[str]], object]
                 ) -> tuple[bool, object]:
    """`--device cpu|cuda` of a CPU benchmark whose CUDA variant is its own module: (True,
    `cuda_main(rest of argv)`) with cuda; (True, 2) after saying what is accepted for anything
    else; (False, None) with cpu or no --device, the option taken out of `argv`."""
    if "--device" not in argv:
        return False, None
    i = argv.index("--device")
    device = argv[i + 1] if i + 1 < len(argv) else ""
    if device not in ("cpu", "cuda"):
        print(f"{prog}: --device {device!r}: expected cpu or cuda", file=sys.stderr)
        return True, 2
    del argv[i:i + 2]
    return (True, cuda_main(argv)) if device == "cuda" else (False, None)
