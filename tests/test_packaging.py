"""The wheel the Docker images install carries what an installed cbd reads at run time:
the chain recipes (package data of ``anchors``), the web page's assets (``app/ui``) and the entry points of ``cbd serve``/``cbd worker``."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_has_recipes_and_entry_points(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "build"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src),
                          "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    wheel = zipfile.ZipFile(next((tmp_path / "dist").glob("cbd-*.whl")))
    names = set(wheel.namelist())
    recipes = {p.name for p in (ROOT / "anchors").glob("*.toml")}
    assert recipes and {f"anchors/{r}" for r in recipes} <= names
    assert {"app/ui/app.js", "app/ui/app.css"} <= names  # the web page's assets (app/routes/ui.py)
    assert not any(n.startswith(("tests/", "bench/")) for n in names)  # evidence and fixtures stay out
    ep = configparser.ConfigParser()
    ep.read_string(wheel.read(next(n for n in names if n.endswith("entry_points.txt"))).decode())
    assert ep["console_scripts"]["cbd"] == "cbd.cli.main:main"
    assert ep["cbd.commands"]["service"] == "worker.cli:register"
    assert ep["cbd.queue"]["chain"] == "worker.cli:enqueue_chain"


def test_installed_cli_finds_the_service_commands():
    out = subprocess.run([sys.executable, "-m", "cbd.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for cmd in ("init", "fetch", "serve", "worker", "chain", "push", "inspect"):
        assert cmd in out.stdout
