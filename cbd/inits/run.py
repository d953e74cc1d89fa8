"""The LInit runner: a plan's two adjacent anchors interpolated and streamed into a checkpoint."""

from __future__ import annotations

from pathlib import Path

from cbd.core.artifacts import ArtifactInfo
from cbd.core.manifest import ChainManifest
from cbd.core.plan import Plan
from cbd.inits.calibration import (
    BLOCK_CHECK,
    BLOCK_STEPS,
    Blend,
    block_values,
    calibrate_blocks,
    carried,
    carry_notes,
    grid_losses,
    init_card,
    repair_terms,
    search_bf16,
    search_blocks,
    validation_batches,
)
from cbd.inits.publish import Progress, publish_checkpoint, recipe_of
from cbd.shape.linit import LInit, make_linit
from cbd.store.anchors import load_alignment, load_anchor, tokenizer_dir


def run_linit(plan: Plan, manifest: ChainManifest, *, progress: Progress, chains_root: Path | None = None,
              artifacts_root: Path | None = None) -> ArtifactInfo:
    li, alpha, calib = prepare(plan, manifest, progress=progress, chains_root=chains_root, card=plan.card)
    blend = calib.get("alphas", alpha)  # per block when the plan calibrates per block
    recipe = recipe_of(plan, manifest, alpha, calib)
    total = plan.target.num_params()  # every stored tensor's elements

    def tensors():
        done = 0
        for k, (name, t) in enumerate(li.chunks(blend)):
            yield name, t
            done += t.numel()
            if k % 8 == 0:
                progress({"stage": "writing", "fraction": 0.1 + 0.85 * done / total})

    info = publish_checkpoint(plan, manifest, plan.target, tensors(), recipe=recipe, alpha=alpha, metrics=calib,
                              tokenizer_src=tokenizer_dir(manifest, chains_root), artifacts_root=artifacts_root)
    progress({"stage": "done", "fraction": 1.0})
    return info


def prepare(plan: Plan, manifest: ChainManifest, *, progress: Progress, chains_root: Path | None = None,
            card: bool = False) -> tuple[LInit, float, dict]:
    """What both runners start from: the LInit of the plan's anchors (its pruned readers repaired
    when the plan says so) and its alpha (calibrated when the plan says so). ``calib`` holds what
    was measured: the grid's losses, the repair, and with ``card`` the init card
    (:func:`cbd.inits.calibration.init_card`)."""
    progress({"stage": "loading anchors", "fraction": 0.0})
    li = linit_for(plan, manifest, chains_root)
    names = {"small": plan.small, "big": plan.big}
    alpha, calib, scores, measured = plan.alpha, {}, {}, {}
    bf16 = search_bf16()
    carry = carry_notes(li)
    if carry:
        calib["carry"] = carry
    if plan.trans.repair == "ridge":
        progress({"stage": "repairing pruned units", "fraction": 0.02})
        calib |= repair_terms(li, names, manifest, chains_root, measured)
    batches = validation_batches(manifest, chains_root) if plan.calibrate or card else []
    blend = Blend(li, batches, bf16=bf16) if batches else None  # both terms once, one model, for every loss below
    if blend is not None:
        blend.remember(measured)  # the repaired terms' own losses, on the same batch
    if plan.calibrate:
        progress({"stage": "calibrating alpha", "fraction": 0.05})
        scores = grid_losses(li, batches, blend)
        alpha = min(scores, key=lambda a: (scores[a], abs(a - li.alpha)))
        calib |= {"alpha0": li.alpha, "calibration_loss": {str(a): round(v, 5) for a, v in scores.items()}}
    alphas = None
    if plan.calibrate and plan.alpha_scheme == "blocks":
        progress({"stage": "calibrating alpha per block", "fraction": 0.07})
        notes: dict = {}
        blocks = search_blocks(li.target, sum(int(b[:, 1:].numel()) for b in batches))
        alphas, loss, passes = calibrate_blocks(li, batches, alpha, scores[alpha], blocks=blocks,
                                                values=block_values(alpha), blend=blend, check=BLOCK_CHECK,
                                                notes=notes)
        calib |= {"alphas": alphas, "alphas_loss": round(loss, 5), "alphas_passes": passes,
                  "alphas_search": {"precision": "bf16" if bf16 else "float32", "moves": list(BLOCK_STEPS), "blocks": blocks, **notes}}
    if card:
        progress({"stage": "measuring the init card", "fraction": 0.09})
        calib["card"] = init_card(li, alphas or alpha, names, batches, repair=plan.trans.repair,
                                  scheme=plan.alpha_scheme, blend=blend)
    del blend
    return li, alpha, calib


def linit_for(plan: Plan, manifest: ChainManifest, chains_root: Path | None = None) -> LInit:
    small = load_anchor(manifest, plan.small, chains_root) if plan.small else None
    big = load_anchor(manifest, plan.big, chains_root) if plan.big and plan.big != plan.small else None
    alignment = load_alignment(manifest, plan.small, plan.big, chains_root) if small and big else None
    if getattr(plan.trans, "carry", "none") == "pca":  # the anchor whose residual width is pruned
        if big is not None:
            big = carried(manifest, plan.big, big, plan.target, list(alignment.resid) if alignment else None, chains_root)
        elif small is not None:
            small = carried(manifest, plan.small, small, plan.target, None, chains_root)
    return make_linit(plan.target, small, big, alpha=plan.alpha, alignment=alignment, opts=plan.trans)
