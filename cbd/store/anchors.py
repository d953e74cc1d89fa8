"""Anchors on disk: write one atomically, read one lazily and verified.

An anchor folder holds ``model.safetensors`` (weights), ``config.json`` (transformers),
``importance.safetensors`` (scores on the calibration batch, so serving needs no forward
pass) and, for every anchor but the source, ``alignment.json`` (its place inside its parent).
"""

from __future__ import annotations

import json
import os
import shutil
from functools import lru_cache
from pathlib import Path

import torch

from cbd.core.artifacts import pid_alive
from cbd.core.files import file_version, publish_dir, sha256_file
from cbd.core.manifest import AnchorEntry, ChainManifest, anchor_dir, chain_dir
from cbd.core.spec import ModelSpec
from cbd.errors import IntegrityError
from cbd.shape import arch
from cbd.shape.linit import Anchor, compose_alignments
from cbd.shape.maps import Alignment
from cbd.tensors.header import verify
from cbd.tensors.reader import LazyReader
from cbd.tensors.writer import write_safetensors


def write_anchor(root: Path | None, chain: str, name: str, spec: ModelSpec, state: dict[str, torch.Tensor], *,
                 importance: dict[str, torch.Tensor], alignment: Alignment | None, parent: str | None,
                 metrics: dict | None = None) -> AnchorEntry:
    """Write into a staging folder and rename it into place; return the manifest entry."""
    final = anchor_dir(chain, name, root)
    tmp = final.with_name(f".tmp-{name}-{os.getpid()}")
    for old in final.parent.glob(f".tmp-{name}-*"):  # left by a build that was killed (or by us)
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ordered = {n: state[n].detach().float().contiguous() for n in arch.param_names(spec)}
    sha = write_safetensors(tmp / "model.safetensors", ordered, {"format": "pt", "anchor": name, "chain": chain})
    write_safetensors(tmp / "importance.safetensors", {k: v.float().contiguous() for k, v in importance.items()})
    (tmp / "config.json").write_text(json.dumps(spec.to_hf_config(), indent=2))
    if alignment is not None:
        (tmp / "alignment.json").write_text(alignment.model_dump_json())
    entry = AnchorEntry(name=name, spec=spec, sha256=sha, parent=parent,
                        metrics=metrics or {})
    (tmp / "anchor.json").write_text(entry.model_dump_json(indent=2))
    publish_dir(tmp, final, replace=True)
    return entry


def read_entry(root: Path | None, chain: str, name: str) -> AnchorEntry | None:
    """A finished anchor's entry (for resuming a build), or None."""
    p = anchor_dir(chain, name, root) / "anchor.json"
    if not p.is_file():
        return None
    entry = AnchorEntry.model_validate_json(p.read_text())
    model = anchor_dir(chain, name, root) / "model.safetensors"
    return entry if model.is_file() and sha256_file(model) == entry.sha256 else None


@lru_cache(maxsize=8)
def _load_anchor(folder: str, sha256: str, spec_json: str, version: tuple[int, int, int]) -> Anchor:
    folder_p = Path(folder)
    spec = ModelSpec.model_validate_json(spec_json)
    reader = LazyReader(folder_p / "model.safetensors")  # verified by load_anchor, at every load (cbd.tensors.header.verify)
    missing = set(arch.param_names(spec)) - set(reader.keys())
    if missing:
        raise IntegrityError(f"{folder}: anchor lacks tensors {sorted(missing)[:3]}")
    imp_path = folder_p / "importance.safetensors"
    imp = LazyReader(imp_path).load_all() if imp_path.is_file() else None
    return Anchor(spec=spec, read=reader, importance=imp)


def load_anchor(manifest: ChainManifest, name: str, root: Path | None = None) -> Anchor:
    """A verified, lazily read anchor; kept open per process (workers keep anchors and their
    importance warm). Its weights are hashed once per process and file identity, and again when
    that verification is older than ``CBD_ANCHOR_REVERIFY_S`` (3600 s; 0: every load); a file that
    fails is an IntegrityError at every load until the chain is rebuilt."""
    entry = manifest.anchor(name)
    folder = anchor_dir(manifest.name, name, root)
    try:  # a file replaced or rewritten since it was cached is verified again
        st = (folder / "model.safetensors").stat()
    except FileNotFoundError:
        raise IntegrityError(f"anchor {name} of chain {manifest.name} has no model.safetensors: "
                             "rebuild the chain") from None
    version = file_version(st)
    try:
        verify(folder / "model.safetensors", entry.sha256)  # a dict look-up unless new or due again
    except IntegrityError:
        _load_anchor.cache_clear()  # drop the open reader of the bad file
        raise
    return _load_anchor(str(folder), entry.sha256, entry.spec.model_dump_json(), version)


def load_alignment(manifest: ChainManifest, small: str, big: str, root: Path | None = None) -> Alignment | None:
    """Where ``small`` sits inside ``big``, composing alignments along the parent links."""
    path: list[Alignment] = []
    cur = manifest.anchor(small)
    while cur.name != big:
        if cur.parent is None:
            return None  # not descended from big: independent anchors
        p = anchor_dir(manifest.name, cur.name, root) / "alignment.json"
        if not p.is_file():
            raise IntegrityError(f"anchor {cur.name} of chain {manifest.name} lacks alignment.json")
        path.append(Alignment.model_validate_json(p.read_text()))
        cur = manifest.anchor(cur.parent)
    if not path:
        return Alignment.identity(manifest.anchor(small).spec)
    out = path[0]
    for nxt in path[1:]:
        out = compose_alignments(out, nxt)
    return out


def tokenizer_dir(manifest: ChainManifest, root: Path | None = None) -> Path:
    return chain_dir(manifest.name, root) / "tokenizer"
