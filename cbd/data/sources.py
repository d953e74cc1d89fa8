"""A recipe's source model as a local folder: packaged, ``path:`` or ``hf:Org/Name@REV`` (cbd.core.sources).

Everything that can be refused is refused before any weights are read or downloaded: the config
(``cbd.core.sources.check_source_config``), safetensors weights (never a pickle), a tokenizer, a
licence (the model card's, the config's or the recipe's). A Hub source first fetches only
``config.json`` and ``README.md`` at the pinned revision, then the snapshot (safetensors, JSON and
tokenizer files only) into ``$CBD_ASSETS/hub``; ``HF_ENDPOINT`` and ``HF_TOKEN`` are read at call time.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from cbd.core.catalog import TEACHERS
from cbd.core.paths import assets_dir
from cbd.core.sources import SourceRef, card_license, check_source_config, parse_source
from cbd.errors import AssetUnavailableError, RecipeError

log = logging.getLogger("cbd.sources")

INDEX = "model.safetensors.index.json"
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "tf_model.h5", "flax_model.msgpack")
ALLOW = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "README.md"]


@dataclass(frozen=True)
class SourceInfo:
    """What a chain records about its source (``a0``'s metrics, ``source``)."""

    source: str
    kind: str
    license: str
    license_from: str
    config: dict = field(repr=False)
    commit: str | None = None

    def record(self) -> dict:
        out = {"source": self.source, "kind": self.kind, "license": self.license, "license_from": self.license_from}
        if self.commit is not None:
            out["commit"] = self.commit
        return out


def _ref(source: str) -> SourceRef:
    try:
        return parse_source(source)
    except ValueError as exc:
        raise RecipeError(str(exc)) from None


def _hub_kwargs() -> dict:
    return {"endpoint": os.environ.get("HF_ENDPOINT") or None, "token": os.environ.get("HF_TOKEN") or None}


def _hub_error(ref: SourceRef, exc: Exception) -> Exception:
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    if isinstance(exc, RevisionNotFoundError):
        return RecipeError(f"source hf:{ref.name}@{ref.revision}: the repo has no revision {ref.revision!r} at "
                           f"{where}; pin an existing branch, tag or commit sha", allowed={"repo": ref.name})
    if isinstance(exc, GatedRepoError | RepositoryNotFoundError):
        return RecipeError(f"source hf:{ref.name}@{ref.revision}: repo {ref.name!r} not found at {where} (or not "
                           "readable with $HF_TOKEN)")
    if isinstance(exc, LocalEntryNotFoundError):
        return AssetUnavailableError(f"source hf:{ref.name}@{ref.revision}: {where} cannot be reached and the "
                                     "revision is not cached (HF_HUB_OFFLINE set, or the network is down)")
    return AssetUnavailableError(f"source hf:{ref.name}@{ref.revision}: {type(exc).__name__}: {exc}")


def _hub_file(ref: SourceRef, filename: str) -> Path | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    try:
        return Path(hf_hub_download(ref.name, filename, revision=ref.revision, cache_dir=assets_dir() / "hub",
                                    **_hub_kwargs()))
    except RemoteEntryNotFoundError:  # (LocalEntryNotFoundError, offline, is another EntryNotFoundError)
        return None
    except Exception as exc:
        raise _hub_error(ref, exc) from None


def source_info(source: str, recipe_license: str | None = None) -> SourceInfo:
    """Config, licence and (for the Hub) the resolved commit, checked; no weights are read or fetched.
    A packaged model's config is not read here (``config`` is empty): it is built from its package."""
    ref = _ref(source)
    if ref.kind == "packaged":
        cfg: dict = {}
        lic, frm = (recipe_license, "recipe") if recipe_license else (TEACHERS[ref.name].license, "catalog")
        return SourceInfo(source, ref.kind, lic, frm, cfg)
    if ref.kind == "path":
        folder = Path(ref.name)
        if not (folder / "config.json").is_file():
            raise RecipeError(f"source {source}: no config.json in {folder} (a Hugging Face model folder, as "
                              "save_pretrained writes it)")
        cfg_path, card_path, commit = folder / "config.json", folder / "README.md", None
    else:
        cfg_path = _hub_file(ref, "config.json")
        if cfg_path is None:
            raise RecipeError(f"source {source}: the repo has no config.json at {ref.revision!r}")
        card_path = _hub_file(ref, "README.md")
        commit = cfg_path.parent.name if len(cfg_path.parent.name) == 40 else None
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise RecipeError(f"source {source}: config.json is not JSON: {exc}") from None
    try:
        check_source_config(cfg, source)
    except ValueError as exc:
        raise RecipeError(str(exc)) from None
    stated = card_license(card_path.read_text()) if card_path is not None and card_path.is_file() else None
    if recipe_license:
        lic, frm = recipe_license, "recipe"
    elif stated:
        lic, frm = stated, "model card"
    elif isinstance(cfg.get("license"), str) and cfg["license"]:
        lic, frm = cfg["license"], "config"
    else:
        raise RecipeError(f"source {source} states no licence (no 'license:' in its README.md front matter or "
                          "config.json): state it in the recipe, license = \"apache-2.0\" (an SPDX id or the name "
                          "its model card uses)")
    return SourceInfo(source, ref.kind, lic, frm, cfg, commit)


def source_folder(source: str) -> Path:
    """The source as a local folder with safetensors weights (a Hub snapshot is fetched once)."""
    ref = _ref(source)
    if ref.kind == "packaged":
        from cbd.data.teachers import teacher_dir

        return teacher_dir(ref.name)
    if ref.kind == "path":
        folder = Path(ref.name)
    else:
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(ref.name, revision=ref.revision, cache_dir=assets_dir() / "hub",
                                            allow_patterns=ALLOW, **_hub_kwargs()))
        except Exception as exc:
            raise _hub_error(ref, exc) from None
    check_weights(folder, source)
    return folder


def check_weights(folder: Path, source: str) -> None:
    if (folder / "model.safetensors").is_file() or (folder / INDEX).is_file():
        if not (folder / "tokenizer.json").is_file():
            raise RecipeError(f"source {source}: no tokenizer.json in {folder} (a fast tokenizer, as "
                              "tokenizer.save_pretrained writes it)")
        return
    pickles = [p for p in PICKLES if (folder / p).exists()]
    raise RecipeError(f"source {source}: no model.safetensors or {INDEX} in {folder}"
                      + (f" (only {', '.join(pickles)}: cbd reads safetensors only, never a pickle; convert it with "
                         "save_pretrained(..., safe_serialization=True))" if pickles else ""))


def commit_of(folder: Path) -> str | None:
    """The commit of a Hub snapshot folder (its name), else None."""
    return folder.name if folder.parent.name == "snapshots" and len(folder.name) == 40 else None
