"""The one publish step of every runner: stage a checkpoint folder, write it, publish it atomically.

Both runners (LInit, ``cbd.inits.run``; bridge, ``cbd.bridge.runner``) write the weights and the
config files of the same kind of folder; they differ only in what they put in it. A failure
anywhere removes the staging folder, so nothing partial is ever visible.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from cbd import __version__
from cbd.core.artifacts import ArtifactInfo, publish, staging_dir
from cbd.core.files import file_version
from cbd.core.manifest import ChainManifest
from cbd.core.plan import Plan
from cbd.core.sources import chain_license
from cbd.core.spec import ModelSpec
from cbd.store.checkpoint import model_card, write_config_files, write_weights

Progress = Callable[[dict], None]


def publish_checkpoint(plan: Plan, manifest: ChainManifest, spec: ModelSpec,
                       tensors: Iterable[tuple[str, torch.Tensor]], *, recipe: dict, alpha: float, metrics: dict,
                       tokenizer_src: Path, extra_card: str = "",
                       finish: Callable[[Path], None] | None = None,
                       artifacts_root: Path | None = None) -> ArtifactInfo:
    """Write ``tensors`` and the config files into a staging folder, then publish it under ``plan.id``.
    The weights' sha256 is the writer's, computed as the bytes went out: the big file is never read back."""
    tmp = staging_dir(plan.id, artifacts_root)
    try:
        weights = tmp / "model.safetensors"
        sha = write_weights(tmp, spec, tensors, dtype=plan.dtype, recipe=recipe)  # hashed as it was written
        written = _identity(weights)
        card = model_card(repo_name=f"cbd-{plan.id[:12]}", recipe=recipe, base_model=manifest.source,
                          license=chain_license(manifest))
        write_config_files(tmp, spec, dtype=plan.dtype, recipe=recipe, tokenizer_src=tokenizer_src,
                           card=card + extra_card)
        if finish is not None:
            finish(tmp)
        known = {weights.name: sha} if _identity(weights) == written else {}  # a finish() that rewrote it: hashed anew
        return publish(tmp, plan.id, {"alpha": alpha, "alpha_source": recipe["alpha_source"], "anchors": recipe["anchors"], "warnings": plan.warnings,
                                      "plan": plan.model_dump(mode="json"), "metrics": metrics}, artifacts_root,
                       hashes=known)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _identity(path: Path) -> tuple[int, int, int]:
    return file_version(path.stat())


def recipe_of(plan: Plan, manifest: ChainManifest, alpha: float, calib: dict) -> dict:
    used = [manifest.anchor(n) for n in dict.fromkeys(x for x in (plan.small, plan.big) if x)]
    return {
        "id": plan.id, "chain": plan.chain, "chain_manifest_sha256": manifest.sha256,
        "request": {"chain": plan.chain, "architecture": {
            k: getattr(plan.target, k) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                                  "num_key_value_heads", "intermediate_size")},
            "tokenizer": plan.tokenizer, "dtype": plan.dtype, "calibrate": plan.calibrate,
            **({} if plan.card else {"card": False})},
        "target": plan.target.model_dump(mode="json") | {"num_key_value_heads": plan.target.kv_heads},
        "num_params": plan.target.num_params(),
        "anchors": [{"name": a.name, "sha256": a.sha256, "shape": list(a.spec.shape),
                     "non_embedding_params": a.non_embedding_params} for a in used],
        "small": plan.small, "big": plan.big, "alpha": alpha, "alpha_source": plan.alpha_source, **calib,
        "trans": plan.trans.model_dump(), "warnings": plan.warnings, "code_version": __version__,
    }
