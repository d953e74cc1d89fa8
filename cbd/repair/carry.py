"""Carry a pruned residual width: rotate the channels a prune may drop onto their principal
directions first, so the channels it keeps hold most of what the dropped ones carried.

Pruning an anchor's residual stream from d_S to d_T channels by importance throws the dropped
channels away; the in-situ repair (:mod:`cbd.repair.refit`) then refits every reader of the stream
on the kept ones, but it can only predict from them what the dropped channels held, never recover
it. Here the anchor is first re-parametrised, function-preserving: the channels the prune is free to
choose among (``rotated``: the bigger anchor's channels the smaller anchor lacks, or the least
important ones of a lone anchor) are turned by an orthogonal ``Q`` onto the principal directions of
their second moment over the anchor's residual stream on calibration text (PCA, uncentred, every
block's input and the final norm's), and ranked by it, so the prune keeps the directions that carry
the most energy instead of the channels that do. The same idea as SliceGPT (Ashkboos et al., 2024),
with one rotation for the whole stream (a stock checkpoint has no place for one per layer) and with
the channels the smaller anchor shares left where they are, so the two anchors stay channel-aligned
for the blend.

Why it preserves the function (RMSNorm family): the stream ``x`` becomes ``R x`` (``R`` the identity
on the fixed channels, ``Q`` on the rotated ones), which keeps every norm; each tensor that writes
the stream (embedding, ``o_proj``, ``down_proj``) gets ``R`` on its output rows; each RMSNorm's
weight on the rotated channels is folded into the tensors that read its output (``W diag(g) R^T``)
and set to 1 there. The one exception is a tied output head: it is the embedding, so the final
norm's weight cannot be folded into it; the final norm keeps the diagonal of ``Q diag(g) Q^T``, an
approximation whose error is the spread of ``g`` over the rotated channels (small: the channels a
prune may drop are the ordinary ones, the outliers are among the fixed ones). Measured on the
`tiny` chain: a2 rotated, not pruned, 6.0485 -> 6.0501 on the validation batch; rotating *every*
channel of a2 instead lost 3.6 nats this way, which is why the most important channels stay fixed
(docs/results.md, "Carrying the pruned residual channels").

A LayerNorm family (GPT-2) is not rotated: its norm subtracts the mean, which a rotation moves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from cbd.core.spec import ModelSpec
from cbd.shape import arch
from cbd.shape.maps import Importance
from cbd.train.models import build_model

__all__ = ["Carry", "RotatedReader", "carried_importance", "carry_rotation", "fixed_channels", "resid_moment", "rotatable",
           "rotated_reader"]

Reader = Callable[[str], Tensor]


def rotatable(spec: ModelSpec) -> bool:
    """Whether ``spec``'s family can be rotated (RMSNorm: no mean to move)."""
    return arch.family(spec).norm == "rms"


def resid_moment(spec: ModelSpec, state: Mapping[str, Tensor], batches: Sequence[Tensor]) -> Tensor:
    """``E[x x^T]`` (d x d, float64) of the residual stream ``x`` at every block's input and at the
    final norm's input, over the tokens of ``batches``: one forward pass of the anchor per batch."""
    d = spec.hidden_size
    acc = {"m": torch.zeros(d, d, dtype=torch.float64), "n": 0}

    def add(h: Tensor) -> None:
        x = h.detach().reshape(-1, d).float()
        acc["m"].add_((x.T @ x).double())
        acc["n"] += x.shape[0]

    model = build_model(spec, state)
    prefix = arch.layer_prefix(spec)
    mods = [model.get_submodule(prefix.format(i=i).rstrip(".")) for i in range(spec.num_hidden_layers)]
    mods.append(model.get_submodule(_final_norm(spec).rsplit(".", 1)[0]))
    hooks = [m.register_forward_pre_hook(lambda m, a, k: add(a[0] if a else k["hidden_states"]), with_kwargs=True)
             for m in mods]
    try:
        with torch.no_grad():
            for b in batches:
                model(input_ids=b[:, :-1], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return acc["m"] / max(acc["n"], 1)


def fixed_channels(spec: ModelSpec, width: int, importance: Importance | None,
                   aligned: Sequence[int] | None = None) -> list[int]:
    """The channels a rotation for a prune of ``spec`` to ``width`` channels leaves where they are:
    those of the aligned smaller anchor (``aligned``: so the blend stays channel-aligned), else the
    ``max(2 width - d, ceil(width / 2))`` most important ones (the prune then keeps the top half of
    the rotated rest when ``width >= 2 d / 3``; never fewer than half the target fixed: the most
    important channels are the stream's outliers, which the tied head's final norm cannot carry
    through a rotation)."""
    if aligned is not None:
        return sorted(set(aligned))
    if importance is None or "resid" not in importance:
        return []
    n = max(2 * width - spec.hidden_size, math.ceil(width / 2))
    return sorted(importance["resid"].argsort(descending=True)[:n].tolist())


@dataclass(frozen=True)
class Carry:
    """A rotation of some residual channels: ``rotated`` (their indices, ascending), ``q`` (float32,
    ``y = q @ x[rotated]``: rows are the principal directions, by energy, highest first) and each
    direction's share of the rotated channels' energy (``energy``, descending, sums to 1)."""

    rotated: Tensor
    q: Tensor
    energy: Tensor

    def kept_energy(self, n: int) -> float:
        """The share of the rotated channels' energy that keeping the top ``n`` directions keeps."""
        return float(self.energy[:n].sum())


def carry_rotation(moment: Tensor, fixed: Sequence[int]) -> Carry | None:
    """The PCA rotation of every channel not in ``fixed`` (None when fewer than two are left)."""
    d = moment.shape[0]
    keep = set(fixed)
    rot = torch.tensor([i for i in range(d) if i not in keep], dtype=torch.long)
    if len(rot) < 2:
        return None
    ev, vec = torch.linalg.eigh(moment[rot][:, rot])
    order = ev.argsort(descending=True)
    ev, vec = ev[order].clamp_min(0), vec[:, order]
    # a deterministic sign per direction (eigh's is arbitrary): its largest entry positive
    sign = torch.sign(vec.gather(0, vec.abs().argmax(0, keepdim=True))).squeeze(0)
    vec = vec * torch.where(sign == 0, 1.0, sign)
    return Carry(rot, vec.T.float().contiguous(), (ev / ev.sum().clamp_min(1e-30)).float())


def carried_importance(importance: Importance | None, d: int, carry: Carry) -> Importance:
    """``importance`` with the residual scores of the rotated coordinates: every fixed channel above
    every rotated direction (they are the more important ones, or the smaller anchor's), the
    directions ranked by energy. Other scores (layers, heads, neurons) are unchanged: the rotation
    does not touch them."""
    out = dict(importance or {})
    scores = torch.full((d,), 2.0)
    scores[carry.rotated] = carry.energy / carry.energy[0].clamp_min(1e-30)  # in [0, 1]
    out["resid"] = scores
    return out


# each RMSNorm and the tensors that read its output (llama family); a tied head is absent
NORM_READERS = {
    "input_layernorm.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "post_attention_layernorm.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "model.norm.weight": ("lm_head.weight",),
}


class RotatedReader:
    """The anchor re-parametrised by a :class:`Carry` (module docstring), one tensor at a time: a
    reader of the same names and shapes (float32 math, each tensor back in its own dtype).

    The last tensor computed is kept, so reading a big tensor block by block (the embedding, in a
    streamed write) rotates it once; ``is_view`` tells LInit which tensors are that kept copy, so
    it copies them before it writes over anything (:class:`cbd.shape.linit.Anchor`)."""

    def __init__(self, spec: ModelSpec, read: Reader, carry: Carry):
        if not rotatable(spec):
            raise ValueError(f"{spec.model_type}: a LayerNorm family's residual stream is not rotated")
        self.spec, self.read, self.carry = spec, read, carry
        self._norm_of = {r: n for n, rs in NORM_READERS.items() for r in rs}
        self._last: tuple[str, Tensor] | None = None

    def __call__(self, name: str) -> Tensor:
        last = self._last
        if last is not None and last[0] == name:
            return last[1]
        t = self._rotated(name)
        self._last = (name, t)
        return t

    def is_view(self, t: Tensor) -> bool:
        last = self._last
        return last is not None and t.numel() > 0 and \
            t.untyped_storage().data_ptr() == last[1].untyped_storage().data_ptr()

    def _rotated(self, name: str) -> Tensor:
        spec, read, c, q = self.spec, self.read, self.carry.rotated, self.carry.q
        layer, key = arch.split_name(name)
        t = read(name)
        prefix = "" if layer is None else arch.layer_prefix(spec).format(i=layer)
        for dim, (axis, io) in enumerate(arch.roles(spec, name)):
            if axis != "resid":
                continue
            if io == "out":  # a writer: R on its output rows
                t = _along(t, dim, c, lambda p: q @ p)
            elif io == "in":  # a reader: its norm's weight folded in, then R^T
                norm = self._norm_of.get(key)
                g = read(prefix + norm).float()[c] if norm is not None else torch.ones(len(c))
                t = _along(t, dim, c, lambda p, g=g: q @ (p * g[:, None]))
            elif io == "norm":
                folded = key in NORM_READERS and not (spec.tie_word_embeddings and key == "model.norm.weight")
                t = _along(t, dim, c, lambda p, folded=folded: torch.ones_like(p) if folded
                           else torch.diagonal(q @ torch.diag(p.reshape(-1)) @ q.T).reshape(-1, 1))
            else:
                raise ValueError(f"{name}: residual role {io!r} is not rotated")
        return t


def rotated_reader(spec: ModelSpec, read: Reader, carry: Carry) -> RotatedReader:
    """``read`` re-parametrised by ``carry``: :class:`RotatedReader`."""
    return RotatedReader(spec, read, carry)


def _along(t: Tensor, dim: int, c: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """``t`` with the entries at ``c`` along ``dim`` replaced by ``fn`` of them (as ``(len(c), -1)``)."""
    out = t.float().movedim(dim, 0).clone()
    part = out[c]
    out[c] = fn(part.reshape(len(c), -1)).reshape(part.shape)
    return out.movedim(0, dim).to(t.dtype).contiguous()


def _final_norm(spec: ModelSpec) -> str:
    return next(n for n, roles in arch.global_table(spec).items() if roles == (("resid", "norm"),))

