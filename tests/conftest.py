"""Shared fixtures: a tiny random chain in a temporary CBD_HOME, and the real `tiny` chain, per session."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def cbd_home(tmp_path_factory):
    """A private CBD_HOME (chains, artifacts) so tests never touch the user's cache.

    Assets (teacher, corpora) stay in the shared cache: they are expensive and read-only.
    """
    home = tmp_path_factory.mktemp("cbd_home")
    mp = pytest.MonkeyPatch()
    mp.setenv("CBD_CHAINS", str(home / "chains"))
    mp.setenv("CBD_ARTIFACTS", str(home / "artifacts"))
    yield home
    mp.undo()


@pytest.fixture(scope="session")
def random_chain(cbd_home):
    from random_chain import build_random_chain

    return build_random_chain(cbd_home / "chains", "test")


@pytest.fixture(scope="session")
def tiny_chain(cbd_home, tmp_path_factory):
    """The real `tiny` chain, built once per session with ``cbd chain build tiny`` into a temporary
    CBD_CHAINS: (manifest, chains root). The teacher, tokenizer and corpus come from the shared asset
    cache (built from their packages on first use). A few minutes on 2 CPU cores; only slow tests
    ask for it, so a fresh clone builds it rather than skipping what depends on it."""
    from cbd.core.manifest import load_manifest

    root = tmp_path_factory.mktemp("real_chains")
    env = os.environ | {"CBD_CHAINS": str(root), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    r = subprocess.run([sys.executable, "-m", "cbd.cli", "chain", "build", "tiny"], env=env, capture_output=True,
                       text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "a3" in r.stdout  # the chain table was printed
    return load_manifest("tiny", root), root
