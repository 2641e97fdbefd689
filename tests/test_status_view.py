"""How `mmctl status` shows both daemons: grouped stage times, the bottleneck, no Python None,
and one meaning per field name across the two daemons."""
from __future__ import annotations

from cli.mmctl import status_table

STAGE = {"label": "video (demux, decode, filter)", "p50_ms": 120.0, "p90_ms": 150.0,
         "p99_ms": 190.0, "mean_ms": 125.0, "count": 40}


def test_null_values_print_as_a_dash_never_as_python_none():
    text = status_table({"producer": {"ok": True, "state": "running", "last_error": None,
                                      "frame_size": None},
                         "trainer": {"ok": True, "state": "running", "loss": None,
                                     "resumed_from_step": None}})
    assert "None" not in text
    assert any(line.split()[:2] == ["last_error", "-"] for line in text.splitlines())


def test_stage_times_are_grouped_per_daemon_and_the_bottleneck_is_named():
    producer = {"ok": True, "state": "running", "samples_per_s": 1.6,
                "stages": {"pipeline": {"video": STAGE}}}
    trainer = {"ok": True, "state": "running", "stall_fraction": 0.7, "live_starved": True,
               "live_note": "live starved: producer 1.6 samples/s, trainer wants 5.0",
               "stages": {"data": {"wait": dict(STAGE, label="wait for a batch")}}}
    lines = status_table({"producer": producer, "trainer": trainer}).splitlines()
    row = next(line for line in lines if line.startswith("producer") and "video" in line)
    assert row.split()[:2] == ["producer", "pipeline"] and "120.0" in row and "190.0" in row
    assert any(line.startswith("trainer") and "wait for a batch" in line for line in lines)
    assert lines[-1] == ("bottleneck: live starved: producer 1.6 samples/s, trainer wants 5.0; "
                         "producer: video (demux, decode, filter) takes 100% of each sample "
                         "(p50 120.0 ms); 1.6 samples/s")
    assert not any(line.startswith("stages.") for line in lines)  # not flattened into rows


def test_top_draws_a_daemon_that_is_down_as_its_error_and_the_other_in_full():
    from rich.console import Console

    from cli.top import view

    console = Console(width=120, record=True)
    producer = {"ok": True, "state": "running", "generation": 3, "samples_per_s": 2.0,
                "config": {"filter": "gray"}, "stages": {"pipeline": {"video": STAGE}},
                "last_error": None}
    console.print(view({"producer": producer, "trainer": None},
                       {"trainer": "no daemon is listening at ipc:///x/trainer.sock"}))
    text = console.export_text()
    assert "no daemon is listening at ipc:///x/trainer.sock" in text
    assert "pipeline/video (demux, decode, filter)" in text and "100%" in text
    assert "filter      gray" in text and "None" not in text
    assert "bottleneck: producer: video" in text


def test_top_once_without_daemons_exits_3(tmp_path):
    from click.testing import CliRunner

    from cli.mmctl import main

    r = CliRunner().invoke(main, ["top", "--once"], env={"MMFEED_RUNTIME_DIR": str(tmp_path)})
    assert r.exit_code == 3 and "not" in r.output
