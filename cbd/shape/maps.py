"""Which source units each target unit comes from: the plan half of Trans.

A :class:`Maps` says, for every axis of the target, the source index of each unit and whether
that unit is *new* (an expansion: a duplicate head or neuron, a zero residual channel, an
identity block). ``cbd.shape.trans`` executes maps on tensors; this module only chooses them from
importance scores (docs/method.md §3), so it is cheap and testable without weights.

An :class:`Alignment` records how a smaller anchor S sits inside a bigger anchor B (S was
pruned from B, then distilled): S's unit k is B's unit ``alignment.<axis>[k]``. LInit chooses
the target's units in B's coordinates, preferring units S also has, and maps S through the
alignment, so both anchors land on the same target coordinates.

Notation in the comments: ``H`` query heads, ``G`` kv heads (= kv groups: grouped-query
attention shares each kv head among ``r = H / G`` consecutive query heads, its *group*),
``f`` FFN neurons, ``d`` residual channels, suffixed by whose they are (``H_src``, ``G_tgt``,
``r_s``...). Query head ``h`` of a model with ``r`` heads per group is in kv group ``h // r``
at position ``h % r`` within it. Every index below says whose unit it is: ``b`` (a unit of B,
the source of ``choose_maps``), ``s`` (of S), ``j`` (of the target).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict

from cbd.core.spec import ModelSpec
from cbd.shape.axis import AxisMap
from cbd.shape.modes import Subset, mode

__all__ = ["Alignment", "AxisMap", "Importance", "Maps", "choose_maps", "compose", "select", "select_depth",
           "select_heads"]


@dataclass(frozen=True)
class Maps:
    """Per-target-layer maps are indexed by target layer."""

    resid: AxisMap
    layers: AxisMap  # source layer per target layer; new = identity (or copied) block
    q: tuple[AxisMap, ...]
    kv: tuple[AxisMap, ...]
    ffn: tuple[AxisMap, ...]


class Alignment(BaseModel):
    """S inside B: S's unit k is B's unit ``axis[k]`` (per S layer for per-layer axes)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    layers: list[int]
    resid: list[int]
    q: list[list[int]]
    kv: list[list[int]]
    ffn: list[list[int]]

    @classmethod
    def from_maps(cls, maps: Maps) -> Alignment:
        if any(maps.resid.new) or any(maps.layers.new):
            raise ValueError("an alignment comes from a pure subset (no expansion)")
        return cls(layers=list(maps.layers.idx), resid=list(maps.resid.idx),
                   q=[list(m.idx) for m in maps.q], kv=[list(m.idx) for m in maps.kv],
                   ffn=[list(m.idx) for m in maps.ffn])

    @classmethod
    def identity(cls, spec: ModelSpec) -> Alignment:
        L, d, H, G, _, f = spec.shape
        return cls(layers=list(range(L)), resid=list(range(d)), q=[list(range(H))] * L,
                   kv=[list(range(G))] * L, ffn=[list(range(f))] * L)


Importance = dict[str, torch.Tensor]  # resid (d,), block (L,), q (L, H), ffn (L, f)


def select(n_src: int, n_tgt: int, scores: torch.Tensor | None, *, preferred: Sequence[int] = (),
           by: str = "importance") -> AxisMap:
    """Choose ``n_tgt`` of ``n_src`` units; duplicates (``new``) when ``n_tgt > n_src``.

    Preferred units come first (by rank), then the rest, ranked by the ``width_subset`` mode
    ``by`` (:data:`cbd.shape.modes.MODES`). Kept units stay in source order (order matters for depth).
    """
    sub: Subset = mode("width_subset", by)
    return _keep_or_repeat(n_src, n_tgt, sub.rank(n_src, scores), preferred)


def _keep_or_repeat(n_src: int, n_tgt: int, ranked: list[int], preferred: Sequence[int]) -> AxisMap:
    pref = set(preferred)
    order = [i for i in ranked if i in pref] + [i for i in ranked if i not in pref]
    if n_tgt <= n_src:
        return AxisMap.keep(sorted(order[:n_tgt]))
    extra = [order[k % n_src] for k in range(n_tgt - n_src)]
    return AxisMap(tuple(range(n_src)) + tuple(extra), (False,) * n_src + (True,) * len(extra))


def select_depth(n_src: int, n_tgt: int, scores: torch.Tensor | None, *, preferred: Sequence[int] = (),
                 by: str = "importance") -> AxisMap:
    """Layers: a subset by the ``depth_subset`` mode ``by``; expansion by inserted blocks.

    Inserted blocks go after evenly spaced source layers and copy the layer before them.
    """
    if n_tgt <= n_src:
        sub: Subset = mode("depth_subset", by)
        if sub.spaced is not None and not preferred:
            return AxisMap.keep(sub.spaced(n_src, n_tgt))
        return _keep_or_repeat(n_src, n_tgt, sub.rank(n_src, scores), preferred)
    extra = n_tgt - n_src
    after = [min(n_src - 1, (2 * k + 1) * n_src // (2 * extra)) for k in range(extra)]
    idx, new = [], []
    for i in range(n_src):
        idx.append(i)
        new.append(False)
        for _ in range(after.count(i)):
            idx.append(i)
            new.append(True)
    return AxisMap(tuple(idx), tuple(new))


def select_heads(src: ModelSpec, tgt: ModelSpec, q_scores: torch.Tensor | None, *,
                 preferred_q: Sequence[int] = (), by: str = "importance") -> tuple[AxisMap, AxisMap]:
    """GQA bookkeeping: pick kv groups first (group importance), then query heads per group.

    Every target query head comes from the source group its target kv head comes from, so
    attention stays exact for kept heads; repeated groups split a source group's heads.
    Returns ``(kv, q)``: ``kv.idx`` (G_tgt,) the source kv group of each target kv head,
    ``q.idx`` (H_tgt,) the source query head of each target query head.
    """
    r_src = src.kv_group_size  # query heads per kv group, source
    r_tgt = tgt.kv_group_size  # query heads per kv group, target
    # (G_src,) kv-group scores: the sum of the group's query-head scores (q_scores: (H_src,))
    g_scores = None if q_scores is None else q_scores.view(src.kv_heads, r_src).sum(1)
    kv = select(src.kv_heads, tgt.kv_heads, g_scores,
                preferred=sorted({h // r_src for h in preferred_q}), by=by)  # groups of the preferred heads
    q_idx: list[int] = []  # (H_tgt,) source query head of each target query head, group after group
    q_new: list[bool] = []
    # source kv group -> its (source query head, new) picks not yet handed to a target kv head
    pending: dict[int, list[tuple[int, bool]]] = {}
    for g_src in kv.idx:  # each target kv head in turn: g_src, the source kv group it copies
        if g_src not in pending:  # first target kv head on g_src: pick for all its copies at once
            copies = kv.idx.count(g_src)  # target kv heads on g_src (> 1: a repeated group)
            first = g_src * r_src  # the group's query heads are first .. first + r_src - 1
            within_scores = None if q_scores is None else q_scores[first:first + r_src]  # (r_src,)
            within_pref = [h - first for h in preferred_q if h // r_src == g_src]  # positions in g_src
            # (copies * r_tgt,) positions within g_src; a repeat (new) once all r_src are used
            pick = select(r_src, copies * r_tgt, within_scores, preferred=within_pref, by=by)
            pending[g_src] = [(first + pos, n) for pos, n in zip(pick.idx, pick.new, strict=True)]
        # this target kv head's r_tgt query heads: the next r_tgt picks of g_src, in head order
        mine, pending[g_src] = pending[g_src][:r_tgt], pending[g_src][r_tgt:]
        for q_src, n in sorted(mine):
            q_idx.append(q_src)
            q_new.append(n)
    return kv, AxisMap(tuple(q_idx), tuple(q_new))


def choose_maps(src: ModelSpec, tgt: ModelSpec, imp: Importance | None, *,
                depth_by: str = "importance", width_by: str = "importance",
                prefer: Alignment | None = None) -> Maps:
    """Target units in the source's coordinates, preferring units of ``prefer`` (S in B).

    ``src`` is B when ``prefer`` is given: every index here is a B unit.
    """
    imp = imp or {}
    layers = select_depth(src.num_hidden_layers, tgt.num_hidden_layers, imp.get("block"),
                          preferred=prefer.layers if prefer else (), by=depth_by)
    resid = select(src.hidden_size, tgt.hidden_size, imp.get("resid"),
                   preferred=prefer.resid if prefer else (), by=width_by)
    s_of_b = {b: s for s, b in enumerate(prefer.layers)} if prefer else {}  # B layer -> the S layer on it
    q, kv, ffn = [], [], []
    for b in layers.idx:  # b: the B layer target layer j copies
        s = s_of_b.get(b)  # the S layer that came from b (None: S dropped it), whose units to prefer
        qs = None if "q" not in imp else imp["q"][b]  # (H_src,) query-head scores of layer b
        fs = None if "ffn" not in imp else imp["ffn"][b]  # (f_src,)
        k_map, q_map = select_heads(src, tgt, qs, preferred_q=prefer.q[s] if s is not None else (), by=width_by)
        kv.append(k_map)
        q.append(q_map)
        ffn.append(select(src.ffn, tgt.ffn, fs, preferred=prefer.ffn[s] if s is not None else (), by=width_by))
    return Maps(resid=resid, layers=layers, q=tuple(q), kv=tuple(kv), ffn=tuple(ffn))


def compose(maps_b: Maps, align: Alignment, s_spec: ModelSpec, s_imp: Importance | None) -> Maps:
    """Maps for S onto the same target units as ``maps_b`` (which is in B's coordinates).

    A target unit that S has (through the alignment) is taken from S; any other unit is new
    for S: a zero residual channel, a duplicate head or neuron, or an identity block. S
    therefore keeps its function wherever the target is at least as large as S.
    """
    s_imp = s_imp or {}
    resid = _through(maps_b.resid, align.resid, s_imp.get("resid"))  # (d_tgt,) S channels
    s_of_b = {b: s for s, b in enumerate(align.layers)}  # B layer -> the S layer on it
    l_idx: list[int] = []  # (L_tgt,) S layer of each target layer
    l_new: list[bool] = []
    real: list[int] = []  # S layers used so far, each once (in target order)
    for b, b_new in zip(maps_b.layers.idx, maps_b.layers.new, strict=True):  # B layer of target layer j
        s = s_of_b.get(b)
        if s is not None and not b_new and s not in real:
            real.append(s)
            l_idx.append(s)
            l_new.append(False)
        else:  # identity block copying the last real S layer so far (or S's first layer)
            l_idx.append(real[-1] if real else 0)
            l_new.append(True)
    q, kv, ffn = [], [], []
    tgt_like = _spec_like(s_spec, maps_b)
    for j, (s, n) in enumerate(zip(l_idx, l_new, strict=True)):  # target layer j from S layer s
        if n:  # an identity block's own units do not matter for S's function: pick S's best
            qs = None if "q" not in s_imp else s_imp["q"][s]  # (H_s,)
            k_map, q_map = select_heads(s_spec, tgt_like, qs)
            kv.append(k_map)
            q.append(q_map)
            fs = None if "ffn" not in s_imp else s_imp["ffn"][s]  # (f_s,)
            ffn.append(select(s_spec.ffn, len(maps_b.ffn[j].idx), fs))
            continue
        k_map = _through(maps_b.kv[j], align.kv[s], None)  # (G_tgt,) S kv group of each target kv head
        kv.append(k_map)
        q.append(_heads_through(maps_b.q[j], align.q[s], k_map, s_spec))  # (H_tgt,) S query heads
        ffn.append(_through(maps_b.ffn[j], align.ffn[s], None if "ffn" not in s_imp else s_imp["ffn"][s]))
    return Maps(resid=resid, layers=AxisMap(tuple(l_idx), tuple(l_new)), q=tuple(q), kv=tuple(kv),
                ffn=tuple(ffn))


def _through(m_b: AxisMap, align: Sequence[int], s_scores: torch.Tensor | None) -> AxisMap:
    """Map target units given as B units onto S units; units S lacks become new duplicates.

    ``m_b.idx`` (n_tgt,): the B unit of each target unit; ``align`` (n_s,): the B unit of each
    S unit; ``s_scores`` (n_s,) or None. Returns (n_tgt,) S units.
    """
    s_of_b: dict[int, int] = {}  # B unit -> the (first) S unit on it
    for s, b in enumerate(align):
        s_of_b.setdefault(b, s)
    ranked = mode("width_subset", "importance").rank(len(align), s_scores)  # S units, best first
    idx, new, seen = [], [], set()
    k = 0  # target units S lacks so far: they take S's best units round robin
    for b, b_new in zip(m_b.idx, m_b.new, strict=True):
        s = s_of_b.get(b)
        if s is not None:  # S has this unit: take it (a repeat of it is S's own duplicate)
            idx.append(s)
            new.append(b_new or s in seen)
            seen.add(s)
        else:
            idx.append(ranked[k % len(ranked)])
            new.append(True)
            k += 1
    return AxisMap(tuple(idx), tuple(new))


def _heads_through(q_b: AxisMap, align_q: Sequence[int], kv_s: AxisMap, s_spec: ModelSpec) -> AxisMap:
    """Query heads of S for target heads given in B units, consistent with S's kv map.

    ``q_b.idx`` (H_tgt,): the B query head of each target query head; ``align_q`` (H_s,): the
    B query head of each S query head; ``kv_s.idx`` (G_tgt,): the S kv group of each target kv
    head. Target query head ``j`` (in target kv head ``j // r_t``) takes its B head's S head
    when S has it *in that S group*; otherwise a head of that S group, round robin, as new.
    Returns (H_tgt,) S query heads, each in the S group its target kv head maps to.
    """
    r_t = len(q_b.idx) // len(kv_s.idx)  # query heads per kv group, target
    r_s = s_spec.kv_group_size  # query heads per kv group, S
    s_of_b = {b: s for s, b in enumerate(align_q)}  # B query head -> the S query head on it
    idx, new = [], []
    real: set[int] = set()  # S heads already placed as themselves (spare copies do not count)
    for j_g, g_s in enumerate(kv_s.idx):  # target kv head j_g uses S kv group g_s
        group = [g_s * r_s + i for i in range(r_s)]  # (r_s,) S query heads of group g_s
        spare = 0  # heads of the group handed out for target heads S lacks (round robin)
        for b, b_new in zip(q_b.idx[j_g * r_t:(j_g + 1) * r_t], q_b.new[j_g * r_t:(j_g + 1) * r_t], strict=True):
            s = s_of_b.get(b)  # the S query head on B head b (None: S dropped it)
            if s is not None and s // r_s == g_s:  # S has it, in the group this kv head reads
                new.append(b_new or s in real)  # a second real use of s is a duplicate
                real.add(s)
                idx.append(s)
            else:
                idx.append(group[spare % r_s])
                new.append(True)
                spare += 1
    return AxisMap(tuple(idx), tuple(new))


def _spec_like(s_spec: ModelSpec, maps_b: Maps) -> ModelSpec:
    """S's spec with the target's head counts (H_tgt, G_tgt), for choosing an identity block's heads."""
    heads = len(maps_b.q[0].idx) if maps_b.q else s_spec.num_attention_heads
    kv = len(maps_b.kv[0].idx) if maps_b.kv else s_spec.kv_heads
    return s_spec.model_copy(update={"num_attention_heads": heads, "num_key_value_heads": kv})

