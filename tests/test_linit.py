"""LInit invariants on a tiny random chain (real files, real alignments)."""

from __future__ import annotations

import pytest
import torch
from random_chain import tiny_spec

from cbd.core.plan import LInitOptions
from cbd.shape import arch
from cbd.shape.linit import make_linit
from cbd.shape.maps import choose_maps
from cbd.shape.trans import trans_state
from cbd.store.anchors import load_alignment, load_anchor
from cbd.train.models import build_model

TOL = 1e-4


@pytest.fixture(scope="module")
def pair(random_chain):
    m = random_chain
    small, big = load_anchor(m, "a1"), load_anchor(m, "a0")
    return m, small, big, load_alignment(m, "a1", "a0")


def _logits(spec, state, batch):
    with torch.no_grad():
        return build_model(spec, state)(batch).logits


BETWEEN = [  # between a1 (3x64, 4/2 heads, f64) and a0 (4x96, 6/2 heads, f96)
    dict(num_hidden_layers=3, hidden_size=96, num_attention_heads=6, num_key_value_heads=2, intermediate_size=80),
    dict(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64),
    dict(num_hidden_layers=4, hidden_size=80, num_attention_heads=5, num_key_value_heads=5, intermediate_size=70),
    dict(num_hidden_layers=4, hidden_size=96, num_attention_heads=6, num_key_value_heads=2, intermediate_size=72),
]


@pytest.mark.parametrize("shape", BETWEEN)
def test_alpha_one_is_trans_of_small_and_keeps_its_function(pair, shape):
    """The plain blend: alpha = 1 gives exactly Trans(S); a target containing S keeps S's logits."""
    m, small, big, align = pair
    tgt = tiny_spec(**shape)
    li = make_linit(tgt, small, big, alpha=0.5, alignment=align, opts=LInitOptions(blend="plain"))
    one = li.state(1.0)
    direct = trans_state(small.read, small.spec, tgt, li.maps_small)
    for k in one:
        assert torch.equal(one[k], direct[k]), k
    batch = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    s_state = {n: small.read(n) for n in arch.param_names(small.spec)}
    assert (_logits(small.spec, s_state, batch) - _logits(tgt, one, batch)).abs().max() <= TOL


@pytest.mark.parametrize("shape", BETWEEN)
def test_fade_holds_bigs_units_where_small_has_none_and_keeps_its_function(pair, shape):
    """The default blend ("fade"): at alpha 1 the small term is S's Trans with new units 0 where S has
    its own parameters, B's Trans where a tensor reads from a unit, channel or layer S lacks, and 0
    where a tensor writes into the residual from one; S's logits exactly."""
    m, small, big, align = pair
    tgt = tiny_spec(**shape)
    li = make_linit(tgt, small, big, alpha=0.5, alignment=align)
    one, zero = li.state(1.0), li.state(0.0)
    grown = trans_state(small.read, small.spec, tgt, li.maps_small, width_expand="zero")
    faded = 0
    for n in one:
        own = li.own(n)
        if own is None:
            assert torch.equal(one[n], grown[n]), n
            continue
        faded += 1
        own = own.expand_as(one[n])
        assert torch.equal(one[n][own], grown[n][own]) and torch.equal(one[n][~own], zero[n][~own]), n
        assert not torch.equal(one[n], grown[n]), n  # B's units, not S's copies
    assert faded
    s_new = {axis: any(getattr(li.maps_small, axis).new) for axis in ("resid",)}
    assert s_new["resid"] or any(li.maps_small.layers.new) or any(any(m.new) for m in li.maps_small.ffn)
    for n in one:  # every tensor that writes into the residual: 0 wherever S lacks the writer or the channel
        j, key = arch.split_name(n)
        if ("resid", "out") in (arch.layer_table(tgt) | arch.family(tgt).global_table)[key]:
            assert li.own(n) is None and torch.equal(one[n], grown[n]), n
    batch = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    s_state = {n: small.read(n) for n in arch.param_names(small.spec)}
    assert (_logits(small.spec, s_state, batch) - _logits(tgt, one, batch)).abs().max() <= TOL


@pytest.mark.parametrize("alpha", [0.2, 0.5, 0.8])
def test_fade_is_the_lerp_of_its_endpoints_bit_for_bit(pair, alpha):
    """What calibration scores (``Blend``: lerp of the two endpoint states) is what the writer writes
    (``LInit.tensor`` at that alpha), bit for bit; B's units that S lacks stay B's where they are read
    and come in at ``1 - alpha`` where they write."""
    m, small, big, align = pair
    tgt = tiny_spec(**BETWEEN[3])
    li = make_linit(tgt, small, big, alpha=0.5, alignment=align)
    mid, s, b = li.state(alpha), li.state(1.0), li.state(0.0)
    for n in mid:
        assert torch.equal(mid[n], torch.lerp(b[n], s[n], alpha)), n
        own = li.own(n)
        if own is not None:
            own = own.expand_as(mid[n])
            assert torch.equal(mid[n][~own], b[n][~own]), n


@pytest.mark.parametrize("shape", BETWEEN)
def test_alpha_zero_is_trans_of_big(pair, shape):
    m, small, big, align = pair
    tgt = tiny_spec(**shape)
    li = make_linit(tgt, small, big, alpha=0.3, alignment=align)
    zero = li.state(0.0)
    direct = trans_state(big.read, big.spec, tgt, choose_maps(big.spec, tgt, big.importance, prefer=align))
    assert all(torch.equal(zero[k], direct[k]) for k in zero)


def test_interpolation_is_convex_combination(pair):
    m, small, big, align = pair
    tgt = tiny_spec(**BETWEEN[0])
    li = make_linit(tgt, small, big, alpha=0.25, alignment=align)
    mid, s, b = li.state(0.25), li.state(1.0), li.state(0.0)
    for k in mid:
        assert torch.allclose(mid[k], 0.25 * s[k] + 0.75 * b[k], atol=1e-6)


def test_same_shape_as_anchor_is_that_anchor(pair):
    m, small, big, align = pair
    li = make_linit(big.spec, None, big, alpha=0.0)
    out = li.state()
    for n in arch.param_names(big.spec):
        assert torch.equal(out[n], big.read(n))


def test_alignment_points_into_parent(pair):
    m, small, big, align = pair
    L, d, H, G, _, f = small.spec.shape
    assert len(align.layers) == L and len(set(align.layers)) == L
    assert len(align.resid) == d and max(align.resid) < big.spec.hidden_size
    for s in range(L):
        r_b, r_s = big.spec.kv_group_size, small.spec.kv_group_size
        for h, b_head in enumerate(align.q[s]):
            assert b_head // r_b == align.kv[s][h // r_s]


def test_composed_alignment_two_steps(random_chain):
    """a2 inside a0 (composed through a1) on every field, by hand: per-layer axes index through
    the a1 layer in between."""
    a2_in_a0 = load_alignment(random_chain, "a2", "a0")
    a2_in_a1 = load_alignment(random_chain, "a2", "a1")
    a1_in_a0 = load_alignment(random_chain, "a1", "a0")
    assert a2_in_a0.layers == [a1_in_a0.layers[m] for m in a2_in_a1.layers]
    assert a2_in_a0.resid == [a1_in_a0.resid[i] for i in a2_in_a1.resid]
    for field in ("q", "kv", "ffn"):
        want = []
        for s, m in enumerate(a2_in_a1.layers):  # a2 layer s is a1 layer m
            want.append([getattr(a1_in_a0, field)[m][u] for u in getattr(a2_in_a1, field)[s]])
        assert getattr(a2_in_a0, field) == want, field
    assert set(type(a2_in_a0).model_fields) == {"layers", "resid", "q", "kv", "ffn"}  # a new field: compare it here


def test_composed_alignment_points_at_the_weights_a2_came_from(random_chain):
    """a2 was pruned from a1, a1 from a0, each perturbed by 0.01 noise: a0's tensors indexed by
    the composed alignment are a2's to within that noise (any other unit is ~0.05+ away)."""
    big, small = load_anchor(random_chain, "a0"), load_anchor(random_chain, "a2")
    al = load_alignment(random_chain, "a2", "a0")
    dh = big.spec.head_dim

    def rows(heads):
        return torch.tensor([h * dh + i for h in heads for i in range(dh)])

    resid = torch.tensor(al.resid)
    close = {"model.embed_tokens.weight": big.read("model.embed_tokens.weight")[:, resid]}
    for s, b in enumerate(al.layers):
        p, q = f"model.layers.{b}.", f"model.layers.{s}."
        ffn = torch.tensor(al.ffn[s])
        close[q + "self_attn.q_proj.weight"] = big.read(p + "self_attn.q_proj.weight")[rows(al.q[s])][:, resid]
        close[q + "self_attn.k_proj.weight"] = big.read(p + "self_attn.k_proj.weight")[rows(al.kv[s])][:, resid]
        close[q + "self_attn.o_proj.weight"] = big.read(p + "self_attn.o_proj.weight")[resid][:, rows(al.q[s])]
        close[q + "mlp.gate_proj.weight"] = big.read(p + "mlp.gate_proj.weight")[ffn][:, resid]
        close[q + "mlp.down_proj.weight"] = big.read(p + "mlp.down_proj.weight")[resid][:, ffn]
    for name, want in close.items():
        assert (small.read(name) - want).abs().max() < 0.1, name
