"""The cache-miss path as the worker runs it: the weights hashed while they are written (never read
back), anchors verified once per file identity and again on a schedule, token batches kept warm."""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest
import torch

from cbd.core import artifacts
from cbd.core.files import sha256_file
from cbd.core.manifest import anchor_dir, load_manifest
from cbd.core.plan import make_plan
from cbd.core.request import InitRequest
from cbd.errors import IntegrityError
from cbd.inits import calibration
from cbd.run import run_plan
from cbd.store import anchors
from cbd.tensors import header
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


# --- 2. anchors verified once per file identity, and again on a schedule --------------------------


@pytest.fixture
def chain_copy(random_chain, cbd_home, tmp_path):
    root = tmp_path / "chains"
    shutil.copytree(cbd_home / "chains" / random_chain.name, root / random_chain.name)
    anchors._load_anchor.cache_clear()
    yield root, load_manifest(random_chain.name, root)
    anchors._load_anchor.cache_clear()


def _change_in_place(path):
    """Flip the last bytes of ``path`` keeping its size, inode and mtime (what a bad disk does)."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        last = f.read(4)
        f.seek(-4, os.SEEK_END)
        f.write(bytes(b ^ 0xFF for b in last))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)


def test_an_anchor_is_verified_again_after_the_interval_and_not_before(chain_copy, monkeypatch):
    root, manifest = chain_copy
    now = [1000.0]
    hashed: list[str] = []
    monkeypatch.setattr(header, "_clock", lambda: now[0])
    monkeypatch.setattr(header, "sha256_file", lambda p: hashed.append(str(p)) or sha256_file(p))
    monkeypatch.setenv("CBD_ANCHOR_REVERIFY_S", "100")
    name = manifest.anchors[0].name
    weights = anchor_dir(manifest.name, name, root) / "model.safetensors"
    assert weights.is_file()

    first = anchors.load_anchor(manifest, name, root)
    assert hashed == [str(weights)]  # verified on its first load
    now[0] += 99
    assert anchors.load_anchor(manifest, name, root) is first  # warm, and not hashed again
    assert len(hashed) == 1

    _change_in_place(weights)
    assert anchors.load_anchor(manifest, name, root) is first  # not due yet: not seen
    assert len(hashed) == 1
    now[0] += 2  # 101 s after the verification
    with pytest.raises(IntegrityError, match="does not match"):
        anchors.load_anchor(manifest, name, root)
    assert len(hashed) == 2
    with pytest.raises(IntegrityError):  # and at every load after that, whatever the clock
        anchors.load_anchor(manifest, name, root)


def test_reverify_zero_hashes_at_every_load(chain_copy, monkeypatch):
    root, manifest = chain_copy
    hashed: list[str] = []
    monkeypatch.setattr(header, "sha256_file", lambda p: hashed.append(str(p)) or sha256_file(p))
    monkeypatch.setenv("CBD_ANCHOR_REVERIFY_S", "0")
    name = manifest.anchors[-1].name
    for k in range(3):
        anchors.load_anchor(manifest, name, root)
        assert len(hashed) == k + 1
    _change_in_place(anchor_dir(manifest.name, name, root) / "model.safetensors")
    with pytest.raises(IntegrityError):
        anchors.load_anchor(manifest, name, root)


# --- 3. validation and calibration batches kept warm ----------------------------------------------


def test_token_batches_are_read_once_per_file_version_and_cannot_be_corrupted(random_chain, tmp_path, monkeypatch):
    folder = tmp_path / random_chain.name
    folder.mkdir()
    val = torch.arange(8 * 17, dtype=torch.int64).reshape(8, 17)
    cal = torch.arange(6 * 17, dtype=torch.int64).reshape(6, 17) * 3
    write_safetensors(folder / "validation.safetensors", {"tokens": val})
    write_safetensors(folder / "calibration.safetensors", {"tokens": cal})
    opened: list[str] = []
    real = calibration.LazyReader
    monkeypatch.setattr(calibration, "LazyReader", lambda p, **kw: opened.append(p.name) or real(p, **kw))

    first = calibration.validation_batches(random_chain, tmp_path)
    assert torch.equal(torch.cat(first), val) and [b.shape[0] for b in first] == [4, 4]
    tokens = calibration.calibration_tokens(random_chain, tmp_path)
    assert torch.equal(tokens, cal)
    assert sorted(opened) == ["calibration.safetensors", "validation.safetensors"]

    first[0].fill_(-1)  # a caller that writes into what it got
    tokens.zero_()
    again = calibration.validation_batches(random_chain, tmp_path)
    assert torch.equal(torch.cat(again), val)
    assert torch.equal(calibration.calibration_tokens(random_chain, tmp_path), cal)
    assert len(opened) == 2  # no file read again

    new = val.flip(0).contiguous()  # the chain rebuilt: a new file in its place
    tmp = folder / "v.tmp"
    write_safetensors(tmp, {"tokens": new})
    os.replace(tmp, folder / "validation.safetensors")
    assert torch.equal(torch.cat(calibration.validation_batches(random_chain, tmp_path)), new)
    assert opened.count("validation.safetensors") == 2
    assert torch.equal(calibration.calibration_tokens(random_chain, tmp_path), cal)
    assert opened.count("calibration.safetensors") == 1
