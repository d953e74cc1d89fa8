"""The one executor of plans: anchors in, a published checkpoint folder out.

Idempotent (an existing artifact is returned as is) and atomic (work happens in a staging
folder that is renamed into place), so an RQ retry after a killed worker is always safe.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from cbd import __version__
from cbd.artifacts import ArtifactInfo, load_artifact, publish, staging_dir
from cbd.chainstore import load_alignment, load_anchor, tokenizer_dir
from cbd.checkpoint import model_card, write_config_files, write_weights
from cbd.errors import ChainNotBuiltError, IntegrityError
from cbd.io import LazyReader
from cbd.linit import LInit, alpha_grid, make_linit
from cbd.manifest import ChainManifest, chain_dir, load_manifest
from cbd.model import state_loss
from cbd.plan import Plan

Progress = Callable[[dict], None]


def run_plan(plan: Plan, *, progress: Progress | None = None, chains_root: Path | None = None,
             artifacts_root: Path | None = None) -> ArtifactInfo:
    existing = load_artifact(plan.id, artifacts_root)
    if existing is not None:
        return existing
    report = progress or (lambda _: None)
    manifest = load_manifest(plan.chain, chains_root)
    if manifest.sha256 != plan.manifest_sha256:
        raise ChainNotBuiltError(f"chain {plan.chain!r} changed since this request was planned; send it again")
    if plan.bridge:
        from cbd.bridge import run_bridge  # slow path: another tokenizer

        return run_bridge(plan, manifest, progress=report, chains_root=chains_root, artifacts_root=artifacts_root)
    report({"stage": "loading anchors", "fraction": 0.0})
    li = linit_for(plan, manifest, chains_root)
    alpha, calib = plan.alpha, {}
    if plan.calibrate:
        report({"stage": "calibrating alpha", "fraction": 0.05})
        alpha, calib = calibrate(li, validation_batches(manifest, chains_root))
    recipe = recipe_of(plan, manifest, alpha, calib)
    tmp = staging_dir(plan.id, artifacts_root)
    try:
        total = plan.target.num_params()  # every stored tensor's elements

        def tensors():
            done = 0
            for k, (name, t) in enumerate(li.chunks(alpha)):
                yield name, t
                done += t.numel()
                if k % 8 == 0:
                    report({"stage": "writing", "fraction": 0.1 + 0.85 * done / total})

        write_weights(tmp, plan.target, tensors(), dtype=plan.dtype, recipe=recipe)
        card = model_card(repo_name=f"cbd-{plan.id[:12]}", recipe=recipe, base_model=manifest.source)
        write_config_files(tmp, plan.target, dtype=plan.dtype, recipe=recipe,
                           tokenizer_src=tokenizer_dir(manifest, chains_root), card=card)
        info = publish(tmp, plan.id, {"alpha": alpha, "anchors": recipe["anchors"], "warnings": plan.warnings,
                                      "plan": plan.model_dump(mode="json"), "metrics": calib},
                       artifacts_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report({"stage": "done", "fraction": 1.0})
    return info


def linit_for(plan: Plan, manifest: ChainManifest, chains_root: Path | None = None) -> LInit:
    small = load_anchor(manifest, plan.small, chains_root) if plan.small else None
    big = load_anchor(manifest, plan.big, chains_root) if plan.big and plan.big != plan.small else None
    alignment = load_alignment(manifest, plan.small, plan.big, chains_root) if small and big else None
    return make_linit(plan.target, small, big, alpha=plan.alpha, alignment=alignment, opts=plan.trans)


def validation_batches(manifest: ChainManifest, chains_root: Path | None = None) -> list[torch.Tensor]:
    """The chain's validation tokens (from its training split, never the held-out text)."""
    path = chain_dir(manifest.name, chains_root) / "validation.safetensors"
    if not path.is_file():
        raise IntegrityError(f"chain {manifest.name} has no validation.safetensors: rebuild it to calibrate")
    tokens = LazyReader(path, keep_dtype=True)("tokens").long()
    return list(tokens.split(4))


def calibrate(li: LInit, batches: list[torch.Tensor]) -> tuple[float, dict]:
    """Pick alpha from a grid around alpha0 by validation loss at step 0 (forward passes only)."""
    if li.small is None or li.big is None:
        return li.alpha, {}
    scores = {a: state_loss(li.target, li.state(a), batches) for a in alpha_grid(li.alpha)}
    best = min(scores, key=lambda a: (scores[a], abs(a - li.alpha)))
    return best, {"alpha0": li.alpha, "calibration_loss": {str(a): round(v, 5) for a, v in scores.items()}}


def recipe_of(plan: Plan, manifest: ChainManifest, alpha: float, calib: dict) -> dict:
    used = [manifest.anchor(n) for n in dict.fromkeys(x for x in (plan.small, plan.big) if x)]
    return {
        "id": plan.id, "chain": plan.chain, "chain_manifest_sha256": manifest.sha256,
        "request": {"chain": plan.chain, "architecture": {
            k: getattr(plan.target, k) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                                  "num_key_value_heads", "intermediate_size")},
            "tokenizer": plan.tokenizer, "dtype": plan.dtype, "calibrate": plan.calibrate},
        "target": plan.target.model_dump(mode="json") | {"num_key_value_heads": plan.target.kv_heads},
        "num_params": plan.target.num_params(),
        "anchors": [{"name": a.name, "sha256": a.sha256, "shape": list(a.spec.shape),
                     "non_embedding_params": a.non_embedding_params} for a in used],
        "small": plan.small, "big": plan.big, "alpha": alpha, "alpha_source":
            "calibrate" if plan.calibrate else plan.alpha_source, **calib,
        "trans": plan.trans.model_dump(), "warnings": plan.warnings, "code_version": __version__,
    }
