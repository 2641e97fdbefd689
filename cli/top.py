"""`mmctl top`: both daemons on one screen, refreshed in place (rich).

What an operator looks at while a run goes: each daemon's state and generation, rates, the
live mix (target and achieved), ring fill and drops, errors, every stage as a bar of its share
of the daemon's time with its p50/p99, and the bottleneck in words (protocol/stages.py). The
view is built from the same `status` replies `mmctl status` prints; `--once` renders one
frame as plain text for scripts.
"""
from __future__ import annotations

from typing import Any, Mapping

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from protocol.stages import bottleneck

BAR = 24


def _num(v: Any, fmt: str = "{:.1f}") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    try:
        return fmt.format(v)
    except (TypeError, ValueError):
        return str(v)


def _pct(v: Any) -> str:
    return _num(v * 100 if isinstance(v, (int, float)) else v, "{:.0f}%")


def _facts(daemon: str, st: Mapping) -> list[tuple[str, str]]:
    if daemon == "producer":
        rows = [("state", str(st.get("state", "-"))), ("generation", _num(st.get("generation"), "{}")),
                ("filter", str((st.get("config") or {}).get("filter", "-"))),
                ("samples/s", _num(st.get("samples_per_s"))),
                ("published", _num(st.get("published"), "{}")),
                ("ring fill", _pct(st.get("ring_fill"))), ("readers", _num(st.get("readers"), "{}")),
                ("dropped", _num(st.get("dropped"), "{}")), ("skipped", _num(st.get("skipped"), "{}"))]
        rec = st.get("record")
        if rec:
            rows.append(("recording", f"{rec.get('recorded')} samples -> {rec.get('cache')}"))
        if st.get("idle_reason"):
            rows.append(("idle", str(st["idle_reason"])))
        if st.get("last_error"):
            rows.append(("last error", str(st["last_error"])))
        return rows
    total = st.get("total_steps")
    rows = [("state", str(st.get("state", "-"))),
            ("step", f"{st.get('step', '-')}" + (f"/{total}" if total else "")),
            ("epoch", _num(st.get("epoch"), "{}")),
            ("generation", _num(st.get("generation"), "{}")),
            ("samples/s", _num(st.get("samples_per_s"))), ("stall", _pct(st.get("stall_fraction"))),
            ("mix", f"target {_num(st.get('live_fraction_target'), '{:.2f}')}, achieved "
                    f"{_num(st.get('live_fraction'), '{:.2f}')}"),
            ("batch", f"{_num(st.get('batch_size'), '{}')} (lr {_num(st.get('lr'), '{:.3g}')})"),
            ("loss", _num(st.get("loss"), "{:.4f}")), ("val acc", _num(st.get("accuracy"), "{:.3f}")),
            ("live lost", f"{_num(st.get('live_lapped'), '{}')} lapped by the producer, "
                          f"{_num(st.get('live_dropped'), '{}')} torn")]
    bad = (st.get("samples_bad_label") or 0)
    if bad:
        rows.append(("bad labels", str(bad)))
    if st.get("live_note"):
        rows.append(("live", str(st["live_note"])))
    return rows


def _stages(st: Mapping) -> Table:
    t = Table(box=None, pad_edge=False, show_header=True, header_style="bold")
    for col, just in (("stage", "left"), ("share", "left"), ("p50 ms", "right"),
                      ("p99 ms", "right")):
        t.add_column(col, justify=just)
    flat = [(g, n, s) for g, group in (st.get("stages") or {}).items() for n, s in group.items()]
    total = sum(s["mean_ms"] for _, _, s in flat) or 1.0
    for group, name, s in flat:
        share = s["mean_ms"] / total
        filled = round(share * BAR)
        t.add_row(f"{group}/{s.get('label', name)}", "#" * filled + "." * (BAR - filled)
                  + f" {share:.0%}", f"{s['p50_ms']:.1f}", f"{s['p99_ms']:.1f}")
    return t


def view(results: Mapping[str, Mapping | None], errors: Mapping[str, str]) -> Group:
    """One frame: a panel per daemon (facts, then stage bars), the bottleneck under them."""
    parts = []
    for daemon in ("producer", "trainer"):
        st = results.get(daemon)
        if st is None:
            parts.append(Panel(Text(errors.get(daemon, "not running")), title=daemon))
            continue
        facts = Table.grid(padding=(0, 2))
        facts.add_column(style="bold")
        facts.add_column()
        for k, v in _facts(daemon, st):
            facts.add_row(k, v)
        parts.append(Panel(Group(facts, Text(""), _stages(st)), title=daemon))
    said = bottleneck(results.get("producer"), results.get("trainer"))
    parts.append(Text(f"bottleneck: {said or '-'}", style="bold"))
    return Group(*parts)


__all__ = ["view"]
