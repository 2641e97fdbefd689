"""What a `Trainer` reports: the metrics of one log interval (`reset_meter`, with the live
supply: starved or not, and why), `status()` for `mmctl status`, the figures `--metrics`
exports, the progress line's few numbers, the per-rank rows and the run's `summary()`.

A mixin of `Trainer` (loop.py), apart so that the loop module reads as the step it runs; it
reads the trainer's counters and never changes what the trainer does.
"""
from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist

from protocol.stages import trainer_bottleneck

from .config import Meter

log = logging.getLogger("trainer.loop")

STARVED_BELOW = 0.8          # achieved live fraction under this share of the target ...


class TrainReports:
    """Metrics, status and summary of a `Trainer` (see the module docstring)."""

    _meter: Meter = None  # type: ignore[assignment]

    def _new_meter(self) -> Meter:
        live = getattr(self, "live", None)
        mixer = getattr(self, "mixer", None)
        return Meter(live_received=live.stats.samples if live is not None else 0,
                     live_misses=mixer.live_misses if mixer is not None else 0)

    def reset_meter(self) -> dict:
        """Close the current log interval; returns its metrics (also kept for `status`).

        Every value is over the interval's steps: `loss` their mean, `samples` trained on,
        `samples_per_s` over the interval's wall time, `stall_fraction` the time steps waited
        for data over the time they took (in [0, 1]: the wait is inside the step),
        `live_fraction` the live share of the samples trained on (not the mixer's window,
        which spans other intervals and batches drawn but not yet trained on), `generation`
        the last live generation trained on, `unlabelled`/`bad_label` the samples left out of
        the loss, `steps_unlabelled` the steps that had no labelled sample. The live supply:
        `live_in_per_s` (samples/s the ring delivered, all ranks), `live_wanted_per_s` (what
        the target fraction asks at this speed), `live_starved` and `live_note` (a sentence,
        "live starved: producer 1.6 samples/s, trainer wants 5.0 ...", or null).
        """
        m, self._meter = self._meter, self._new_meter()
        if m is None or m.steps + m.steps_unlabelled == 0:
            return self.last_metrics
        elapsed = max(time.monotonic() - m.t0, 1e-9)
        samples_per_s = m.samples / elapsed
        achieved = m.samples_live / m.samples if m.samples else 0.0
        self.last_metrics = {
            "step": self.step, "steps": m.steps, "samples": m.samples,
            "loss": round(m.loss_sum / m.steps, 5) if m.steps else None,
            "samples_per_s": round(samples_per_s, 2),
            "stall_fraction": round(m.wait_s / m.step_s, 4) if m.step_s else 0.0,
            "live_fraction": round(achieved, 4),
            "live_fraction_target": self.mixer.fraction,
            "generation": self.last_generation,
            "copies_per_sample": self.copies_per_sample(),
            "copy_bytes_per_sample": self.copy_bytes_per_sample(),
            "unlabelled": m.samples_unlabelled, "bad_label": m.samples_bad_label,
            "steps_unlabelled": m.steps_unlabelled,
            **self._live_supply(m, elapsed, samples_per_s, achieved),
        }
        return self.last_metrics

    def _live_supply(self, m: Meter, elapsed: float, samples_per_s: float,
                     achieved: float) -> dict:
        """Whether the live side kept up with the target over the interval, and if not, the
        figures that say why (the producer's rate against what the trainer would take).

        Starved = the achieved live fraction fell below STARVED_BELOW of the target AND the
        mixer found no live batch ready when it wanted one: the ring delivers fewer samples
        than the mix asks at this training speed (not a short-lived swing of the window).
        Rates are per node: they count the node's ranks (each reads its share of the node's
        ring, NOTE [live split] in topology.py), so they compare with that node's producer."""
        target = self.mixer.fraction
        if self.live is None or target <= 0:
            self.live_starved = False
            return {"live_in_per_s": None, "live_wanted_per_s": None, "live_starved": False,
                    "live_note": None}
        w = self.dist.local_world_size
        # Rounded once, so the sentence and the fields never disagree (4.95 vs "4.9").
        live_in = round((self.live.stats.samples - m.live_received) / elapsed * w, 2)
        wanted = round(target * samples_per_s * w, 2)
        missed = self.mixer.live_misses > m.live_misses
        starved = missed and achieved < STARVED_BELOW * target
        note = None
        if starved:
            match = live_in / (samples_per_s * w) if samples_per_s > 0 else 0.0
            source = (f"producer {live_in:.1f} samples/s" if self.live.attached
                      else f"no producer on ring {self.cfg.ring} (0 samples/s)")
            note = (f"live starved: {source}, trainer wants {wanted:.1f} (live fraction "
                    f"{achieved:.2f} of target {target:.2f}); the producer must deliver "
                    f"{wanted:.1f} samples/s, or `mmctl mix {match:.2f}` matches what arrives")
        if starved != self.live_starved:
            self.live_starved = starved
            if starved:
                log.warning(note, extra={"live_in_per_s": round(live_in, 2),
                                         "live_wanted_per_s": round(wanted, 2),
                                         "live_fraction": round(achieved, 4),
                                         "live_fraction_target": target})
            else:
                log.info("live supply keeps up with the target again",
                         extra={"live_in_per_s": round(live_in, 2),
                                "live_fraction": round(achieved, 4),
                                "live_fraction_target": target})
        return {"live_in_per_s": round(live_in, 2), "live_wanted_per_s": round(wanted, 2),
                "live_starved": starved, "live_note": note}

    def copies_per_sample(self) -> float | None:
        return round(self.live_copies / self.samples_live, 3) if self.samples_live else None

    def copy_bytes_per_sample(self) -> float | None:
        """Host bytes copied per live sample (slot -> pinned batch row): bytes, not calls."""
        return round(self.live_copy_bytes / self.samples_live, 1) if self.samples_live else None


    def status(self) -> dict:
        live = self.live.stats if self.live is not None else None
        elapsed = max(time.monotonic() - self.started, 1e-9)
        disk_epoch = self.disk_position[0]
        lm = self.last_metrics
        lifetime = self.lifetime_counts()
        st = {
            "state": self.state, "step": self.step, "total_steps": self.total_steps,
            "epoch": disk_epoch, "loss": self.loss, "accuracy": self.accuracy,
            "samples_per_s": self.last_metrics.get(
                "samples_per_s", round((self.samples_live + self.samples_disk) / elapsed, 2)),
            "stall_fraction": self.last_metrics.get("stall_fraction", self.stall_fraction()),
            "stall": self.last_metrics.get("stall_fraction", self.stall_fraction()),
            "live_fraction_target": self.mixer.fraction,
            "live_fraction_source": self.cfg.mix_source,
            "live_fraction": round(self.mixer.achieved, 4),
            "live_fraction_total": round(self.mixer.achieved_total, 4),
            "live_in_per_s": lm.get("live_in_per_s"),
            "live_wanted_per_s": lm.get("live_wanted_per_s"),
            "live_starved": bool(lm.get("live_starved")), "live_note": lm.get("live_note"),
            "samples_live": self.samples_live, "samples_disk": self.samples_disk,
            "samples_unlabelled": self.samples_unlabelled,
            "samples_bad_label": self.samples_bad_label,
            "steps_unlabelled": self.steps_unlabelled,
            "run_steps": self.step - self.resumed_step,
            "resumed_from_step": self.resumed_step if self.resumed_from is not None else None,
            "lifetime_steps": self.step,
            "lifetime_samples_live": lifetime["live"], "lifetime_samples_disk": lifetime["disk"],
            "lifetime_samples_unlabelled": lifetime["unlabelled"],
            "lifetime_samples_bad_label": lifetime["bad_label"],
            "generations_seen": sorted(live.generations) if live else [],
            "generations_trained": sorted(self.generations_trained),
            "generation": self.last_generation,
            "copies_per_sample": self.copies_per_sample(),
            "copy_bytes_per_sample": self.copy_bytes_per_sample(),
            "ring": self.cfg.ring, "ring_attached": bool(self.live and self.live.attached),
            "ring_reattached": live.reattached if live else 0,
            "live_dropped": live.dropped if live else 0,
            "live_lapped": self.live.follow.lapped if self.live is not None else 0,
            "adapted_batches": self.adapter.adapted,
            "records_corrupt": self.disk.stats.corrupt,
            "checkpoint": str(self.checkpoint_path) if self.checkpoint_path else None,
            "rank": self.dist.rank, "world_size": self.dist.world_size,
            "device": str(self.device), "amp": str(self.amp_dtype).replace("torch.", "")
            if self.amp_dtype else "off",
            "batch_size": self.cfg.batch_size, "batch_size_trained": self.batch_size_trained,
            "lr": self.optimizer.param_groups[0]["lr"],
            "auto_batch": self.auto_batch.sentence() if self.auto_batch else None,
            "stages": self.stages.summary(),
        }
        st["bottleneck"] = trainer_bottleneck(st)
        return st

    def metric_values(self) -> dict:
        """What `--metrics` exports (protocol/metrics.py METRICS); None values are left out."""
        lm = self.last_metrics
        return {
            "mmfeed_trainer_steps_total": self.step,
            "mmfeed_trainer_samples_total": {"live": self.samples_live, "disk": self.samples_disk},
            "mmfeed_trainer_samples_unlabelled_total": self.samples_unlabelled,
            "mmfeed_trainer_samples_bad_label_total": self.samples_bad_label,
            "mmfeed_trainer_stall_seconds_total": self.total_wait_s,
            "mmfeed_trainer_step_seconds_total": self.total_step_s,
            "mmfeed_trainer_stall_ratio": lm.get("stall_fraction", self.stall_fraction()),
            "mmfeed_trainer_samples_per_second": lm.get("samples_per_s"),
            "mmfeed_trainer_live_fraction": self.mixer.achieved,
            "mmfeed_trainer_live_fraction_target": self.mixer.fraction,
            "mmfeed_trainer_live_starved": self.live_starved,
            "mmfeed_trainer_live_dropped_total": self.live.stats.dropped if self.live else 0,
            "mmfeed_trainer_live_lapped_total": self.live.follow.lapped if self.live else 0,
            "mmfeed_trainer_generation": self.last_generation,
            "mmfeed_trainer_loss": self.loss,
            "mmfeed_trainer_accuracy": self.accuracy,
            "mmfeed_trainer_batch_size": self.cfg.batch_size,
        }

    def progress(self) -> dict:
        """The few figures a progress line needs (cheaper than `status()`)."""
        return {"step": self.step, "total_steps": self.total_steps,
                "epoch": self.disk_position[0], "samples": self.samples_live + self.samples_disk,
                "samples_per_s": self.last_metrics.get("samples_per_s"), "loss": self.loss,
                "accuracy": self.accuracy}

    def stall_fraction(self) -> float:
        return round(self.total_wait_s / self.total_step_s, 4) if self.total_step_s else 0.0

    def rank_counts(self) -> list[dict]:
        """What each rank trained on, one row per rank (a collective: call on all ranks).

        The other counts in `summary` are this rank's; these rows show that every rank read
        its own node's ring as its own reader (`node`, `ring_epoch`: the epoch of the producer
        it read, `live_skipped`: samples of that ring left to the node's other ranks, NOTE
        [live split] in topology.py) and that DDP kept the ranks in step (`weights_sum`, the
        sum of every parameter, is the same on every rank; `loss` is the rank's own last one).
        """
        live = self.live
        reader = getattr(live, "reader", None) if live is not None else None
        mine = {"rank": self.dist.rank, "node": self.dist.node,
                "local_rank": self.dist.local_rank, "samples_live": self.samples_live,
                "samples_disk": self.samples_disk,
                "live_skipped": live.stats.skipped if live is not None else 0,
                "ring_epoch": getattr(reader, "epoch", None), "generation": self.last_generation,
                "loss": self.loss, "weights_sum": self.weights_sum()}
        if not self.dist.enabled:
            return [mine]
        rows: list = [None] * self.dist.world_size
        dist.all_gather_object(rows, mine)
        return rows

    @torch.no_grad()
    def weights_sum(self) -> float:
        """Sum of every parameter, in float64: equal on all ranks while DDP keeps them in sync."""
        return float(sum(p.detach().double().sum().item() for p in self.model.parameters()))

    def summary(self) -> dict:
        """What the run ends with; a collective under torchrun (`rank_counts`): all ranks call it."""
        elapsed = max(self.total_step_s, 1e-9)
        lifetime = self.lifetime_counts()
        return {
            "steps": self.step, "samples_disk": self.samples_disk,
            "samples_live": self.samples_live,
            "samples_unlabelled": self.samples_unlabelled,
            "samples_bad_label": self.samples_bad_label,
            "steps_unlabelled": self.steps_unlabelled,
            "run_steps": self.step - self.resumed_step,
            "resumed_from_step": self.resumed_step if self.resumed_from is not None else None,
            "lifetime_samples_live": lifetime["live"], "lifetime_samples_disk": lifetime["disk"],
            "lifetime_samples_unlabelled": lifetime["unlabelled"],
            "lifetime_samples_bad_label": lifetime["bad_label"],
            "live_fraction_target": self.mixer.fraction,
            "live_fraction_source": self.cfg.mix_source,
            "generations": sorted(self.generations_trained),
            "accuracy": self.accuracy, "loss": self.loss,
            "samples_per_s": round((self.samples_live + self.samples_disk) / elapsed, 2),
            "stall_fraction": self.stall_fraction(),
            "live_fraction": round(self.mixer.achieved_total, 4),
            "copies_per_sample": self.copies_per_sample(),
            "copy_bytes_per_sample": self.copy_bytes_per_sample(),
            "records_corrupt": self.disk.stats.corrupt,
            "checkpoint": str(self.checkpoint_path) if self.checkpoint_path else None,
            "world_size": self.dist.world_size, "ranks": self.rank_counts(),
            "batch_size": self.cfg.batch_size,
        }
