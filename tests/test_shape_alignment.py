"""LInit puts both anchors' terms on the same target units, checked against tensors indexed by hand.

B is a random llama-family model; S is B's units at known, deliberately unsorted indices (kv
groups swapped, heads, channels and neurons permuted) plus noise, a "distilled" S. With the
target of B's shape, every unit S has must land on its own B unit::

    LInit[B unit] = alpha * S[unit] + (1 - alpha) * B[B unit]

(S's norm weights scaled by sqrt(d_S / d_B)), every residual channel S lacks is 0 in S's
writers, and the block S lacks is an identity block (its output projections 0). The
expectations index B's and S's tensors directly: nothing here calls Trans or the maps, so a
misplaced anchor (a wrong or ignored alignment) fails them.
"""

from __future__ import annotations

import math

import pytest
import torch
from random_chain import tiny_spec

from cbd.core.plan import TransOptions
from cbd.shape import arch
from cbd.shape.linit import Anchor, make_linit
from cbd.shape.maps import Alignment

DH = 4
B_SPEC = tiny_spec(num_hidden_layers=3, hidden_size=16, num_attention_heads=6, num_key_value_heads=2, head_dim=DH,
                   intermediate_size=12, vocab_size=20, tie_word_embeddings=False)
S_SPEC = tiny_spec(num_hidden_layers=2, hidden_size=10, num_attention_heads=4, num_key_value_heads=2, head_dim=DH,
                   intermediate_size=7, vocab_size=20, tie_word_embeddings=False)
# S's unit k is B's unit ALIGN.<axis>[k]. B has 3 query heads per kv group, S 2: in layer 0,
# S's group 0 is B's group 1 (heads 3-5), so S's heads 0, 1 are B heads in 3..5 (here 4, 3).
ALIGN = Alignment(
    layers=[0, 2],
    resid=[7, 2, 15, 0, 9, 4, 12, 1, 10, 5],
    q=[[4, 3, 1, 0], [1, 0, 4, 3]],
    kv=[[1, 0], [0, 1]],
    ffn=[[11, 3, 0, 8, 5, 9, 1], [2, 10, 4, 7, 0, 6, 11]],
)
# The same S but with heads whose B unit comes after a B head S lacks, in its group (B head 4
# is S's spare in layer 0, group 1): see test_a_spare_head_before_its_real_use_stays_real
ALIGN_SPARE_FIRST = ALIGN.model_copy(update={"q": [[5, 3, 2, 0], [1, 2, 4, 3]]})
# S2 = S with its units permuted: S2's unit k is S's unit PERM.<axis>[k] (groups swapped with their heads)
PERM = Alignment(
    layers=[0, 1],
    resid=[3, 8, 0, 5, 9, 1, 6, 2, 4, 7],
    q=[[3, 2, 0, 1], [2, 3, 1, 0]],
    kv=[[1, 0], [1, 0]],
    ffn=[[6, 0, 4, 1, 3, 5, 2], [1, 0, 2, 6, 5, 4, 3]],
)

GLOBAL_AXES = {  # the axis of each dimension, by hand (None: the vocabulary, never mapped)
    "model.embed_tokens.weight": (None, "resid"),
    "model.norm.weight": ("resid",),
    "lm_head.weight": (None, "resid"),
}
LAYER_AXES = {
    "input_layernorm.weight": ("resid",),
    "self_attn.q_proj.weight": ("q", "resid"),
    "self_attn.k_proj.weight": ("kv", "resid"),
    "self_attn.v_proj.weight": ("kv", "resid"),
    "self_attn.o_proj.weight": ("resid", "q"),
    "post_attention_layernorm.weight": ("resid",),
    "mlp.gate_proj.weight": ("ffn", "resid"),
    "mlp.up_proj.weight": ("ffn", "resid"),
    "mlp.down_proj.weight": ("resid", "ffn"),
}
AXES = GLOBAL_AXES | LAYER_AXES
WRITERS = {"model.embed_tokens.weight": 1, "self_attn.o_proj.weight": 0, "mlp.down_proj.weight": 0}  # resid dim
BLOCK_OUTPUTS = ("self_attn.o_proj.weight", "mlp.down_proj.weight")


def _key(name: str) -> tuple[int | None, str]:
    if name.startswith("model.layers."):
        layer, key = name[len("model.layers."):].split(".", 1)
        return int(layer), key
    return None, name


def _entries(axis: str | None, align: Alignment, s: int | None) -> list[int] | None:
    """The entries of the parent's dimension that the child's dimension holds, in the child's order."""
    if axis is None:
        return None
    if axis == "resid":
        return align.resid
    units = getattr(align, axis)[s]
    return [h * DH + i for h in units for i in range(DH)] if axis in ("q", "kv") else units


def _index(t: torch.Tensor, entries: list[list[int] | None]) -> torch.Tensor:
    for dim, e in enumerate(entries):
        if e is not None:
            t = t.index_select(dim, torch.tensor(e, dtype=torch.long))
    return t


def subset(state: dict, child_layers: int, align: Alignment) -> dict:
    """The child of ``state`` whose unit k is the parent's unit ``align.<axis>[k]``, by hand."""
    out = {name: _index(state[name], [_entries(a, align, None) for a in axes]) for name, axes in GLOBAL_AXES.items()}
    for s in range(child_layers):
        for key, axes in LAYER_AXES.items():
            src = f"model.layers.{align.layers[s]}.{key}"
            out[f"model.layers.{s}.{key}"] = _index(state[src], [_entries(a, align, s) for a in axes])
    return out


def through(first: Alignment, then: Alignment) -> Alignment:
    """A inside C from A inside B (``first``) and B inside C (``then``), by hand."""
    per_layer = {ax: [[getattr(then, ax)[b][u] for u in getattr(first, ax)[s]] for s, b in enumerate(first.layers)]
                 for ax in ("q", "kv", "ffn")}
    return Alignment(layers=[then.layers[b] for b in first.layers], resid=[then.resid[c] for c in first.resid],
                     **per_layer)


@pytest.fixture(scope="module")
def anchors():
    g = torch.Generator().manual_seed(0)
    b_state = {n: torch.randn(arch.tensor_shape(B_SPEC, n), generator=g) for n in arch.param_names(B_SPEC)}
    s_state = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in subset(b_state, 2, ALIGN).items()}
    return b_state, s_state


def check(out: dict, b_state: dict, s_state: dict, align: Alignment, alpha: float) -> None:
    """LInit of S (placed by ``align``) and B onto B's shape, against B and S indexed by hand."""
    c = math.sqrt(S_SPEC.hidden_size / B_SPEC.hidden_size)
    s_of_b = {b: s for s, b in enumerate(align.layers)}
    lacks = [ch for ch in range(B_SPEC.hidden_size) if ch not in align.resid]
    assert set(out) == set(b_state)
    for name, got in out.items():
        b, key = _key(name)
        if b is not None and b not in s_of_b:  # S lacks this block: an identity block in S's term
            if key in BLOCK_OUTPUTS:
                torch.testing.assert_close(got, (1 - alpha) * b_state[name], rtol=1e-5, atol=1e-5, msg=name)
            continue
        s = None if b is None else s_of_b[b]
        entries = [_entries(a, align, s) for a in AXES[key]]
        s_term = s_state[name if b is None else f"model.layers.{s}.{key}"]
        if AXES[key] == ("resid",):  # a norm weight: scaled for the zero channels S gets
            s_term = s_term * c
        want = alpha * s_term + (1 - alpha) * _index(b_state[name], entries)
        torch.testing.assert_close(_index(got, entries), want, rtol=1e-5, atol=1e-5, msg=name)
        if key in WRITERS:  # the channels S lacks are 0 in S's term: only B's remains
            dim = WRITERS[key]
            only_b = [lacks if d == dim else None for d in range(got.dim())]
            torch.testing.assert_close(_index(got, only_b), (1 - alpha) * _index(b_state[name], only_b),
                                       rtol=1e-5, atol=1e-5, msg=name)


OPTS = TransOptions(width_expand="zero")  # S's duplicate heads and neurons read nothing: S's own units stay as they are


def _linit(s_state, b_state, align, alpha):
    small = Anchor(S_SPEC, s_state.__getitem__)
    big = Anchor(B_SPEC, b_state.__getitem__)
    return make_linit(B_SPEC, small, big, alpha=alpha, alignment=align, opts=OPTS).state()


@pytest.mark.parametrize("align", [ALIGN, ALIGN_SPARE_FIRST, through(PERM, ALIGN)])
def test_the_hand_made_alignments_are_valid_gqa_subsets(align):
    r_b, r_s = B_SPEC.kv_group_size, S_SPEC.kv_group_size
    for s in range(2):
        for h, b_head in enumerate(align.q[s]):
            assert b_head // r_b == align.kv[s][h // r_s]
        assert sorted(align.q[s]) != align.q[s] and len(set(align.ffn[s])) == S_SPEC.intermediate_size
    assert sorted(align.resid) != align.resid


@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_linit_puts_each_unit_of_s_on_its_b_unit(anchors, alpha):
    b_state, s_state = anchors
    check(_linit(s_state, b_state, ALIGN, alpha), b_state, s_state, ALIGN, alpha)


def test_permuting_s_with_its_alignment_lands_on_the_same_units(anchors):
    """S2 = S's units in another order, with the alignment permuted the same way: the same
    expectation holds (S2 is B's units at ``through(PERM, ALIGN)``)."""
    b_state, s_state = anchors
    s2 = subset(s_state, 2, PERM)
    align2 = through(PERM, ALIGN)
    assert align2 != ALIGN
    check(_linit(s2, b_state, align2, 0.3), b_state, s2, align2, 0.3)


def test_a_stale_alignment_misplaces_s(anchors):
    """S2 given S's alignment (not permuted along with its units) lands on the wrong units: the
    check against where S2's units really are in B fails, and so does the result."""
    b_state, s_state = anchors
    s2 = subset(s_state, 2, PERM)
    true_align = through(PERM, ALIGN)
    stale = _linit(s2, b_state, ALIGN, 0.3)
    with pytest.raises(AssertionError):
        check(stale, b_state, s2, true_align, 0.3)
    good = _linit(s2, b_state, true_align, 0.3)
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight"):
        assert not torch.allclose(good[name], stale[name]), name


def test_a_spare_head_before_its_real_use_stays_real():
    """A spare copy of an S head placed before that head's own slot in its target kv group must not
    mark the real head as new (a bug this test found: with width_expand="zero" its o_proj columns
    were zeroed)."""
    g = torch.Generator().manual_seed(1)
    b_state = {n: torch.randn(arch.tensor_shape(B_SPEC, n), generator=g) for n in arch.param_names(B_SPEC)}
    s_state = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in subset(b_state, 2, ALIGN_SPARE_FIRST).items()}
    check(_linit(s_state, b_state, ALIGN_SPARE_FIRST, 0.3), b_state, s_state, ALIGN_SPARE_FIRST, 0.3)


def test_the_by_hand_subset_is_what_prune_makes_of_the_same_choice(anchors):
    """``subset`` (the test's own indexing) agrees with Trans on a pure subset, so the
    expectations above are about the same layout Trans writes."""
    from cbd.shape.maps import AxisMap, Maps
    from cbd.shape.trans import trans_state

    b_state, _ = anchors
    sorted_align = Alignment(layers=ALIGN.layers, resid=sorted(ALIGN.resid), q=[sorted(q) for q in ALIGN.q],
                             kv=[sorted(k) for k in ALIGN.kv], ffn=[sorted(f) for f in ALIGN.ffn])
    maps = Maps(resid=AxisMap.keep(sorted_align.resid), layers=AxisMap.keep(sorted_align.layers),
                q=tuple(AxisMap.keep(q) for q in sorted_align.q), kv=tuple(AxisMap.keep(k) for k in sorted_align.kv),
                ffn=tuple(AxisMap.keep(f) for f in sorted_align.ffn))
    by_trans = trans_state(b_state, B_SPEC, S_SPEC, maps)
    by_hand = subset(b_state, 2, sorted_align)
    assert by_trans.keys() == by_hand.keys()
    for k in by_hand:
        assert torch.equal(by_trans[k], by_hand[k]), k
