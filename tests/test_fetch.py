"""`cbd fetch` client logic: polling, resumable verified downloads, cache, exit codes.

The service side is exercised end to end in test_e2e_service.py; here an httpx MockTransport
plays the API so that broken downloads, checksum mismatches and refusals can be staged.
"""

from __future__ import annotations

import hashlib

import httpx
import pytest

from cbd.cli.fetch import fetch
from cbd.cli.main import exit_code
from cbd.errors import FetchError

DATA = b"weights" * 1000
SHA = hashlib.sha256(DATA).hexdigest()
AID = "0" * 32


class _Broken(httpx.SyncByteStream):
    def __init__(self, head: bytes) -> None:
        self.head = head

    def __iter__(self):
        yield self.head
        raise httpx.ReadError("connection reset")


def _app(state):
    def handler(req: httpx.Request) -> httpx.Response:
        state["calls"].append((req.method, req.url.path, req.headers.get("range")))
        if req.url.path == "/initialize":
            if state.get("refuse"):
                return httpx.Response(422, json={"error": "ShapeError", "message": "bad"})
            return httpx.Response(202, json={"id": AID, "status": "queued"})
        if req.url.path == f"/jobs/{AID}":
            state["polls"] += 1
            if state["polls"] < 2:
                return httpx.Response(200, json={"id": AID, "status": "started", "progress": {"fraction": 0.5}})
            files = {"model.safetensors": {"url": f"/checkpoints/{AID}/model.safetensors", "size": len(DATA),
                                           "sha256": state.get("sha", SHA)}}
            return httpx.Response(200, json={"id": AID, "status": "finished", "artifact_id": AID, "files": files})
        if req.url.path.startswith("/checkpoints/"):
            rng = req.headers.get("range")
            if state.get("cut") and not rng:  # first attempt: the connection breaks mid-file
                state["cut"] = False
                return httpx.Response(200, stream=_Broken(DATA[:3000]))
            start = int(rng.split("=")[1].rstrip("-")) if rng else 0
            return httpx.Response(206 if rng else 200, content=DATA[start:])
        return httpx.Response(404)
    return handler


@pytest.fixture
def client_state(tmp_path, monkeypatch):
    monkeypatch.setenv("CBD_HOME", str(tmp_path / "home"))
    monkeypatch.setattr("cbd.cli.fetch.time.sleep", lambda s: None)
    state = {"calls": [], "polls": 0}
    return httpx.Client(base_url="http://cbd", transport=httpx.MockTransport(_app(state))), state


def test_polls_downloads_and_verifies(client_state, tmp_path):
    client, state = client_state
    out = fetch({"architecture": {}}, tmp_path / "out", url="http://cbd", client=client)
    assert (out / "model.safetensors").read_bytes() == DATA
    assert state["polls"] == 2


def test_resumes_a_broken_download_with_range(client_state, tmp_path):
    """A run that broke off left a .part file: the next run asks only for the rest."""
    client, state = client_state
    part = tmp_path / "home" / "fetch" / AID / "model.safetensors.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(DATA[:3000])
    out = fetch({"architecture": {}}, tmp_path / "out", url="http://cbd", client=client)
    assert (out / "model.safetensors").read_bytes() == DATA
    ranges = [r for _, p, r in state["calls"] if p.startswith("/checkpoints/")]
    assert ranges == ["bytes=3000-"]


def test_broken_connection_is_exit_5(client_state, tmp_path):
    client, state = client_state
    state["cut"] = True
    with pytest.raises(FetchError) as e:
        fetch({"architecture": {}}, tmp_path / "out", url="http://cbd", client=client)
    assert exit_code(e.value) == 5 and "run the same command again" in str(e.value)


def test_checksum_mismatch_is_exit_4_and_leaves_nothing(client_state, tmp_path):
    client, state = client_state
    state["sha"] = "f" * 64
    with pytest.raises(FetchError) as e:
        fetch({"architecture": {}}, tmp_path / "out", url="http://cbd", client=client)
    assert exit_code(e.value) == 4 and not (tmp_path / "out").exists()


def test_refusal_is_exit_2(client_state, tmp_path):
    client, state = client_state
    state["refuse"] = True
    with pytest.raises(FetchError) as e:
        fetch({"architecture": {}}, tmp_path / "out", url="http://cbd", client=client)
    assert exit_code(e.value) == 2


def test_second_fetch_uses_the_cache(client_state, tmp_path):
    client, state = client_state
    fetch({"architecture": {}}, tmp_path / "a", url="http://cbd", client=client)
    n = sum(1 for _, p, _ in state["calls"] if p.startswith("/checkpoints/"))
    state["polls"] = 5
    fetch({"architecture": {}}, tmp_path / "b", url="http://cbd", client=client)
    assert sum(1 for _, p, _ in state["calls"] if p.startswith("/checkpoints/")) == n


def test_fetch_posts_only_what_the_user_gave(tmp_path):
    """``cbd fetch`` sends the fields given (flags, a spec file), not every default of this version's
    request model: an older service, whose model forbids fields it does not know, still answers a
    request that uses none of them. The body means the same request to the service."""
    import json

    from cbd.cli.fetch import request_body
    from cbd.cli.options import request_from
    from cbd.core.request import InitRequest

    req = request_from(None, 4, 256, 4, None, None, chain=None, dtype=None)
    body = request_body(req)
    assert body == {"architecture": {"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 4}}
    assert InitRequest.model_validate(body) == req
    spec = tmp_path / "shape.json"
    spec.write_text(json.dumps({"architecture": {"num_hidden_layers": 2, "hidden_size": 64,
                                                 "num_attention_heads": 2}, "card": False, "repair": False}))
    req = request_from(spec, None, None, None, 1, None, chain="tiny", dtype="bfloat16")
    body = request_body(req)
    assert body == {"architecture": {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2,
                                     "num_key_value_heads": 1},
                    "card": False, "repair": False, "chain": "tiny", "dtype": "bfloat16"}
    assert InitRequest.model_validate(body) == req and "calibrate" not in body and "blend" not in body
