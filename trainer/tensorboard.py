"""`mm-trainer run --tensorboard DIR`: the run as TensorBoard event files.

Written at each log interval (`Trainer.reset_meter()`): loss, stall fraction, live fraction
(achieved and target), samples/s, batch size and every stage's p50 time (`stages/<stage>`);
at each evaluation: val accuracy. At every new live generation trained on, a marker: the
scalar `live/generation` steps up and a text entry `generations` says what made it ("generation
5: filter gray"), so a user sees what `mmctl filter gray` did to the loss curve.

What made a generation is the producer's to say: the marker's text is fetched from its control
socket (`generation {number}`) on this module's own thread with a short timeout, so a slow or
absent producer never holds a training step; the text then says the producer did not answer.
SummaryWriter itself queues events to a writer thread; nothing here runs per step.
"""
from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

_STOP = object()
FLUSH_S = 5  # events reach the file within this (TensorBoard's default of 120 s hides a run)


def summary_writer(logdir: Path):
    """torch's SummaryWriter, or an ImportError that says what to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError(f"--tensorboard needs the tensorboard package ({e}); install it with "
                          f"`pip install 'mmfeed[tensorboard]'` (or `pip install tensorboard`)") \
            from None
    return SummaryWriter(log_dir=str(logdir), flush_secs=FLUSH_S)


def describe_generation(info: dict) -> str:
    """'filter gray (filter gray, sensors lidar=lidar_front, radar range_doppler)' from the
    producer's `generation` reply."""
    parts = [f"filter {info.get('filter', '?')}"]
    sensors = info.get("sensors") or {}
    if sensors:
        parts.append("sensors " + ", ".join(f"{k}={v}" for k, v in sorted(sensors.items())))
    methods = info.get("methods") or {}
    if methods:
        parts.append(", ".join(f"{k} {v}" for k, v in sorted(methods.items())))
    if info.get("segment"):
        a, b = info["segment"]
        parts.append(f"segment {a:g}..{b:g} s")
    if info.get("label") is not None:
        parts.append(f"label {info['label']}")
    return f"{info.get('reason', 'a change')} ({'; '.join(parts)})"


class TensorBoardLog:
    """One run's event files. `describe(generation) -> str` names what made a generation (the
    daemon asks the producer); it runs on this object's thread."""

    def __init__(self, logdir: str | Path, describe: Callable[[int], str] | None = None):
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.writer = summary_writer(self.logdir)
        self.describe = describe
        self._marked: set[int] = set()
        self._q: queue.Queue = queue.Queue(maxsize=256)
        self._thread = threading.Thread(target=self._markers, name="tensorboard markers",
                                        daemon=True)
        self._thread.start()

    def interval(self, step: int, metrics: dict, stages: dict, batch_size: int) -> None:
        """One log interval's figures (`Trainer.reset_meter()`), and the stages' p50 times."""
        w = self.writer
        for tag, key in (("train/loss", "loss"), ("train/stall_fraction", "stall_fraction"),
                         ("train/samples_per_s", "samples_per_s"),
                         ("live/fraction", "live_fraction"),
                         ("live/fraction_target", "live_fraction_target"),
                         ("live/in_per_s", "live_in_per_s")):
            v = metrics.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                w.add_scalar(tag, v, step)
        w.add_scalar("train/batch_size", batch_size, step)
        for group in stages.values():
            for name, s in group.items():
                w.add_scalar(f"stages/{name}_p50_ms", s["p50_ms"], step)

    def evaluation(self, step: int, accuracy: float | None) -> None:
        if accuracy is not None:
            self.writer.add_scalar("val/accuracy", accuracy, step)

    def generation(self, step: int, generation: int | None) -> None:
        """A marker the first time a live generation is trained on (cheap when seen)."""
        if generation is None or generation in self._marked:
            return
        self._marked.add(generation)
        self.writer.add_scalar("live/generation", generation, step)
        try:
            self._q.put_nowait((step, generation))
        except queue.Full:  # the producer is not answering and markers pile up
            self.writer.add_text("generations", f"generation {generation}", step)

    def _markers(self) -> None:
        while True:
            item = self._q.get()
            if item is _STOP:
                return
            step, gen = item
            text = f"generation {gen}"
            if self.describe is not None:
                try:
                    text = f"generation {gen}: {self.describe(gen)}"
                except Exception as e:  # the producer is gone, slow, or forgot it
                    text = (f"generation {gen} (what made it is unknown: the producer did not "
                            f"say: {e})")
            self.writer.add_text("generations", text, step)

    def close(self) -> None:
        self._q.put(_STOP)
        self._thread.join(timeout=10)
        self.writer.flush()
        self.writer.close()
