"""Shared fixtures: a tiny random chain in a temporary CBD_HOME for the whole session."""

from __future__ import annotations

import os

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
