"""What every mmctl subcommand is handed: `Ctl` (where the daemons are, how long to wait, how
to print: one JSON object with --json, words otherwise) and the exit codes it fails with."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import click

from protocol.control import ControlClient, CurveClientKeys, Timeouts
from protocol.errors import ControlError, ControlTimeout, RemoteError

EXIT_OK, EXIT_REMOTE, EXIT_USAGE, EXIT_NO_DAEMON = 0, 1, 2, 3
DAEMONS = ("producer", "trainer")


@dataclass
class Ctl:
    """What every subcommand needs: where the daemons are, how long to wait, how to print."""

    as_json: bool
    endpoints: dict[str, str]
    timeouts: Timeouts
    keys: Path | None
    tried: dict[str, list[str]] = field(default_factory=dict)  # daemon -> endpoints considered
    producers: list[str] = field(default_factory=list)  # every node's producer (several nodes)
    _clients: dict[str, ControlClient] = field(default_factory=dict)

    def curve(self, endpoint: str) -> CurveClientKeys | None:
        return CurveClientKeys.from_dir(self.keys) if self.keys and endpoint.startswith("tcp://") \
            else None

    def tried_note(self, daemon: str) -> str:
        """'; sockets tried: A, B': where mmctl looked, for a message saying nothing answered."""
        return f"; sockets tried: {', '.join(self.tried.get(daemon) or [self.endpoints[daemon]])}"

    def client(self, daemon: str, endpoint: str | None = None) -> ControlClient:
        endpoint = endpoint or self.endpoints[daemon]
        key = f"{daemon} {endpoint}"
        if key not in self._clients:
            try:
                self._clients[key] = ControlClient(endpoint, self.timeouts, self.curve(endpoint),
                                                   daemon=daemon)
            except ControlError as e:
                self.fail(EXIT_USAGE, str(e), e.code, daemon)
        return self._clients[key]

    def call(self, daemon: str, cmd: str, **args: Any) -> dict:
        """One request; every failure becomes its documented exit code. A producer command
        with several producers goes to every one of them (cli/fanout.py)."""
        if daemon == "producer" and len(self.producers) > 1:
            from .fanout import call_every_producer

            return call_every_producer(self, cmd, **args)
        try:
            return self.client(daemon).request(cmd, **args)
        except ControlTimeout as e:
            self.fail(EXIT_NO_DAEMON, f"{daemon}: {e}{self.tried_note(daemon)}", e.code, daemon)
        except RemoteError as e:
            self.fail(EXIT_REMOTE, f"{daemon} refused {cmd}: {e}", e.code, daemon)
        except ControlError as e:  # a reply that is not ours, a request too large, ...
            self.fail(EXIT_REMOTE if e.code == "malformed" else EXIT_USAGE, f"{daemon}: {e}", e.code, daemon)

    def emit(self, obj: dict, text: str) -> None:
        click.echo(json.dumps(obj, default=str) if self.as_json else text)

    def fail(self, exit_code: int, message: str, code: str, daemon: str | None = None) -> NoReturn:
        if self.as_json:
            click.echo(json.dumps({"ok": False, "daemon": daemon,
                                   "error": {"code": code, "message": message}}))
        else:
            click.echo(f"mmctl: {message}", err=True)
        raise click.exceptions.Exit(exit_code)


pass_ctl = click.make_pass_decorator(Ctl)
