"""Trans, importance and LInit for the GPT-2 family (docs/method.md §3) on tiny random models.

GPT-2 differs from the llama family where Trans can go wrong: Conv1D weights are [in, out],
``c_attn`` fuses q, k and v, LayerNorm has a mean and a bias, positions are learned, every
projection has a bias, and width changes are head changes (hidden = heads * head_dim).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from random_chain import tiny_gpt2_spec
from transformers import AutoModelForCausalLM

from cbd.shape import arch
from cbd.shape.importance import importance
from cbd.shape.linit import Anchor, make_linit, prune
from cbd.shape.maps import choose_maps
from cbd.shape.trans import trans_state
from cbd.store.checkpoint import write_weights
from cbd.train.models import build_model, random_state

TOL = 1e-4


def _perturbed(spec, seed):
    """transformers' init plus noise: distinct logits and a trained model's residual scale."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + (1.0 if k.startswith(("transformer.wte", "transformer.wpe")) else 0.05)
            * torch.randn(v.shape, generator=g) for k, v in random_state(spec, seed=seed).items()}


def _setup(spec):
    state = _perturbed(spec, 0)
    batch = torch.randint(0, spec.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    return spec, state, importance(build_model(spec, state), spec, batch), batch


@pytest.fixture(scope="module")
def src():
    return _setup(tiny_gpt2_spec())


@pytest.fixture(scope="module")
def src_untied():
    return _setup(tiny_gpt2_spec(tie_word_embeddings=False))


def _logits(spec, state, batch):
    with torch.no_grad():
        return build_model(spec, state)(batch).logits


def _grow(spec, state, imp, tgt, **opts):
    return trans_state(state, spec, tgt, choose_maps(spec, tgt, imp), **opts)


def test_tables_match_transformers(src):
    spec, state, _, _ = src
    sd = build_model(spec).state_dict()
    assert set(arch.param_names(spec)) == set(sd) - {"lm_head.weight"}  # tied head: stored once
    for name in arch.param_names(spec):
        assert tuple(sd[name].shape) == arch.tensor_shape(spec, name), name


def test_same_shape_is_identity(src):
    spec, state, imp, _ = src
    out = _grow(spec, state, imp, spec)
    assert out.keys() == state.keys()
    for k in state:
        assert torch.equal(out[k], state[k]), k


EXPANSIONS = [
    (dict(num_hidden_layers=5), dict(depth_expand="identity")),
    (dict(hidden_size=96, num_attention_heads=12), dict(width_expand="clone")),  # heads x2 (and d x2)
    (dict(hidden_size=96, num_attention_heads=12), dict(width_expand="zero")),
    (dict(hidden_size=72, num_attention_heads=9), dict(width_expand="clone")),  # d x1.5: mean channels
    (dict(intermediate_size=80), dict(width_expand="clone")),
    (dict(intermediate_size=74), dict(width_expand="zero")),
    (dict(num_hidden_layers=6, hidden_size=80, num_attention_heads=10, intermediate_size=90),
     dict(width_expand="clone", depth_expand="identity")),
]


@pytest.mark.parametrize("tgt_kw, opts", EXPANSIONS)
def test_function_preserving_expansions(src, tgt_kw, opts):
    spec, state, imp, batch = src
    tgt = spec.with_shape(**tgt_kw)
    out = _grow(spec, state, imp, tgt, **opts)
    diff = (_logits(spec, state, batch) - _logits(tgt, out, batch)).abs().max().item()
    assert diff <= TOL, diff


@pytest.mark.parametrize("tgt_kw, opts", [EXPANSIONS[1], EXPANSIONS[-1]])
def test_function_preserving_expansions_untied_head(src_untied, tgt_kw, opts):
    spec, state, imp, batch = src_untied
    tgt = spec.with_shape(**tgt_kw)
    out = _grow(spec, state, imp, tgt, **opts)
    assert "lm_head.weight" in out
    assert (_logits(spec, state, batch) - _logits(tgt, out, batch)).abs().max() <= TOL


def test_new_residual_channels_carry_the_mean(src):
    """Zero padding would move LayerNorm's mean; new channels hold the real channels' mean."""
    spec, state, imp, _ = src
    tgt = spec.with_shape(hidden_size=72, num_attention_heads=9)
    maps = choose_maps(spec, tgt, imp)
    out = trans_state(state, spec, tgt, maps)
    new = torch.tensor(maps.resid.new)
    for name in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.1.mlp.c_proj.bias"):
        t = out[name]
        assert torch.allclose(t[..., new], t[..., ~new].mean(-1, keepdim=True).expand_as(t[..., new]), atol=1e-6)
    assert torch.equal(out["transformer.h.0.ln_1.bias"][new], torch.zeros(int(new.sum())))


def test_zero_padding_would_not_preserve_layernorm(src, monkeypatch):
    """The llama family's zero channels + norm rescale move LayerNorm's mean: really not exact."""
    spec, state, imp, batch = src
    monkeypatch.setitem(arch.FAMILIES, "gpt2", dataclasses.replace(arch.FAMILIES["gpt2"], norm="rms"))
    tgt = spec.with_shape(hidden_size=96, num_attention_heads=12)
    out = _grow(spec, state, imp, tgt)
    assert (_logits(spec, state, batch) - _logits(tgt, out, batch)).abs().max() > 1e-2


def test_copy_depth_expansion_changes_function(src):
    spec, state, imp, batch = src
    tgt = spec.with_shape(num_hidden_layers=5)
    out = _grow(spec, state, imp, tgt, depth_expand="copy")
    assert (_logits(spec, state, batch) - _logits(tgt, out, batch)).abs().max() > 1e-3


SUBSETS = [
    dict(num_hidden_layers=2),
    dict(hidden_size=32, num_attention_heads=4),
    dict(hidden_size=16, num_attention_heads=2),
    dict(intermediate_size=20),
    dict(num_hidden_layers=1, hidden_size=24, num_attention_heads=3, intermediate_size=11),
    dict(num_hidden_layers=5, hidden_size=24, num_attention_heads=3, intermediate_size=60),  # mixed
]


@pytest.mark.parametrize("tgt_kw", SUBSETS)
def test_subsets_match_target_config(src, tgt_kw):
    spec, state, imp, batch = src
    tgt = spec.with_shape(**tgt_kw)
    out = _grow(spec, state, imp, tgt)
    assert list(out) == arch.param_names(tgt)
    for name, t in out.items():
        assert tuple(t.shape) == arch.tensor_shape(tgt, name), name
    assert torch.isfinite(_logits(tgt, out, batch)).all()


@pytest.mark.parametrize("tgt_kw", [SUBSETS[-2], EXPANSIONS[-1][0]])
def test_checkpoint_loads_in_stock_transformers(src, tmp_path, tgt_kw):
    spec, state, imp, batch = src
    tgt = spec.with_shape(**tgt_kw)
    out = _grow(spec, state, imp, tgt)
    write_weights(tmp_path, tgt, ((n, out[n]) for n in arch.param_names(tgt)), dtype="float32",
                  recipe={"test": "gpt2"})
    (tmp_path / "config.json").write_text(json.dumps(tgt.to_hf_config()))
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # re-tied
    with torch.no_grad():
        assert torch.equal(model(batch).logits, _logits(tgt, out, batch))


def test_importance_reads_conv1d_layout(src):
    """A head whose c_proj rows are zero, or a neuron whose c_proj row is zero, scores 0."""
    spec, state, _, batch = src
    dh = spec.head_dim
    st = dict(state)
    st["transformer.h.1.attn.c_proj.weight"] = st["transformer.h.1.attn.c_proj.weight"].clone()
    st["transformer.h.1.attn.c_proj.weight"][2 * dh:3 * dh] = 0
    st["transformer.h.0.mlp.c_proj.weight"] = st["transformer.h.0.mlp.c_proj.weight"].clone()
    st["transformer.h.0.mlp.c_proj.weight"][5] = 0
    imp = importance(build_model(spec, st), spec, batch)
    assert {k: tuple(v.shape) for k, v in imp.items()} == {"resid": (48,), "block": (3,), "q": (3, 6),
                                                          "ffn": (3, 37)}
    assert imp["q"][1, 2] == 0 and (imp["q"][1, [0, 1, 3, 4, 5]] > 0).all()
    assert imp["ffn"][0, 5] == 0 and (imp["ffn"][0].count_nonzero() == 36)
    assert (imp["block"] > 0).all() and (imp["resid"] > 0).all()


def test_importance_subset_drops_least_important_block(src):
    spec, _, imp, _ = src
    maps = choose_maps(spec, spec.with_shape(num_hidden_layers=2), imp)
    assert set(range(3)) - set(maps.layers.idx) == {int(imp["block"].argmin())}


@pytest.fixture(scope="module")
def pair(src):
    """B = the source; S pruned from it by importance and perturbed ("distilled"), with its alignment."""
    b_spec, b_state, b_imp, batch = src
    s_spec = b_spec.with_shape(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=24)
    s_state, align = prune(b_state, b_spec, b_imp, s_spec)
    g = torch.Generator().manual_seed(2)
    s_state = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in s_state.items()}
    small = Anchor(s_spec, s_state.__getitem__, importance(build_model(s_spec, s_state), s_spec, batch))
    big = Anchor(b_spec, b_state.__getitem__, b_imp)
    return small, big, align, s_state, batch


BETWEEN = [
    dict(num_hidden_layers=3, hidden_size=40, num_attention_heads=5, intermediate_size=30),
    dict(num_hidden_layers=2, hidden_size=48, num_attention_heads=6, intermediate_size=24),
    dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, intermediate_size=37),
]


@pytest.mark.parametrize("shape", BETWEEN)
def test_linit_alpha_one_is_trans_of_small(pair, shape):
    small, big, align, s_state, batch = pair
    tgt = big.spec.with_shape(**shape)
    li = make_linit(tgt, small, big, alpha=0.5, alignment=align)
    one = li.state(1.0)
    direct = trans_state(s_state, small.spec, tgt, li.maps_small)
    assert list(one) == arch.param_names(tgt)
    for k in one:
        assert torch.equal(one[k], direct[k]), k
    # every target here contains S on every axis, so S keeps its function
    assert (_logits(small.spec, s_state, batch) - _logits(tgt, one, batch)).abs().max() <= TOL


def test_linit_interpolates_between_trans_of_both(pair):
    small, big, align, _, batch = pair
    tgt = big.spec.with_shape(**BETWEEN[0])
    li = make_linit(tgt, small, big, alpha=0.25, alignment=align)
    mid, s, b = li.state(0.25), li.state(1.0), li.state(0.0)
    direct_b = trans_state({n: big.read(n) for n in arch.param_names(big.spec)}, big.spec, tgt, li.maps_big)
    for k in mid:
        assert torch.equal(b[k], direct_b[k]), k
        assert torch.allclose(mid[k], 0.25 * s[k] + 0.75 * b[k], atol=1e-6), k
    assert torch.isfinite(_logits(tgt, mid, batch)).all()


def test_positions_and_family_must_match(src):
    spec, state, imp, _ = src
    for tgt in (spec.with_shape(max_position_embeddings=32), spec.with_shape(model_type="llama", head_dim=8)):
        with pytest.raises(ValueError, match="positions|family"):
            _grow(spec, state, imp, tgt)


def _file_anchor(tmp_path, spec, state, imp):
    from cbd.tensors.reader import LazyReader
    from cbd.tensors.writer import write_safetensors

    path = tmp_path / f"{spec.num_hidden_layers}x{spec.hidden_size}.safetensors"
    write_safetensors(path, state)
    return Anchor(spec, LazyReader(path), imp)


@pytest.fixture(scope="module")
def gpt2_pair(src, tmp_path_factory):
    """The source and an anchor pruned from it, both read from files (views), and the alignment."""
    spec, state, imp, batch = src
    child = spec.with_shape(num_hidden_layers=2, hidden_size=24, num_attention_heads=3, num_key_value_heads=3,
                            intermediate_size=20)
    small_state, align = prune(state, spec, imp, child)
    small_imp = importance(build_model(child, small_state), child, batch)
    root = tmp_path_factory.mktemp("gpt2-anchors")
    return _file_anchor(root, child, small_state, small_imp), _file_anchor(root, spec, state, imp), align


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(L=st.integers(1, 5), h=st.integers(1, 8), f=st.integers(1, 80), alpha=st.sampled_from([0.0, 0.4, 1.0]),
       dtype=st.sampled_from(["float32", "bfloat16"]))
def test_any_gpt2_shape_streams_to_a_checkpoint_transformers_loads(gpt2_pair, tmp_path_factory, L, h, f, alpha,
                                                                     dtype):
    """LInit of two GPT-2 anchors, written in row blocks: stock transformers loads it, with the
    parameter count its config implies and finite logits."""
    small, big, align = gpt2_pair
    tgt = big.spec.with_shape(num_hidden_layers=L, hidden_size=8 * h, num_attention_heads=h, num_key_value_heads=h,
                              intermediate_size=f)
    li = make_linit(tgt, small, big, alpha=alpha, alignment=align)
    out = tmp_path_factory.mktemp("gpt2-sweep")
    write_weights(out, tgt, li.chunks(max_bytes=512), dtype=dtype, recipe={"test": "gpt2 sweep"})
    (out / "config.json").write_text(json.dumps(tgt.to_hf_config(dtype=dtype)))
    model = AutoModelForCausalLM.from_pretrained(out).float().eval()
    assert sum(p.numel() for p in model.parameters()) == tgt.num_params()
    with torch.no_grad():
        logits = model(torch.tensor([[3, 4, 5, 6, 7]])).logits
    assert logits.shape == (1, 5, 99) and torch.isfinite(logits).all()
