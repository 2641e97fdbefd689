"""`make demo`: the whole system, end to end, on a synthetic dataset of real encoded files.

What it does, in order, and only through the public interfaces a user has (the console
scripts and `mmctl`), so that it doubles as an end-to-end check:

1. makes a small synthetic dataset (H.264 video whose class is visible, audio whose class is
   audible, LiDAR and radar whose class is in the geometry, one unknown sensor), plus the real
   recordings ($MMFEED_REAL_DATA, producer/synth.py) when they are there (as an extra,
   unlabelled-by-design sample folder the producer replays);
2. `mm-producer preprocess` it to a disk cache, with the progress bar;
3. starts `mm-producer run` (ring, replaying the dataset in a loop) and `mm-trainer run`
   (ring + cache) as real background daemons, each with its own log file;
4. while the trainer trains: `mmctl filter gray`, `mmctl wait GEN` (until the trainer has
   trained a step on the grayscale generation), `mmctl mix 0.75`;
5. draws the newest live sample (`mmctl preview`), stops both with SIGTERM (the trainer
   writes a checkpoint), checks that no process and no shared-memory segment is left behind,
   and prints a summary that says where the preview and the TensorBoard logs are.

It is never silent for long: while it waits for the daemons it prints a line at least every
SAY_EVERY_S seconds (the trainer's step, rate, loss and ETA once it trains).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from producer.synth import REAL_DIR

REPO = Path(__file__).resolve().parent.parent
REAL_DATA = REAL_DIR  # $MMFEED_REAL_DATA (producer/synth.py)
BIN = Path(sys.executable).parent
SAY_EVERY_S = 5.0


@dataclass(frozen=True)
class DemoSettings:
    workdir: Path
    quick: bool = False
    train_seconds: float = 60.0
    ring: str = ""

    @property
    def steps(self) -> int:
        """Steps trained before the demo stops the trainer with SIGTERM."""
        return 60 if self.quick else 300

    @property
    def eval_interval(self) -> int:
        return 20 if self.quick else 50


def _say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def _die_with_the_demo() -> None:
    """preexec_fn of each daemon: the kernel sends it SIGTERM when the demo dies, however it
    dies (PR_SET_PDEATHSIG). WHY: the daemons lead their own sessions (so a Ctrl-C reaches them
    once, from the demo's `finally`), which also means a demo killed with SIGKILL (an OOM kill,
    a test's timeout) left both daemons running for good, training on a deleted folder."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _script(name: str) -> str:
    p = BIN / name
    return str(p) if p.exists() else name


def _mmctl(env: dict, *args: str, timeout: float = 30.0) -> dict:
    """Run `mmctl --json ARGS` and return its last JSON line (raises on a non-zero exit)."""
    r = subprocess.run([_script("mmctl"), "--json", *args], env=env, capture_output=True,
                       text=True, timeout=timeout)
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else "{}"
    try:
        obj = json.loads(last)
    except ValueError:
        obj = {"raw": r.stdout}
    if r.returncode != 0:
        raise RuntimeError(f"mmctl {' '.join(args)} exited {r.returncode}: {r.stderr.strip() or obj}")
    return obj


def _wait_for(cond, what: str, timeout: float, proc: subprocess.Popen | None = None,
              log: Path | None = None, say=None):
    """Poll `cond` until it is true; every SAY_EVERY_S seconds print `say()` (or that it is
    still waiting), so the demo is never silent for long."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    next_say = t0 + SAY_EVERY_S
    while time.monotonic() < deadline:
        if time.monotonic() >= next_say:
            next_say = time.monotonic() + SAY_EVERY_S
            try:
                line = say() if say is not None else None
            except Exception:  # the daemon is busy: say that we wait instead
                line = None
            _say(line or f"waiting for {what} ({time.monotonic() - t0:.0f} s)")
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"{what}: the daemon exited with {proc.returncode}\n{tail}")
        try:
            v = cond()
            if v:
                return v
        except Exception:  # not up yet: keep polling until the deadline
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{what}: not reached within {timeout:.0f} s")


@contextmanager
def _busy(what: str):
    """Say `what` is still going every SAY_EVERY_S seconds while the block runs."""
    done = threading.Event()
    t0 = time.monotonic()

    def tick() -> None:
        while not done.wait(SAY_EVERY_S):
            _say(f"{what} ({time.monotonic() - t0:.0f} s)")

    t = threading.Thread(target=tick, daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join()


class TrainerProgress:
    """The trainer's progress, from `mmctl status`, as one line with a rate and an ETA to the
    demo's target step."""

    def __init__(self, env: dict, target: int):
        self.env, self.target = env, target
        self.first: tuple[float, int] | None = None

    def __call__(self) -> str | None:
        st = _mmctl(self.env, "status").get("trainer") or {}
        step = st.get("step")
        if step is None:
            return None
        now = time.monotonic()
        if self.first is None:
            self.first = (now, step)
        t0, s0 = self.first
        eta = ""
        if step > s0 and now > t0:
            left = max(0, self.target - step) / ((step - s0) / (now - t0))
            eta = f", ETA {left:.0f} s"
        parts = [f"trainer: step {step}/{self.target}"]
        if st.get("samples_per_s") is not None:
            parts.append(f"{st['samples_per_s']:.1f} samples/s")
        if st.get("loss") is not None:
            parts.append(f"loss {st['loss']:.4f}")
        if st.get("accuracy") is not None:
            parts.append(f"val acc {st['accuracy']:.3f}")
        return ", ".join(parts) + eta


def make_dataset(s: DemoSettings) -> Path:
    """The synthetic train/val samples, plus the real recordings (when REAL_DATA is there)
    as `test/real/*`: preprocessed and cached with the rest, so the demo shows real LiDAR,
    radar, audio and video going through the same pipeline. They sit in the test split because
    they carry no class of their own; the producer replays train and val only."""
    from producer.synth import link_real_recordings
    from producer.synth import make_dataset as synth

    root = s.workdir / "dataset"
    per_class = {"train": 6, "val": 3} if s.quick else {"train": 16, "val": 6}
    # The dataset is deterministic for its settings: a second run reuses it (and so the
    # preprocess cache, which only redoes samples whose files changed).
    stamp = root / ".mmfeed-demo-dataset"
    want = json.dumps({"per_class": per_class, "seed": 0, "real": REAL_DATA.is_dir()})
    if stamp.exists() and stamp.read_text() == want:
        _say(f"reusing the synthetic dataset in {root}")
        return root
    if root.exists():
        shutil.rmtree(root)
    with _busy("making the synthetic dataset"):
        synth(root, per_class=per_class, seed=0)
    real = link_real_recordings(root, REAL_DATA, split="test", class_name="real")
    stamp.write_text(want)
    _say(f"synthetic dataset: {sum(1 for _ in root.glob('[tv][ra]*/*/*'))} samples in {root}")
    if real:
        _say(f"real recordings from {REAL_DATA}: {len(real)} samples in {root / 'test' / 'real'}")
    else:
        _say(f"no real recordings at {REAL_DATA}; synthetic data only")
    return root


def _group_alive(pgid: int) -> bool:
    """True while any process of the daemon's process group (workers included) exists."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run(s: DemoSettings) -> dict:
    s.workdir.mkdir(parents=True, exist_ok=True)
    runtime = s.workdir / "run"
    runtime.mkdir(mode=0o700, exist_ok=True)  # the daemons refuse a socket dir others may write
    logs = s.workdir / "logs"
    logs.mkdir(exist_ok=True)
    ckpt = s.workdir / "checkpoints"
    if ckpt.exists():
        shutil.rmtree(ckpt)
    tensorboard = s.workdir / "tensorboard"
    if tensorboard.exists():
        shutil.rmtree(tensorboard)
    preview = s.workdir / "preview.png"
    env = dict(os.environ, MMFEED_RUNTIME_DIR=str(runtime), PYTHONUNBUFFERED="1")
    ring = s.ring or f"mmfeed-demo-{os.getpid()}"
    t0 = time.monotonic()

    dataset = make_dataset(s)
    cache = s.workdir / "cache"
    _say("preprocessing to the disk cache")
    r = subprocess.run([_script("mm-producer"), "preprocess", str(dataset), "--cache", str(cache),
                        "--workers", "2", "--json"], env=env, stdout=subprocess.PIPE, text=True)
    if r.returncode not in (0, 3):
        raise RuntimeError(f"mm-producer preprocess exited {r.returncode}")
    pre = json.loads(r.stdout.strip().splitlines()[-1])

    procs: dict[str, subprocess.Popen] = {}
    summary: dict = {"preprocess": pre}
    try:
        _say(f"starting mm-producer run (ring {ring}); log: {logs / 'producer.log'}")
        procs["producer"] = subprocess.Popen(
            [_script("mm-producer"), "run", "--source", str(dataset), "--ring", ring, "--mode", "lossy",
             "--split", "train", "--split", "val", "--loop", "--rate", "max", "--json"],
            env=env, stdout=open(logs / "producer.out", "w"), stderr=open(logs / "producer.log", "w"),
            start_new_session=True, preexec_fn=_die_with_the_demo)
        _wait_for(lambda: _mmctl(env, "status").get("producer"), "producer up", 60,
                  procs["producer"], logs / "producer.log")
        _say(f"starting mm-trainer run; log: {logs / 'trainer.log'}")
        procs["trainer"] = subprocess.Popen(
            [_script("mm-trainer"), "run", "--cache", str(cache), "--ring", ring, "--mix", "0.5",
             "--checkpoint-dir", str(ckpt), "--steps", "1000000", "--batch-size", "8",
             "--eval-interval", str(s.eval_interval), "--log-interval", "5",
             "--progress-interval", "5", "--tensorboard", str(tensorboard), "--json"],
            env=env, stdout=open(logs / "trainer.out", "w"), stderr=open(logs / "trainer.log", "w"),
            start_new_session=True, preexec_fn=_die_with_the_demo)
        progress = TrainerProgress(env, s.steps)
        _wait_for(lambda: (_mmctl(env, "status").get("trainer") or {}).get("step", 0) >= 5,
                  "trainer training", 180, procs["trainer"], logs / "trainer.log", say=progress)

        _say("switching the video filter to grayscale while training: mmctl filter gray")
        gen = _mmctl(env, "filter", "gray")["generation"]
        _say(f"new generation {gen}; waiting until the trainer has trained on it: mmctl wait {gen}")
        _wait_for(lambda: _mmctl(env, "wait", str(gen), "--timeout", "1", timeout=30),
                  f"the trainer to train on generation {gen}", 120, procs["trainer"],
                  logs / "trainer.log", say=progress)
        _say("changing the live mix to 0.75: mmctl mix 0.75")
        _mmctl(env, "mix", "0.75")
        summary["filter_generation"] = gen
        summary["mix"] = 0.75
        _say(f"training on until step {s.steps} (evaluating on val every {s.eval_interval} steps)")
        _wait_for(lambda: (_mmctl(env, "status").get("trainer") or {}).get("step", 0) >= s.steps,
                  f"trainer at step {s.steps}", 600, procs["trainer"], logs / "trainer.log",
                  say=progress)
        summary["status"] = _mmctl(env, "status")
        _say(f"drawing the newest live sample as the model gets it: mmctl preview --out {preview}")
        shown = _mmctl(env, "preview", "--out", str(preview))
        summary["preview"] = {"path": shown.get("path"), "caption": shown.get("caption")}
    finally:
        _say("stopping both daemons with SIGTERM (the trainer writes a checkpoint)")
        for name in ("trainer", "producer"):
            p = procs.get(name)
            if p and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for name, p in procs.items():
            deadline = time.monotonic() + 120
            while p.poll() is None and time.monotonic() < deadline:
                try:
                    p.wait(timeout=SAY_EVERY_S)
                except subprocess.TimeoutExpired:
                    _say(f"waiting for the {name} to stop" + (
                        " (it evaluates on val and writes its checkpoint)"
                        if name == "trainer" else ""))
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            summary.setdefault("exit_codes", {})[name] = p.returncode

    tr = _last_json(logs / "trainer.out")
    leftovers = [p.name for p in Path("/dev/shm").glob(f"*{ring}*")]
    # Each daemon leads its own process group (start_new_session): a group that still has a
    # member after the leader exited is a worker or helper left running.
    lingering = [name for name, p in procs.items() if _group_alive(p.pid)]
    summary.update(
        trainer=tr,
        seconds=round(time.monotonic() - t0, 1),
        leftover_shm=leftovers,
        leftover_processes=lingering,
        real_recordings=sorted(p.name for p in (dataset / "test" / "real").glob("*")),
        checkpoints=str(ckpt),
        logs=str(logs),
        tensorboard=str(tensorboard),
    )
    return summary


def _last_json(path: Path) -> dict:
    try:
        lines = [l for l in path.read_text().splitlines() if l.startswith("{")]
        return json.loads(lines[-1]) if lines else {}
    except (OSError, ValueError):
        return {}


def _producer_copies(summary: dict) -> str | None:
    """The producer's side of "copies" (slot_fill.py): bytes it copied into ring slots beyond
    its pipeline's own output, per sample, and how many samples were made in place."""
    c = ((summary.get("status") or {}).get("producer") or {}).get("copies")
    if not c:
        return None
    return (f"{c['copy_bytes_mean']:.0f} bytes a sample on average ({c['in_place_samples']} made "
            f"in place, {c['copied_samples']} with bytes copied: a generation's first, a "
            f"reader lagging one ring behind for a moment ({c.get('copied_reader_behind', 0)}),"
            f" or inputs whose schema changed ({_inputs(c.get('copied_inputs') or {})}))")


def _inputs(counts: dict) -> str:
    return ", ".join(f"{name} {n}" for name, n in sorted(counts.items())) or "none"


def print_summary(summary: dict) -> None:
    tr = summary.get("trainer", {})
    pre = summary.get("preprocess", {})
    st = summary.get("status", {}).get("trainer", {}) or {}
    rows = [
        ("samples cached", pre.get("cached")),
        ("samples rejected", len(pre.get("rejected", []))),
        ("steps trained", tr.get("steps", st.get("step"))),
        ("samples from disk", tr.get("samples_disk")),
        ("samples live", tr.get("samples_live")),
        ("generations trained on", tr.get("generations")),
        ("grayscale generation", summary.get("filter_generation")),
        ("val accuracy", tr.get("accuracy")),
        ("samples/s", tr.get("samples_per_s")),
        ("data-stall fraction", tr.get("stall_fraction")),
        ("copies per live sample", tr.get("copies_per_sample")),
        ("producer bytes copied", _producer_copies(summary)),
        ("checkpoint", tr.get("checkpoint") or summary.get("checkpoints")),
        ("logs", summary.get("logs")),
        ("preview of a live sample", (summary.get("preview") or {}).get("path") or "none"),
        ("TensorBoard logs", f"{summary.get('tensorboard')} "
                             f"(tensorboard --logdir {summary.get('tensorboard')})"),
        ("exit codes", summary.get("exit_codes")),
        ("real recordings cached", ", ".join(f"test/real/{n}" for n in summary.get("real_recordings", []))
         or f"none (no {REAL_DATA}; set $MMFEED_REAL_DATA)"),
        ("live mix set to", summary.get("mix")),
        ("shared memory left behind", summary.get("leftover_shm") or "none"),
        ("processes left behind", summary.get("leftover_processes") or "none"),
        ("demo took", f"{summary.get('seconds')} s"),
    ]
    print("\nmmfeed demo summary")
    for k, v in rows:
        print(f"  {k:<26} {'-' if v is None else v}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cli.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=REPO / "demo-run")
    ap.add_argument("--quick", action="store_true", help="a shorter run (used by the test suite)")
    ap.add_argument("--json", action="store_true", help="print the summary as one JSON line last")
    a = ap.parse_args(argv)
    summary = run(DemoSettings(workdir=a.workdir.resolve(), quick=a.quick))
    print_summary(summary)
    if a.json:
        print(json.dumps(summary, default=str))
    ok = (all(c == 0 for c in summary.get("exit_codes", {}).values()) and not summary["leftover_shm"]
          and not summary["leftover_processes"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
