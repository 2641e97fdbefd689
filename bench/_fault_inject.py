"""bench.faults' injectors: every kind of command and fault the soak sends, and the checks
on what comes back. A mixin of `FaultBench` (bench/faults.py), which owns the processes, the
counts, the random streams and `fail()`:

  * `mmctl(cmd)`: one mmctl command line (valid or invalid, bench/_fault_menu.py) as a process;
    its exit code, its --json line and its reply are checked;
  * `raw()`: a ZeroMQ message no client of ours writes; it must be refused, never accepted;
  * `metrics()`: an HTTP request to a daemon's Prometheus endpoint;
  * `repeated_id()`: one valid change sent twice under one request id (a retry): run once;
  * `fault(kind)`: SIGKILL or SIGTERM of one process, restarted after a random delay.
"""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
import uuid

import zmq

from bench._fault_menu import CliCommand
from bench._fault_plan import BIN, CHANGES, DAEMONS, MMCTL_TIMEOUT_S, MMCTL_WALL_S, RAW_REPLY_S
from bench._fault_rig import STDERR_TAIL
from protocol.control import CONTROL_VERSION


class Injectors:
    """The commands and faults `FaultBench` sends (see the module docstring)."""

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
