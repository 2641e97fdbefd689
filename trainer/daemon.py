"""The trainer daemon: the training loop plus control socket, signals, sd_notify and logs.

Everything runs on the main thread, between steps: the control server is polled (handlers
never race the loop), WATCHDOG=1 is sent from here (a stuck loop stops it, which is the point),
and SIGTERM only sets a flag that the loop reads at the next step boundary, then writes a
checkpoint and exits 0. Evaluation and checkpoint writes run long inside one loop turn, so they
call the same rate-limited `_keepalive` per val batch and per file write (still the main
thread, still only on progress).

Under torchrun, rank 0 owns the control socket, the log PUB socket and sd_notify; at every
step all ranks agree on (stop, checkpoint, pause, live fraction) with one tiny all_reduce, so
they stop, pause and checkpoint at the same step (a rank that ran ahead would hang in DDP).
The same all_reduce carries each rank's last live generation, so rank 0's `status` says
what every rank, on every node, has trained on (`mmctl wait GEN` waits for all of them).
"""
from __future__ import annotations

import json
import logging
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from protocol.control import ControlServer, DaemonSockets, daemon_sockets, wire_command
from protocol.errors import BadArgument, MmfeedError
from protocol.heap import HeapTrimmer
from protocol.metrics import MetricsExporter
from protocol.logs import LogLimiter, close_daemon_logging, logs_command, setup_daemon_logging
from protocol.notify import Notifier, watchdog_interval

from .loop import Dist, Trainer, TrainConfig
from .progress import Progress

log = logging.getLogger("trainer")


@dataclass
class DaemonConfig:
    control: str | None = None        # endpoint; None = paths.control_endpoint("trainer")
    log_endpoint: str | None = None   # None = next to control (paths.log_endpoint_for)
    curve_dir: Path | None = None     # `mmctl keygen` folder: CURVE keys for tcp:// sockets
    json: bool = False
    metrics: str | None = None        # HOST:PORT of the Prometheus endpoint (rank 0); None: off
    tensorboard: Path | None = None   # event files here (rank 0); None: off
    producer: str | None = None       # producer control endpoint (generation markers' text)


class TrainerDaemon:
    def __init__(self, cfg: TrainConfig, dcfg: DaemonConfig, trainer: Trainer, d: Dist,
                 sockets: DaemonSockets | None = None, metrics: MetricsExporter | None = None):
        self.cfg, self.dcfg, self.trainer, self.dist = cfg, dcfg, trainer, d
        self.sockets = sockets  # rank 0: where the control and log sockets go
        self.stop_requested = False
        self.stop_reason = ""
        self.paused = False
        self.checkpoint_requested = False
        self.rank_generations: list[int | None] = [None] * d.world_size
        self.server: ControlServer | None = None
        self.metrics = metrics  # started by run_daemon (rank 0, --metrics); closed by run()
        self.notifier = Notifier() if d.rank == 0 else None
        self.tb = None  # trainer/tensorboard.py TensorBoardLog (rank 0, --tensorboard)
        self._producer_client = None
        self._wd = watchdog_interval()
        self._last_wd = time.monotonic()

    # --- control commands (rank 0, main thread) ----------------------------------------------

    def on_status(self) -> dict:
        st = self.trainer.status()
        st["state"] = "paused" if self.paused else st["state"]
        st["metrics"] = self.metrics.url if self.metrics is not None else None
        if self.dist.enabled:
            # `generation` is what EVERY rank has trained on (the lowest rank's last live
            # generation; null while any rank has none), the number `mmctl wait` compares;
            # `rank_generations` has each rank's, as of the last step boundary.
            gens = self.rank_generations
            st["rank_generations"] = gens
            st["generation"] = (min(gens) if gens and all(g is not None for g in gens)
                                else None)
        return st

    def on_mix(self, fraction: float) -> dict:
        if math.isnan(fraction) or not 0.0 <= fraction <= 1.0:
            raise BadArgument(f"mix: fraction must be in [0, 1], got {fraction}")
        if fraction > 0 and self.trainer.live is None:
            raise BadArgument("mix: this trainer has no ring (start it with --ring NAME); "
                              "only fraction 0 is possible")
        previous = self.trainer.mixer.fraction
        self.trainer.mixer.set_fraction(fraction)
        self.cfg.mix_source = "mmctl"
        log.info("live fraction changed", extra={"previous": previous, "fraction": fraction})
        return {"fraction": fraction, "previous": previous}

    def on_batch(self, size: int, lr_rule: str) -> dict:
        """`mmctl batch N [--lr-rule linear|sqrt|none]`: handlers run between steps, so the
        change lands at a step boundary; under torchrun the other ranks follow at the next
        step's agreement (`_sync`)."""
        try:
            reply = self.trainer.set_batch_size(size, lr_rule)
        except ValueError as e:
            raise BadArgument(f"batch: {e}") from None
        reply["note"] = ("batches already read ahead (at most 2 per loader) keep the old size; "
                         "status batch_size_trained shows the size of the last one trained")
        return reply

    def on_checkpoint(self) -> dict:
        if self.cfg.checkpoint_dir is None:
            raise BadArgument("checkpoint: this trainer has no --checkpoint-dir")
        if self.dist.enabled:  # a collective: written by every rank at the next step boundary
            self.checkpoint_requested = True
            return {"scheduled": True, "step": self.trainer.step}
        path = self._save()
        return {"checkpoint": str(path), "step": self.trainer.step}

    def on_pause(self) -> dict:
        self.paused = True
        log.info("paused", extra={"step": self.trainer.step})
        return {"state": "paused", "step": self.trainer.step}

    def on_resume(self) -> dict:
        self.paused = False
        log.info("resumed", extra={"step": self.trainer.step})
        return {"state": "running", "step": self.trainer.step}

    def _serve(self, timeout_ms: int, errors: LogLimiter) -> None:
        """Answer control requests. `ControlServer.poll` turns whatever a request does into a
        reply; this catch is the loop's last resort for the rest (a socket error, a bug in the
        server itself): logged once a minute, and training goes on."""
        if self.server is None:
            return
        try:
            self.server.poll(timeout_ms)
        except Exception as e:
            errors.log(type(e).__name__, logging.ERROR, "control socket failed; training goes "
                       "on: %s: %s", type(e).__name__, e, exc_info=True)

    # --- signals -----------------------------------------------------------------------------

    def _on_signal(self, signum, _frame) -> None:
        self.stop_requested = True
        self.stop_reason = signal.Signals(signum).name

    # --- the watchdog and the long calls that must feed it -----------------------------------

    def _keepalive(self) -> None:
        """WATCHDOG=1 if a watchdog interval passed since the last one (rank 0 under systemd).

        Called where the loop makes progress: between steps, after each val batch, after each
        checkpoint write. The rate limit keeps it to a clock read per call otherwise.
        """
        if self.notifier is None or not self._wd:
            return
        now = time.monotonic()
        if now - self._last_wd >= self._wd:
            self.notifier.watchdog()
            self._last_wd = now

    def _status(self, text: str) -> None:
        if self.notifier is not None:
            self.notifier.status(text)

    def _evaluate(self) -> float | None:
        tr = self.trainer
        self._status(f"evaluating on the val split at step {tr.step}")
        acc = tr.evaluate(keepalive=self._keepalive)
        if self.tb is not None:
            self.tb.evaluation(tr.step, acc)
        if acc is not None:
            log.info("evaluation", extra={"step": tr.step, "accuracy": round(acc, 4)})
        self._status(f"step {tr.step}" + (f" accuracy {acc:.4f}" if acc is not None else ""))
        return acc

    def _describe_generation(self, number: int) -> str:
        """What made live generation `number`, in the producer's words (runs on the
        TensorBoard marker thread, which alone uses this client)."""
        from protocol import paths
        from protocol.control import ControlClient, Timeouts

        from .tensorboard import describe_generation

        if self._producer_client is None:
            endpoint = self.dcfg.producer or paths.find_control_endpoint("producer")[0]
            self._producer_client = ControlClient(endpoint, Timeouts(request=2.0, retries=0),
                                                  daemon="producer")
        return describe_generation(self._producer_client.request("generation", number=number))

    def _save(self) -> Path | None:
        tr = self.trainer
        if self.cfg.checkpoint_dir is None:
            return None
        self._status(f"writing the checkpoint of step {tr.step}")
        path = tr.save_checkpoint(keepalive=self._keepalive)
        self._status(f"step {tr.step} checkpoint written")
        return path

    # --- the loop ----------------------------------------------------------------------------

    def _sync(self) -> tuple[bool, bool, bool]:
        """(stop, checkpoint, paused) agreed by all ranks; rank 0's live fraction everywhere."""
        if not self.dist.enabled:
            stop, ck, self.checkpoint_requested = self.stop_requested, self.checkpoint_requested, False
            return stop, ck, self.paused
        r0 = self.dist.rank == 0
        tr = self.trainer
        # Then one slot per rank: its last live generation trained on (-1: none yet), so
        # rank 0's status can say what EVERY rank trained on (`mmctl wait`).
        gens = torch.full((self.dist.world_size,), -2.0, dtype=torch.float64)
        last = tr.last_generation
        gens[self.dist.rank] = -1.0 if last is None else float(last)
        t = torch.cat([torch.tensor([float(self.stop_requested),
                                     float(r0 and self.checkpoint_requested),
                                     float(r0 and self.paused),
                                     tr.mixer.fraction if r0 else -1.0,
                                     float(tr.cfg.batch_size) if r0 else -1.0,
                                     tr.optimizer.param_groups[0]["lr"] if r0 else -1.0],
                                    dtype=torch.float64), gens])
        if self.trainer.device.type == "cuda":
            t = t.to(self.trainer.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        t = t.cpu()
        self.rank_generations = [None if g < 0 else int(g) for g in t[6:].tolist()]
        self.checkpoint_requested = False
        if not r0 and abs(float(t[3]) - self.trainer.mixer.fraction) > 1e-12:
            self.trainer.mixer.set_fraction(float(t[3]))
        if not r0 and int(t[4]) != tr.cfg.batch_size:  # `mmctl batch` reached rank 0
            tr.set_batch_size(int(t[4]))
            for g in tr.optimizer.param_groups:
                g["lr"] = float(t[5])
        self.paused = bool(t[2])
        if t[0] and not self.stop_requested:
            # Another rank got the signal (a node's unit stopped first): this rank stops too,
            # AS a stop - it must skip the final evaluation as the signalled rank does, or the
            # ranks run different collectives (evaluate vs checkpoint) and hang.
            self.stop_requested = True
            self.stop_reason = "a stop on another rank"
        return bool(t[0]), bool(t[1]), bool(t[2])

    def run(self) -> int:
        tr = self.trainer
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._on_signal)
        if self.dist.rank == 0:
            socks = self.sockets or daemon_sockets("trainer", self.dcfg.control,
                                                   self.dcfg.log_endpoint, self.dcfg.curve_dir)
            self.server = ControlServer(socks.control, {
                "status": wire_command("status", self.on_status),
                "mix": wire_command("mix", self.on_mix),
                "checkpoint": wire_command("checkpoint", self.on_checkpoint),
                "batch": wire_command("batch", self.on_batch),
                "pause": wire_command("pause", self.on_pause),
                "resume": wire_command("resume", self.on_resume),
                "logs": logs_command(),
            }, curve=socks.control_curve, group=self.cfg.group)
            if self.metrics is not None:
                self.metrics.timer = tr.stages
            if self.dcfg.tensorboard is not None:
                from .tensorboard import TensorBoardLog

                self.tb = TensorBoardLog(self.dcfg.tensorboard, self._describe_generation)
        self._last_wd = last_log = time.monotonic()
        heap = HeapTrimmer()
        loop_errors = LogLimiter(log, burst=1, window_s=60.0)
        tr.state = "running"
        progress = Progress(tr.progress, interval=self.cfg.progress_interval) \
            if self.dist.rank == 0 else None
        if self.notifier:
            self.notifier.ready(f"training, control at {self.server.endpoint}")
        log.info("training started", extra={
            "step": tr.step, "total_steps": tr.total_steps, "ring": self.cfg.ring,
            "mix": tr.mixer.fraction, "mix_source": self.cfg.mix_source,
            "device": str(tr.device), "rank": self.dist.rank,
            "world_size": self.dist.world_size,
            "control": self.server.endpoint if self.server else None,
            "metrics": self.metrics.url if self.metrics else None,
            "tensorboard": str(self.dcfg.tensorboard) if self.tb else None})
        try:
            while True:
                self._serve(0, loop_errors)
                self._keepalive()
                if progress is not None:
                    progress.maybe()
                if self.metrics is not None:
                    self.metrics.refresh(tr.metric_values, time.monotonic())
                heap.maybe(time.monotonic())
                stop, ck, paused = self._sync()
                if stop:
                    log.info("stopping on %s at step %d", self.stop_reason or "request", tr.step)
                    break
                if tr.total_steps is not None and tr.step >= tr.total_steps:
                    break
                if ck:
                    self._save()
                if paused:
                    tr.state = "paused"
                    if self.server is not None:
                        self._serve(50, loop_errors)
                    else:
                        time.sleep(0.05)  # non-zero ranks: the next _sync is the wait
                    continue
                tr.state = "running"
                before = tr.step
                tr.step_once(timeout=0.5 if not self.dist.enabled else 30.0)
                if self.tb is not None:
                    self.tb.generation(tr.step, tr.last_generation)
                if tr.step != before:  # an optimiser step (not data without labels)
                    if self.cfg.eval_interval and tr.step % self.cfg.eval_interval == 0:
                        self._evaluate()
                    if self.cfg.checkpoint_interval and tr.step % self.cfg.checkpoint_interval == 0:
                        self._save()
                if time.monotonic() - last_log >= self.cfg.log_interval:
                    last_log = time.monotonic()
                    m = tr.reset_meter()
                    if m:
                        log.info("train", extra=m)
                        if self.tb is not None:
                            self.tb.interval(tr.step, m, tr.stages.summary(), self.cfg.batch_size)
                        if self.notifier:
                            loss = m.get("loss")
                            self.notifier.status(f"step {tr.step}" + (
                                f" loss {loss:.4f}" if loss is not None else "") + (
                                f"; {m['live_note']}" if m.get("live_note") else ""))
            if not self.stop_requested:
                # Before STOPPING=1: systemd's stop timeout, not the watchdog, governs what
                # comes after it, and a big val split would outlast TimeoutStopSec.
                self._evaluate()
            tr.state = "stopping"
            if progress is not None:
                progress.report()
                progress.close()
                progress = None
            if self.notifier:
                self.notifier.stopping()
            self._save()
            summary = tr.summary()
            log.info("training finished", extra={k: v for k, v in summary.items()
                                                  if not isinstance(v, (list, dict))})
            if self.dcfg.json and self.dist.rank == 0:
                print(json.dumps(summary), flush=True)
            return 0
        finally:
            if progress is not None:
                progress.close()
            if self.metrics is not None:
                self.metrics.close()
            if self.tb is not None:
                self.tb.close()
            if self._producer_client is not None:
                self._producer_client.close()
            tr.close()
            if self.server is not None:
                self.server.close()


def run_daemon(cfg: TrainConfig, dcfg: DaemonConfig) -> int:
    """Set up distribution and logging, build the trainer, run; the exit code."""
    d = Dist.from_env()
    if d.enabled and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        # the ranks of THIS node share its cores (not every rank of the job: other nodes')
        torch.set_num_threads(max(1, torch.get_num_threads() // d.local_world_size))
    socks = metrics = None
    if d.rank == 0:
        try:  # a tcp:// socket without keys, a bad key folder: say so before training starts
            socks = daemon_sockets("trainer", dcfg.control, dcfg.log_endpoint, dcfg.curve_dir)
            if dcfg.metrics is not None:  # a port in use: said before the model is built
                metrics = MetricsExporter("trainer", dcfg.metrics).start()
        except MmfeedError as e:
            print(f"mm-trainer run: {e}", file=sys.stderr)
            if d.enabled and dist.is_initialized():
                dist.destroy_process_group()
            return 1
        setup_daemon_logging("trainer", socks.logs, group=cfg.group, curve=socks.logs_curve)
    else:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                            format=f"%(levelname)s trainer[rank {d.rank}] %(message)s")
    try:
        try:
            trainer = Trainer(cfg, d)
        except ValueError as e:  # --auto-batch over the budget, a checkpoint of other classes
            log.error("%s", e)
            print(f"mm-trainer run: {e}", file=sys.stderr)
            return 1
        return TrainerDaemon(cfg, dcfg, trainer, d, socks, metrics).run()
    finally:
        if metrics is not None:
            metrics.close()  # idempotent; here for a Trainer that failed to build
        if d.enabled and dist.is_initialized():
            dist.destroy_process_group()
        if d.rank == 0:
            close_daemon_logging()
