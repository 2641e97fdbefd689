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

This module is the soak driver (the processes, the baseline and fault phases, the command
line); its parts: _fault_plan.py (the plan, the counts, shared names), _fault_watchdog.py (the
status watchdog), _fault_inject.py (commands and faults), _fault_report.py (figures, leaks,
the summary), _fault_menu.py (what commands to send), _fault_rig.py (supervised processes).
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
from pathlib import Path

import zmq

from bench._fault_inject import Injectors
from bench._fault_menu import CliCommand, Menu
from bench._fault_plan import (BIN, COMMAND_ROUND, FAULTS, MMCTL_WALL_S, RAW_REPLY_S, ROOT,
                               Counts, Plan)
from bench._fault_report import FIGURES_HELP, Reporting, print_report
from bench._fault_rig import (ActionLog, Failure, Proc, error_lines, judge_exit, proc_state,
                              raw_tracebacks, shm_entries)
from bench._fault_watchdog import Watchdog
from producer.synth import make_dataset
from protocol.control import ControlClient, Timeouts



def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FaultBench(Injectors, Reporting):
    """The soak driver: prepares the data, starts and supervises every process, runs the
    baseline and the fault phase, and stops everything, judging each exit."""

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
    print_report(bench.failures, bench.work, out, as_json)
    return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
