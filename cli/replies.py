"""How mmctl prints a daemon's reply: the scalar fields as `key=value`, and the result of a
command that makes a new generation (its number first; several producers each with theirs).

Shared by the producer commands (cli/producer_commands.py) and the rest of mmctl (cli/mmctl.py)."""
from __future__ import annotations

import click

from .ctl import Ctl
from .status_table import human


def scalars(reply: dict, skip: tuple[str, ...] = ("ok",)) -> str:
    """The reply's scalar fields (not those in `skip`) as `key=value` words for people."""
    items = []
    for k, v in reply.items():
        if k in skip or isinstance(v, (dict, list)):
            continue
        items.append(f"{k}={human(v)}")
    return " ".join(items)


def changed(ctl: Ctl, daemon: str, reply: dict) -> None:
    """Print the result of a command that changes the output: its new generation first."""
    gen = reply.get("generation")
    head = f"{daemon}: generation {gen}" if gen is not None else f"{daemon}: ok"
    if "producers" in reply:  # several nodes: each one's generation (cli/fanout.py)
        each = ", ".join(f"{ep} {r.get('generation', 'ok')}" for ep, r in reply["producers"].items())
        head = f"{len(reply['producers'])} producers: generation {gen} ({each})"
    rest = scalars(reply, skip=("ok", "generation", "generations_differ"))
    ctl.emit({"daemon": daemon, **reply}, f"{head} {rest}".rstrip())
    from .fanout import differ_note

    note = differ_note(reply)
    if note and not ctl.as_json:
        click.echo(f"mmctl: {note}", err=True)

