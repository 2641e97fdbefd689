"""`mmctl status` as a table: both daemons side by side (fixed rows first, then whatever else
they report), their stage times grouped, and the bottleneck in words."""
from __future__ import annotations

from typing import Any

from protocol.stages import bottleneck


def human(v: Any) -> str:
    """A value as people read it: null is "-" (never Python's "None"), true/false as words."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return str(v)


# (row label, status key, formatter) - the keys daemons put in their status reply (CONTRACTS.md).
_ROWS = [
    ("state", "state", str),
    ("generation", "generation", str),
    ("samples/s", "samples_per_s", lambda v: f"{v:.1f}"),
    ("stall", "stall", lambda v: f"{100 * v:.1f}%"),
    ("ring fill", "ring_fill", lambda v: f"{100 * v:.0f}%"),
    ("readers", "readers", str),
    ("dropped", "dropped", str),
]


def _cell(reply: dict | None, key: str, fmt) -> str:
    if reply is None or reply.get(key) is None:
        return "-"
    try:
        return fmt(reply[key])
    except (TypeError, ValueError):
        return str(reply[key])


def _flat(reply: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in reply.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif not isinstance(v, list):
            out[prefix + k] = v
    return out


def status_table(results: dict[str, dict]) -> str:
    """Both daemons side by side: the fixed rows first, then whatever else they report."""
    ok = {d: (r if r.get("ok") else None) for d, r in results.items()}
    down = {d: "not running" if r.get("error", {}).get("code") == "timeout" else "error"
            for d, r in results.items() if ok[d] is None}
    rows = [("", *results)]
    for label, key, fmt in _ROWS:
        rows.append((label, *(down[d] if d in down and key == "state" else _cell(ok[d], key, fmt)
                              for d in results)))
    fixed = {key for _, key, _ in _ROWS} | {"ok", "daemon"}
    shown_apart = ("stages", "bottleneck")  # drawn below the table
    # A daemon may also nest its whole status under its own name; don't show it twice.
    flats = {d: _flat({k: v for k, v in r.items() if k != d and k not in shown_apart})
             if r else {} for d, r in ok.items()}
    extra = sorted({k for f in flats.values() for k in f} - fixed)
    for key in extra:
        rows.append((key, *(human(flats[d].get(key)) for d in results)))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines += stage_lines(ok)
    said = bottleneck(ok.get("producer"), ok.get("trainer"))
    if said:
        lines.append(f"bottleneck: {said}")
    for d, r in results.items():
        if not r.get("ok"):
            lines.append(f"{d}: {r['error']['message']}")
    return "\n".join(lines)


def stage_lines(replies: dict[str, dict | None]) -> list[str]:
    """Each daemon's stage times, grouped: 'producer  pipeline  video (...)  12.1  15.0  30.2'."""
    rows = []
    for d, r in replies.items():
        for group, stages in ((r or {}).get("stages") or {}).items():
            for name, s in stages.items():
                rows.append((d, group, s.get("label", name), f"{s['p50_ms']:.1f}",
                             f"{s['p90_ms']:.1f}", f"{s['p99_ms']:.1f}", str(s["count"])))
    if not rows:
        return []
    rows.insert(0, ("stage times", "group", "stage", "p50 ms", "p90 ms", "p99 ms", "count"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [""] + ["  ".join(c.rjust(w) if i >= 3 else c.ljust(w)
                             for i, (c, w) in enumerate(zip(row, widths))).rstrip()
                   for row in rows]
