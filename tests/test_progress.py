"""trainer/progress.py: progress lines at a steady interval, a bar on a terminal."""
from __future__ import annotations

import io
import logging

import pytest

from trainer.progress import Progress, duration


class Clock:
    """A clock the test moves by hand: no sleeping."""

    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Run:
    """A trainer's progress figures, advanced by the test."""

    def __init__(self, total=100):
        self.st = {"step": 0, "total_steps": total, "epoch": 0, "samples": 0,
                   "samples_per_s": None, "loss": None, "accuracy": None}

    def __call__(self) -> dict:
        return dict(self.st)


@pytest.fixture
def records():
    got: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            got.append(record)

    h = Keep()
    logger = logging.getLogger("trainer.progress")
    logger.addHandler(h)
    old = logger.level
    logger.setLevel(logging.INFO)
    yield got
    logger.removeHandler(h)
    logger.setLevel(old)


def test_plain_lines_come_at_the_interval_and_not_before(records):
    clock, run = Clock(), Run()
    p = Progress(run, interval=10.0, stream=io.StringIO(), tty=False, clock=clock)
    clock.t += 9.9
    p.maybe()
    assert records == []
    clock.t += 0.2
    p.maybe()
    assert len(records) == 1 and records[0].getMessage() == "step 0/100 (0%), epoch 0, ETA -"


def test_a_line_has_step_total_epoch_rate_eta_loss_and_val_accuracy(records):
    clock, run = Clock(), Run(total=100)
    p = Progress(run, interval=10.0, stream=io.StringIO(), tty=False, clock=clock)
    p.report()
    clock.t += 10
    run.st.update(step=10, epoch=1, samples=80, loss=0.53125, accuracy=0.8125)
    p.report()
    msg = records[-1].getMessage()
    assert msg == ("step 10/100 (10%), epoch 1, 8.0 samples/s, ETA 1m30s, loss 0.5312, "
                   "val acc 0.812")
    assert records[-1].eta_s == 90.0 and records[-1].total_steps == 100
    assert "None" not in msg


def test_an_open_ended_run_says_its_step_without_a_total_or_eta(records):
    run = Run(total=None)
    run.st["step"] = 7
    Progress(run, stream=io.StringIO(), tty=False, clock=Clock()).report()
    assert records[-1].getMessage() == "step 7, epoch 0"


def test_on_a_terminal_the_bar_is_redrawn_in_place_and_log_lines_go_above_it():
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        clock, run = Clock(), Run(total=100)
        p = Progress(run, stream=out, tty=True, clock=clock)
        run.st["step"] = 50
        clock.t += 1
        p.maybe()
        assert out.getvalue().endswith("\r\x1b[K[############------------] step 50/100 (50%), "
                                       "epoch 0, ETA -")
        logging.getLogger("x").warning("a log line")
        # the bar is cleared, the line written, the bar drawn again below it
        assert out.getvalue().endswith("\r\x1b[Ka log line\n[############------------] step "
                                       "50/100 (50%), epoch 0, ETA -")
        p.close()
        assert out.getvalue().endswith("\n") and handler.stream is out
    finally:
        root.removeHandler(handler)


def test_durations_read_as_hours_minutes_seconds():
    assert [duration(s) for s in (42, 185, 3725, None, float("inf"))] == \
        ["42s", "3m05s", "1h02m", "-", "-"]
