"""bench.faults' watchdog: a thread that asks every daemon for `status` every
WATCH_EVERY_S and judges hangs and stalls, samples RssAnon and keeps the trainer's sample
counts per incarnation; what it finds goes to the soak driver (`FaultBench.hang`/`fail`,
bench/faults.py)."""
from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from bench._fault_plan import DAEMONS, WATCH_EVERY_S
from bench._fault_rig import rss_anon_mib
from protocol.control import ControlClient, Timeouts

if TYPE_CHECKING:
    from bench.faults import FaultBench


class Watchdog(threading.Thread):
    """Asks every daemon for `status` every WATCH_EVERY_S on its own sockets; judges hangs
    and stalls; samples RssAnon; keeps the trainer's sample counts per incarnation."""

    def __init__(self, bench: "FaultBench"):
        super().__init__(name="watchdog", daemon=True)
        self.b = bench
        self.stop_event = threading.Event()
        self.state: dict[str, dict] = {d: {"inc": 0} for d in DAEMONS}
        self.rss: dict[str, list[tuple[int, float, float]]] = {d: [] for d in DAEMONS}
        self.trainer_samples: dict[int, int] = {}   # incarnation -> samples trained (run)
        self.published: dict[str, dict[int, int]] = {"producer": {}, "stream": {}}
        self.trainer_generation: int | None = None
        self.metrics_url: dict[str, tuple[int, str]] = {}   # daemon -> (incarnation, url)
        self.lock = threading.Lock()
        self._next_rss = 0.0

    def run(self) -> None:
        clients = {d: ControlClient(self.b.endpoints[d],
                                    Timeouts(request=min(10.0, self.b.plan.hang_s / 3), retries=0),
                                    daemon="trainer" if d == "trainer" else "producer")
                   for d in DAEMONS}
        try:
            while not self.stop_event.wait(WATCH_EVERY_S):
                now = time.monotonic()
                sample_rss = now >= self._next_rss
                if sample_rss:
                    self._next_rss = now + self.b.plan.rss_interval_s
                for d in DAEMONS:
                    self._watch(d, clients[d], sample_rss)
        finally:
            for c in clients.values():
                c.close()

    def _watch(self, name: str, client: ControlClient, sample_rss: bool) -> None:
        proc = self.b.procs[name]
        inc, pid, started, stopping = proc.snapshot()
        st = self.state[name]
        if st["inc"] != inc:
            st.clear()
            st.update(inc=inc, answered=None, last_answer=started, step=None,
                      step_moved=time.monotonic(), published=None,
                      published_moved=time.monotonic(), flagged=False)
        if pid is None or stopping or st["flagged"]:
            return
        if sample_rss:
            mib = rss_anon_mib(pid)
            if mib is not None:
                self.rss[name].append((inc, time.monotonic() - started, mib))
        reply = None
        with self.b.flock:  # read before asking: a change announced meanwhile is newer
            announced = self.b.generations.get(name, 0)
        try:
            if client.listening() is not False:
                reply = client.request("status")
        except Exception:  # silence, a refusal, a socket error: no answer this round
            reply = None
        now = time.monotonic()
        if proc.snapshot()[0] != inc:
            return  # restarted while we asked: the answer (or silence) was the old one's
        if reply is not None:
            st["answered"] = st["answered"] or now
            st["last_answer"] = now
            if isinstance(reply.get("metrics"), str):
                with self.lock:
                    self.metrics_url[name] = (inc, reply["metrics"])
            if name == "trainer":
                self._trainer(st, reply, now, inc)
            else:
                self._producer(name, st, reply, now, inc, announced)
            return
        silent = now - st["last_answer"]
        limit = self.b.plan.hang_s if st["answered"] else self.b.plan.startup_s
        if silent > limit:
            what = ("did not answer status for" if st["answered"] else
                    "never answered status in the") + f" {silent:.0f} s"
            self.b.hang(name, inc, pid, what)
            st["flagged"] = True

    def _producer(self, name: str, st: dict, reply: dict, now: float, inc: int,
                  announced: int) -> None:
        """Counts what each incarnation published; a producer 'running' that publishes
        nothing for `stall_s` is stalled - unless it is lossless (a paused trainer holds it by
        design) or, for the stream, ffmpeg has not been sending all that time."""
        published = int(reply.get("published") or 0)
        gen = reply.get("generation")
        if isinstance(gen, int) and gen < announced and not st.get("gen_flagged"):
            st["gen_flagged"] = True
            self.b.fail(name, "protocol", f"status says generation {gen} after generation "
                        f"{announced} was announced (incarnation {inc}): numbers went back")
        with self.lock:
            self.published[name][inc] = max(self.published[name].get(inc, 0), published)
        if published != st["published"]:
            st["published"], st["published_moved"] = published, now
            return
        lossless = "lossless" in self.b.procs[name].last_argv
        _, sender_pid, sender_started, _ = self.b.procs["sender"].snapshot()
        if reply.get("state") != "running" or lossless or (name == "stream" and not sender_pid):
            st["published_moved"] = now
            return
        since = max(st["published_moved"], sender_started if name == "stream" else 0.0)
        if now - since > self.b.plan.stall_s:
            self.b.hang(name, inc, self.b.procs[name].snapshot()[1],
                        f"published nothing for {now - since:.0f} s while 'running' "
                        f"(published {published}, idle_reason {reply.get('idle_reason')!r}, "
                        f"last_error {reply.get('last_error')!r})")
            st["flagged"] = True

    def _trainer(self, st: dict, reply: dict, now: float, inc: int) -> None:
        with self.lock:
            samples = int(reply.get("samples_live") or 0) + int(reply.get("samples_disk") or 0)
            self.trainer_samples[inc] = max(self.trainer_samples.get(inc, 0), samples)
            if isinstance(reply.get("generation"), int):
                self.trainer_generation = reply["generation"]
        step = reply.get("step")
        if step != st["step"]:
            st["step"], st["step_moved"] = step, now
            return
        running = reply.get("state") == "running"
        live_only = (reply.get("live_fraction_target") or 0) >= 1.0
        if not running or live_only:
            st["step_moved"] = now  # paused or waiting for live samples by design: not a stall
            return
        if now - st["step_moved"] > self.b.plan.stall_s:
            self.b.hang("trainer", inc, self.b.procs["trainer"].snapshot()[1],
                        f"step stayed at {step} for {now - st['step_moved']:.0f} s while "
                        f"running (live fraction {reply.get('live_fraction_target')}, ring "
                        f"attached {reply.get('ring_attached')})")
            st["flagged"] = True

    def samples_trained(self) -> int:
        with self.lock:
            return sum(self.trainer_samples.values())

    def add_summary(self, inc: int, samples: int) -> None:
        with self.lock:
            self.trainer_samples[inc] = max(self.trainer_samples.get(inc, 0), samples)
