"""Where things live on disk. Weights and corpora never go in git: they live under CBD_HOME.

Layout (all created on demand)::

    $CBD_HOME/                      default ~/.cache/cbd
      assets/                       teacher, tokenizers and corpora built from packages
      chains/<chain>/manifest.json  written last: a chain without it is not built
      chains/<chain>/<anchor>/      model.safetensors, config.json, anchor.json
      artifacts/<id>/               finished checkpoints, one folder per request hash

``chains/`` and ``artifacts/`` sit in the folder of a ``file://`` ``CBD_STORE_URL`` when one is set
(the store, ``cbd.core.objstore``); with an ``s3://`` store they are this host's local caches.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from urllib.parse import unquote

# The packaged chain recipes: the top-level ``anchors`` package's data (in a checkout, the
# anchors/ folder; in an installed wheel, its copy in site-packages).
RECIPES_DIR = Path(str(resources.files("anchors")))


def home() -> Path:
    return Path(os.environ.get("CBD_HOME", "~/.cache/cbd")).expanduser()


def store_root() -> Path:
    """Where chains and artifacts live on this host: the folder of a ``file://`` ``CBD_STORE_URL``, else
    ``CBD_HOME`` (with an ``s3://`` store they are this host's caches of the bucket)."""
    url = os.environ.get("CBD_STORE_URL") or ""
    if url.startswith("file:///"):
        return Path(unquote(url[len("file://"):]))
    return home()


def assets_dir() -> Path:
    return Path(os.environ.get("CBD_ASSETS", home() / "assets")).expanduser()


def chains_dir() -> Path:
    return Path(os.environ.get("CBD_CHAINS", store_root() / "chains")).expanduser()


def artifacts_dir() -> Path:
    return Path(os.environ.get("CBD_ARTIFACTS", store_root() / "artifacts")).expanduser()
