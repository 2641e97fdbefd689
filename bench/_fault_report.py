"""bench.faults' report: the run's figures as one dict (`Reporting._results`, a mixin of
`FaultBench` that also judges the leaks left after the final stop), the human summary table,
and the failures and figure printed at the end (`print_report`)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from bench._common import report
from bench._fault_plan import DAEMONS
from bench._fault_rig import Failure, growth_per_hour, shm_entries


class Reporting:
    """`FaultBench`'s last act: what the run leaked, and every figure it counted."""

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


def print_report(failures: list[Failure], work: Path, out: dict, as_json: bool) -> None:
    """Every failure with what came before it and its evidence, the summary table, and the
    figure against its limit (the fault-free baseline of the same run)."""
    for f in failures:
        print(f"FAILURE {f.line()}")
        for line in f.before:
            print(f"    before: {line}")
        if f.evidence:
            print("    " + f.evidence[-1500:].replace("\n", "\n    "))
    print(summary_table(out))
    if failures:
        print(f"faults: logs kept in {work}")
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
