"""The producer daemon: the engine (engine.py) plus control socket, signals, sd_notify and logs.

    start:  sockets and logs -> Producer (source, ring: a stale one is replaced) -> control
            socket -> READY=1
    loop:   answer control (poll, never long) -> heartbeat/watchdog/status -> one
            Producer.step_once; when it says nothing will happen for a while (`wait_s`:
            pacing, back-off, paused), that while is spent answering control
    stop:   SIGTERM/SIGINT set a flag; the current sample is finished, the ring is removed,
            STOPPING=1, exit 0

NOTE [one thread]: the control server is polled from this loop, so handlers run on the same
thread as the engine and need no lock; the price is that a command waits for the sample in
progress (one pipeline call, tens of milliseconds). Nothing in a step blocks longer than that:
recorded-speed pacing, lossless back-pressure, pause and source back-off are values the step
returns, never waits inside it. Live network sources are the exception a step cannot bound (a
read blocks up to the read timeout), so they are decoded on a reader thread (clip_reader.py).
The trainer daemon has the same shape (trainer/daemon.py).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time

from protocol import logs, notify
from protocol.control import Command, ControlServer, daemon_sockets, wire_command
from protocol.filters import FilterSpec
from protocol.heap import HeapTrimmer
from protocol.metrics import MetricsExporter

from .engine import STATUS_INTERVAL_S, Producer, RunOptions, WrongState

log = logging.getLogger("producer.daemon")

IDLE_POLL_S = 0.05            # the longest a step blocks, and a control poll while idle

__all__ = ["IDLE_POLL_S", "STATUS_INTERVAL_S", "ProducerDaemon", "RunOptions", "WrongState"]


class ProducerDaemon:
    """`mm-producer run`: see the module docstring. `start()`, then `run()` until stopped."""

    def __init__(self, opts: RunOptions, *, out=sys.stdout, json_lines: bool = False):
        self.opts = opts
        self.out = out
        self.json_lines = json_lines
        self._stop = False
        self.producer: Producer | None = None
        self.server: ControlServer | None = None
        self.metrics: MetricsExporter | None = None
        self.notifier = notify.Notifier()
        self._heap = HeapTrimmer()
        self.t_start = time.monotonic()

    # --- start ------------------------------------------------------------------------------

    def start(self) -> None:
        opts = self.opts
        socks = daemon_sockets("producer", opts.control, opts.log_endpoint, opts.curve_dir)
        logs.setup_daemon_logging("producer", socks.logs, group=opts.group, curve=socks.logs_curve)
        if opts.curve_dir is not None and socks.control_curve is None and socks.logs_curve is None:
            log.warning("--curve-dir given but both sockets are ipc://; the keys are not used",
                        extra={"curve_dir": str(opts.curve_dir)})
        self.producer = p = Producer(opts)
        self.server = ControlServer(socks.control, self._commands(), group=opts.group,
                                    curve=socks.control_curve)
        if opts.metrics is not None:
            self.metrics = MetricsExporter("producer", opts.metrics, p.stages).start()
            self.metrics.refresh(p.metric_values, time.monotonic(), force=True)
        self.notifier.ready(p.status_line())
        self._watchdog_every = notify.watchdog_interval()
        self._next_watchdog = time.monotonic()
        self._next_status = time.monotonic() + opts.status_interval
        stats = p.sink.stats()
        log.info("producer ready", extra={"ring": stats.name, "control": self.server.endpoint,
                                          "logs": logs.pub_endpoint(),
                                          "metrics": self._metrics_url(),
                                          "ring_epoch": f"{stats.epoch:#x}",
                                          "source": opts.source})
        self._emit({"event": "ready", "ring": stats.name, "control": self.server.endpoint,
                    "logs": logs.pub_endpoint(), "metrics": self._metrics_url(),
                    "ring_epoch": stats.epoch, "generation": p.gens.current.number,
                    "pid": os.getpid(), "ring_memory": p.sink.memory})

    def abort(self) -> None:
        """Undo a start() that failed half-way: nothing of ours is left behind."""
        if self.metrics is not None:
            self.metrics.close()
        if self.server is not None:
            self.server.close()
        if self.producer is not None:
            self.producer.close()
        logs.close_daemon_logging()

    def _commands(self) -> dict[str, Command]:
        return {
            "status": wire_command("status", self.on_status),
            "filter": wire_command("filter", self.on_filter),
            "sensor": wire_command("sensor", self.on_sensor),
            "method": wire_command("method", self.on_method),
            "segment": wire_command("segment", self.on_segment),
            "segment_clear": wire_command("segment_clear", self.on_segment_clear),
            "label": wire_command("label", self.on_label),
            "modalities": wire_command("modalities", self.on_modalities),
            "pause": wire_command("pause", self.on_pause),
            "resume": wire_command("resume", self.on_resume),
            "logs": logs.logs_command(),
            "generation": wire_command("generation", self.on_generation),
            "preview": wire_command("preview", self.on_preview),
            "record": wire_command("record", self.on_record),
        }

    # --- control commands (main thread, between steps) ----------------------------------------

    def on_status(self) -> dict:
        return {**self.producer.status(), "metrics": self._metrics_url()}

    def _metrics_url(self) -> str | None:
        return self.metrics.url if self.metrics is not None else None

    def on_generation(self, number: int) -> dict:
        return self.producer.watch.generation(self.producer.gens, number)

    def on_preview(self) -> dict:
        p = self.producer
        return p.watch.preview(p.gens.facts.classes, p.idle_reason())

    def on_record(self, action: str, split: str, cache: str) -> dict:
        p = self.producer
        return p.watch.record(action, split, cache, tuple(p.gens.facts.classes))

    def _changed(self, reply: dict) -> dict:
        self.notifier.status(self.producer.status_line())
        return reply

    def on_filter(self, spec: FilterSpec) -> dict:
        p = self.producer
        return self._changed(p.change(p.gens.propose_filter(spec)))

    def on_sensor(self, input: str, stem: str) -> dict:  # noqa: A002 - the wire name
        p = self.producer
        p.refresh_facts()
        return self._changed(p.change(p.gens.propose_sensor(input, stem)))

    def on_method(self, input: str, name: str) -> dict:  # noqa: A002
        p = self.producer
        p.refresh_facts()
        return self._changed(p.change(p.gens.propose_method(input, name)))

    def on_segment(self, start: float, end: float) -> dict:
        return self._changed(self.producer.segment(start, end))

    def on_segment_clear(self) -> dict:
        p = self.producer
        gen = p.gens.propose_segment_clear()
        if gen is None:  # idempotent: nothing to clear is not an error
            return {"generation": p.gens.current.number, "changed": False, "segment": None}
        return self._changed(p.change(gen))

    def on_label(self, name: str) -> dict:
        p = self.producer
        reply = self._changed(p.change(p.gens.propose_label(name)))
        if not p.gens.facts.classes and p.gens.current.label is not None:
            reply["note"] = (f"this source has no class list (--classes A,B,... or a dataset "
                             f"folder): label {name} is a class index that only the trainer "
                             f"can check")
        return reply

    def on_modalities(self, enable: list[str], disable: list[str]) -> dict:
        p = self.producer
        if not enable and not disable:
            return {"enabled": p.gens.enabled()}
        p.refresh_facts()
        return self._changed(p.change(p.gens.propose_modalities(enable, disable)))

    def on_pause(self) -> dict:
        return self.producer.pause()

    def on_resume(self) -> dict:
        return self.producer.resume()

    # --- signals and the loop ----------------------------------------------------------------

    def request_stop(self, *_: object) -> None:
        self._stop = True

    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def run(self) -> dict:
        """Serve until stopped; returns the exit summary."""
        p = self.producer
        try:
            while not self._stop:
                self._housekeeping()
                if not p.step_once(IDLE_POLL_S) and p.wait_s > 0:
                    self.server.poll(max(0, min(int(IDLE_POLL_S * 1000), int(p.wait_s * 1000))))
        finally:
            summary = self._shutdown()
        return summary

    def _housekeeping(self) -> None:
        now = time.monotonic()
        p = self.producer
        self.server.poll(0)
        p.tick(now)
        if self._watchdog_every is not None and now >= self._next_watchdog:
            self.notifier.watchdog()
            self._next_watchdog = now + self._watchdog_every
        self._heap.maybe(now)
        if self.metrics is not None:
            self.metrics.refresh(p.metric_values, now)
        if now >= self._next_status:
            self._next_status = now + self.opts.status_interval
            self.notifier.status(p.status_line())
            extra = {"state": p.state_name(), "published": p.counters.published,
                     "samples_per_s": round(p.rate(), 2), "generation": p.gens.current.number}
            dropped = p.dropped_while_paused()
            if dropped:
                extra["dropped_while_paused"] = dropped
            why = p.idle_reason()
            if why:
                extra["idle_reason"] = why
            log.info("status", extra=extra)

    # --- status and shutdown -----------------------------------------------------------------

    def _emit(self, obj: dict) -> None:
        if self.json_lines:
            print(json.dumps(obj), file=self.out, flush=True)

    def _shutdown(self) -> dict:
        self.notifier.stopping()
        summary = self.producer.summary()
        log.info("producer stopping", extra={k: v for k, v in summary.items() if k != "event"})
        if self.metrics is not None:
            self.metrics.close()
        if self.server is not None:
            self.server.close()
        self.producer.close()
        self.notifier.close()
        logs.close_daemon_logging()
        self._emit(summary)
        return summary
