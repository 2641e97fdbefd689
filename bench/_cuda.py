"""What the `--device cuda` benchmarks share: one clear skip when there is no GPU.

A GPU figure measured on a machine without one would be a lie; a silent pass would hide that
it was never measured. So the bench says why in one line and exits 2 (with --json, the last
line is {"bench": ..., "skipped": reason}), and docs/gpu.md lists the command to run on a GPU.
"""
from __future__ import annotations

import json
import sys


def cuda_missing() -> str | None:
    """Why CUDA benchmarks cannot run here, or None when they can."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is a dependency
        return f"torch cannot be imported ({e})"
    if not torch.cuda.is_available():
        return (f"no CUDA device: torch {torch.__version__} (CUDA build: "
                f"{torch.version.cuda or 'none'}) sees no GPU; run this on a GPU machine "
                f"(docs/gpu.md, GPU checklist)")
    return None


def skip(bench: str, reason: str, as_json: bool) -> int:
    """Print the one-line reason (and the JSON object) and return the exit status 2."""
    print(f"{bench}: skipped: {reason}")
    if as_json:
        print(json.dumps({"bench": bench, "skipped": reason}))
    sys.stdout.flush()
    return 2
