"""Stock Hub clients fetch inits by name from the service (app/routes/hub.py), with HF_ENDPOINT set.

The clients are the real ones, each run in its own process because huggingface_hub reads
HF_ENDPOINT at import: ``transformers`` 5 ``from_pretrained``, ``snapshot_download``,
``hf_hub_download``, the ``hf download`` command line, and (slow, in the second environment that
tests/test_compat_457.py builds) transformers 4.57 with its huggingface_hub 0.x. The service is an
API process and a worker on the fast queue only, so a bridge (slow queue) stays not ready.
"""

# ruff: noqa: F401, F811  (fixtures are imported from conftest_service and then requested by name)

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest_service import REPO, child_env, children, module_artifacts, redis_db, redis_server

from cbd.core import repo_ids

DB = 15
KEY = "hub-test-key-1"
NAME = "test/L3-d64-h4-kv2-f72"  # between the random chain's anchors: an interpolation on the fast queue
BRIDGE = "test/L2-d48-h3-kv1-f40-gpt2"  # another tokenizer: a bridge job on the slow queue
RETRY_AFTER_S = 1  # the service's Retry-After, so that clients give up on a bridge in seconds

CLIENT = """
import hashlib, json, sys, torch, huggingface_hub, transformers
from pathlib import Path
from huggingface_hub import hf_hub_download, snapshot_download
from transformers import AutoModelForCausalLM, AutoTokenizer
repo = sys.argv[1]
sha = lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest()
out = {"one": sha(hf_hub_download(repo, "config.json"))}
snap = Path(snapshot_download(repo))
out["snapshot"] = {p.name: sha(p) for p in snap.iterdir()}
out["commit"] = snap.name
tok = AutoTokenizer.from_pretrained(repo)
model = AutoModelForCausalLM.from_pretrained(repo)
ids = torch.tensor([tok("the man said that it was time to go").input_ids])
with torch.no_grad():
    out["logits"] = model(ids).logits[0].tolist()
out["layers"] = model.config.num_hidden_layers
out["versions"] = [transformers.__version__, huggingface_hub.__version__]
print(json.dumps(out))
"""

# What a user of from_pretrained sees when the name names no init, or the init is not ready: the exception,
# its whole __cause__ / __context__ chain, the traceback Python prints, and how long the call took.
FROM_PRETRAINED = """
import json, sys, time, traceback
from transformers import AutoModelForCausalLM
out = {}
for repo in sys.argv[1:]:
    t0 = time.monotonic()
    try:
        AutoModelForCausalLM.from_pretrained(repo)
        out[repo] = "no error"
        continue
    except Exception as e:
        chain, todo, seen = [], [e], set()
        while todo:
            x = todo.pop(0)
            if x is None or id(x) in seen:
                continue
            seen.add(id(x))
            chain.append(type(x).__name__ + ": " + str(x))
            todo += [x.__cause__, x.__context__]
        out[repo] = {"top": chain[0], "chain": chain, "printed": "".join(traceback.format_exception(e)),
                     "seconds": time.monotonic() - t0}
print(json.dumps(out))
"""

# No transformers: a second download from the cache, names that name no init, a bridge not ready.
AGAIN = """
import hashlib, json, sys, time
from pathlib import Path
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
repo, bridge, bad = sys.argv[1], sys.argv[2], sys.argv[3:]
out = {"snapshot": snapshot_download(repo), "one": hf_hub_download(repo, "model.safetensors")}
out["bad"] = {}
for name in bad:
    try:
        hf_hub_download(name, "config.json")
        out["bad"][name] = "no error"
    except RepositoryNotFoundError as e:
        out["bad"][name] = str(e)
try:
    snapshot_download(bridge)
    out["bridge"] = "no error"
except Exception as e:
    out["bridge"] = type(e).__name__ + ": " + str(e)
t0 = time.monotonic()
try:  # the HEAD path (from_pretrained's): retried on 503, then the cause says why
    hf_hub_download(bridge, "config.json")
    out["bridge_head"] = "no error"
except Exception as e:
    out["bridge_head"] = [type(e).__name__, str(e.__cause__), time.monotonic() - t0]
print(json.dumps(out))
"""

KEYS = """
import hashlib, json, sys
from pathlib import Path
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HfHubHTTPError
repo, key = sys.argv[1], sys.argv[2]
out = {}
for token in (None, "wrong-key"):
    try:
        hf_hub_download(repo, "config.json", token=token)
        out[str(token)] = "no error"
    except HfHubHTTPError as e:
        out[str(token)] = [e.response.status_code, str(e)]
out["ok"] = hashlib.sha256(Path(hf_hub_download(repo, "config.json", token=key)).read_bytes()).hexdigest()
print(json.dumps(out))
"""


def hub_env(endpoint: str, hf_home: Path, **extra: str) -> dict[str, str]:
    return child_env(HF_ENDPOINT=endpoint, HF_HOME=str(hf_home), HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1",
                     HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", **extra)


def run_client(script: str, env: dict[str, str], *args: str, python: str = sys.executable) -> dict:
    r = subprocess.run([python, "-c", script, *args], capture_output=True, text=True, env=env, cwd=REPO,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def service(redis_server, module_artifacts, children):
    url = redis_db(redis_server, DB)
    children.start("worker-fast", [sys.executable, "-m", "worker.main", "--queues", "fast", "--redis-url", url],
                   child_env())
    base, _ = children.api(url, CBD_SYNC_WAIT_S="60", CBD_RETRY_AFTER_S=str(RETRY_AFTER_S))
    keyed, _ = children.api(url, CBD_SYNC_WAIT_S="60", CBD_API_KEYS=f"other,{KEY}")
    return base, keyed


def post(base: str, name: str) -> tuple[dict, dict[str, str]]:
    """POST /initialize for the body ``name`` stands for: its answer and the sha256 of each file
    GET /checkpoints serves."""
    rn = repo_ids.parse(*name.split("/"))
    with httpx.Client(base_url=base, timeout=120) as client:
        r = client.post("/initialize", json=rn.to_request().model_dump(exclude_none=True))
        assert r.status_code == 200, r.text
        body = r.json()
        digests = {n: hashlib.sha256(client.get(f["url"]).content).hexdigest() for n, f in body["files"].items()}
    return body, digests


@pytest.fixture(scope="module")
def served(service) -> tuple[dict, dict[str, str]]:
    return post(service[0], NAME)


def metric(base: str, method: str, handler: str) -> float:
    """http_requests_total of one route and method with a 2xx answer, from the service's /metrics."""
    want = (f'handler="{handler}"', f'method="{method}"', 'status="2xx"')
    return sum(float(line.rsplit(" ", 1)[1]) for line in httpx.get(base + "/metrics").text.splitlines()
               if line.startswith("http_requests_total{") and all(w in line for w in want))


def assert_same_logits(theirs: list, body: dict, tmp_path: Path) -> None:
    """``theirs`` (a client's logits) equal the logits this process's transformers 5 computes from the files
    ``POST /initialize`` (``body``) links to, up to float32 summation order (thread pools differ between
    processes)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path / "direct"
    folder.mkdir(exist_ok=True)
    for n, f in body["files"].items():
        (folder / n).write_bytes(httpx.get(f["url"]).content)
    tok, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        ours = model(torch.tensor([tok("the man said that it was time to go").input_ids])).logits[0]
    torch.testing.assert_close(torch.tensor(theirs), ours, rtol=1e-5, atol=1e-5)


def test_transformers_and_hub_clients_get_the_bytes_checkpoints_serves(service, module_artifacts, tmp_path):
    base, _ = service
    assert not list(module_artifacts.iterdir())  # nothing made yet: the first HEAD produces the init
    out = run_client(CLIENT, hub_env(base, tmp_path / "hf"), NAME)
    body, digests = post(base, NAME)
    assert out["snapshot"] == digests  # snapshot_download: every file, the same bytes
    assert out["one"] == digests["config.json"]  # hf_hub_download of one file
    assert out["commit"] == body["repo_revision"]  # the cache's snapshot folder is the init's commit
    assert out["layers"] == 3
    assert out["versions"][0].startswith("5.") and not out["versions"][1].startswith("0.")
    # the same weights as the folder /checkpoints serves, loaded here
    assert_same_logits(out["logits"], body, tmp_path)

    # again with the same cache: HEADs only, no file is sent twice; bad names; a bridge not ready
    resolve = "/{chain}/{name}/resolve/{revision}/{filename:path}"
    gets, heads = metric(base, "GET", resolve), metric(base, "HEAD", resolve)
    bad = ["test/L3-d65-h4-kv2-f72", "test/banana", "nochain/L3-d64-h4-kv2-f72", "test/L3-d64-h4-kv2-f72-xx16"]
    again = run_client(AGAIN, hub_env(base, tmp_path / "hf"), NAME, BRIDGE, *bad)
    assert metric(base, "GET", resolve) == gets and metric(base, "HEAD", resolve) > heads
    assert Path(again["snapshot"]).name == body["repo_revision"]
    assert hashlib.sha256(Path(again["one"]).read_bytes()).hexdigest() == digests["model.safetensors"]
    assert "hidden_size 65 is not divisible by num_attention_heads 4" in again["bad"][bad[0]]
    assert "is not an init's repo id" in again["bad"][bad[1]] and repo_ids.FORMAT in again["bad"][bad[1]]
    assert "chain 'nochain' is not built and has no recipe" in again["bad"][bad[2]]
    assert "unknown tokenizer 'xx16'" in again["bad"][bad[3]]
    assert all(repo_ids.FORMAT in again["bad"][name] for name in bad)  # every bad name's message: the format too
    assert "is not ready yet" in again["bridge"] and "bridge to another tokenizer" in again["bridge"]
    assert "Retry in a while" in again["bridge"]
    kind, cause, _ = again["bridge_head"]
    assert kind == "LocalEntryNotFoundError" and "503" in cause and "is not ready yet" in cause


def test_from_pretrained_shows_why_a_name_gives_no_model(service, tmp_path):
    """transformers 5 ``from_pretrained`` as a user calls it. A bad name: transformers' own "is not a valid model
    identifier" on top, raised from huggingface_hub's RepositoryNotFoundError that carries the service's reason
    (and Python prints both). A bridge not ready: after huggingface_hub's retries, transformers' "couldn't connect"
    on top and the service's 503 message down the chain (huggingface_hub turns any HEAD error but 401 and
    not-found into LocalEntryNotFoundError, docs/hub.md), in seconds, not a hang."""
    base, _ = service
    bad = {"test/banana": "is not an init's repo id", "test/L3-d64-h4-kv2-f72-xx16": "unknown tokenizer 'xx16'"}
    out = run_client(FROM_PRETRAINED, hub_env(base, tmp_path / "hf"), *bad, BRIDGE)
    for name, reason in bad.items():
        seen = out[name]
        assert seen["top"].startswith("OSError: ") and "is not a valid model identifier" in seen["top"]
        assert any(c.startswith("RepositoryNotFoundError: ") and reason in c and repo_ids.FORMAT in c
                   for c in seen["chain"])
        assert reason in seen["printed"] and repo_ids.FORMAT in seen["printed"]
    seen = out[BRIDGE]
    assert seen["top"].startswith("OSError: ")
    assert any("503" in c and "is not ready yet" in c and "bridge to another tokenizer" in c for c in seen["chain"])
    assert "is not ready yet" in seen["printed"] and "Retry in a while" in seen["printed"]
    # huggingface_hub retries the 503 five times, each after Retry-After (+1 s): about 10 s (10.1 s measured);
    # six times that leaves room for busy cores and is still no hang
    assert seen["seconds"] < 6 * 5 * (RETRY_AFTER_S + 1), seen["seconds"]


def test_post_answer_names_the_repo(service, served):
    body, _ = served
    assert body["repo_id"] == NAME
    assert body["repo_revision"] == body["artifact_id"] + "0" * 8
    bridge = repo_ids.parse(*BRIDGE.split("/")).to_request().model_dump(exclude_none=True)
    r = httpx.post(service[0] + "/initialize", json=bridge, timeout=60)  # queued: the answer names it too
    assert r.status_code == 202 and r.json()["repo_id"] == BRIDGE
    assert r.json()["repo_revision"] == r.json()["artifact_id"] + "0" * 8
    with_alpha = repo_ids.parse(*NAME.split("/")).to_request().model_dump(exclude_none=True) | {"alpha": 0.25}
    other = httpx.post(service[0] + "/initialize", json=with_alpha, timeout=120).json()
    assert other["repo_id"] == NAME and other["repo_revision"] != body["repo_revision"]  # the sha tells them apart
    head = httpx.head(f"{service[0]}/{NAME}/resolve/{other['repo_revision']}/model.safetensors")
    assert head.headers["etag"] == f'"{other["files"]["model.safetensors"]["sha256"]}"'
    assert head.headers["x-repo-commit"] == other["repo_revision"]


def test_hf_download_command_line(service, served, tmp_path):
    base, _ = service
    _, digests = served
    hf = Path(sys.executable).parent / "hf"
    r = subprocess.run([str(hf), "download", NAME, "--local-dir", str(tmp_path / "out")], capture_output=True,
                       text=True, env=hub_env(base, tmp_path / "hf"), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "out").iterdir() if p.is_file()}
    assert got == digests
    # the CLI prints its own line for RepositoryNotFoundError; HF_DEBUG=1 adds the service's reason
    r = subprocess.run([str(hf), "download", "test/L3-d64-h4"], capture_output=True, text=True,
                       env=hub_env(base, tmp_path / "hf", HF_DEBUG="1"), timeout=300)
    assert r.returncode != 0 and "Model 'test/L3-d64-h4' not found" in r.stderr
    assert "is not an init's repo id" in r.stderr


def test_resolve_headers_range_304_and_revisions(service, served):
    base, _ = service
    body, digests = served
    commit = body["repo_revision"]
    with httpx.Client(base_url=base, timeout=60) as client:
        url = f"/{NAME}/resolve/main/model.safetensors"
        head = client.head(url)
        assert head.status_code == 200
        size = body["files"]["model.safetensors"]["size"]
        assert head.headers["x-repo-commit"] == commit
        assert head.headers["etag"] == f'"{digests["model.safetensors"]}"' == head.headers["x-linked-etag"]
        assert int(head.headers["x-linked-size"]) == size == int(head.headers["content-length"])
        assert "x-linked-size" not in client.head(f"/{NAME}/resolve/main/config.json").headers  # not an LFS file
        assert client.get(url, headers={"If-None-Match": head.headers["etag"]}).status_code == 304
        part = client.get(url, headers={"Range": "bytes=8-15"})
        assert part.status_code == 206 and part.content == client.get(f"/checkpoints/{body['id']}/model.safetensors").content[8:16]
        for rev in (commit, body["artifact_id"]):  # the sha and the bare id are revisions too
            assert client.head(f"/{NAME}/resolve/{rev}/config.json").headers["x-repo-commit"] == commit
        missing = client.head(f"/{NAME}/resolve/main/pytorch_model.bin")
        assert missing.status_code == 404 and missing.headers["x-error-code"] == "EntryNotFound"
        assert missing.headers["x-repo-commit"] == commit
        wrong = client.get(f"/api/models/{NAME}/revision/{'f' * 40}")
        assert wrong.status_code == 404 and wrong.headers["x-error-code"] == "RevisionNotFound"
        info = client.get(f"/api/models/{NAME}/revision/main", params={"blobs": "true"}).json()
        assert info["sha"] == commit and info["id"] == NAME
        sizes = {s["rfilename"]: s["size"] for s in info["siblings"]}
        assert sizes == {n: f["size"] for n, f in body["files"].items()}
        lfs = {s["rfilename"]: s["lfs"]["sha256"] for s in info["siblings"] if "lfs" in s}
        assert lfs == {"model.safetensors": digests["model.safetensors"]}


def test_api_keys_as_hub_tokens(service, served, tmp_path):
    _, keyed = service
    _, digests = served
    out = run_client(KEYS, hub_env(keyed, tmp_path / "hf"), NAME, KEY)
    assert out["None"][0] == 401 and "Authorization: Bearer" in out["None"][1]
    assert out["wrong-key"][0] == 401
    assert out["ok"] == digests["config.json"]


@pytest.mark.slow
def test_transformers_457_from_pretrained(service, served, tmp_path):
    from test_compat_457 import VERSION, _venv

    base, _ = service
    body, digests = served
    env = {k: v for k, v in hub_env(base, tmp_path / "hf").items() if k != "PYTHONPATH"}
    out = run_client(CLIENT, env, NAME, python=str(_venv()))
    assert out["versions"][0] == VERSION and out["versions"][1].startswith("0.")  # the older protocol client
    assert out["snapshot"] == digests and out["one"] == digests["config.json"]
    assert out["commit"] == body["repo_revision"] and out["layers"] == 3
    assert_same_logits(out["logits"], body, tmp_path)  # 4.57 computes what transformers 5 computes here


# The repo id parser alone (torch-free, no service).

@pytest.mark.parametrize(("name", "dtype", "tokenizer"), [
    ("L12-d384-h6-kv2-f1024", "float32", None), ("L12-d384-h6-kv2-f1024-fp32", "float32", None),
    ("L4-d256-h4-kv2-f512-bf16-gpt2", "bfloat16", "gpt2"), ("L4-d256-h4-kv2-f512-fp16", "float16", None),
    ("L4-d256-h4-kv2-f512-gpt2", "float32", "gpt2"), ("L4-d256-h4-kv2-f512-test-words", "float32", "test-words"),
])
def test_repo_ids_parse_to_the_post_body(name, dtype, tokenizer):
    rn = repo_ids.parse("tiny", name)
    req = rn.to_request()
    assert (req.chain, req.dtype, req.tokenizer) == ("tiny", dtype, tokenizer)
    a = req.architecture
    assert f"L{a.num_hidden_layers}-d{a.hidden_size}-h{a.num_attention_heads}-kv{a.num_key_value_heads}-" \
           f"f{a.intermediate_size}" == "-".join(name.split("-")[:5])
    assert repo_ids.parse(*rn.repo_id().split("/")) == rn  # the canonical id names the same request
    assert "-fp32" not in rn.repo_id()


@pytest.mark.parametrize(("name", "says"), [
    ("banana", "is not an init's repo id"), ("l4-d256-h4-kv2-f512", "is not an init's repo id"),
    ("L4-d256-h4-f512", "is not an init's repo id"), ("L0-d256-h4-kv2-f512", "num_hidden_layers: Input should be"),
    ("L4-d256-h4-kv2-f512-Bad", "tokenizer: String should match pattern"),
])
def test_bad_repo_ids_say_what_is_wrong_and_what_is_allowed(name, says):
    from cbd.errors import UnknownNameError

    with pytest.raises(UnknownNameError) as e:
        repo_ids.parse("tiny", name).to_request()
    assert says in e.value.message and repo_ids.FORMAT in e.value.message
    assert e.value.allowed["dtypes"] == ["fp32", "bf16", "fp16"]


def test_commits_are_content_ids():
    aid = "0123456789abcdef" * 2
    assert repo_ids.commit_of(aid) == aid + "00000000"
    assert repo_ids.artifact_of_commit(repo_ids.commit_of(aid)) == aid == repo_ids.artifact_of_commit(aid)
    assert repo_ids.artifact_of_commit("main") is None and repo_ids.artifact_of_commit("f" * 40) is None
