"""Fault-injection soak: both daemons steered, fed garbage and killed at random, for N minutes.

    python -m bench.faults [--minutes 30] [--seed 1] [--json]

What runs, as a user runs it (real processes, sockets, signals, shared memory):
  * `mm-producer run` replaying a synthetic dataset (producer.synth) in a loop at full rate
    into ring A (control socket producer.sock);
  * `ffmpeg -re -f lavfi -i testsrc ... -f mpegts udp://127.0.0.1:PORT`, the ffmpeg command
    line sending a live stream, and a second `mm-producer run --source udp://...` on it into
    ring B (control socket stream.sock);
  * `mm-trainer run` on the disk cache of the same dataset and ring A or B (odd starts A,
    even starts B, resuming from its checkpoints), checkpointing into the run's folder;
  * a plain ring reader process attached to both rings (bench/_ring_reader.py).

First a fault-free baseline (`--baseline-s`, default a tenth of the run, 1..3 min), then for
`--minutes` minutes, at seeded random times:
  * commands (one every `--command-interval` s on average): every mmctl command with valid
    and invalid arguments (bench/_fault_menu.py), to either producer, both at once, or the
    trainer; raw ZeroMQ REQ messages no client of ours writes (not JSON, not UTF-8, deep
    nesting, huge numbers, wrong types, unknown commands and fields, oversized, two frames,
    lone surrogates); a valid command sent twice under one request id, as a retry is (the
    second must be answered from the reply cache: same generation, nothing run twice);
  * faults (one every `--fault-interval` s on average, each kind once per round in a
    shuffled order):
    SIGKILL + restart of either producer, SIGTERM + restart (resume) of the trainer, SIGKILL
    of the ffmpeg sender (restarted a few seconds later), SIGKILL of the ring reader.

A watchdog thread asks each daemon for `status` every 2 s. Figures: commands sent, faults
injected, samples trained, crashes (a daemon or the reader exiting non-zero, by a signal the
bench did not send, or on its own), hangs (no `status` answer for `--hang-s`; a trainer whose
step stays put for `--stall-s` while it is running, not paused and not set to live-only; a
producer 'running' that publishes nothing for `--stall-s`, unless it is lossless or, for the
stream, ffmpeg was not sending; a daemon still running `--stop-s` after SIGTERM; an mmctl
process that outlives its timeout),
leaks (/dev/shm entries of the run's rings, runtime-folder files and checkpoint temporaries
left after the final stop, once every daemon a fault left down has been started again),
mmctl failures (tracebacks, exit codes outside 0-3, --json output without its JSON line),
protocol failures (a reply that is not JSON, a malformed message accepted, a retried id run
twice, pause not paused, resume still paused, a generation number at or below one already
announced on that ring - across producer restarts too - a scrape not answered 200),
`internal` error replies (a handler failed in a way nobody foresaw), tracebacks a daemon
printed while it went on (a thread that died),
and each daemon's RssAnon growth per hour (least squares over each incarnation's samples
after `--warmup-s`, one intercept per incarnation since restarts start low again). Every
failure is printed with the stderr tail of the process and the bench's actions before it.

The figure (every bench prints a figure beside a limit measured in the same run): samples
trained per minute during the fault phase, against the same run's fault-free baseline as the
limit - how much training a run keeps while it is steered, fed garbage and killed. The pass/fail figures are the failure
counts, which must be 0; the exit status is 1 when any failure was found.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from bench._common import report
from bench._fault_menu import CliCommand, Menu
from bench._fault_rig import (STDERR_TAIL, ActionLog, Failure, Proc, error_lines,
                              growth_per_hour, judge_exit, proc_state, raw_tracebacks,
                              rss_anon_mib, shm_entries)
from producer.synth import make_dataset
from protocol.control import CONTROL_VERSION, ControlClient, Timeouts

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


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


class FaultBench:
    def __init__(self, plan: Plan):
        self.plan = plan
        self.t0 = time.monotonic()
        self.actions = ActionLog(self.t0)
        self.failures: list[Failure] = []
        self.flock = threading.Lock()
        self.counts = Counts()
        self.kill_queue: list[tuple[str, int]] = []
        self.cmd_rng = random.Random(plan.seed)
        self.fault_rng = random.Random(plan.seed + 1)
        self.ring_rng = random.Random(plan.seed + 2)
        self.work = Path(tempfile.mkdtemp(prefix="mmfaults"))
        # Short: the daemons' unix sockets live in it (107-byte path limit).
        self.runtime = Path(tempfile.mkdtemp(prefix="mmf", dir="/tmp"))
        self.prefix = f"mmf{uuid.uuid4().hex[:8]}"
        self.rings = {"dataset": f"{self.prefix}ds", "stream": f"{self.prefix}live"}
        self.endpoints = {"producer": f"ipc://{self.runtime}/producer.sock",
                          "stream": f"ipc://{self.runtime}/stream.sock",
                          "trainer": f"ipc://{self.runtime}/trainer.sock"}
        self.menu = Menu(self.cmd_rng, self.work)
        self.procs: dict[str, Proc] = {}
        self.restart_delay: dict[str, float] = {}
        self.undo: list[tuple[float, CliCommand]] = []
        self.trainer_rings: dict[int, str] = {}
        self.generations: dict[str, int] = {}   # producer -> highest generation announced
        self.watchdog: Watchdog | None = None
        self.error_log_lines: dict[str, int] = {}
        self.zctx = zmq.Context.instance()

    # --- failures ----------------------------------------------------------------------------

    def now(self) -> float:
        return time.monotonic() - self.t0

    def fail(self, process: str, kind: str, detail: str, evidence: str = "") -> None:
        f = Failure(self.now(), process, kind, detail, evidence, self.actions.recent())
        with self.flock:
            self.failures.append(f)
        print(f"  FAILURE {f.line()}", file=sys.stderr, flush=True)

    def hang(self, name: str, inc: int, pid: int | None, what: str) -> None:
        """Called by the watchdog: record it, and have the main loop kill and restart it."""
        proc = self.procs[name]
        evidence = (proc_state(pid) + "\n" if pid else "") + proc.stderr_tail(inc)
        self.fail(name, "hang", f"{what} (incarnation {inc}, pid {pid})", evidence)
        with self.flock:
            self.kill_queue.append((name, inc))

    # --- set-up ------------------------------------------------------------------------------

    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        env.update({"MMFEED_RUNTIME_DIR": str(self.runtime),
                    "MMFEED_STATE_DIR": str(self.work / "state"),
                    "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
        env.pop("MMFEED_PRODUCER", None)
        env.pop("MMFEED_TRAINER", None)
        return env

    def prepare(self) -> None:
        data = make_dataset(self.work / "ds", per_class={"train": 3, "val": 1}, size=(64, 48),
                            clip_seconds=0.5)
        subprocess.run([str(BIN / "mm-producer"), "preprocess", str(data), "--cache",
                        str(self.work / "cache"), "--workers", "2", "--json"], env=self.env(),
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=True, timeout=600)
        port = _free_udp_port()
        env, logs = self.env(), self.work / "logs"
        logs.mkdir()
        classes = ",".join(("circle", "square", "stripes"))
        ffmpeg = shutil.which("ffmpeg")
        self.procs = {
            "sender": Proc("sender", lambda: [
                ffmpeg, "-nostdin", "-loglevel", "error", "-re",
                "-f", "lavfi", "-i", "testsrc=size=160x120:rate=10",
                "-f", "lavfi", "-i", "sine=frequency=1000:sample_rate=16000",
                "-f", "mpegts", f"udp://127.0.0.1:{port}?pkt_size=1316"], env, logs, daemon=False),
            "producer": Proc("producer", lambda: [
                str(BIN / "mm-producer"), "run", "--source", str(data), "--ring",
                self.rings["dataset"], "--loop", "--rate", "max", "--record-cache",
                str(self.work / "recorded"), "--status-interval", "5", "--metrics", "127.0.0.1:0",
                "--mode", self.ring_rng.choice(("lossy", "lossless"))], env, logs, daemon=True),
            "stream": Proc("stream", lambda: [
                str(BIN / "mm-producer"), "run", "--source", f"udp://127.0.0.1:{port}",
                "--ring", self.rings["stream"], "--control", self.endpoints["stream"],
                "--classes", classes, "--status-interval", "5", "--metrics", "127.0.0.1:0"],
                env, logs, daemon=True),
            "trainer": Proc("trainer", self._trainer_argv, env, logs, daemon=True, stdout=True),
            "reader": Proc("reader", lambda: [
                sys.executable, "-m", "bench._ring_reader", self.rings["dataset"],
                self.rings["stream"]], env, logs, daemon=True),
        }

    def _trainer_argv(self) -> list[str]:
        # Alternating, so a short run covers both: the replay's ring (fast, full schema) and
        # the stream's (a live source slower than the trainer, video and audio only).
        which = ("dataset", "stream")[self.procs["trainer"].incarnation % 2 == 0]
        self.trainer_rings[self.procs["trainer"].incarnation] = which
        return [str(BIN / "mm-trainer"), "run", "--cache", str(self.work / "cache"),
                "--ring", self.rings[which], "--mix", "0.5", "--steps", str(10 ** 9),
                "--batch-size", "8", "--checkpoint-dir", str(self.work / "ckpt"), "--json",
                "--log-interval", "10", "--progress-interval", "30", "--metrics", "127.0.0.1:0"]

    # --- the main loop -----------------------------------------------------------------------

    def supervise(self) -> None:
        """Reap exits (judging them), restart what is due, act on the watchdog's hangs."""
        now = time.monotonic()
        with self.flock:
            queue, self.kill_queue = self.kill_queue, []
        for name, inc in queue:
            proc = self.procs[name]
            if proc.incarnation == inc:
                self.restart_delay[name] = 0.5
                proc.send(signal.SIGKILL)
        for name, proc in self.procs.items():
            if proc.stopping_since is not None and now - proc.stopping_since > self.plan.stop_s:
                pid = proc.snapshot()[1]
                self.fail(name, "hang", f"still running {self.plan.stop_s:.0f} s after SIGTERM "
                          f"(incarnation {proc.incarnation})",
                          (proc_state(pid) + "\n" if pid else "") + proc.stderr_tail())
                proc.stopping_since = None
                proc.send(signal.SIGKILL)
            ended = proc.reap()
            if ended is not None:
                rc, sent = ended
                self.actions.add(f"{name} #{proc.incarnation} exited {rc}")
                self._judge(name, proc, rc, sent, "")
                if proc.want_up:
                    proc.restart_at = now + self.restart_delay.pop(name, 1.0)
            if proc.want_up and proc.popen is None and proc.restart_at is not None \
                    and now >= proc.restart_at:
                self._start(name)

    def _start(self, name: str) -> None:
        proc = self.procs[name]
        proc.start()
        argv = proc.last_argv
        how = ""
        if "--mode" in argv:
            how = f" {argv[argv.index('--mode') + 1]}"
        if name == "trainer":
            how = f" on ring {argv[argv.index('--ring') + 1]}"
        self.actions.add(f"{name} started (#{proc.incarnation}){how}")

    def _judge(self, name: str, proc: Proc, rc: int, sent: set[int], when: str) -> None:
        """An incarnation ended: a crash, or tracebacks it printed while it went on (a thread
        that died), are failures; a trainer's summary line adds its final counts."""
        if name == "trainer":
            self._trainer_summary(proc)
        why = judge_exit(rc, sent, proc.daemon)
        if why is not None:
            self.fail(name, "crash", f"{when}incarnation {proc.incarnation}: {why}",
                      proc.stderr_tail())
        elif name != "sender":
            for tb in raw_tracebacks(proc.stderr_path):
                self.fail(name, "traceback", f"incarnation {proc.incarnation} printed a "
                          f"traceback and went on", tb)
        self.error_log_lines[name] = self.error_log_lines.get(name, 0) + \
            error_lines(proc.stderr_path)

    def _trainer_summary(self, proc: Proc) -> None:
        """A trainer that stopped on SIGTERM printed its summary: its run's final counts."""
        try:
            lines = proc.stdout_path.read_text().strip().splitlines()
            s = json.loads(lines[-1]) if lines else {}
        except (OSError, ValueError):
            return
        if isinstance(s, dict) and self.watchdog is not None:
            self.watchdog.add_summary(proc.incarnation, int(s.get("samples_live") or 0)
                                      + int(s.get("samples_disk") or 0))

    def mmctl(self, cmd: CliCommand) -> None:
        eps = {"producer": self.endpoints["producer"], "stream": self.endpoints["stream"],
               "producers": f"{self.endpoints['producer']},{self.endpoints['stream']}",
               "trainer": self.endpoints["producer"], "local": self.endpoints["producer"]}
        argv = [str(BIN / "mmctl"), "--json", "--timeout", str(MMCTL_TIMEOUT_S), "--producer",
                eps[cmd.target], "--trainer", self.endpoints["trainer"], *cmd.args]
        self.actions.add(cmd.text())
        self.counts.commands["mmctl_valid" if cmd.valid else "mmctl_invalid"] += 1
        wall = 20.0 if cmd.may_block else MMCTL_WALL_S
        try:
            done = subprocess.run(argv, env=self.procs["producer"].env, capture_output=True,
                                  text=True, timeout=wall, cwd=self.work)
        except subprocess.TimeoutExpired as e:
            if not cmd.may_block:
                self.fail("mmctl", "hang", f"`{cmd.text()}` still running after {wall:.0f} s",
                          (e.stderr or b"")[-1000:].decode(errors="replace")
                          if isinstance(e.stderr, bytes) else str(e.stderr or "")[-1000:])
            return
        rc = done.returncode
        self.counts.mmctl_exit[str(rc)] = self.counts.mmctl_exit.get(str(rc), 0) + 1
        last = (done.stdout.strip().splitlines() or [""])[-1]
        with open(self.work / "commands.log", "a") as f:
            f.write(f"t={self.now():.1f} rc={rc} {cmd.text()} :: {last[:300]}\n")
        if rc not in (0, 1, 2, 3) or "Traceback" in done.stderr:
            self.fail("mmctl", "cli", f"`{cmd.text()}` exited {rc}", done.stderr[-STDERR_TAIL:])
            return
        if rc in (0, 1, 3):
            last = done.stdout.strip().splitlines()[-1:] or [""]
            try:
                obj = json.loads(last[0])
            except ValueError:
                self.fail("mmctl", "cli", f"`{cmd.text()}` --json exited {rc} without a JSON "
                          f"last line", f"stdout: {done.stdout[-500:]}\nstderr: "
                          f"{done.stderr[-500:]}")
                return
            self._internal(cmd.target, f"`{cmd.text()}`", obj)
            if rc == 0:
                self._check_reply(cmd, obj)
        if cmd.undo and rc == 0:
            self.undo.append((time.monotonic() + self.cmd_rng.uniform(1.0, 8.0),
                              CliCommand(cmd.target, cmd.undo, True)))

    def raw(self) -> None:
        kind, frames, reply_due, must_refuse = self.menu.raw()
        target = self.cmd_rng.choice(DAEMONS)
        self.actions.add(f"raw {kind!r} ({sum(map(len, frames))} bytes) -> {target}")
        self.counts.commands["raw"] += 1
        reply = self._send_raw(target, frames)
        if reply is None:
            if reply_due:
                self.counts.raw_unanswered += 1
            return
        try:
            obj = json.loads(reply)
        except ValueError:
            self.fail(target, "protocol", f"raw {kind!r}: the reply is not JSON: {reply[:200]!r}")
            return
        if not isinstance(obj, dict) or not isinstance(obj.get("ok"), bool):
            self.fail(target, "protocol", f"raw {kind!r}: a reply without a boolean ok: "
                      f"{reply[:200]!r}")
        elif obj["ok"] and must_refuse:
            self.fail(target, "protocol", f"raw {kind!r} was accepted: {reply[:300]!r}")
        else:
            self._internal(target, f"raw {kind!r}", obj)

    def _check_reply(self, cmd: CliCommand, reply: dict) -> None:
        """A reply that says something untrue: pause not paused, resume still paused, or a
        change numbered at or below a generation that producer (any of its incarnations)
        already announced - generations only grow on a ring, across restarts too."""
        what, target = cmd.args[0], cmd.target
        state = reply.get("state")
        if what == "pause" and state is not None and state != "paused":
            self.fail(target, "protocol", f"`{cmd.text()}` answered ok with state {state!r}")
        if what == "resume" and state == "paused":
            self.fail(target, "protocol", f"`{cmd.text()}` answered ok but still paused")
        if what in CHANGES and target in ("producer", "stream") and reply.get("changed") is not False:
            self._new_generation(target, reply.get("generation"), f"`{cmd.text()}`")

    def _new_generation(self, target: str, gen: object, what: str) -> None:
        if not isinstance(gen, int) or isinstance(gen, bool):
            return
        with self.flock:
            last = self.generations.get(target, 0)
            self.generations[target] = max(last, gen)
        if gen <= last:
            self.fail(target, "protocol", f"{what} made generation {gen}, but generation {last} "
                      f"was already announced on this ring: numbers must only grow, across "
                      f"producer restarts too")

    def _internal(self, target: str, what: str, reply: object) -> None:
        """An `internal` error reply: a handler failed in a way nobody foresaw (the control
        layer's last-resort catch kept the daemon alive; the request deserved a real answer)."""
        err = reply.get("error") if isinstance(reply, dict) else None
        if isinstance(err, dict) and err.get("code") == "internal":
            self.fail(target, "internal", f"{what} got an internal error: "
                      f"{str(err.get('message'))[:300]}")

    def _send_raw(self, target: str, frames: list[bytes]) -> bytes | None:
        s = self.zctx.socket(zmq.REQ)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDTIMEO, 2000)
        try:
            s.connect(self.endpoints[target])
            s.send_multipart(frames)
            if s.poll(int(RAW_REPLY_S * 1000), zmq.POLLIN):
                return s.recv()
            return None
        except zmq.ZMQError:
            return None
        finally:
            s.close()

    def metrics(self) -> None:
        """One HTTP request to a daemon's Prometheus endpoint (`--metrics`): a scrape must be
        answered 200 with mmfeed's metric families; anything else may be refused or dropped,
        and the next scrape shows the exporter survived it."""
        kind, data, scrape = self.menu.metrics()
        target = self.cmd_rng.choice(DAEMONS)
        with self.watchdog.lock:
            inc, url = self.watchdog.metrics_url.get(target, (0, ""))
        if not url or self.procs[target].snapshot()[0] != inc:
            return  # not known yet, or restarted since (a new port): next time
        host, _, port = url.split("//", 1)[1].split("/", 1)[0].rpartition(":")
        self.actions.add(f"metrics {kind!r} ({len(data)} bytes) -> {target} {url}")
        self.counts.commands["metrics"] += 1
        got = b""
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=RAW_REPLY_S) as c:
                c.sendall(data)
                if kind == "half a request":
                    return  # and hang up: the server's thread must not wait forever
                while len(got) < 16 << 20:
                    chunk = c.recv(1 << 16)
                    if not chunk:
                        break
                    got += chunk
        except (ConnectionError, socket.timeout, OSError) as e:
            if scrape and self.procs[target].snapshot()[0] == inc and self.procs[target].snapshot()[1]:
                if isinstance(e, socket.timeout):
                    self.fail(target, "hang", f"metrics {kind!r} at {url}: no full reply in "
                              f"{RAW_REPLY_S:.0f} s ({len(got)} bytes)")
            return
        if not scrape:
            return
        head = got.split(b"\r\n", 1)[0]
        if not head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
            self.fail(target, "protocol", f"metrics {kind!r} at {url}: {head[:100]!r}")
        elif kind != "scrape gzip" and b"mmfeed_" not in got:
            self.fail(target, "protocol", f"metrics {kind!r} at {url}: 200 without an mmfeed_ "
                      f"metric ({len(got)} bytes)")

    def repeated_id(self) -> None:
        """A valid change sent twice under one id, as a client's retry is: the second reply
        must be the first one (from the reply cache), the change made once."""
        if self.cmd_rng.random() < 0.7:
            target = self.cmd_rng.choice(("producer", "stream"))
            cmd, args = "filter", {"spec": self.cmd_rng.choice(("gray", "rgb", "none",
                                                               "resize=48x36"))}
            key = "generation"
        else:
            target, cmd, args, key = "trainer", "checkpoint", {}, "checkpoint"
        rid = uuid.uuid4().hex
        body = json.dumps({"v": CONTROL_VERSION, "id": rid, "cmd": cmd, "args": args}).encode()
        self.actions.add(f"{cmd} {args} twice under id {rid[:8]} -> {target}")
        self.counts.commands["repeated_id"] += 1
        first = self._send_raw(target, [body])
        second = self._send_raw(target, [body])
        if first is None or second is None:
            return  # restarting meanwhile: nothing to compare
        try:
            a, b = json.loads(first), json.loads(second)
        except ValueError:
            self.fail(target, "protocol", f"{cmd}: a reply that is not JSON: {first[:100]!r} / "
                      f"{second[:100]!r}")
            return
        if target != "trainer" and a.get("ok"):
            self._new_generation(target, a.get("generation"), f"{cmd} under id {rid[:8]}")
        if a.get("ok") and b.get("ok") and a.get(key) != b.get(key):
            self.fail(target, "protocol", f"{cmd} retried under the same id ran twice: "
                      f"{key} {a.get(key)} then {b.get(key)}")

    def fault(self, kind: str) -> bool:
        """Inject one fault; False when its process is down or already stopping."""
        r = self.fault_rng
        name, sig, delay = {
            "kill producer": ("producer", signal.SIGKILL, r.uniform(0.0, 2.0)),
            "kill stream producer": ("stream", signal.SIGKILL, r.uniform(0.0, 2.0)),
            "term trainer": ("trainer", signal.SIGTERM, r.uniform(0.0, 2.0)),
            "kill sender": ("sender", signal.SIGKILL, r.uniform(0.5, 5.0)),
            "kill reader": ("reader", signal.SIGKILL, r.uniform(0.0, 2.0)),
        }[kind]
        proc = self.procs[name]
        if proc.stopping_since is not None:
            return False
        self.restart_delay[name] = delay
        if not proc.send(sig):
            return False
        self.counts.faults[kind] += 1
        self.actions.add(f"fault: {kind} (#{proc.incarnation}, restart in {delay:.1f} s)")
        return True

    def wait_until(self, cond, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            self.supervise()
            if self.failures:
                raise RuntimeError(f"{what}: {self.failures[-1].line()}\n"
                                   f"{self.failures[-1].evidence}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}; logs "
                                   f"in {self.work / 'logs'}")
            time.sleep(0.2)

    def trainer_status(self) -> dict:
        try:
            with ControlClient(self.endpoints["trainer"], Timeouts(request=10.0, retries=0)) as c:
                return c.request("status") if c.listening() else {}
        except Exception:  # busy or restarting: the caller polls again
            return {}

    def run(self) -> dict:
        plan = self.plan
        self.load_start = os.getloadavg()
        print(f"faults: preparing in {self.work}", file=sys.stderr, flush=True)
        self.prepare()
        for name in ("sender", "producer", "stream", "reader", "trainer"):
            self._start(name)
        self.wait_until(lambda: self.trainer_status().get("step", 0) >= 1,
                        "the trainer's first step", plan.startup_s)
        self.watchdog = Watchdog(self)
        self.watchdog.start()
        self.wait_until(lambda: self.watchdog.samples_trained() > 0,
                        "the watchdog's first trainer status", plan.startup_s)
        # The baseline: the same processes, nothing injected.
        print(f"faults: baseline {plan.baseline_s:.0f} s", file=sys.stderr, flush=True)
        s0, t_base = self.watchdog.samples_trained(), time.monotonic()
        self._loop(plan.baseline_s, inject=False)
        s1, t_faults = self.watchdog.samples_trained(), time.monotonic()
        baseline_rate = (s1 - s0) / max(t_faults - t_base, 1e-9) * 60
        print(f"faults: {plan.minutes:g} min of faults (seed {plan.seed})", file=sys.stderr,
              flush=True)
        self._loop(plan.minutes * 60, inject=True)
        s2, t_end = self.watchdog.samples_trained(), time.monotonic()
        self.load_end = os.getloadavg()
        self._all_up()
        self.watchdog.stop_event.set()
        self.watchdog.join(30)
        self._stop_all()
        return self._results(baseline_rate, (s2 - s1) / max(t_end - t_faults, 1e-9) * 60,
                             s2 - s1)

    def _loop(self, seconds: float, inject: bool) -> None:
        """Supervise for `seconds`; with `inject`, faults on this thread and commands on
        another (an mmctl process takes seconds on a loaded machine: faults keep their pace)."""
        end = time.monotonic() + seconds
        commands = threading.Thread(target=self._command_loop, args=(end,), name="commands",
                                    daemon=True) if inject else None
        if commands is not None:
            commands.start()
        next_fault = time.monotonic() + self._fault_gap()
        order: list[str] = []
        last_progress = time.monotonic()
        while (now := time.monotonic()) < end:
            self.supervise()
            if inject and now >= next_fault:
                if not order:  # every kind once per round, in a shuffled order
                    order = list(FAULTS)
                    self.fault_rng.shuffle(order)
                if self.fault(order[-1]):
                    order.pop()  # else its process is down or stopping: the same kind next time
                next_fault = now + self._fault_gap()
            if now - last_progress >= 30:
                last_progress = now
                c = self.counts
                print(f"  t={self.now():6.0f}s commands {sum(c.commands.values())} faults "
                      f"{sum(c.faults.values())} samples {self.watchdog.samples_trained()} "
                      f"failures {len(self.failures)}", file=sys.stderr, flush=True)
            time.sleep(0.05)
        if commands is not None:
            commands.join(MMCTL_WALL_S + RAW_REPLY_S * 2)

    def _fault_gap(self) -> float:
        """Seconds to the next fault: uniform in 0..2x the mean, so faults may come in quick
        succession (a kill while the last one's restart is under way) yet a run of N means
        has at least N/2 of them - every kind within a few rounds, even in a short run."""
        return self.fault_rng.uniform(0.0, 2.0 * self.plan.fault_interval_s)

    def _command_loop(self, end: float) -> None:
        """Commands until `end`: one every `command_interval_s` on average, and the undo of
        a pause or a recording when it is due."""
        r = self.cmd_rng
        next_cmd = time.monotonic() + r.expovariate(1 / self.plan.command_interval_s)
        order: list[str] = []
        while (now := time.monotonic()) < end:
            due = [u for u in self.undo if u[0] <= now]
            if due:
                self.undo = [u for u in self.undo if u[0] > now]
                for _, cmd in due:
                    self.mmctl(cmd)
                continue
            if now < next_cmd:
                time.sleep(min(0.05, next_cmd - now))
                continue
            if not order:  # every kind in each round, shuffled: a short or loaded run has all
                order = list(COMMAND_ROUND)
                r.shuffle(order)
            kind = order.pop()
            if kind == "mmctl":
                self.mmctl(self.menu.cli(self.watchdog.trainer_generation))
            elif kind == "raw":
                self.raw()
            elif kind == "metrics":
                self.metrics()
            else:
                self.repeated_id()
            next_cmd = max(next_cmd + r.expovariate(1 / self.plan.command_interval_s),
                           time.monotonic())

    def _all_up(self) -> None:
        """Before the final stop, every daemon a fault left down is started again and must
        answer status, as systemd's Restart= would bring it back: what a SIGKILLed producer
        left in /dev/shm and the runtime folder is the next start's to reclaim, so the leak
        count judges that, not the kill itself."""
        for proc in self.procs.values():
            if proc.want_up and proc.popen is None:
                proc.restart_at = time.monotonic()
        deadline = time.monotonic() + self.plan.startup_s
        waiting = ["producer", "stream", "trainer"]
        while waiting:
            self.supervise()
            name = waiting[0]
            if self._answers(name, self.procs[name].incarnation):
                waiting.pop(0)
            elif time.monotonic() > deadline:
                proc = self.procs[name]
                self.fail(name, "hang", f"never answered status in the {self.plan.startup_s:.0f} s"
                          f" after its restart for the final stop (incarnation "
                          f"{proc.incarnation})", proc.stderr_tail())
                waiting.pop(0)
            else:
                time.sleep(0.2)

    def _answers(self, name: str, inc: int) -> bool:
        if self.procs[name].incarnation != inc:
            return True  # it died and was restarted meanwhile: judged on its own
        try:
            with ControlClient(self.endpoints[name], Timeouts(request=5.0, retries=0),
                               daemon="trainer" if name == "trainer" else "producer") as c:
                return bool(c.listening()) and bool(c.request("status"))
        except Exception:  # not listening yet
            return False

    def _stop_all(self) -> None:
        """Everything down in the order a user's shutdown goes, each exit judged."""
        for name in ("reader", "trainer", "stream", "producer", "sender"):
            proc = self.procs[name]
            proc.want_up = False
            if name == "sender":
                proc.send(signal.SIGKILL)
                if proc.popen is not None:
                    proc.popen.wait(30)
                proc.reap()
                continue
            rc, sent = proc.stop(self.plan.stop_s)
            if rc is None:
                continue
            if signal.SIGKILL in sent:
                self.fail(name, "hang", f"still running {self.plan.stop_s:.0f} s after the "
                          f"final SIGTERM", proc.stderr_tail())
            self._judge(name, proc, rc, sent, "at the final stop: ")

    def _results(self, baseline_rate: float, fault_rate: float, fault_samples: int) -> dict:
        deadline = time.monotonic() + 5.0
        while (left := shm_entries(self.prefix)) and time.monotonic() < deadline:
            time.sleep(0.1)  # a last unlink may still be on its way
        if left:
            self.fail("shm", "leak", f"{len(left)} /dev/shm entries left after every process "
                      f"stopped: {', '.join(left[:10])}")
            for n in left:  # leave the machine clean; the failure says what was there
                try:
                    os.unlink(f"/dev/shm/{n}")
                except OSError:
                    pass
        leftover_files = sorted(p.name for p in self.runtime.iterdir()) \
            if self.runtime.exists() else []
        if leftover_files:
            self.fail("runtime dir", "leak", f"{len(leftover_files)} files left in the runtime "
                      f"folder after every daemon stopped: {', '.join(leftover_files[:10])}")
        temporaries = sorted(p.name for p in (self.work / "ckpt").glob("*.tmp*")) \
            if (self.work / "ckpt").exists() else []
        if temporaries:
            self.fail("checkpoints", "leak", f"{len(temporaries)} checkpoint temporaries left "
                      f"after the trainer stopped: {', '.join(temporaries[:10])}")
        kinds = [f.kind for f in self.failures]
        rss = {}
        for d in DAEMONS:
            slope, n = growth_per_hour(self.watchdog.rss[d], self.plan.warmup_s)
            pts = self.watchdog.rss[d]
            rss[d] = {"rss_anon_growth_mib_per_hour": None if slope is None else round(slope, 2),
                      "points": n, "incarnations": self.procs[d].incarnation,
                      "rss_anon_last_mib": round(pts[-1][2], 1) if pts else None,
                      "rss_anon_mib_over_time": [[i, round(t), round(m, 1)] for i, t, m in pts]}
        return {
            "minutes": self.plan.minutes, "seed": self.plan.seed,
            "commands_sent": sum(self.counts.commands.values()),
            "commands": self.counts.commands,
            "mmctl_exit_codes": self.counts.mmctl_exit,
            "raw_unanswered": self.counts.raw_unanswered,
            "faults_injected": sum(self.counts.faults.values()),
            "faults": self.counts.faults,
            "samples_trained": self.watchdog.samples_trained(),
            "published": {n: sum(v.values()) for n, v in self.watchdog.published.items()},
            "samples_trained_under_faults": fault_samples,
            "baseline_samples_per_min": round(baseline_rate, 1),
            "fault_samples_per_min": round(fault_rate, 1),
            "trainer_rings": {k: self.trainer_rings.get(k) for k in sorted(self.trainer_rings)},
            "crashes": kinds.count("crash"), "hangs": kinds.count("hang"),
            "leaks": kinds.count("leak"), "leaked_shm": len(left),
            "load_average_start": [round(x, 2) for x in self.load_start],
            "load_average_end": [round(x, 2) for x in self.load_end],
            "cli_failures": kinds.count("cli"), "protocol_failures": kinds.count("protocol"),
            "internal_errors": kinds.count("internal"),
            "tracebacks": kinds.count("traceback"),
            "error_log_lines": self.error_log_lines,
            "leftover_runtime_files": leftover_files,
            "leftover_checkpoint_temporaries": temporaries,
            "restarts": {n: p.incarnation - 1 for n, p in self.procs.items()},
            "rss": rss,
            "failures": [f.as_dict() for f in self.failures],
            "workdir": str(self.work),
        }

    def cleanup(self) -> None:
        for proc in self.procs.values():
            proc.want_up = False
            if proc.popen is not None and proc.popen.poll() is None:
                try:
                    os.killpg(proc.popen.pid, signal.SIGKILL)
                except OSError:
                    pass
                proc.popen.wait()
        for n in shm_entries(self.prefix):
            try:
                os.unlink(f"/dev/shm/{n}")
            except OSError:
                pass
        shutil.rmtree(self.runtime, ignore_errors=True)
        if not self.plan.keep and not self.failures:
            shutil.rmtree(self.work, ignore_errors=True)



FIGURES_HELP = """\
figures (--json keys; human output: a line every 30 s, a table at the end):
  commands_sent       mmctl command lines (valid, invalid, local), raw ZeroMQ messages,
                      Prometheus /metrics requests, retries under one request id
  faults_injected     SIGKILL + restart of either producer, SIGTERM + resume of the trainer,
                      SIGKILL + restart of the ffmpeg sender and of the ring reader (by kind)
  samples_trained     samples the trainer trained on, over every incarnation
  crashes             a daemon or the ring reader exiting other than by the bench's own
                      signal (non-zero status, a signal not sent, status 0 unasked)
  hangs               status unanswered for --hang-s; a running trainer or producer making no
                      progress for --stall-s while data flows; alive --stop-s after SIGTERM;
                      an mmctl process outliving its timeout; a scrape left unanswered
  leaks               /dev/shm entries of the run's rings (leaked_shm), runtime-folder files
                      and checkpoint temporaries left after the final stop (every daemon a
                      fault left down is started once more first, as systemd would)
  cli/protocol/internal/tracebacks
                      mmctl tracebacks or exits outside 0-3; replies that are not JSON, a
                      malformed message accepted, a retried id run twice, pause/resume
                      replies in the wrong state, generation numbers going back, a bad scrape;
                      `internal` error replies; tracebacks a daemon printed and went on
  rss                 RssAnon growth per hour of each daemon (least squares within each
                      incarnation after --warmup-s; noisy below ~30 min)
  load_average_*      the machine's 1/5/15-minute load average at the start and the end
  figure              samples trained per minute under faults, against the same run's
                      fault-free baseline (--baseline-s) as the limit
exit status: 0 when every failure count is 0, 1 otherwise, 2 without ffmpeg.
"""


def parse_args(argv: list[str] | None = None) -> Plan:
    ap = argparse.ArgumentParser(
        prog="python -m bench.faults", epilog=FIGURES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fault-injection soak: both daemons (a dataset replay and an ffmpeg UDP "
                    "stream) and the trainer, steered with every mmctl command, fed malformed "
                    "control messages, killed and restarted at random; counts crashes, hangs "
                    "and leaks (all must be 0) and the training kept.")
    ap.add_argument("--minutes", type=float, default=30.0, help="length of the fault phase")
    ap.add_argument("--seed", type=int, default=1, help="seeds every random choice")
    ap.add_argument("--baseline-s", type=float, default=None,
                    help="fault-free baseline first [default: a tenth of the run, 60..180 s]")
    ap.add_argument("--command-interval", type=float, default=1.0, metavar="S",
                    help="mean seconds between commands")
    ap.add_argument("--fault-interval", type=float, default=30.0, metavar="S",
                    help="mean seconds between faults (kills, restarts)")
    ap.add_argument("--hang-s", type=float, default=60.0,
                    help="a daemon silent to status this long is hung")
    ap.add_argument("--stall-s", type=float, default=120.0,
                    help="a running trainer whose step (or a producer whose published count) "
                         "stays put this long is stalled")
    ap.add_argument("--stop-s", type=float, default=120.0,
                    help="a daemon still running this long after SIGTERM is hung")
    ap.add_argument("--startup-s", type=float, default=300.0,
                    help="how long a daemon may take to answer its first status")
    ap.add_argument("--warmup-s", type=float, default=60.0,
                    help="each incarnation's first seconds, left out of the RSS slope")
    ap.add_argument("--rss-interval", type=float, default=5.0, metavar="S")
    ap.add_argument("--keep", action="store_true", help="keep the run's folder (logs)")
    ap.add_argument("--json", action="store_true", help="last line: one JSON object")
    a = ap.parse_args(argv)
    baseline = a.baseline_s if a.baseline_s is not None else min(180.0, max(60.0, a.minutes * 6))
    return Plan(a.minutes, a.seed, baseline, a.command_interval, a.fault_interval, a.hang_s,
                a.stall_s, a.stop_s, a.startup_s, a.warmup_s, a.rss_interval, a.keep)


def summary_table(out: dict) -> str:
    """The human summary: one row per figure, the failure counts marked when non-zero."""
    c, f = out["commands"], out["faults"]
    rows = [
        ("commands sent", f"{out['commands_sent']} (mmctl {c['mmctl_valid']} valid, "
                          f"{c['mmctl_invalid']} invalid; raw {c['raw']}; metrics "
                          f"{c['metrics']}; retried ids {c['repeated_id']})"),
        ("faults injected", f"{out['faults_injected']} ("
                            + ", ".join(f"{k} {v}" for k, v in f.items()) + ")"),
        ("samples trained", f"{out['samples_trained']} ({out['fault_samples_per_min']}/min "
                            f"under faults, {out['baseline_samples_per_min']}/min baseline)"),
    ]
    for key, label in (("crashes", "daemon crashes"), ("hangs", "hangs"),
                       ("leaks", "leaks (shm, runtime dir, checkpoints)"),
                       ("cli_failures", "mmctl failures"), ("protocol_failures",
                                                            "protocol failures"),
                       ("internal_errors", "internal errors"), ("tracebacks", "tracebacks")):
        rows.append((label, f"{out[key]}" + ("   <-- must be 0" if out[key] else "")))
    for d, r in out["rss"].items():
        g = r["rss_anon_growth_mib_per_hour"]
        rows.append((f"RssAnon growth {d}", f"{'-' if g is None else g} MiB/h ({r['points']} "
                                            f"samples, {r['incarnations']} incarnations)"))
    rows.append(("load average", f"{' '.join(map(str, out['load_average_start']))} at the "
                                 f"start, {' '.join(map(str, out['load_average_end']))} at the end"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    plan = parse_args(argv)
    as_json = "--json" in (sys.argv[1:] if argv is None else argv)
    if shutil.which("ffmpeg") is None:
        print("bench.faults: needs the ffmpeg command line (it sends the live stream); "
              "install ffmpeg", file=sys.stderr)
        return 2
    bench = FaultBench(plan)
    try:
        out = bench.run()
    finally:
        bench.cleanup()
    for f in bench.failures:
        print(f"FAILURE {f.line()}")
        for line in f.before:
            print(f"    before: {line}")
        if f.evidence:
            print("    " + f.evidence[-1500:].replace("\n", "\n    "))
    print(summary_table(out))
    if bench.failures:
        print(f"faults: logs kept in {bench.work}")
    limit = out["baseline_samples_per_min"]
    if limit > 0:
        report("faults", out["fault_samples_per_min"], "samples/min",
               "fault-free baseline of the same run", limit, as_json, **out)
    else:
        print("faults: the baseline trained nothing, so there is no limit to compare with")
        if as_json:
            print(json.dumps({"bench": "faults", "figure": out["fault_samples_per_min"],
                              "unit": "samples/min", "limit_name": "fault-free baseline of "
                              "the same run", "limit": None, "ratio": None, **out}))
    return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
