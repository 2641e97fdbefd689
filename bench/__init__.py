"""Benchmarks: `python -m bench.NAME [--json]`. Each prints its figure beside the physical limit
measured in the same run, as a ratio (figure / limit, higher is better)."""
