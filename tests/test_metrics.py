"""protocol/metrics.py: the /metrics endpoint both daemons serve with --metrics."""
from __future__ import annotations

import socket
import urllib.error
import urllib.request

import pytest

from protocol.errors import BadArgument
from protocol.metrics import MetricsExporter, parse_address
from protocol.stages import StageTimer


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def test_addresses_read_as_host_port_or_a_bare_port_on_localhost():
    assert parse_address("0.0.0.0:9400") == ("0.0.0.0", 9400)
    assert parse_address("9400") == ("127.0.0.1", 9400)
    assert parse_address("[::1]:0") == ("::1", 0)
    for bad in ("host:http", "127.0.0.1:70000", ""):
        with pytest.raises(BadArgument, match="--metrics"):
            parse_address(bad)


def test_a_scrape_serves_the_last_snapshot_and_the_stage_histograms():
    timer = StageTimer("producer")
    timer.stage("video", "pipeline").add(3_000_000)  # 3 ms
    timer.stage("radar", "pipeline")                 # never ran: not exported
    ex = MetricsExporter("producer", "127.0.0.1:0", timer).start()
    try:
        ex.refresh(lambda: {"mmfeed_producer_samples_published_total": 12,
                            "mmfeed_producer_paused": False,
                            "mmfeed_trainer_loss": None,      # unknown yet: left out
                            "mmfeed_trainer_samples_total": {"live": 3, "disk": 5}},
                   now=0.0, force=True)
        text = _scrape(ex.url)
    finally:
        ex.close()
    assert "mmfeed_producer_samples_published_total 12.0" in text
    assert "mmfeed_producer_paused 0.0" in text and "mmfeed_trainer_loss" not in text
    assert 'mmfeed_trainer_samples_total{source="live"} 3.0' in text
    assert ('mmfeed_stage_seconds_bucket{daemon="producer",group="pipeline",le="0.0025",'
            'stage="video"} 0.0') in text
    assert ('mmfeed_stage_seconds_bucket{daemon="producer",group="pipeline",le="0.005",'
            'stage="video"} 1.0') in text
    assert 'stage="radar"' not in text
    assert "process_resident_memory_bytes" in text


def test_a_metric_name_not_in_the_table_is_a_bug_caught_at_refresh():
    ex = MetricsExporter("trainer", "127.0.0.1:0")
    with pytest.raises(KeyError, match="mmfeed_trainer_typo"):
        ex.refresh(lambda: {"mmfeed_trainer_typo": 1}, now=0.0, force=True)


def test_a_port_in_use_is_refused_naming_it_and_close_frees_the_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(BadArgument, match=f"127.0.0.1:{port}: cannot listen"):
            MetricsExporter("producer", f"127.0.0.1:{port}").start()
    ex = MetricsExporter("producer", "127.0.0.1:0").start()
    url = ex.url
    ex.close()
    with pytest.raises(urllib.error.URLError):
        _scrape(url)
