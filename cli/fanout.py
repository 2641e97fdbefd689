"""mmctl and several producers: one command to every node's producer, one combined reply.

With one producer per node (docs/deploy.md), a change such as `mmctl filter gray` must reach
every node, or the nodes train on different inputs. mmctl sends it to each producer in the
order given, each request with its own id (a retry after a timeout is answered from that
producer's reply cache, never run twice).

The combined reply is the first producer's, plus `producers` {endpoint: reply} and, for a
command that made a new generation, `generations` {endpoint: N}. Its `generation` is that
number when every node reports the same one - the case when all producers started together
and every change went through mmctl - and the highest otherwise, flagged `generations_differ`
(a producer restarted alone numbers from 1 again: `mmctl wait` compares ONE number with every
rank, so line the numbers up by restarting the producers together).

A producer that refuses or does not answer stops nothing already done elsewhere (a command
cannot be taken back); the error names which producers applied it and which did not, and the
exit code is that of the first failure (1 refused, 3 no answer).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from protocol.errors import ControlError, ControlTimeout, RemoteError

if TYPE_CHECKING:
    from .ctl import Ctl

EXIT_REMOTE, EXIT_USAGE, EXIT_NO_DAEMON = 1, 2, 3


def call_every_producer(ctl: "Ctl", cmd: str, **args: Any) -> dict:
    """`cmd` to every producer in `ctl.producers`; the combined reply (module docstring)."""
    replies: dict[str, dict] = {}
    failed: list[tuple[str, int, str, str]] = []  # endpoint, exit code, error code, message
    for endpoint in ctl.producers:
        try:
            replies[endpoint] = ctl.client("producer", endpoint).request(cmd, **args)
        except ControlTimeout as e:
            failed.append((endpoint, EXIT_NO_DAEMON, e.code, f"{e}"))
        except RemoteError as e:
            failed.append((endpoint, EXIT_REMOTE, e.code, f"refused {cmd}: {e}"))
        except ControlError as e:
            failed.append((endpoint, EXIT_REMOTE if e.code == "malformed" else EXIT_USAGE,
                           e.code, str(e)))
    if failed:
        applied = ", ".join(f"{ep}{_gen_note(r)}" for ep, r in replies.items()) or "none"
        lines = "; ".join(f"producer {ep}: {msg}" for ep, _, _, msg in failed)
        ctl.fail(failed[0][1], f"{lines} (applied on: {applied})", failed[0][2], "producer")
    first = replies[ctl.producers[0]]
    merged = {**first, "producers": replies}
    gens = {ep: r["generation"] for ep, r in replies.items() if r.get("generation") is not None}
    if gens:
        merged["generations"] = gens
        merged["generation"] = max(gens.values())
        if len(set(gens.values())) > 1:
            merged["generations_differ"] = True
    return merged


def _gen_note(reply: dict) -> str:
    return f" (generation {reply['generation']})" if reply.get("generation") is not None else ""


def differ_note(reply: dict) -> str | None:
    """A line for people when the producers number generations apart; None otherwise."""
    if not reply.get("generations_differ"):
        return None
    each = ", ".join(f"{ep} {g}" for ep, g in reply["generations"].items())
    return (f"the producers number generations apart ({each}): `mmctl wait N` compares one "
            f"number with every rank; restart the producers together to line them up")
