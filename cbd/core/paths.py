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
from importlib import resources
from pathlib import Path

# The packaged chain recipes: the top-level ``anchors`` package's data (in a checkout, the
# anchors/ folder; in an installed wheel, its copy in site-packages).
RECIPES_DIR = Path(str(resources.files("anchors")))


def home() -> Path:
    return Path(os.environ.get("CBD_HOME", "~/.cache/cbd")).expanduser()


def assets_dir() -> Path:
    return Path(os.environ.get("CBD_ASSETS", home() / "assets")).expanduser()


def chains_dir() -> Path:
    return Path(os.environ.get("CBD_CHAINS", home() / "chains")).expanduser()


def artifacts_dir() -> Path:
    return Path(os.environ.get("CBD_ARTIFACTS", home() / "artifacts")).expanduser()
