"""The user documentation runs as written: every ```python block of docs/python-api.md in
order, as one script, and the model factory the README shows for `mm-trainer run --model`.
A doc whose example stopped working fails here, not in a user's hands."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _trainer_data import build_cache  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(doc: Path) -> list[str]:
    return FENCE.findall(doc.read_text())


def _env(tmp_path: Path) -> dict:
    """The daemons a doc starts bind their sockets in a runtime dir of this test's own."""
    runtime = Path(tempfile.mkdtemp(prefix="mmdoc", dir="/tmp"))
    return {**{k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")},
            "MMFEED_RUNTIME_DIR": str(runtime), "PYTHONPATH": str(ROOT)}


def test_python_api_guide_runs_as_written(tmp_path):
    blocks = python_blocks(ROOT / "docs" / "python-api.md")
    assert len(blocks) >= 6, "docs/python-api.md lost its examples"
    script = tmp_path / "guide.py"
    script.write_text("\n\n".join(blocks))
    # cwd: a scratch folder (the guide writes try-mmfeed/ where it runs)
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=_env(tmp_path),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr[-4000:]}"
    out = r.stdout
    assert re.search(r"cached \d+ samples, rejected 0", out), out
    assert re.search(r"^epoch 1: loss \d", out, re.M), out
    assert "refused: CacheDataset: one batch asks for samples of different schemas" in out, out
    assert re.search(r"^[1-9]\d* live batches", out, re.M), out
    assert "live share" in out, out


def _readme_model_block() -> str:
    for block in python_blocks(ROOT / "README.md"):
        if block.startswith("# mymodels.py"):
            return block
    raise AssertionError("README.md has no `# mymodels.py` example for --model")


def test_readme_model_factory_builds_a_model_that_trains_on_a_batch(tmp_path):
    import torch

    (tmp_path / "mymodels.py").write_text(_readme_model_block())
    sys.path.insert(0, str(tmp_path))
    try:
        from trainer.datasets import CacheDataset
        from trainer.model import build_model

        ds = CacheDataset(build_cache(tmp_path / "cache", n_train=8, n_val=2), "train")
        model = build_model("mymodels:build", ds.example_schema, ds.num_classes)
        inputs, labels = next(iter(ds.loader(4)))
        logits = model({k: v.float() for k, v in inputs.items()})
        assert logits.shape == (4, ds.num_classes)
        torch.nn.functional.cross_entropy(logits, labels).backward()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("mymodels", None)


@pytest.mark.slow
def test_mm_trainer_run_loads_the_readme_model_factory(tmp_path):
    (tmp_path / "mymodels.py").write_text(_readme_model_block())
    cache = build_cache(tmp_path / "cache", n_train=16, n_val=4)
    env = _env(tmp_path)
    env["PYTHONPATH"] = f"{tmp_path}:{ROOT}"
    r = subprocess.run([sys.executable, "-m", "trainer.cli", "run", "--cache", str(cache),
                        "--model", "mymodels:build", "--steps", "3", "--batch-size", "4",
                        "--checkpoint-dir", str(tmp_path / "ckpt"), "--json"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 3, summary


# What a citation of something outside the repository looks like: the project's shared folder
# (relative or absolute) and the documents in it.
OUTSIDE = ("../shared/", "/work/", "DESIGN.md", "STYLE.md")


def test_no_file_cites_a_document_outside_the_repository():
    # The design lives in docs/ (architecture.md, CONTRACTS.md); a clone has nothing beside it.
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    here = Path(__file__).name
    bad = [f"{name}:{n}" for name in tracked if name.endswith((".py", ".md", ".toml", ".service"))
           and Path(name).name != here
           for n, line in enumerate((ROOT / name).read_text(errors="replace").splitlines(), 1)
           if any(outside in line for outside in OUTSIDE)]
    assert not bad, f"cites a file outside the repository: {bad}"
