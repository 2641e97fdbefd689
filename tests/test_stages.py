"""protocol/stages.py: rolling percentiles of stage times, and the bottleneck in words."""
from __future__ import annotations

from protocol.stages import (BUCKETS_S, Stage, StageTimer, bottleneck, producer_bottleneck,
                             trainer_bottleneck)


def test_percentiles_cover_only_the_last_window_of_durations():
    st = Stage("video", "pipeline", window=10)
    for _ in range(50):
        st.add(1_000_000_000)          # 1 s, all pushed out of the window below
    for ms in range(1, 11):
        st.add(ms * 1_000_000)         # 1..10 ms
    s = st.stats()
    assert s.count == 60
    assert s.p50_ms == 6.0 and s.p99_ms == 10.0 and s.mean_ms == 5.5


def test_histogram_counts_every_duration_since_start_in_its_bucket():
    st = Stage("ring_write", "ring", window=4)
    st.add(40_000)            # 40 us: first bucket (<= 50 us)
    st.add(3_000_000)         # 3 ms: the <= 5 ms bucket
    st.add(60 * 10**9)        # a minute: +Inf
    assert sum(st.buckets) == 3 and st.buckets[0] == 1 and st.buckets[-1] == 1
    assert st.buckets[list(BUCKETS_S).index(0.005)] == 1
    assert st.sum_ns == 40_000 + 3_000_000 + 60 * 10**9


def test_a_stage_that_never_ran_is_left_out_of_the_summary():
    t = StageTimer("trainer")
    t.stage("forward", "compute")
    t.stage("wait", "data").add(2_000_000)
    assert t.summary() == {"data": {"wait": {
        "label": "wait for a batch (data stall)", "p50_ms": 2.0, "p90_ms": 2.0, "p99_ms": 2.0,
        "mean_ms": 2.0, "count": 1}}}


def _stages(**means):
    return {"g": {k: {"label": k.replace("_", " "), "p50_ms": v, "p90_ms": v, "p99_ms": v,
                      "mean_ms": v, "count": 5} for k, v in means.items()}}


def test_producer_bottleneck_names_its_slowest_stage_and_its_share():
    text = producer_bottleneck({"stages": _stages(video=90.0, lidar=10.0), "samples_per_s": 1.6})
    assert text == "producer: video takes 90% of each sample (p50 90.0 ms); 1.6 samples/s"


def test_a_starved_trainer_names_the_producers_slowest_stage_too():
    note = "live starved: producer 1.6 samples/s, trainer wants 5.0"
    text = bottleneck({"stages": _stages(video=90.0, radar=10.0), "samples_per_s": 1.6},
                      {"live_starved": True, "live_note": note, "stall_fraction": 0.5})
    assert text.startswith(note) and "producer: video takes 90%" in text


def test_a_trainer_that_waits_for_data_is_called_data_bound():
    text = trainer_bottleneck({"stall_fraction": 0.6, "stages": _stages(disk_read=40.0)})
    assert "data-bound" in text and "60%" in text and "40.0 ms" in text


def test_a_trainer_that_rarely_waits_names_its_slowest_compute_stage():
    text = trainer_bottleneck({"stall_fraction": 0.01,
                               "stages": _stages(forward=30.0, backward=60.0, optimizer=10.0)})
    assert text.startswith("trainer: compute-bound, backward takes 60%")


def test_no_stage_ran_means_no_bottleneck_is_claimed():
    assert bottleneck({"stages": {}}, {"stages": {}, "stall_fraction": 0.0}) is None
    assert bottleneck(None, None) is None
