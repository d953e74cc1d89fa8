"""The import-linter contracts of pyproject.toml hold, and would catch the breaks they name.

``make test`` runs ``lint-imports`` itself; these tests show that each contract is not vacuous:
a copy of the tree with one planted violation fails it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(root), "PATH": ""})


@pytest.fixture()
def tree(tmp_path):
    for name in ("cbd", "app", "worker", "anchors"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def test_the_tree_keeps_every_contract():
    out = lint(ROOT)
    assert out.returncode == 0, out.stdout[-3000:]
    assert "0 broken" in out.stdout


@pytest.mark.parametrize("module,line,contract", [
    ("cbd/core/names.py", "import torch", "the torch-free core imports no torch"),
    ("app/views.py", "import numpy", "the web process imports no torch"),
    ("cbd/shape/arch.py", "from cbd.train import models", "cbd layers"),
    ("cbd/store/hub.py", "from worker import queue", "the library knows neither the web nor the queue"),
    ("cbd/core/spec.py", "from cbd.core import plan", "no import cycles"),
])
def test_a_planted_violation_breaks_its_contract(tree, module, line, contract):
    path = tree / module
    path.write_text(path.read_text() + f"\n\ndef _planted():\n    {line}\n")
    out = lint(tree)
    assert out.returncode != 0
    broken = [ln for ln in out.stdout.splitlines() if ln.endswith("BROKEN")]
    assert any(ln.startswith(contract) for ln in broken), out.stdout[-3000:]
