"""The cache-miss path as the worker runs it: the weights hashed while they are written (never read
back), anchors verified once per file identity and again on a schedule, token batches kept warm."""

from __future__ import annotations

import hashlib

import torch

from cbd.core import artifacts
from cbd.core.files import sha256_file
from cbd.core.plan import make_plan
from cbd.core.request import InitRequest
from cbd.run import run_plan
from cbd.tensors.writer import StreamingWriter, write_safetensors

# --- 1. the writer's hash, and publish not reading the weights back -------------------------------


def test_the_writers_hash_is_that_of_the_file_on_disk_with_row_blocks(tmp_path):
    g = torch.Generator().manual_seed(3)
    tensors = {"a": torch.randn(7, 5, generator=g), "b": torch.randn(3, generator=g).to(torch.bfloat16),
               "c": torch.arange(11, dtype=torch.int64), "d": torch.randn(9, 4, generator=g), "s": torch.tensor(2.5),
               "e": torch.empty(0, 3)}
    layout = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    path = tmp_path / "w.safetensors"
    with StreamingWriter(path, layout, {"note": "x" * 5}) as w:  # a header needing padding
        w.write("a", tensors["a"][:2])
        w.write("a", tensors["a"][2:3])
        w.write("a", tensors["a"][3:])
        w.write("b", tensors["b"])
        w.write("c", tensors["c"])
        w.write_all([("d", tensors["d"][:4]), ("d", tensors["d"][4:]), ("s", tensors["s"]), ("e", tensors["e"])])
        assert w.sha256 is None  # only a closed file has one
    data = path.read_bytes()
    assert w.sha256 == hashlib.sha256(data).hexdigest()
    assert w.size == len(data) == path.stat().st_size
    whole = tmp_path / "whole.safetensors"
    assert write_safetensors(whole, tensors, {"note": "x" * 5}) == w.sha256  # blocks change no byte
    assert whole.read_bytes() == data


def test_publish_takes_known_hashes_and_hashes_only_the_rest(tmp_path, monkeypatch):
    aid = "f" * 32
    tmp = artifacts.staging_dir(aid, tmp_path)
    (tmp / "model.safetensors").write_bytes(b"w" * 1000)
    (tmp / "config.json").write_text("{}")
    read: list[str] = []
    monkeypatch.setattr(artifacts, "sha256_file", lambda p: read.append(p.name) or sha256_file(p))
    known = hashlib.sha256(b"w" * 1000).hexdigest()
    info = artifacts.publish(tmp, aid, {"alpha": 0.5}, tmp_path, hashes={"model.safetensors": known})
    assert read == ["config.json"]
    assert info.files["model.safetensors"].sha256 == known
    assert info.files["model.safetensors"].size == 1000
    assert artifacts.load_artifact(aid, tmp_path) == info


def test_a_miss_never_reads_the_weights_back_to_hash_them(random_chain, cbd_home, tmp_path, monkeypatch):
    read: list[str] = []
    monkeypatch.setattr(artifacts, "sha256_file", lambda p: read.append(p.name) or sha256_file(p))
    arch = dict(num_hidden_layers=2, hidden_size=48, num_attention_heads=3, num_key_value_heads=1, intermediate_size=64)
    plan = make_plan(InitRequest(chain="test", architecture=arch, alpha=0.4, repair=False), random_chain)
    info = run_plan(plan, chains_root=cbd_home / "chains", artifacts_root=tmp_path)
    assert "model.safetensors" not in read
    assert {"config.json", "recipe.json", "README.md"} <= set(read)  # the small files still are
    weights = artifacts.artifact_dir(plan.id, tmp_path) / "model.safetensors"
    assert info.files["model.safetensors"].sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert info.files["model.safetensors"].size == weights.stat().st_size
