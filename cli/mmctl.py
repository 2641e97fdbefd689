"""`mmctl`: steer the running mmfeed daemons over their control sockets.

Parse, call, print - nothing a daemon should own lives here. Every command talks to a daemon
through `protocol.control.ControlClient` (a timeout instead of a hang) and prints either a
short line for people or, with `--json`, one JSON object as the last line.

Which daemon gets what: filter, sensor, method, segment, label, modalities -> producer;
mix, checkpoint, wait -> trainer; pause, resume, logs -> the daemon named (default producer);
status -> both, side by side. The producer commands live in cli/producer_commands.py and are
registered on this group; how replies are printed is cli/replies.py.

Several nodes (docs/deploy.md): `--producer` takes a list (comma-separated or repeated), one
control address per node's producer; every producer command then goes to each of them in turn
and the reply lists each node's (cli/fanout.py). The trainer has one control socket, on the node
of rank 0; `mmctl wait` reads there what every rank of every node has trained on.

Exit codes:
    0  ok
    1  the daemon answered with an error (bad argument, unknown sensor, ...)
    2  usage error (bad option or argument; checked here before anything is sent)
    3  no daemon answered in time (the message names the socket tried and how to start the
       daemon), or `mmctl wait` reached its deadline
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import click

from cli.params import FiniteFloatRange
from protocol import logs, paths
from protocol.control import Timeouts
from protocol.control import keygen as write_keys
from protocol.errors import ControlError, ControlTimeout, RemoteError
from protocol.stages import bottleneck

from .ctl import (DAEMONS, EXIT_NO_DAEMON, EXIT_OK, EXIT_REMOTE, EXIT_USAGE,  # noqa: F401
                  Ctl, pass_ctl)
from .producer_commands import PRODUCER_COMMANDS
from .replies import scalars
from .status_table import status_table  # noqa: F401  (status_table: re-exported)

EPILOG = """\b
Exit codes:
  0  ok
  1  the daemon answered with an error
  2  usage error (checked before anything is sent)
  3  no daemon answered in time (or `wait` reached its deadline)
\b
Default sockets: ipc://DIR/{producer,trainer}.sock, DIR = $MMFEED_RUNTIME_DIR when set;
else $XDG_RUNTIME_DIR/mmfeed (or /tmp/mmfeed-$UID), then /run/mmfeed where the systemd
units put them. Logs next to them (X.sock -> X.log.sock, tcp port + 1).
tcp:// needs CURVE keys (--keys).
"""




@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (the last line).")
@click.option("--producer", metavar="ADDR[,ADDR...]", envvar="MMFEED_PRODUCER", multiple=True,
              help="Producer control endpoint [default: producer.sock in the runtime dir, "
                   "else in /run/mmfeed]. Several nodes: one per node's producer, "
                   "comma-separated or repeated; producer commands go to each.")
@click.option("--trainer", metavar="ADDR", envvar="MMFEED_TRAINER",
              help="Trainer control endpoint [default: trainer.sock in the runtime dir, "
                   "else in /run/mmfeed].")
@click.option("--timeout", type=FiniteFloatRange(min=0, min_open=True), default=5.0, show_default=True,
              metavar="S", help="Seconds to wait for a daemon's reply (over two attempts).")
@click.option("--keys", type=click.Path(file_okay=False, path_type=Path), envvar="MMFEED_KEYS",
              help="CURVE key folder from `mmctl keygen` (needed for tcp:// endpoints).")
@click.pass_context
def main(ctx: click.Context, as_json: bool, producer: tuple[str, ...], trainer: str | None,
         timeout: float, keys: Path | None) -> None:
    """mmctl: control the mmfeed daemons (mm-producer, mm-trainer)."""
    endpoints, tried = {}, {}
    producers = [a.strip() for given in producer for a in given.split(",") if a.strip()]
    for daemon, given in (("producer", producers[0] if producers else None),
                          ("trainer", trainer)):
        if given:
            endpoints[daemon], tried[daemon] = given, [given]
        else:  # own runtime dir, then /run/mmfeed (systemd); creates neither
            endpoints[daemon], tried[daemon] = paths.find_control_endpoint(daemon)
    ctx.obj = Ctl(
        as_json=as_json,
        endpoints=endpoints,
        timeouts=Timeouts.within(timeout, retries=1),
        keys=keys,
        tried=tried,
        producers=producers or [endpoints["producer"]],
    )
    ctx.call_on_close(lambda: [c.close() for c in ctx.obj._clients.values()])



# --- status -----------------------------------------------------------------------------------

@main.command()
@click.argument("daemon", required=False, type=click.Choice(DAEMONS))
@pass_ctl
def status(ctl: Ctl, daemon: str | None) -> None:
    """State of both daemons side by side (or of DAEMON): state, generation, samples/s,
    stall, ring fill, readers, dropped. Exits 0 when any daemon answered.

    With --json: {"ok": ..., "producer": {...} | null, "trainer": {...} | null, "errors": {...}}."""
    results: dict[str, dict] = {}
    # Several producers (one per node): a column for each, named "producer ADDR".
    several = len(ctl.producers) > 1
    asked: list[tuple[str, str | None]] = []  # (column, endpoint; None: the daemon's default)
    if daemon != "trainer":
        asked += [(f"producer {ep}", ep) for ep in ctl.producers] if several else [("producer", None)]
    if daemon != "producer":
        asked.append(("trainer", None))
    for d, endpoint in asked:
        client = ctl.client(d.split(" ")[0], endpoint)
        try:
            if client.listening() is False:  # no socket file or nobody behind it: don't wait
                raise ControlTimeout(client._silence_message("status", 0.0))
            results[d] = client.request("status")
        except ControlTimeout as e:
            results[d] = {"ok": False, "error": {"code": e.code,
                                                 "message": f"{e}{ctl.tried_note(d) if endpoint is None else ''}"}}
        except RemoteError as e:
            results[d] = {"ok": False, "error": {"code": e.code, "message": str(e)}}
    any_ok = any(r.get("ok") for r in results.values())
    # JSON shape fixed in CONTRACTS.md: a daemon that did not answer is null, its error under "errors".
    shown = {d: r if r.get("ok") else None for d, r in results.items()}
    if several and daemon != "trainer":  # "producer": the first node's; "producers": each's
        prods = {d.split(" ", 1)[1]: shown.pop(d) for d in list(shown) if d.startswith("producer ")}
        shown = {"producer": prods[ctl.producers[0]], "producers": prods, **shown}
    ctl.emit({"ok": any_ok, **shown,
              "errors": {d: r["error"] for d, r in results.items() if not r.get("ok")}},
             status_table(results))
    if not any_ok:
        timeouts = all(r["error"]["code"] == "timeout" for r in results.values())
        raise click.exceptions.Exit(EXIT_NO_DAEMON if timeouts else EXIT_REMOTE)


def _poll_both(ctl: Ctl) -> tuple[dict[str, dict | None], dict[str, str]]:
    """Both daemons' status replies (None for one that did not answer) and why not."""
    results: dict[str, dict | None] = {}
    errors: dict[str, str] = {}
    for d in DAEMONS:
        client = ctl.client(d)
        try:
            if client.listening() is False:
                raise ControlTimeout(client._silence_message("status", 0.0))
            results[d] = client.request("status")
        except (ControlTimeout, RemoteError) as e:
            results[d], errors[d] = None, f"{e}{ctl.tried_note(d)}"
    return results, errors


@main.command()
@click.option("--once", is_flag=True, help="Print one frame and exit (for scripts).")
@click.option("--interval", type=FiniteFloatRange(min=0.2), default=1.0, show_default=True,
              metavar="S", help="Seconds between refreshes.")
@pass_ctl
def top(ctl: Ctl, once: bool, interval: float) -> None:
    """Both daemons live, refreshed in place: state, generation, rates, stall, mix target and
    achieved, ring fill and drops, errors, every stage as a bar with p50/p99, and the
    bottleneck. Ctrl-C leaves. `--once` prints one frame; with --json one object:
    {"ok", "producer", "trainer", "errors", "bottleneck"}."""
    from rich.console import Console
    from rich.live import Live

    from .top import view

    if once or ctl.as_json:
        results, errors = _poll_both(ctl)
        if ctl.as_json:
            click.echo(json.dumps({"ok": any(results.values()), **results, "errors": errors,
                                   "bottleneck": bottleneck(results.get("producer"),
                                                            results.get("trainer"))}, default=str))
        else:
            Console(width=shutil.get_terminal_size((120, 40)).columns).print(view(results, errors))
        if not any(results.values()):
            raise click.exceptions.Exit(EXIT_NO_DAEMON)
        return
    try:
        with Live(view(*_poll_both(ctl)), refresh_per_second=4, screen=False) as live:
            while True:
                time.sleep(interval)  # the refresh period the user asked for
                live.update(view(*_poll_both(ctl)))
    except KeyboardInterrupt:
        return



for _command in PRODUCER_COMMANDS:  # filter, sensor, ... (cli/producer_commands.py)
    main.add_command(_command)


# --- trainer commands ------------------------------------------------------------------------


@main.command()
@click.argument("fraction", type=FiniteFloatRange(0.0, 1.0))
@pass_ctl
def mix(ctl: Ctl, fraction: float) -> None:
    """Train on FRACTION live samples (0 = disk only, 1 = live only)."""
    reply = ctl.call("trainer", "mix", fraction=fraction)
    ctl.emit({"daemon": "trainer", **reply}, f"trainer: live fraction {fraction:g} {scalars(reply)}".rstrip())


@main.command()
@click.argument("size", type=click.IntRange(1, 65536))
@click.option("--lr-rule", type=click.Choice(["none", "linear", "sqrt"]), default="none",
              show_default=True,
              help="Scale the learning rate with the batch: linear (lr x N/old, the usual rule "
                   "for SGD-like training), sqrt (x sqrt(N/old), common for Adam), or none.")
@pass_ctl
def batch(ctl: Ctl, size: int, lr_rule: str) -> None:
    """Train on batches of SIZE samples from the next step on (batches already read ahead
    keep their size). `mm-trainer run --auto-batch` picks the largest that fits in memory."""
    reply = ctl.call("trainer", "batch", size=size, lr_rule=lr_rule)
    lr = (f", lr {reply['previous_lr']:.3g} -> {reply['lr']:.3g} ({lr_rule})"
          if lr_rule != "none" else "")
    ctl.emit({"daemon": "trainer", **reply},
             f"trainer: batch size {reply.get('previous')} -> {reply.get('batch_size')} from step "
             f"{reply.get('step')}{lr}")


@main.command()
@pass_ctl
def checkpoint(ctl: Ctl) -> None:
    """Write a checkpoint now."""
    reply = ctl.call("trainer", "checkpoint")
    ctl.emit({"daemon": "trainer", **reply}, f"trainer: checkpoint {scalars(reply)}".rstrip())


@main.command()
@click.argument("generation", type=click.IntRange(min=0))
@click.option("--timeout", "deadline", type=FiniteFloatRange(min=0), default=600.0, show_default=True,
              metavar="S", help="Give up (exit 3) after S seconds.")
@click.option("--interval", type=FiniteFloatRange(min=0.01), default=0.5, show_default=True,
              metavar="S", help="Seconds between status polls.")
@pass_ctl
def wait(ctl: Ctl, generation: int, deadline: float, interval: float) -> None:
    """Return once the trainer has trained a step on GENERATION (or a later one); under
    torchrun, once EVERY rank on every node has (the trainer's status says the lowest)."""
    client = ctl.client("trainer")
    t0 = time.monotonic()
    last: Any = None
    ranks = None
    silent = ""
    while True:
        try:
            st = client.request("status")
            last, ranks = st.get("generation"), st.get("rank_generations")
            silent = ""
        except ControlTimeout as e:  # restarting or busy: keep trying until the deadline
            silent = str(e)
        except RemoteError as e:
            ctl.fail(EXIT_REMOTE, f"trainer refused status: {e}", e.code, "trainer")
        if isinstance(last, int) and last >= generation:
            ctl.emit({"ok": True, "daemon": "trainer", "generation": last,
                      "waited_s": round(time.monotonic() - t0, 3)},
                     f"trainer: trained on generation {last}")
            return
        if time.monotonic() - t0 >= deadline:
            why = silent or f"the trainer's last trained generation is {last}" + (
                f" (each rank's: {ranks})" if ranks else "")
            ctl.fail(EXIT_NO_DAEMON, f"wait {generation}: gave up after {deadline:g} s; {why}",
                     "timeout", "trainer")
        time.sleep(interval)  # a poll interval, not a guess at how long something takes


# --- either daemon ---------------------------------------------------------------------------


def _daemon_arg(f):
    return click.argument("daemon", required=False, default="producer", type=click.Choice(DAEMONS))(f)


@main.command()
@_daemon_arg
@pass_ctl
def pause(ctl: Ctl, daemon: str) -> None:
    """Pause DAEMON (default: producer)."""
    reply = ctl.call(daemon, "pause")
    ctl.emit({"daemon": daemon, **reply}, f"{daemon}: paused {scalars(reply)}".rstrip())


@main.command()
@_daemon_arg
@pass_ctl
def resume(ctl: Ctl, daemon: str) -> None:
    """Resume DAEMON (default: producer)."""
    reply = ctl.call(daemon, "resume")
    head = f"{daemon}: was not paused;" if reply.get("was_paused") is False else f"{daemon}: resumed"
    ctl.emit({"daemon": daemon, **reply}, f"{head} {scalars(reply)}".rstrip())


@main.command("logs")
@_daemon_arg
@click.option("-f", "--follow", is_flag=True, help="Follow new records as the daemon logs them.")
@click.option("-n", "--lines", default=50, show_default=True, type=click.IntRange(min=1),
              help="How many recent records to show (without -f).")
@click.option("--count", type=click.IntRange(min=1), help="With -f: stop after COUNT records.")
@click.option("--from", "source", metavar="ADDR", help="With -f: the log PUB endpoint "
              "[default: next to the control socket, X.sock -> X.log.sock].")
@pass_ctl
def logs_(ctl: Ctl, daemon: str, follow: bool, lines: int, count: int | None, source: str | None) -> None:
    """Show DAEMON's recent log records (default: producer); -f follows them (from the
    daemon's PUB socket, or from the journal when it runs under systemd)."""
    if daemon == "producer" and len(ctl.producers) > 1 and not source:
        ctl.fail(EXIT_USAGE, f"logs: {len(ctl.producers)} producers given; name the node's "
                 f"with --producer ADDR (one of {', '.join(ctl.producers)})", "bad_argument",
                 daemon)
    if not follow:
        reply = ctl.call(daemon, "logs", n=lines)
        records = reply.get("records", [])
        omitted = reply.get("omitted") or 0
        note = (f"({omitted} older record{'s' if omitted != 1 else ''} left out: a logs reply "
                f"holds at most {reply.get('max_bytes')} bytes; `mmctl logs -f {daemon}` or the "
                f"journal has them all)") if reply.get("truncated") else ""
        ctl.emit({"ok": True, "daemon": daemon, "records": records,
                  "truncated": bool(reply.get("truncated")), "omitted": omitted},
                 "\n".join(logs.format_record(r) for r in records) or f"{daemon}: no records")
        if note and not ctl.as_json:
            click.echo(note, err=True)
        return
    try:  # the daemons bind by the same rule (paths.log_endpoint_for)
        endpoint = source or paths.log_endpoint_for(ctl.endpoints[daemon])
        curve = ctl.curve(endpoint)
        if endpoint.startswith("tcp://") and curve is None:
            raise ControlError(f"log socket {endpoint} is TCP: pass the CURVE key folder with --keys")
    except ControlError as e:
        ctl.fail(EXIT_USAGE, f"{daemon}: {e}", e.code, daemon)
    if logs.log_socket_exists(endpoint) is False:
        journalctl = shutil.which("journalctl")
        unit = f"mm-{daemon}.service"
        if journalctl and _unit_known(journalctl, unit):
            # --count with the journal: its last COUNT records, without following.
            follow_or_last = ["-n", str(count)] if count else ["-f"]
            cmd = [journalctl, *follow_or_last, "-u", unit, "-o", "json" if ctl.as_json else "cat"]
            raise click.exceptions.Exit(subprocess.call(cmd))
        looked = [source] if source else [_log_or(e) for e in ctl.tried.get(daemon, [])]
        ctl.fail(EXIT_NO_DAEMON, f"{daemon}: no log socket at {endpoint} and no {unit} in the "
                 f"journal; is {daemon} running? (start it with `mm-{daemon} run ...`); "
                 f"log sockets tried: {', '.join(looked or [endpoint])}", "timeout", daemon)
    seen = 0
    try:
        for rec in logs.follow(endpoint, curve=curve):
            click.echo(json.dumps(rec) if ctl.as_json else logs.format_record(rec))
            seen += 1
            if count and seen >= count:
                return
    except KeyboardInterrupt:
        return


def _log_or(control: str) -> str:
    try:
        return paths.log_endpoint_for(control)
    except ControlError:
        return control


def _unit_known(journalctl: str, unit: str) -> bool:
    """Whether the journal holds anything for `unit` (i.e. it runs, or ran, under systemd)."""
    try:
        out = subprocess.run([journalctl, "-q", "-n", "1", "-u", unit, "-o", "cat"],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and bool(out.stdout.strip())


# --- local helpers -----------------------------------------------------------------------------


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@pass_ctl
def keygen(ctl: Ctl, directory: Path) -> None:
    """Write CURVE keypairs for TCP control into DIRECTORY (server + client, and
    DIRECTORY/clients/ holding the client public keys the server admits)."""
    try:
        secrets = write_keys(directory)
    except OSError as e:  # a file in the way, no permission, a full disk: say which and why
        ctl.fail(EXIT_USAGE, f"keygen: cannot write keys into {directory}: "
                             f"{e.strerror or e}; pass a folder you may create and write",
                 "bad_argument")
    info = {"ok": True, "server_secret": str(secrets["server"]), "server_public": str(directory / "server.key"),
            "client_secret": str(secrets["client"]), "clients_dir": str(directory / "clients")}
    ctl.emit(info, "\n".join([
        f"wrote CURVE keys to {directory}",
        f"  daemon: server secret key {info['server_secret']}, allowed clients {info['clients_dir']}",
        f"  mmctl:  mmctl --keys {directory} --producer tcp://HOST:PORT status",
        "  copy server.key and client.key_secret to the machine that runs mmctl; keep *_secret private",
    ]))


@main.command("install-units")
@click.option("--unit-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("/etc/systemd/system"), show_default=True)
@click.option("--env-file", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("/etc/mmfeed/mmfeed.env"), show_default=True,
              help="Settings file the units read (an example is written if it is missing).")
@click.option("--no-enable", is_flag=True, help="Install without `systemctl enable`.")
@click.option("--no-user", is_flag=True, help="Do not create the mmfeed system user and group.")
@click.option("--dry-run", is_flag=True, help="Print what would be done; change nothing.")
@pass_ctl
def install_units_(ctl: Ctl, unit_dir: Path, env_file: Path, no_enable: bool, no_user: bool,
                   dry_run: bool) -> None:
    """Install the systemd units (mm-producer, mm-trainer, mmfeed.target) for this install.

    ExecStart points at the console scripts of the Python environment mmctl runs from."""
    from .units import UnitSettings, install_units

    if not dry_run and os.geteuid() != 0 and not os.access(unit_dir, os.W_OK):
        ctl.fail(EXIT_USAGE, f"writing to {unit_dir} needs root: re-run with sudo, or --dry-run "
                 f"to see the steps, or --unit-dir DIR", "permission")
    settings = UnitSettings(unit_dir=unit_dir, env_path=env_file)
    res = install_units(settings, enable=not no_enable, create_user=not no_user, dry_run=dry_run)
    ctl.emit(res, "\n".join(res["steps"]))


@main.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
@pass_ctl
def completion(ctl: Ctl, shell: str) -> None:
    """Print the shell completion script: `eval "$(mmctl completion bash)"`.

    With --json: {"ok": true, "shell": ..., "script": ...} (for installers)."""
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    script = cls(main, {}, "mmctl", "_MMCTL_COMPLETE").source()
    ctl.emit({"ok": True, "shell": shell, "script": script}, script)


def _set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.find_object(Ctl).as_json = True


def _accept_json_after_the_command(group: click.Group) -> None:
    """`mmctl filter gray --json` means what `mmctl --json filter gray` means.

    WHY: people (and scripts copied from other tools) put the flag at the end; refusing it as
    "No such option" is a usage error for no reason."""
    for cmd in group.commands.values():
        cmd.params.append(click.Option(
            ["--json"], is_flag=True, expose_value=False, callback=_set_json,
            help="Print one JSON object (the last line); the same as `mmctl --json ...`."))


_accept_json_after_the_command(main)


if __name__ == "__main__":
    main()
