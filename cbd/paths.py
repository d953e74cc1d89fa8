"""Where things live on disk. Weights and corpora never go in git: they live under CBD_HOME.

Layout (all created on demand)::

    $CBD_HOME/                      default ~/.cache/cbd
      assets/                       teacher, tokenizers and corpora built from packages
      chains/<chain>/manifest.json  written last: a chain without it is not built
      chains/<chain>/<anchor>/      model.safetensors, config.json, anchor.json
      artifacts/<id>/               finished checkpoints, one folder per request hash
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RECIPES_DIR = REPO_ROOT / "anchors"


def home() -> Path:
    return Path(os.environ.get("CBD_HOME", "~/.cache/cbd")).expanduser()


def assets_dir() -> Path:
    return Path(os.environ.get("CBD_ASSETS", home() / "assets")).expanduser()


def chains_dir() -> Path:
    return Path(os.environ.get("CBD_CHAINS", home() / "chains")).expanduser()


def artifacts_dir() -> Path:
    return Path(os.environ.get("CBD_ARTIFACTS", home() / "artifacts")).expanduser()
