"""cbd.store.hub against a local Hub-compatible server (tests/hubserver.py), read back with stock clients.

Large files take the LFS path (HF_HUB_DISABLE_XET): the Xet upload path cannot be exercised
offline. Each test pushes to its own repo, so one server serves the whole module.
"""

from __future__ import annotations

import logging
import socket
import uuid
from pathlib import Path

import httpx
import pytest
import torch
from hubserver import HubServer  # tests/ is on sys.path (pytest rootdir-relative import)
from huggingface_hub import CommitOperationAdd, HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from app.errors import http_status
from cbd.errors import (
    HubAuthError,
    HubConflictError,
    HubError,
    HubPermissionError,
    HubUnavailableError,
    InvalidPushError,
    InvalidRepoIdError,
)
from cbd.store.hub import push_folder, scrub, validate_repo_id

ALICE, BOB = "hf_aliceSECRETtoken0123456789", "hf_bobSECRETtoken9876543210"
WRONG = "hf_wrongSECRETtoken000000000"
SMALL_LFS = 1024  # bytes: model.safetensors (~60 KB) goes LFS, config.json stays regular
SENTENCES = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "the small model reads a short text",
    "chains of models share their weights",
]
README = """---
library_name: transformers
license: apache-2.0
pipeline_tag: text-generation
tags: [cbd, tiny]
---
# tiny-llama

A random tiny Llama for tests.
"""


@pytest.fixture(scope="module", autouse=True)
def local_hub_only():
    """LFS instead of Xet, and online for the local server only (conftest sets HF_HUB_OFFLINE=1).

    huggingface_hub reads both variables once at import: patch the constants it consults.
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "HF_HUB_DISABLE_XET", True)
        mp.setattr(constants, "HF_HUB_OFFLINE", False)
        mp.setenv("HF_HUB_DISABLE_XET", "1")
        mp.delenv("HF_TOKEN", raising=False)
        yield


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with HubServer(tmp_path_factory.mktemp("hub"), tokens={ALICE: "alice", BOB: "bob"}) as server:
        server.lfs_threshold = SMALL_LFS
        yield server


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Llama + a trained WordLevel tokenizer + README, saved as an HF folder."""
    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=37,
        vocab_size=99,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        SENTENCES, trainers.WordLevelTrainer(vocab_size=99, special_tokens=["[UNK]", "[PAD]"])
    )
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(
        folder
    )
    (folder / "README.md").write_text(README)
    return folder, model


@pytest.fixture
def repo_id():
    return f"alice/tiny-{uuid.uuid4().hex[:8]}"


def copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(SENTENCES[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits  # (B, T, vocab)


# -- round trip -----------------------------------------------------------------------------------


@pytest.mark.parametrize("lfs_threshold", [SMALL_LFS, 2**30], ids=["lfs", "all-regular"])
def test_push_reads_back_with_equal_logits(hub, checkpoint, repo_id, tmp_path, lfs_threshold, monkeypatch):
    folder, model = checkpoint
    monkeypatch.setattr(hub, "lfs_threshold", lfs_threshold)
    hub.requests.clear()
    result = push_folder(folder, repo_id, token=ALICE, endpoint=hub.url)

    assert not result.no_op and result.revision == "main"
    assert sorted(result.files) == sorted(p.name for p in folder.iterdir())
    history = hub.history(repo_id)
    assert len(history) == 2 and history[-1].oid == result.commit_sha  # initial commit + one push
    assert sorted(history[-1].changed) == sorted(result.files)  # atomic: all files in one commit
    stored = history[-1].files
    big = {f.name for f in folder.iterdir() if f.stat().st_size >= lfs_threshold}
    assert {p for p, blob in stored.items() if blob.lfs} == big
    assert ("model.safetensors" in big) == (lfs_threshold == SMALL_LFS) and "README.md" not in big
    assert len([p for m, p in hub.requests if m == "PUT" and p.startswith("/_lfs/")]) == len(big)

    api = HfApi(endpoint=hub.url, token=ALICE)
    assert api.repo_info(repo_id).sha == result.commit_sha
    url, auth = f"{hub.url}/{repo_id}/resolve/main/model.safetensors", {"Authorization": f"Bearer {ALICE}"}
    head = httpx.head(url, headers=auth)
    assert head.headers["X-Repo-Commit"] == result.commit_sha
    assert ("X-Linked-Size" in head.headers) == (lfs_threshold == SMALL_LFS)
    ranged = httpx.get(url, headers=auth | {"Range": "bytes=0-7"})  # the safetensors header length
    assert ranged.status_code == 206 and ranged.content == (folder / "model.safetensors").read_bytes()[:8]
    config = hf_hub_download(repo_id, "config.json", endpoint=hub.url, token=ALICE, cache_dir=tmp_path / "c1")
    assert Path(config).read_bytes() == (folder / "config.json").read_bytes()
    local = snapshot_download(repo_id, endpoint=hub.url, token=ALICE, cache_dir=tmp_path / "c2")
    for f in folder.iterdir():
        assert (Path(local) / f.name).read_bytes() == f.read_bytes(), f.name
    loaded = AutoModelForCausalLM.from_pretrained(local).eval()
    tokenizer = AutoTokenizer.from_pretrained(local)
    assert torch.equal(logits(loaded, tokenizer), logits(model, tokenizer))


def test_private_repo_is_unreadable_without_the_owners_token(hub, checkpoint, repo_id, tmp_path):
    push_folder(checkpoint[0], repo_id, token=ALICE, endpoint=hub.url, private=True)
    assert HfApi(endpoint=hub.url).model_info(repo_id, token=ALICE).private
    for i, token in enumerate([False, BOB]):
        with pytest.raises(RepositoryNotFoundError):
            hf_hub_download(
                repo_id, "config.json", endpoint=hub.url, token=token, cache_dir=tmp_path / str(i)
            )
    assert hf_hub_download(repo_id, "config.json", endpoint=hub.url, token=ALICE, cache_dir=tmp_path / "ok")


def test_private_push_into_an_existing_public_repo_is_refused(hub, checkpoint, repo_id):
    push_folder(checkpoint[0], repo_id, token=ALICE, endpoint=hub.url)
    with pytest.raises(HubConflictError, match="public"):
        push_folder(checkpoint[0], repo_id, token=ALICE, endpoint=hub.url, private=True)


def test_new_branch_leaves_main_alone(hub, checkpoint, repo_id, tmp_path):
    main = push_folder(checkpoint[0], repo_id, token=ALICE, endpoint=hub.url)
    changed = copy_folder(checkpoint[0], tmp_path / "v2")
    (changed / "README.md").write_text(README + "\nBranch edit.\n")
    result = push_folder(changed, repo_id, token=ALICE, endpoint=hub.url, revision="exp-1")

    assert not result.no_op and result.revision == "exp-1"
    assert hub.history(repo_id, "main")[-1].oid == main.commit_sha
    assert hub.history(repo_id, "exp-1")[-2].oid == main.commit_sha  # branched from main's head
    assert hub.history(repo_id, "exp-1")[-1].changed == ("README.md",)  # unchanged files skipped
    path = hf_hub_download(
        repo_id, "README.md", revision="exp-1", endpoint=hub.url, token=ALICE, cache_dir=tmp_path / "c"
    )
    assert Path(path).read_text().endswith("Branch edit.\n")


# -- no-op and conditional commits ----------------------------------------------------------------


def test_repush_of_same_folder_is_a_no_op(hub, checkpoint, repo_id):
    first = push_folder(checkpoint[0], repo_id, token=ALICE, endpoint=hub.url)
    hub.requests.clear()
    again = push_folder(checkpoint[0], repo_id, token=ALICE, endpoint=hub.url)

    assert again.no_op and again.commit_sha == first.commit_sha
    assert len(hub.history(repo_id)) == 2
    assert not [p for m, p in hub.requests if m in ("PUT", "POST") and ("/commit/" in p or "/_lfs/" in p)]


def test_huggingface_hub_itself_skips_an_all_unchanged_commit(hub, checkpoint, repo_id):
    """What push_folder relies on when files become identical between its check and its commit."""
    api = HfApi(endpoint=hub.url, token=ALICE)
    api.create_repo(repo_id)
    ops = lambda: [CommitOperationAdd(f.name, str(f)) for f in checkpoint[0].iterdir()]  # noqa: E731
    first = api.create_commit(repo_id, ops(), commit_message="one")
    second = api.create_commit(repo_id, ops(), commit_message="two")
    assert second.oid == first.oid and len(hub.history(repo_id)) == 2  # no commit, head returned


def test_stale_parent_commit_conflicts(hub, checkpoint, repo_id, tmp_path):
    v1 = push_folder(checkpoint[0], repo_id, token=ALICE, endpoint=hub.url)
    folder = copy_folder(checkpoint[0], tmp_path / "work")
    (folder / "README.md").write_text(README + "\nv2\n")
    v2 = push_folder(folder, repo_id, token=ALICE, endpoint=hub.url, parent_commit=v1.commit_sha)
    (folder / "README.md").write_text(README + "\nv3\n")

    with pytest.raises(HubConflictError, match="parent_commit") as err:
        push_folder(folder, repo_id, token=ALICE, endpoint=hub.url, parent_commit=v1.commit_sha)
    assert http_status(err.value) == 409
    assert hub.history(repo_id)[-1].oid == v2.commit_sha
    # Already-present content is a no-op even with a stale parent (idempotent retries).
    (folder / "README.md").write_text(README + "\nv2\n")
    retry = push_folder(folder, repo_id, token=ALICE, endpoint=hub.url, parent_commit=v1.commit_sha[:7])
    assert retry.no_op and retry.commit_sha == v2.commit_sha


# -- failures -------------------------------------------------------------------------------------


def test_wrong_token_is_an_auth_error_without_the_token(hub, checkpoint, repo_id):
    with pytest.raises(HubAuthError) as err:
        push_folder(checkpoint[0], repo_id, token=WRONG, endpoint=hub.url)
    assert http_status(err.value) == 401 and "token" in str(err.value)
    assert WRONG not in str(err.value) and WRONG not in repr(err.value)


@pytest.mark.parametrize("existing", [False, True], ids=["new-repo", "existing-repo"])
def test_writing_into_another_namespace_is_forbidden(hub, checkpoint, repo_id, existing, tmp_path):
    folder = checkpoint[0]
    if existing:  # alice's public repo: bob may read it, not write to it
        push_folder(folder, repo_id, token=ALICE, endpoint=hub.url)
        assert push_folder(folder, repo_id, token=BOB, endpoint=hub.url).no_op  # nothing to write
        folder = copy_folder(folder, tmp_path / "changed")
        (folder / "README.md").write_text(README + "\nby bob\n")
    with pytest.raises(HubPermissionError) as err:
        push_folder(folder, repo_id, token=BOB, endpoint=hub.url)
    assert http_status(err.value) == 403 and "namespace" in str(err.value) and BOB not in str(err.value)
    assert len(hub.history(repo_id)) == 2 if existing else repo_id not in hub.repos


def test_invalid_readme_metadata_is_refused(hub, checkpoint, repo_id, tmp_path):
    folder = copy_folder(checkpoint[0], tmp_path / "bad-card")
    (folder / "README.md").write_text("---\nlicense: [unclosed\n---\n# card\n")
    with pytest.raises(InvalidPushError, match="README") as err:
        push_folder(folder, repo_id, token=ALICE, endpoint=hub.url)
    assert http_status(err.value) == 422 and len(hub.history(repo_id)) == 1  # nothing but the initial commit


def test_unreachable_endpoint_is_unavailable(checkpoint, repo_id):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    with pytest.raises(HubUnavailableError, match="Cannot reach"):
        push_folder(checkpoint[0], repo_id, token=ALICE, endpoint=f"http://127.0.0.1:{port}")


@pytest.mark.parametrize(
    "bad",
    ["tiny", "a/b/c", "alice/-tiny", "alice/tiny.", "alice/ti..ny", "alice/ti--ny", "alice/t y", "alice/x.git",
     "alice/" + "x" * 97, "ålice/tiny", ""],
)  # fmt: skip
def test_invalid_repo_ids_are_refused_before_any_request(hub, checkpoint, bad):
    hub.requests.clear()
    with pytest.raises(InvalidRepoIdError) as err:
        push_folder(checkpoint[0], bad, token=ALICE, endpoint=hub.url)
    assert http_status(err.value) == 422 and repr(bad) in str(err.value) and hub.requests == []


def test_valid_repo_ids_pass():
    for good in ["alice/tiny", "a-b/c_d.e", "Alice/LLaMA-60M", "x/" + "y" * 96, "_x/y_"]:
        assert validate_repo_id(good) == good


# -- the token never leaks ------------------------------------------------------------------------


def test_scrub():
    assert scrub("bad hf_abc and hf_abc again", "hf_abc") == "bad *** and *** again"
    assert scrub("nothing", None) == "nothing" and scrub("nothing", "") == "nothing"


def failing_pushes(hub, folder: Path, tmp_path: Path) -> list[HubError]:
    """A 401, a 403 and a 412, each after a successful push that used ALICE's token."""
    repo_id = f"alice/leak-{uuid.uuid4().hex[:8]}"
    v1 = push_folder(folder, repo_id, token=ALICE, endpoint=hub.url)
    work = copy_folder(folder, tmp_path / repo_id.split("/")[1])
    (work / "README.md").write_text(README + "\nchanged\n")
    push_folder(work, repo_id, token=ALICE, endpoint=hub.url)
    (work / "README.md").write_text(README + "\nchanged again\n")
    errors = []
    for token, parent in [(WRONG, None), (BOB, None), (ALICE, v1.commit_sha)]:
        with pytest.raises(HubError) as err:
            push_folder(work, repo_id, token=token, endpoint=hub.url, parent_commit=parent)
        errors.append(err.value)
    assert [type(e) for e in errors] == [HubAuthError, HubPermissionError, HubConflictError]
    return errors


def assert_no_token(*texts: str) -> None:
    for text in texts:
        assert all(t not in text for t in (ALICE, BOB, WRONG)), text


def test_token_never_appears_in_errors_or_logs(hub, checkpoint, tmp_path, caplog):
    """Every logger at DEBUG (huggingface_hub, httpx2, httpcore2, cbd): no token anywhere."""
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")  # it sets its own level
    for e in failing_pushes(hub, checkpoint[0], tmp_path):
        assert_no_token(str(e), repr(e), str(e.to_dict()))
    assert any(r.name.startswith("httpcore") for r in caplog.records)  # transport logs were on
    assert_no_token(caplog.text)


def test_token_echoed_by_the_server_is_scrubbed(checkpoint, tmp_path, caplog):
    """A server that echoes the Authorization header in every error: huggingface_hub's errors then
    carry the token (checked), HubErrors and the cbd/huggingface_hub logs must not. (httpcore2's
    DEBUG log prints response headers verbatim; no client can scrub what such a server sends.)"""
    caplog.set_level(logging.DEBUG, logger="cbd")
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    with HubServer(tmp_path / "leaky", tokens={ALICE: "alice", BOB: "bob"}, leak_tokens=True) as hub:
        with pytest.raises(HfHubHTTPError) as raw:
            HfApi(endpoint=hub.url, token=WRONG).model_info("alice/anything")
        assert WRONG in str(raw.value)  # the leak is real
        errors = failing_pushes(hub, checkpoint[0], tmp_path)
    for e in errors:
        assert_no_token(str(e), repr(e), str(e.to_dict()))
    assert any("***" in r.getMessage() for r in caplog.records if r.name == "cbd.store.hub")  # scrubbed, logged
    assert_no_token(caplog.text)
