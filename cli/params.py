"""Click parameter types mmctl needs beyond click's own.

click.FloatRange lets `nan` through (every comparison with nan is false, so no bound is ever
broken): `mmctl mix nan` sent NaN, which is not JSON, and the daemon's "malformed message"
blamed the wire; `--timeout nan` ended in a traceback. `FiniteFloatRange` refuses nan and
the infinities as a usage error (exit 2) before anything is sent.
"""
from __future__ import annotations

import math

import click


class FiniteFloatRange(click.FloatRange):
    """A click.FloatRange that only takes finite numbers."""

    name = "float range"

    def convert(self, value, param, ctx):
        number = float(value) if isinstance(value, (int, float)) else None
        if number is None:
            try:
                number = float(str(value).strip())
            except ValueError:
                return super().convert(value, param, ctx)  # click's own "is not a valid float"
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a number (a finite number is expected)", param, ctx)
        return super().convert(value, param, ctx)
