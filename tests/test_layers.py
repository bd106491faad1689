"""The layer rule of DESIGN.md, checked with import-linter (configured in pyproject.toml):
``types <- io, world <- memory <- models <- pipelines <- train, eval <- cli``; every import,
including those inside functions, counts."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_layers_are_kept():
    exe = Path(sys.executable).parent / "lint-imports"
    res = subprocess.run([str(exe), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "1 kept, 0 broken" in res.stdout
