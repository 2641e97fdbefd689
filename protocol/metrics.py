"""Prometheus metrics of either daemon: `--metrics HOST:PORT` serves the text format at
`http://HOST:PORT/metrics` (prometheus-client's HTTP server, on its own daemon thread).

Off by default: nothing listens and nothing is computed unless `--metrics` is given. The
daemon's main loop hands the exporter a snapshot of its values at most once a second
(`refresh(values)`: plain counters and the ring header, read on the thread that owns them,
so a scrape never reads half-updated state or a ring being closed); a scrape serves the
latest snapshot plus the stage histograms (protocol/stages.py, which are safe to read from
any thread). The hot paths never touch a Prometheus object (NOTE [cheap timing]).

Every metric name is in `METRICS` below (the table docs/CONTRACTS.md and the README list);
`process_*` (resident memory, CPU seconds, open fds) come from prometheus-client's process
collector, and the stage times are one histogram, `mmfeed_stage_seconds{daemon, group, stage}`.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Mapping

from .errors import BadArgument
from .stages import BUCKETS_S, StageTimer

log = logging.getLogger(__name__)

# name -> (type, help). Values a daemon does not know yet (loss before the first step) are
# left out of the scrape, never exported as NaN or 0.
METRICS: dict[str, tuple[str, str]] = {
    # producer
    "mmfeed_producer_samples_published_total": ("counter", "Samples published to the ring"),
    "mmfeed_producer_samples_skipped_total": ("counter", "Bad samples left out (each logged once)"),
    "mmfeed_producer_samples_dropped_while_paused_total": (
        "counter", "Live clips read and dropped while paused"),
    "mmfeed_producer_source_errors_total": ("counter", "Source failures (each retried)"),
    "mmfeed_producer_generation": ("gauge", "Current generation"),
    "mmfeed_producer_generations_total": ("counter", "Generations made since this start"),
    "mmfeed_producer_samples_per_second": ("gauge", "Samples published per second (5 s window)"),
    "mmfeed_producer_paused": ("gauge", "1 while paused"),
    "mmfeed_producer_recording": ("gauge", "1 while `mmctl record` writes live samples"),
    "mmfeed_producer_samples_recorded_total": ("counter", "Live samples handed to the recorder"),
    "mmfeed_ring_fill_ratio": ("gauge", "Share of ring slots holding a sample"),
    "mmfeed_ring_readers": ("gauge", "Registered ring readers"),
    "mmfeed_ring_dropped": ("gauge", "Samples the registered readers missed (sum; lossy ring)"),
    # trainer
    "mmfeed_trainer_steps_total": ("counter", "Optimiser steps (continues a resumed run's count)"),
    "mmfeed_trainer_samples_total": ("counter", "Samples trained on this run, by source"),
    "mmfeed_trainer_samples_unlabelled_total": ("counter", "Samples without a label (no loss)"),
    "mmfeed_trainer_samples_bad_label_total": ("counter", "Samples with a label outside the classes"),
    "mmfeed_trainer_stall_seconds_total": ("counter", "Seconds steps waited for data"),
    "mmfeed_trainer_step_seconds_total": ("counter", "Seconds spent in steps (waits included)"),
    "mmfeed_trainer_stall_ratio": ("gauge", "Wait for data over step time, last log interval"),
    "mmfeed_trainer_samples_per_second": ("gauge", "Samples trained per second, last interval"),
    "mmfeed_trainer_live_fraction": ("gauge", "Live share of recent samples (mixer window)"),
    "mmfeed_trainer_live_fraction_target": ("gauge", "Live share asked for (`mmctl mix`)"),
    "mmfeed_trainer_live_starved": ("gauge", "1 while the ring cannot supply the live share"),
    "mmfeed_trainer_live_dropped_total": ("counter", "Live samples read but discarded (a torn "
                                          "lossy read, a partial batch at shutdown)"),
    "mmfeed_trainer_live_lapped_total": ("counter", "Live samples the lossy ring moved past "
                                         "before the trainer read them"),
    "mmfeed_trainer_generation": ("gauge", "Last live generation trained on"),
    "mmfeed_trainer_loss": ("gauge", "Loss of the last optimiser step"),
    "mmfeed_trainer_accuracy": ("gauge", "Last val accuracy"),
    "mmfeed_trainer_batch_size": ("gauge", "Batch size in force (`mmctl batch`)"),
    # both
    "mmfeed_stage_seconds": ("histogram", "Time per stage (protocol/stages.py)"),
}


def parse_address(text: str, flag: str = "--metrics") -> tuple[str, int]:
    """'HOST:PORT', '[V6]:PORT' or 'PORT' (then 127.0.0.1) -> (host, port); port 0 picks a
    free one. BadArgument names the flag and what is expected."""
    s = str(text).strip()
    host, sep, port = s.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", s
    host = host.strip("[]") or "127.0.0.1"
    try:
        n = int(port)
    except ValueError:
        n = -1
    if not 0 <= n <= 65535:
        raise BadArgument(f"{flag} {text!r}: expected HOST:PORT (e.g. 127.0.0.1:9400, or "
                          f"0.0.0.0:9400 to be scraped from other machines), PORT 0..65535")
    return host, n


class _Collector:
    def __init__(self, daemon: str, timer: StageTimer | None):
        self.daemon, self.timer = daemon, timer
        self.values: Mapping = {}   # replaced whole by refresh(): one reference store

    def collect(self):
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily)

        for name, value in self.values.items():
            kind, doc = METRICS[name]
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            # prometheus-client appends _total itself to counters
            fam_name = name[: -len("_total")] if kind == "counter" else name
            if isinstance(value, Mapping):  # {label value: number}, label "source"
                fam = family(fam_name, doc, labels=["source"])
                for label, v in value.items():
                    if _number(v):
                        fam.add_metric([str(label)], float(v))
                yield fam
            elif _number(value):
                yield family(fam_name, doc, value=float(value))
        if self.timer is not None:
            kind, doc = METRICS["mmfeed_stage_seconds"]
            fam = HistogramMetricFamily("mmfeed_stage_seconds", doc,
                                        labels=["daemon", "group", "stage"])
            for st in list(self.timer.stages.values()):
                if st.count == 0:
                    continue
                counts, acc = [], 0
                for le, n in zip([*map(str, BUCKETS_S), "+Inf"], list(st.buckets)):
                    acc += n
                    counts.append((le, acc))
                fam.add_metric([self.daemon, st.group, st.name], counts, st.sum_ns / 1e9)
            yield fam


def _number(v) -> bool:
    """A value Prometheus can carry (bools as 0/1); None and NaN are left out."""
    return isinstance(v, bool) or (isinstance(v, (int, float)) and math.isfinite(v))


REFRESH_S = 1.0


class MetricsExporter:
    """The `/metrics` endpoint of one daemon. `start()` binds (BadArgument when the address
    cannot be bound, naming it), `url` is where it listens, `refresh(values)` from the main
    loop, `close()` stops it."""

    def __init__(self, daemon: str, address: str, timer: StageTimer | None = None):
        self.daemon = daemon
        self.host, self.port = parse_address(address)
        self._collector = _Collector(daemon, timer)
        self._server = None
        self._next = 0.0
        self.url: str | None = None

    @property
    def timer(self) -> StageTimer | None:
        return self._collector.timer

    @timer.setter
    def timer(self, timer: StageTimer | None) -> None:
        """The stages to export (a daemon may start the exporter before it has them)."""
        self._collector.timer = timer

    def refresh(self, values: Callable[[], Mapping], now: float, force: bool = False) -> None:
        """Take a new snapshot when the last is REFRESH_S old (call every loop turn: it is one
        comparison otherwise). Only names of METRICS are accepted (KeyError otherwise: a
        misspelt metric is a bug, found by the test that scrapes)."""
        if now < self._next and not force:
            return
        self._next = now + REFRESH_S
        snapshot = dict(values())
        unknown = set(snapshot) - set(METRICS)
        if unknown:
            raise KeyError(f"metrics not in protocol.metrics.METRICS: {sorted(unknown)}")
        self._collector.values = snapshot

    def start(self) -> "MetricsExporter":
        from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server

        registry = CollectorRegistry(auto_describe=False)
        registry.register(self._collector)
        ProcessCollector(registry=registry)  # process_resident_memory_bytes, cpu, fds
        try:
            self._server, _thread = start_http_server(self.port, self.host, registry=registry)
        except OSError as e:
            raise BadArgument(f"--metrics {self.host}:{self.port}: cannot listen there "
                              f"({e.strerror or e}); pick another port, or 0 for a free one") \
                from None
        port = self._server.server_address[1]
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{host}:{port}/metrics"
        return self

    def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()


__all__ = ["METRICS", "MetricsExporter", "parse_address"]
