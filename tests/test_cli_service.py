"""The command line's exit codes, run as a user runs it (``python -m cbd.cli``, a real process).

README, "Command line": 0 done, 2 bad input, 3 not found or not built, 4 integrity, 5 service or
Hub unreachable. ``cbd init`` on the random test chain and on a tampered copy; ``cbd fetch`` and
``cbd chain list`` against a real service (redis-server, one worker, uvicorn) that requires an
API key (``CBD_API_KEYS``); ``cbd push`` against the Hub-compatible test server (tests/hubserver.py).
Typer's ``CliRunner`` would call the app, not ``cbd.cli.main.main``, which maps errors to exit
codes: hence the subprocesses.
"""

# ruff: noqa: F401, F811  (fixtures are imported from conftest_service and then requested by name)

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from conftest_service import REPO, child_env, children, closed_port_url, free_port, redis_db, redis_server
from hubserver import HubServer

DB = 13
KEY = "cli-test-key-0123456789"
ALICE = "hf_alice_0123456789abcdef"
SHAPE = ["--layers", "2", "--hidden", "48", "--heads", "3"]  # head dim 16: the random chain's


def cbd(*args: str, home: Path, timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    """``python -m cbd.cli ARGS`` with its own CBD_HOME (the fetch cache) and no inherited API key."""
    e = child_env(CBD_HOME=str(home), COLUMNS="200", **env)
    if "CBD_API_KEY" not in env:
        e.pop("CBD_API_KEY", None)
    return subprocess.run([sys.executable, "-m", "cbd.cli", *args], cwd=REPO, env=e, capture_output=True,
                          text=True, timeout=timeout)


def tamper(root: Path, chain: str) -> None:
    """Flip one bit of every anchor's weights (same size): each load fails its sha256 check."""
    from cbd.core.manifest import anchor_dir, load_manifest

    for a in load_manifest(chain, root).anchors:
        path = anchor_dir(chain, a.name, root) / "model.safetensors"
        data = bytearray(path.read_bytes())
        data[-5] ^= 0x01
        path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def chains(tmp_path_factory) -> Path:
    """``test`` (intact) and ``broken`` (every anchor tampered with) in a chains root of their own."""
    from random_chain import build_random_chain

    root = tmp_path_factory.mktemp("cli_chains")
    build_random_chain(root, "test")
    build_random_chain(root, "broken", seed=1)
    tamper(root, "broken")
    return root


@pytest.fixture(scope="module")
def svc(redis_server, chains, children, tmp_path_factory):
    """One worker; an API that waits for jobs (CBD_SYNC_WAIT_S=60), one that answers 202 at once, and
    one whose Redis is down (503). All require ``X-API-Key: KEY`` on POST."""
    url = redis_db(redis_server, DB)
    env = {"CBD_CHAINS": str(chains), "CBD_ARTIFACTS": str(tmp_path_factory.mktemp("cli_artifacts")),
           "CBD_API_KEYS": KEY}
    children.worker(url, **env)
    waits, _ = children.api(url, CBD_SYNC_WAIT_S="60", **env)
    at_once, _ = children.api(url, CBD_SYNC_WAIT_S="0", **env)
    down, _ = children.api(closed_port_url(), **env)
    return SimpleNamespace(waits=waits, at_once=at_once, down=down, chains=chains, env=env)


def fetch(svc_url: str, tmp_path: Path, *extra: str, key: str | None = KEY, **env: str):
    keyed = {"CBD_API_KEY": key} if key is not None else {}
    return cbd("fetch", "--out", str(tmp_path / "out"), "--url", svc_url, *extra, home=tmp_path / "home",
               **keyed, **env)


# ---- cbd fetch -----------------------------------------------------------------------------------
def test_fetch_sends_the_api_key_and_is_refused_without_it(svc, tmp_path):
    no_key = fetch(svc.waits, tmp_path, *SHAPE, "--chain", "test", key=None)
    assert no_key.returncode == 2 and "(401)" in no_key.stderr, no_key.stderr
    wrong = fetch(svc.waits, tmp_path, *SHAPE, "--chain", "test", key="not-the-key")
    assert wrong.returncode == 2 and "(401)" in wrong.stderr, wrong.stderr
    assert not (tmp_path / "out").exists()
    ok = fetch(svc.waits, tmp_path, *SHAPE, "--chain", "test")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().splitlines()[-1] == str(tmp_path / "out")
    recipe = json.loads((tmp_path / "out" / "recipe.json").read_text())
    assert recipe["request"]["chain"] == "test" and recipe["target"]["num_hidden_layers"] == 2
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in (tmp_path / "out").iterdir()}


def test_fetch_unknown_chain_is_exit_3(svc, tmp_path):
    r = fetch(svc.waits, tmp_path, *SHAPE, "--chain", "nope")
    assert r.returncode == 3 and "UnknownNameError" in r.stderr, (r.returncode, r.stderr)


@pytest.mark.parametrize("api", ["at_once", "waits"])
def test_fetch_failed_job_is_exit_3(svc, tmp_path, api):
    """A job that fails on the worker (tampered anchors: IntegrityError): polled (202 first) or
    answered within the request (the POST waits: a 500 naming the job's error), both exit 3."""
    layers = {"at_once": "2", "waits": "3"}[api]  # one plan each
    r = fetch(getattr(svc, api), tmp_path, "--layers", layers, "--hidden", "48", "--heads", "3", "--chain", "broken")
    assert r.returncode == 3, (r.returncode, r.stderr)
    assert "failed" in r.stderr and "IntegrityError" in r.stderr and "sha256" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_fetch_timeout_is_exit_5(svc, tmp_path):
    r = fetch(svc.at_once, tmp_path, "--layers", "1", "--hidden", "64", "--heads", "4", "--chain", "test",
              "--timeout", "0")
    assert r.returncode == 5 and "did not finish" in r.stderr, (r.returncode, r.stderr)


def test_fetch_5xx_or_unreachable_service_is_exit_5(svc, tmp_path):
    down = fetch(svc.down, tmp_path, "--layers", "1", "--hidden", "32", "--heads", "2", "--chain", "test")
    assert down.returncode == 5 and "503" in down.stderr, (down.returncode, down.stderr)
    nobody = fetch(f"http://127.0.0.1:{free_port()}", tmp_path, *SHAPE)
    assert nobody.returncode == 5 and "cannot reach" in nobody.stderr, (nobody.returncode, nobody.stderr)


def test_fetch_bad_input_is_exit_2(svc, tmp_path):
    local = fetch(svc.waits, tmp_path, "--layers", "0", "--hidden", "48", "--heads", "3")  # refused before any request
    assert local.returncode == 2 and "invalid input" in local.stderr, (local.returncode, local.stderr)
    refused = fetch(svc.waits, tmp_path, "--layers", "2", "--hidden", "40", "--heads", "2", "--chain", "test")
    assert refused.returncode == 2 and "(422)" in refused.stderr, (refused.returncode, refused.stderr)  # head dim 20
    usage = cbd("fetch", "--layers", "2", home=tmp_path / "home")  # no --out
    assert usage.returncode == 2, (usage.returncode, usage.stderr)


# ---- cbd chain list ------------------------------------------------------------------------------
def test_chain_list_shows_the_chains_the_service_serves(svc, tmp_path):
    served = httpx.get(svc.waits + "/chains", timeout=30).json()["chains"]
    assert {c["name"] for c in served} == {"test", "broken"}
    r = cbd("chain", "list", home=tmp_path / "home", CBD_CHAINS=str(svc.chains))
    assert r.returncode == 0, r.stderr
    for c in served:
        assert f"chain {c['name']} " in r.stdout, r.stdout
        for a in c["anchors"]:
            assert f"{a['non_embedding_params']:,}" in r.stdout
    empty = cbd("chain", "list", home=tmp_path / "home", CBD_CHAINS=str(tmp_path / "none"))
    assert empty.returncode == 0 and "recipes not built yet" in empty.stderr and "tiny" in empty.stderr


# ---- cbd init ------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,code,says", [
    ((*SHAPE, "--chain", "test"), 0, "wrote"),
    (("--layers", "2", "--hidden", "40", "--heads", "2", "--chain", "test"), 2, "head"),  # head dim 20, not 16
    (("--layers", "0", "--hidden", "48", "--heads", "3", "--chain", "test"), 2, "invalid input"),
    ((*SHAPE, "--chain", "test", "--alpha", "2"), 2, "alpha"),  # out of [0, 1]: a usage error
    ((*SHAPE, "--chain", "nope"), 3, "not built"),
    ((*SHAPE, "--chain", "broken"), 4, "sha256"),
], ids=["done", "bad-shape", "invalid", "bad-alpha", "unknown-chain", "tampered"])
def test_init_exit_codes(chains, tmp_path, args, code, says):
    r = cbd("init", "--out", str(tmp_path / "out"), *args, home=tmp_path / "home", CBD_CHAINS=str(chains),
            CBD_ARTIFACTS=str(tmp_path / "artifacts"))
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    assert says in r.stderr, r.stderr[-2000:]
    assert (tmp_path / "out" / "model.safetensors").is_file() == (code == 0)


def test_init_with_no_chain_built_is_exit_3(tmp_path):
    r = cbd("init", "--out", str(tmp_path / "out"), *SHAPE, home=tmp_path / "home",
            CBD_CHAINS=str(tmp_path / "none"), CBD_ARTIFACTS=str(tmp_path / "artifacts"))
    assert r.returncode == 3 and "cbd chain build" in r.stderr, (r.returncode, r.stderr[-2000:])


# ---- cbd push ------------------------------------------------------------------------------------
@pytest.fixture
def hub(tmp_path):
    with HubServer(tmp_path / "hub", tokens={ALICE: "alice"}, lfs_threshold=4096) as server:
        yield server


def push(folder: Path, repo_id: str, endpoint: str, home: Path, token: str | None = ALICE):
    env = {"HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": token or ""}
    return cbd("push", str(folder), repo_id, "--endpoint", endpoint, home=home, timeout=120, **env)


def test_push_exit_codes(hub, tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "model.safetensors").write_bytes(b"\0" * 8192)  # over the LFS threshold
    home = tmp_path / "home"
    done = push(folder, "alice/cli-init", hub.url, home)
    assert done.returncode == 0, done.stderr
    res = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(res["commit_sha"]) == 40 and res["no_op"] is False
    again = push(folder, "alice/cli-init", hub.url, home)
    assert again.returncode == 0 and json.loads(again.stdout.strip().splitlines()[-1])["no_op"] is True
    bad_id = push(folder, "not a repo id", hub.url, home)
    assert bad_id.returncode == 2 and "repo id" in bad_id.stderr, (bad_id.returncode, bad_id.stderr)
    not_a_folder = push(tmp_path / "missing", "alice/cli-init", hub.url, home)
    assert not_a_folder.returncode == 2, (not_a_folder.returncode, not_a_folder.stderr)
    wrong_token = push(folder, "alice/cli-init", hub.url, home, token="hf_not_a_valid_token_999")
    assert wrong_token.returncode == 2 and "hf_not_a_valid_token_999" not in wrong_token.stderr, \
        (wrong_token.returncode, wrong_token.stderr)
    unreachable = push(folder, "alice/cli-init", f"http://127.0.0.1:{free_port()}", home)
    assert unreachable.returncode == 5, (unreachable.returncode, unreachable.stderr)
