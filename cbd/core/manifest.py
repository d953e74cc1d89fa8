"""Chain manifests: what a built chain holds. Torch-free.

A chain folder is ``$CBD_CHAINS/<chain>/``; its ``manifest.json`` is written last and
atomically, so a reader either sees a whole chain or none (a half-built chain has anchors
on disk but no manifest).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cbd.core import paths
from cbd.core.files import atomic_write_bytes, canonical_json, file_version
from cbd.core.names import check_name
from cbd.core.spec import ModelSpec
from cbd.errors import ChainNotBuiltError, IntegrityError, UnknownNameError


class AnchorEntry(BaseModel):
    """One anchor: a distilled model of the chain's family and vocabulary."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    spec: ModelSpec
    sha256: str = Field(description="sha256 of model.safetensors")
    parent: str | None = Field(default=None, description="anchor it was pruned from and distilled by")
    metrics: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _derived_counts(cls, data: Any) -> Any:
        """Manifests written before the counts were derived carry them: check and drop them."""
        if isinstance(data, dict) and ("num_params" in data or "non_embedding_params" in data):
            data = dict(data)
            stored = (data.pop("num_params", None), data.pop("non_embedding_params", None))
            spec = ModelSpec.model_validate(data["spec"])
            if stored != (spec.num_params(), spec.non_embedding_params()):
                raise ValueError(f"anchor {data.get('name')!r}: stored parameter counts {stored} do not match "
                                 "its spec")
        return data

    @property
    def num_params(self) -> int:
        return self.spec.num_params()

    @property
    def non_embedding_params(self) -> int:
        return self.spec.non_embedding_params()

    @property
    def size(self) -> int:
        """The size LInit's relative distance is measured in (non-embedding parameters)."""
        return self.non_embedding_params


class ChainManifest(BaseModel):
    """Anchors ordered from the largest (the source) to the smallest."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    source: str
    tokenizer: str
    recipe: dict[str, Any] = Field(default_factory=dict)
    anchors: list[AnchorEntry]
    code_version: str = ""
    created: str = ""

    @property
    def sha256(self) -> str:
        return hashlib.sha256(canonical_json(self.model_dump(mode="json")).encode()).hexdigest()

    @property
    def base(self) -> ModelSpec:
        """The largest anchor's spec: fixed fields (family, vocab, rope) come from it."""
        return self.anchors[0].spec

    def anchor(self, name: str) -> AnchorEntry:
        for a in self.anchors:
            if a.name == name:
                return a
        raise UnknownNameError(f"chain {self.name!r} has no anchor {name!r}",
                               allowed=[a.name for a in self.anchors])


def chain_dir(name: str, root: Path | None = None) -> Path:
    return (root or paths.chains_dir()) / check_name(name, "chain name")


def anchor_dir(chain: str, anchor: str, root: Path | None = None) -> Path:
    return chain_dir(chain, root) / check_name(anchor, "anchor name")


DEFAULT_CHAIN = "default"


def pick_default_chain(default: str, built: list[str]) -> tuple[str, str | None]:
    """The chain a request that names none gets: ``default`` when it is built, else the first built
    chain (with a warning saying so), else ``default`` itself (built on demand, or not at all)."""
    if default in built or not built:
        return default, None
    return built[0], f"the default chain {default!r} is not built; used chain {built[0]!r} instead"


def chains_fingerprint(root: Path | None = None) -> tuple:
    """What a cached answer depends on among the built chains: each manifest's name and file identity
    (inode, size, mtime in ns). Any build, rebuild or removal of a chain changes it; one scandir and a
    stat per chain folder."""
    root = root or paths.chains_dir()
    out = []
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return ()
    for entry in entries:
        try:
            st = os.stat(os.path.join(entry.path, "manifest.json"))
        except OSError:
            continue
        out.append((entry.name, *file_version(st)))
    return tuple(out)


def list_chains(root: Path | None = None) -> list[str]:
    """Names of built chains (those with a manifest)."""
    root = root or paths.chains_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "manifest.json").is_file())


def load_manifest(name: str, root: Path | None = None) -> ChainManifest:
    path = chain_dir(name, root) / "manifest.json"
    if not path.is_file():
        raise ChainNotBuiltError(
            f"chain {name!r} is not built; build it with `cbd chain build {name}`",
            allowed=list_chains(root))
    try:
        return ChainManifest.model_validate_json(path.read_bytes())
    except ValueError as exc:
        raise IntegrityError(f"chain manifest {path} is corrupt: {exc}") from None


def write_manifest(manifest: ChainManifest, root: Path | None = None) -> Path:
    """Atomic publish: the manifest is the last file a build writes."""
    path = chain_dir(manifest.name, root) / "manifest.json"
    atomic_write_bytes(path, manifest.model_dump_json(indent=2).encode())
    return path
