"""What a bench.faults run is told (`Plan`, from its command line), what it counts
(`Counts`) and the fixed names and limits its parts share (bench/faults.py, the soak driver;
_fault_watchdog.py; _fault_inject.py; _fault_report.py)."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FAULTS = ("kill producer", "kill stream producer", "term trainer", "kill sender", "kill reader")
DAEMONS = ("producer", "stream", "trainer")
# One round of commands (shuffled each round): mostly mmctl, whose menu draws valid or
# invalid, producer or trainer; the raw kinds cost no process, so a loaded machine still
# sends each of them within the first round.
COMMAND_ROUND = ("mmctl", "mmctl", "mmctl", "mmctl", "raw", "raw", "metrics", "repeated_id")
CHANGES = ("filter", "sensor", "method", "segment", "label", "modalities")  # new generations
MMCTL_TIMEOUT_S = 6.0      # mmctl --timeout: two attempts of 3 s (a retry keeps its request id)
MMCTL_WALL_S = 60.0        # an mmctl process alive past this is hung
RAW_REPLY_S = 10.0
WATCH_EVERY_S = 2.0


@dataclass
class Plan:
    minutes: float
    seed: int
    baseline_s: float
    command_interval_s: float
    fault_interval_s: float
    hang_s: float
    stall_s: float
    stop_s: float
    startup_s: float
    warmup_s: float
    rss_interval_s: float
    keep: bool


@dataclass
class Counts:
    commands: dict[str, int] = field(default_factory=lambda: {
        "mmctl_valid": 0, "mmctl_invalid": 0, "raw": 0, "repeated_id": 0, "metrics": 0})
    faults: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAULTS, 0))
    mmctl_exit: dict[str, int] = field(default_factory=dict)
    raw_unanswered: int = 0
