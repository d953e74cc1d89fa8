"""Invariants of Trans (docs/method.md §3) on tiny random models with odd sizes."""

from __future__ import annotations

import pytest
import torch

from cbd.core.spec import ModelSpec
from cbd.shape import arch
from cbd.shape.importance import importance
from cbd.shape.maps import choose_maps, select_depth
from cbd.shape.trans import trans_state
from cbd.train.models import build_model, random_state

TOL = 1e-4


def _spec(**kw) -> ModelSpec:
    base = dict(
        num_hidden_layers=3,
        hidden_size=48,
        num_attention_heads=6,
        num_key_value_heads=2,
        intermediate_size=37,
        vocab_size=99,
        rope_theta=10000.0,
        norm_eps=1e-6,
    )
    return ModelSpec(**(base | kw))


@pytest.fixture(scope="module")
def src():
    spec = _spec()
    state = random_state(spec, seed=0)
    # transformers' init gives tiny, near-identical logits; perturb so differences show, and
    # give the residual stream a trained model's scale (RMS ~1, far above the norm epsilon)
    g = torch.Generator().manual_seed(1)
    state = {
        k: v + (1.0 if "embed" in k else 0.05) * torch.randn(v.shape, generator=g) for k, v in state.items()
    }
    batch = torch.randint(0, spec.vocab_size, (2, 12), generator=g)
    imp = importance(build_model(spec, state), spec, batch)
    return spec, state, imp, batch


def _logits(spec, state, batch):
    with torch.no_grad():
        return build_model(spec, state)(batch).logits


def _grow(src_spec, state, imp, tgt, **opts):
    maps = choose_maps(src_spec, tgt, imp)
    return trans_state(state, src_spec, tgt, maps, **opts)


def test_same_shape_is_identity(src):
    spec, state, imp, _ = src
    out = _grow(spec, state, imp, spec)
    assert out.keys() == state.keys()
    for k in state:
        assert torch.equal(out[k], state[k]), k


@pytest.mark.parametrize(
    "tgt_kw, opts",
    [
        (dict(num_hidden_layers=5), dict(depth_expand="identity")),
        (dict(hidden_size=72, num_attention_heads=9, num_key_value_heads=3), dict(width_expand="clone")),
        (dict(num_attention_heads=12, num_key_value_heads=4, hidden_size=96), dict(width_expand="zero")),
        (dict(num_attention_heads=12, num_key_value_heads=2, hidden_size=96), dict(width_expand="clone")),
        (dict(num_attention_heads=6, num_key_value_heads=6), dict(width_expand="clone")),
        (dict(intermediate_size=80), dict(width_expand="clone")),
        (dict(intermediate_size=74), dict(width_expand="zero")),
        (
            dict(
                num_hidden_layers=7,
                hidden_size=96,
                num_attention_heads=12,
                num_key_value_heads=4,
                intermediate_size=90,
            ),
            dict(width_expand="clone", depth_expand="identity"),
        ),
    ],
)
def test_function_preserving_expansions(src, tgt_kw, opts):
    spec, state, imp, batch = src
    tgt = spec.with_shape(**tgt_kw)
    out = _grow(spec, state, imp, tgt, **opts)
    diff = (_logits(spec, state, batch) - _logits(tgt, out, batch)).abs().max().item()
    assert diff <= TOL, diff


def test_integer_residual_cloning_is_exact(src):
    """Doubling every axis (HyperCloning's integer case) keeps the logits."""
    spec, state, imp, batch = src
    tgt = spec.with_shape(hidden_size=96, num_attention_heads=12, num_key_value_heads=4, intermediate_size=74)
    out = _grow(spec, state, imp, tgt)
    assert (_logits(spec, state, batch) - _logits(tgt, out, batch)).abs().max() <= TOL


def test_copy_depth_expansion_changes_function(src):
    """The non-exact mode really differs (so the exact test above can fail)."""
    spec, state, imp, batch = src
    tgt = spec.with_shape(num_hidden_layers=5)
    out = _grow(spec, state, imp, tgt, depth_expand="copy")
    assert (_logits(spec, state, batch) - _logits(tgt, out, batch)).abs().max() > 1e-3


@pytest.mark.parametrize(
    "tgt_kw",
    [
        dict(num_hidden_layers=2),
        dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2),
        dict(hidden_size=16, num_attention_heads=2, num_key_value_heads=1),
        dict(intermediate_size=20),
        dict(
            num_hidden_layers=1,
            hidden_size=24,
            num_attention_heads=3,
            num_key_value_heads=1,
            intermediate_size=11,
        ),
    ],
)
def test_subsets_match_target_config(src, tgt_kw):
    spec, state, imp, batch = src
    tgt = spec.with_shape(**tgt_kw)
    out = _grow(spec, state, imp, tgt)
    assert list(out) == arch.param_names(tgt)
    for name, t in out.items():
        assert tuple(t.shape) == arch.tensor_shape(tgt, name), name
    logits = _logits(tgt, out, batch)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("H,G", [(6, 1), (6, 2), (6, 3), (6, 6), (12, 4), (12, 2), (4, 4), (2, 2), (18, 3)])
def test_gqa_bookkeeping(src, H, G):
    """Each target query head comes from the source kv group its target kv head comes from."""
    spec, _, imp, _ = src
    tgt = spec.with_shape(hidden_size=8 * H, num_attention_heads=H, num_key_value_heads=G)
    maps = choose_maps(spec, tgt, imp)
    r_src, r_tgt = spec.kv_group_size, tgt.kv_group_size
    for q, kv in zip(maps.q, maps.kv, strict=True):
        assert len(q.idx) == H and len(kv.idx) == G
        for j, h in enumerate(q.idx):
            assert h // r_src == kv.idx[j // r_tgt]
        real = [h for h, n in zip(q.idx, q.new, strict=True) if not n]
        assert len(real) == len(set(real)), "a real head is used twice"


def test_even_depth_keeps_first_and_last():
    m = select_depth(30, 12, None, by="even")
    assert m.idx[0] == 0 and m.idx[-1] == 29 and len(m.idx) == 12 and not any(m.new)


def test_importance_subset_drops_least_important_block(src):
    spec, state, imp, _ = src
    tgt = spec.with_shape(num_hidden_layers=2)
    maps = choose_maps(spec, tgt, imp)
    dropped = set(range(3)) - set(maps.layers.idx)
    assert dropped == {int(imp["block"].argmin())}
