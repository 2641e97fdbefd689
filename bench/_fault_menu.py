"""What bench.faults sends: mmctl command lines, valid and invalid, and raw control messages
that no client of ours would write.

Every entry is data (argv for mmctl, bytes for the raw socket), drawn by a seeded
`random.Random`, so a run is repeatable from its seed (up to the timing of the processes). A
valid command that changes something lasting (pause, record start, disabling an input) names
the command that undoes it and bench.faults sends that a few seconds later, as an operator
would: the run keeps training instead of drifting into "everything paused".

Targets: "producer" (the dataset replay's producer), "stream" (the producer of the ffmpeg
stream), "producers" (both at once: mmctl's several-producer fan-out), "trainer", "local"
(mmctl's commands that talk to no daemon: keygen, install-units --dry-run, completion).

`METRICS_REQUESTS` are what the bench sends to each daemon's Prometheus endpoint
(`--metrics`): scrapes, and HTTP no scraper sends.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from protocol.control import CONTROL_VERSION, MAX_MESSAGE_BYTES, TRANSPORT_MAX_BYTES

CLASSES = ("circle", "square", "stripes")   # producer.synth's default classes
RADAR_METHODS = ("range_doppler", "range_azimuth", "points_bev")


@dataclass(frozen=True)
class CliCommand:
    """One mmctl invocation: `mmctl --json ... ARGS` against `target`."""

    target: str
    args: tuple[str, ...]
    valid: bool                                  # meant to be accepted (the daemon may still refuse)
    undo: tuple[str, ...] | None = None          # args that undo it, sent a few seconds later
    may_block: bool = False                      # `logs -f`: waits for a record; a timeout is fine

    def text(self) -> str:
        return f"mmctl {' '.join(self.args)} -> {self.target}"


def _producer_valid(preview_png: str, record_cache: str) -> list[CliCommand]:
    """Commands the source may accept (a dataset replay has every input; the stream has video
    and audio only, so some of these are refusals there, which is the point too)."""
    out: list[CliCommand] = []
    for spec in ("gray", "rgb", "none", "resize=48x36", "resize=32x32,gray", "fps=10",
                 "crop=32x32+4+4"):
        out.append(CliCommand("producer", ("filter", spec), True))
    out += [CliCommand("producer", ("sensor", "lidar", stem), True)
            for stem in ("lidar_front", "lidar")]
    out += [CliCommand("producer", ("method", "radar", m), True) for m in RADAR_METHODS]
    out += [CliCommand("producer", ("segment", "0", "0.5"), True),
            CliCommand("producer", ("segment", "0.2", "0.9"), True),
            CliCommand("producer", ("segment", "clear"), True)]
    out += [CliCommand("producer", ("label", c), True) for c in CLASSES]
    out += [CliCommand("producer", ("modalities",), True),
            CliCommand("producer", ("modalities", "-d", "imu"), True, undo=("modalities", "-e", "imu")),
            CliCommand("producer", ("modalities", "-d", "lidar"), True,
                       undo=("modalities", "-e", "lidar")),
            CliCommand("producer", ("pause",), True, undo=("resume",)),
            CliCommand("producer", ("resume",), True),
            CliCommand("producer", ("record", "start"), True, undo=("record", "stop")),
            CliCommand("producer", ("record", "start", "--cache", record_cache, "--split", "val"),
                       True, undo=("record", "stop")),
            CliCommand("producer", ("record", "status"), True),
            CliCommand("producer", ("preview", "--out", preview_png), True),
            CliCommand("producer", ("logs", "producer", "-n", "20"), True),
            CliCommand("producer", ("logs", "-f", "producer", "--count", "1"), True, may_block=True),
            CliCommand("producer", ("status",), True),
            CliCommand("producer", ("status", "producer"), True),
            CliCommand("producer", ("top", "--once"), True)]
    return out


def _producer_invalid(blocked: str) -> list[CliCommand]:
    """Out of range, malformed or impossible; `blocked` is a path under a regular file (no
    folder can be made there, even by root), so nothing is written outside the run's folder."""
    bad = [("filter", s) for s in ("crop=2000x2000", "bogus", "fps=0", "fps=1e-300",
                                   "resize=0x0", "resize=99999x99999", "gray," * 100,
                                   "x" * 5000, "resize=48x36;rm -rf /", "fps=nan")]
    bad += [("sensor", "lidar", "nosuch"), ("sensor", "video", "lidar"), ("sensor", "nosuch", "x"),
            ("sensor", "radar", "lidar_front"), ("method", "radar", "bogus"),
            ("method", "video", "range_doppler"), ("method", "lidar", "points_bev"),
            ("segment", "5", "2"), ("segment", "-1", "3"), ("segment", "0", "1e10"),
            ("segment", "abc", "def"), ("segment", "0", "inf"), ("segment", "1e308", "1e309"),
            ("segment", "clear", "5"), ("segment", "3"), ("segment", "100", "200"),
            ("label", "3000000000"), ("label", "nosuchclass"), ("label", "-1"), ("label", ""),
            ("label", "99"), ("modalities", "-e", "nothing"),
            ("modalities", "-d", "video", "-d", "audio", "-d", "lidar", "-d", "radar", "-d", "imu"),
            ("modalities", "-e", "video", "-d", "video"), ("record", "stop"),
            ("record", "start", "--split", "../../x"), ("record", "start", "--cache", blocked),
            ("record", "bogus"), ("preview", "--out", f"{blocked}/x.png"),
            ("logs", "-n", "0"), ("logs", "-n", "100000000"), ("logs", "nosuchdaemon"),
            ("frobnicate",), ("status", "--bogus"), ("top", "--once", "--interval", "0.01"),
            ("resume", "nosuch")]
    return [CliCommand("producer", a, False) for a in bad]


def _trainer_valid() -> list[CliCommand]:
    out = [CliCommand("trainer", ("mix", f), True) for f in ("0", "0.25", "0.5", "0.9", "1")]
    out += [CliCommand("trainer", ("batch", n), True) for n in ("4", "8", "12")]
    out += [CliCommand("trainer", ("batch", "6", "--lr-rule", "linear"), True),
            CliCommand("trainer", ("batch", "10", "--lr-rule", "sqrt"), True),
            CliCommand("trainer", ("checkpoint",), True),
            CliCommand("trainer", ("pause", "trainer"), True, undo=("resume", "trainer")),
            CliCommand("trainer", ("resume", "trainer"), True),
            CliCommand("trainer", ("logs", "trainer", "-n", "10"), True),
            CliCommand("trainer", ("status", "trainer"), True),
            CliCommand("trainer", ("wait", "0", "--timeout", "3"), True)]
    return out


def _local(work: Path, blocked: str) -> list[CliCommand]:
    """mmctl's own helpers: everything they write stays in the run's folder (install-units only
    with --dry-run: it would otherwise add a system user and enable units)."""
    valid = [("keygen", str(work / "keys")), ("completion", "bash"), ("completion", "zsh"),
             ("completion", "fish"),
             ("install-units", "--dry-run", "--unit-dir", str(work / "units"), "--env-file",
              str(work / "units" / "mmfeed.env"), "--no-user", "--no-enable")]
    invalid = [("keygen", blocked), ("completion", "tcsh"), ("install-units", "--bogus"),
               ("keygen",)]
    return ([CliCommand("local", a, True) for a in valid]
            + [CliCommand("local", a, False) for a in invalid])


def _trainer_invalid() -> list[CliCommand]:
    bad = [("mix", "2"), ("mix", "-0.5"), ("mix", "nan"), ("batch", "0"), ("batch", "100000"),
           ("batch", "-3"), ("batch", "2.5"), ("batch", "4", "--lr-rule", "cube"),
           ("wait", "999999999", "--timeout", "1"), ("wait", "-1"), ("pause", "nosuch"),
           ("logs", "trainer", "-n", "-5"), ("checkpoint", "now"),
           ("wait", "1", "--timeout", "nan")]
    return [CliCommand("trainer", a, False) for a in bad]


class Menu:
    """Draws the next mmctl command or raw message; `rng` makes the run repeatable."""

    def __init__(self, rng: random.Random, work: Path):
        self.rng = rng
        blocker = work / "not-a-folder"
        blocker.write_text("a file where a folder is expected\n")
        self.producer_valid = _producer_valid(str(work / "preview.png"),
                                              str(work / "recorded-by-mmctl"))
        self.producer_invalid = _producer_invalid(str(blocker / "x"))
        self.trainer_valid = _trainer_valid()
        self.trainer_invalid = _trainer_invalid()
        self.local = _local(work, str(blocker / "x"))

    def commands(self) -> list[CliCommand]:
        """Every command line the menu may draw (the coverage test reads it)."""
        return (self.producer_valid + self.producer_invalid + self.trainer_valid
                + self.trainer_invalid + self.local)

    def cli(self, trainer_generation: int | None) -> CliCommand:
        r = self.rng
        if r.random() < 0.05:
            return r.choice(self.local)
        if r.random() < 0.6:  # the producers get most of the steering
            cmd = r.choice(self.producer_valid if r.random() < 0.6 else self.producer_invalid)
            target = r.choices(("producer", "stream", "producers"), weights=(5, 4, 1))[0]
            if cmd.may_block and target == "producers":
                target = "producer"  # `logs -f` follows one node's producer
            return CliCommand(target, cmd.args, cmd.valid, cmd.undo, cmd.may_block)
        if r.random() < 0.1:  # wait: for what the trainer has (or nearly has) trained on
            gen = max(0, (trainer_generation or 0) + r.choice((0, 0, 1)))
            return CliCommand("trainer", ("wait", str(gen), "--timeout", "3"), True)
        return r.choice(self.trainer_valid if r.random() < 0.6 else self.trainer_invalid)

    def metrics(self) -> tuple[str, bytes, bool]:
        """(what it is, the bytes sent on a fresh TCP connection, whether it is a scrape that
        must be answered 200 with the daemon's metric families)."""
        kind = self.rng.choice(tuple(METRICS_REQUESTS))
        data, scrape = METRICS_REQUESTS[kind]
        return kind, data, scrape

    def raw(self) -> tuple[str, list[bytes], bool, bool]:
        """(what it is, the frames to send, whether a reply is due, whether that reply must
        be a refusal). A message past TRANSPORT_MAX_BYTES is dropped by ZeroMQ with its
        connection (no reply, by design); every other one gets a reply."""
        kind = self.rng.choice(RAW_KINDS)
        frames, reply_due = _RAW[kind](self.rng)
        return kind, frames, reply_due, kind not in ANSWERED_OK_ALLOWED


def _msg(cmd, args=None, **extra) -> bytes:
    body = {"v": CONTROL_VERSION, "cmd": cmd, **extra}
    if args is not None:
        body["args"] = args
    return json.dumps(body).encode()


def _nested(depth: int) -> bytes:
    return (b'{"v": 1, "cmd": "status", "args": {"a": ' + b"[" * depth + b"1"
            + b"]" * depth + b"}}")


_RAW = {
    "not json": lambda r: ([b"hello, daemon"], True),
    "not utf-8": lambda r: ([bytes(r.randrange(128, 256) for _ in range(64))], True),
    "empty": lambda r: ([b""], True),
    "json array": lambda r: ([b"[1, 2, 3]"], True),
    "json null": lambda r: ([b"null"], True),
    "open brackets": lambda r: ([b"[" * r.choice((2048, 50_000))], True),
    "open braces": lambda r: ([b"{" * 3000], True),
    "deep nesting": lambda r: ([_nested(r.choice((100, 5000, 20_000)))], True),
    "huge int": lambda r: ([b'{"v": 1, "cmd": "batch", "args": {"size": '
                            + b"9" * r.choice((40, 4301, 60_000)) + b"}}"], True),
    "huge float": lambda r: ([b'{"v": 1, "cmd": "mix", "args": {"fraction": 1e999}}'], True),
    "nan": lambda r: ([b'{"v": 1, "cmd": "mix", "args": {"fraction": NaN}}'], True),
    "int label overflow": lambda r: ([_msg("label", {"name": "3000000000"})], True),
    "wrong version": lambda r: ([_msg("status", v=2)], True),
    "version string": lambda r: ([json.dumps({"v": "1", "cmd": "status"}).encode()], True),
    "cmd not a string": lambda r: ([json.dumps({"v": 1, "cmd": 5}).encode()], True),
    "args a list": lambda r: ([json.dumps({"v": 1, "cmd": "status", "args": [1]}).encode()], True),
    "wrong arg type": lambda r: ([_msg(r.choice(("filter", "mix", "batch", "segment")),
                                       {"spec": 5, "fraction": "half", "size": True,
                                        "start": [], "end": {}})], True),
    "bool for int": lambda r: ([_msg("batch", {"size": True})], True),
    "unknown command": lambda r: ([_msg(r.choice(("rm -rf", "shutdown", "__init__", "STATUS",
                                                  "status\u0000", "x" * 10_000)))], True),
    "unknown field": lambda r: ([_msg("status", exec="x")], True),
    "id not a string": lambda r: ([_msg("status", id=12345)], True),
    "id too long": lambda r: ([_msg("status", id="i" * 5000)], True),
    "lone surrogate": lambda r: ([b'{"v": 1, "cmd": "filter", "args": {"spec": "\\ud800x"}}'],
                                 True),
    "surrogate command": lambda r: ([b'{"v": 1, "cmd": "\\udfff"}'], True),
    "nul in string": lambda r: ([b'{"v": 1, "cmd": "filter", "args": {"spec": "gray\\u0000"}}'],
                                True),
    "oversized": lambda r: ([_msg("filter", {"spec": "g" * (MAX_MESSAGE_BYTES + 10)})], True),
    "past the transport limit": lambda r: ([b"x" * (TRANSPORT_MAX_BYTES + 1024)], False),
    "two frames": lambda r: ([_msg("status"), _msg("status")], True),
    "logs huge n": lambda r: ([_msg("logs", {"n": 10 ** 18})], True),
    "logs negative n": lambda r: ([_msg("logs", {"n": -1})], True),
    "generation negative": lambda r: ([_msg("generation", {"number": -1})], True),
    "segment huge": lambda r: ([_msg("segment", {"start": 0, "end": 1e308})], True),
    "record split escape": lambda r: ([_msg("record", {"action": "start",
                                                       "split": "../../etc"})], True),
}
RAW_KINDS = tuple(_RAW)

_GET = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
METRICS_REQUESTS: dict[str, tuple[bytes, bool]] = {
    "scrape": (_GET + b"\r\n", True),
    "scrape http/1.0": (b"GET /metrics HTTP/1.0\r\n\r\n", True),
    "scrape gzip": (_GET + b"Accept-Encoding: gzip\r\n\r\n", True),
    "unknown path": (b"GET /../../etc/passwd HTTP/1.1\r\nConnection: close\r\n\r\n", False),
    "post": (b"POST /metrics HTTP/1.1\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
             False),
    "not http": (b"\x00\xff garbage \r\n\r\n", False),
    "huge header": (_GET + b"X-Junk: " + b"j" * 70_000 + b"\r\n\r\n", False),
    "half a request": (b"GET /met", False),
}
# Requests well-formed enough that a daemon may answer them with ok: true (a huge `logs` n is
# valid: the reply is bounded; a segment ending at 1e308 seconds may be clamped to the
# source). Every other kind is malformed or out of range and must never be accepted.
ANSWERED_OK_ALLOWED = {"logs huge n", "segment huge"}
