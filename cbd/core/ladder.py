"""Anchor shapes as fractions of the source, resolved to valid shapes; the plan of a build. Torch-free.

A recipe may give an anchor ``fraction = 0.33`` (or the whole ladder, ``ladder = [0.33, 0.11, 0.04]``)
instead of its shape: that share of the source's **non-embedding** parameters. ``resolve_anchors``
turns each into a shape valid for the source: the source's head dim and family, the source's
query-per-kv ratio where the head count allows it (else the nearest divisor below), the source's
FFN/width ratio, widths and FFN sizes rounded to a multiple of ``width_unit``, every axis at most
the previous anchor's (anchors stay channel aligned). Among the head counts and depths that fit, the
one whose parameter count is nearest the target in log scale wins, with a small pull towards
shrinking depth and width alike (``ASPECT_WEIGHT``), as the packaged ladders do.

``estimate_build`` is the rough cost of a build: forward and backward of each student and a
forward of its teacher per distillation token (``6 N_s + 2 N_t`` FLOPs), at ``CPU_FLOPS`` (fitted to
the packaged ``tiny`` chain: 4 minutes on 2 CPU cores), plus nothing for tokenising or evaluation.
"""

from __future__ import annotations

import math
from typing import Any

from cbd.core.recipe import AnchorRecipe, Recipe
from cbd.core.spec import ModelSpec
from cbd.errors import RecipeError

ASPECT_WEIGHT = 0.25
# FLOP/s of a distillation step on the 2-core machines the recipes document, fitted to the packaged
# `tiny` recipe (1.53e13 FLOPs by this count, ~4 minutes documented); the same rate puts `default`
# (1.12e14) at 31 minutes against its documented 45 (its anchors also repair and evaluate more)
CPU_FLOPS = 6.4e10


def width_unit(source: ModelSpec) -> int:
    """Widths and FFN sizes are multiples of this: a power of two, 8 to 64, ~1/16 of the source width."""
    return min(64, max(8, 2 ** int(math.log2(max(1, source.hidden_size // 16)))))


def _kv(heads: int, source: ModelSpec, parent: ModelSpec) -> int | None:
    """kv heads for ``heads`` query heads: at most the parent's kv heads and its query-per-kv ratio (a subset
    of it), the source's ratio where a divisor allows; None when no count fits."""
    if source.family == "gpt2":
        return heads if heads <= parent.kv_heads else None
    fits = [g for g in range(1, min(heads, parent.kv_heads) + 1)
            if heads % g == 0 and heads // g <= parent.kv_group_size]
    if not fits:
        return None
    return min(fits, key=lambda g: (abs(math.log(heads / g / source.kv_group_size)), -g))


def _round(x: float, m: int, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, round(x / m) * m)))


def shape_for(fraction: float, source: ModelSpec, parent: ModelSpec) -> ModelSpec:
    """The valid shape nearest ``fraction`` of ``source``'s non-embedding parameters inside ``parent``."""
    target = fraction * source.non_embedding_params()
    m = width_unit(source)
    tied_width = source.hidden_size == source.num_attention_heads * source.head_dim
    best: tuple[float, ModelSpec] | None = None
    for heads in range(1, parent.num_attention_heads + 1):
        if source.family == "gpt2" or tied_width:
            d = heads * source.head_dim
        else:
            d = _round(source.hidden_size * heads / source.num_attention_heads, m, m, parent.hidden_size)
        if d > parent.hidden_size:
            continue
        kv = _kv(heads, source, parent)
        if kv is None:
            continue
        ffn = _round(source.ffn * d / source.hidden_size, m, min(m, parent.ffn), parent.ffn)
        one = source.with_shape(num_hidden_layers=1, hidden_size=d, num_attention_heads=heads,
                                num_key_value_heads=kv, head_dim=source.head_dim, intermediate_size=ffn)
        for layers in {max(1, min(parent.num_hidden_layers, math.floor(target / one.layer_params()) + k))
                       for k in (0, 1)}:
            spec = one.with_shape(num_hidden_layers=layers)
            n = spec.non_embedding_params()
            aspect = math.log((layers / source.num_hidden_layers) / (d / source.hidden_size))
            score = abs(math.log(n / target)) + ASPECT_WEIGHT * abs(aspect)
            if best is None or score < best[0]:
                best = (score, spec)
    if best is None:
        raise RecipeError(f"no shape of {source.model_type} fits inside {parent.shape}")
    return best[1]


def resolve_anchors(recipe: Recipe, source: ModelSpec, zero: ModelSpec | None = None) -> Recipe:
    """``recipe`` with every fraction anchor given its shape (``zero``: a0's spec when it is not the source)."""
    from cbd.core.plan import target_spec

    parent = zero or source
    anchors: list[AnchorRecipe] = []
    for a in recipe.anchors:
        if a.resolved:
            spec = target_spec(a, source)
            anchors.append(a)
        else:
            spec = shape_for(a.fraction, source, parent)
            if spec.non_embedding_params() >= parent.non_embedding_params():
                raise RecipeError(f"anchor {a.name!r}: fraction {a.fraction} of the source resolves to {spec.shape}, "
                                  f"no smaller than the anchor before it {parent.shape}: give a smaller fraction",
                                  allowed={"fraction": f"< {parent.non_embedding_params() / source.non_embedding_params():.3f}"})
            anchors.append(a.model_copy(update={
                "num_hidden_layers": spec.num_hidden_layers, "hidden_size": spec.hidden_size,
                "num_attention_heads": spec.num_attention_heads, "num_key_value_heads": spec.kv_heads,
                "intermediate_size": spec.ffn, "head_dim": spec.head_dim}))
        parent = spec
    return recipe.model_copy(update={"anchors": anchors})


def estimate_build(recipe: Recipe, specs: list[ModelSpec]) -> dict[str, Any]:
    """Rough build time of a resolved recipe; ``specs``: a0's then every anchor's, in build order."""
    t = recipe.train
    rows, total = [], 0.0
    for k, a in enumerate(recipe.anchors, start=1):
        steps = a.steps if a.steps is not None else t.steps
        tokens = steps * t.batch_size * t.seq_len
        teacher = specs[0] if recipe.mode == "direct" else specs[k - 1]
        flops = tokens * (6 * specs[k].num_params() + 2 * teacher.num_params())
        rows.append({"anchor": a.name, "steps": steps, "tokens": tokens, "flops": flops})
        total += flops
    return {"anchors": rows, "flops": total, "cpu_minutes_2cpu": round(total / CPU_FLOPS / 60, 1),
            "rate": f"{CPU_FLOPS:.2g} FLOP/s (fitted to the tiny chain on 2 CPU cores); a GPU is far faster"}
