"""Trans: map one model's weights onto a target shape (docs/method.md §3). Pure functions.

Executes a :class:`~cbd.shape.maps.Maps` tensor by tensor. Expansions are function preserving:

- residual width, llama family (RMSNorm): new channels are zero in every tensor that writes
  the residual stream and every RMSNorm weight is scaled by ``sqrt(n_real / d_T)``, which keeps
  the normalised values of the real channels (RMS over zero-padded channels shrinks by that
  factor; exact up to the norm epsilon, whose relative weight grows by d_T / n_real);
- residual width, GPT-2 family (LayerNorm, with a mean and a bias): zero padding is *not*
  function preserving (it moves the mean), so every new channel carries the mean of the real
  channels instead: each writer's (``wte``, ``wpe``, ``c_proj`` weights and biases) new row is
  the mean of its real rows, so by linearity the stream's new channels always equal the mean of
  its real ones. The LayerNorm mean is then unchanged, the variance shrinks by exactly
  ``n_real / d_T`` and the new channels normalise to 0; scaling the LayerNorm weights by
  ``sqrt(n_real / d_T)`` and zeroing the new channels' LayerNorm biases keeps every output. Exact
  up to the epsilon (as for RMSNorm: its weight grows by d_T / n_real, ~1e-4 on the logits of a
  tiny random model with a unit-scale residual and eps 1e-5 when d doubles; negligible at a
  trained model's residual scale) and float rounding; readers of the new channels see zeros;
- heads and FFN neurons (``clone``): duplicates share their reader's columns, divided by the
  number of copies (Net2Net / HyperCloning); (``zero``): the duplicates' reader columns are 0.
  GPT-2's fused ``c_attn`` is split into its q, k and v blocks, each mapped by the head map
  (GPT-2 has no GQA: kv heads are the query heads), and re-fused;
- kv heads: repeated (each query head keeps its own group's keys and values);
- depth (``identity``): an inserted block copies its neighbour with its attention-output and
  FFN-down projections zeroed (GPT-2: both ``c_proj`` weights and biases), so it adds nothing
  to the residual stream; (``copy``) keeps them.

GPT-2's learned positions (``wpe``) follow the residual map only: source and target must
agree on ``max_position_embeddings``.

Subsets just drop units (never exact; for GPT-2 the dropped residual channels also change the
LayerNorm statistics, as RMSNorm's). ``trans_tensor`` computes one target tensor from a reader,
so the executor can stream a checkpoint as large as the teacher through memory one tensor at a time.

Trans maps and scales; it never frees. Every tensor it computes is new memory from ``alloc``
(``torch.empty`` unless the caller passes another allocator of the same signature: the streamed
write passes :func:`cbd.tensors.pool.empty`, and gives the intermediates back itself once the
target tensor is computed). What it returns may also be the reader's own tensor (nothing to map).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Literal

import torch

from cbd.core.spec import ModelSpec
from cbd.shape import arch
from cbd.shape.axis import AxisMap
from cbd.shape.maps import Maps
from cbd.shape.modes import RESID_FILL, ZERO, Alloc, DepthExpand, Expand, mode

__all__ = ["Alloc", "Reader", "fresh", "rows_independent", "trans_state", "trans_tensor"]

Reader = Callable[[str], torch.Tensor]
WidthExpandName = Literal["clone", "zero"]  # cbd.shape.modes.MODES["width_expand"]
DepthExpandName = Literal["identity", "copy"]  # cbd.shape.modes.MODES["depth_expand"]


def fresh(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The default :data:`~cbd.shape.modes.Alloc`: plain new memory."""
    return torch.empty(shape, dtype=dtype)


def trans_tensor(name: str, read: Reader, src: ModelSpec, tgt: ModelSpec, maps: Maps, *,
                 width_expand: WidthExpandName = "clone", depth_expand: DepthExpandName = "identity",
                 alloc: Alloc = fresh) -> torch.Tensor:
    """The target tensor ``name`` (a name of the target's checkpoint) from the source.

    Intermediates (and the result) come from ``alloc``; none is freed here (module docstring).
    """
    if src.family != tgt.family:
        raise ValueError(f"Trans maps within one family: {src.model_type!r} -> {tgt.model_type!r}")
    if src.family == "gpt2" and src.max_position_embeddings != tgt.max_position_embeddings:
        raise ValueError(f"learned positions are kept as they are: max_position_embeddings "
                         f"{src.max_position_embeddings} -> {tgt.max_position_embeddings}")
    width: Expand = mode("width_expand", width_expand)
    depth: DepthExpand = mode("depth_expand", depth_expand)
    resid: Expand = mode("resid_fill", RESID_FILL[arch.family(tgt).norm])
    layer, key = arch.split_name(name)
    if layer is None:
        roles = arch.global_table(tgt)[key]
        out = read(name)
    else:
        roles = arch.layer_table(tgt)[key]
        out = read(arch.layer_prefix(src).format(i=maps.layers.idx[layer]) + key)
    # the strided gathers (dims >= 1) first, on the smaller source; the row gather (whole rows,
    # contiguous copies) last. Gathers copy exactly and each dimension is scaled once, so the
    # order changes no value.
    for dim in sorted(range(len(roles)), key=lambda d: d == 0):
        axis, io = roles[dim]
        m = axis_map(maps, axis, layer)
        if m is None:
            continue
        out = _apply_axis(out, dim, m, arch.unit(src, axis), axis == "qkv", _new_units(axis, io, width, resid),
                          alloc)
    if any(a == "resid" and io == "norm" for a, io in roles):
        out = out * _norm_scale(maps.resid)
    if layer is not None and maps.layers.new[layer] and key in arch.block_outputs(tgt):
        out = depth.outputs(out, alloc)
    return out


def rows_independent(name: str, tgt: ModelSpec) -> bool:
    """Whether Trans maps each row (first dimension) of ``name`` on its own, so a block of rows
    of the source gives the same block of the target: true when the first axis is not mapped
    (the vocabulary rows of the embedding and an untied head, GPT-2's position rows)."""
    layer, key = arch.split_name(name)
    if layer is not None:
        return False
    roles = arch.global_table(tgt)[key]
    return len(roles) >= 2 and roles[0][0] in ("vocab", "pos")


def trans_state(state: Mapping[str, torch.Tensor], src: ModelSpec, tgt: ModelSpec, maps: Maps,
                **opts) -> dict[str, torch.Tensor]:
    """Trans of a whole in-memory state dict (tests, calibration, chain building)."""
    return {n: trans_tensor(n, state.__getitem__, src, tgt, maps, **opts) for n in arch.param_names(tgt)}


def axis_map(maps: Maps, axis: str, layer: int | None) -> AxisMap | None:
    """The map of ``axis`` (in ``layer`` for per-layer axes); None for an axis no map changes."""
    if axis == "resid":
        return maps.resid
    if axis in ("q", "kv", "ffn"):
        return getattr(maps, axis)[layer]
    if axis == "qkv":  # GPT-2's fused q, k, v: no GQA, so the query-head map serves all three
        return maps.q[layer]
    return None  # vocab, dh, pos: unchanged


def _new_units(axis: str, io: str, width: Expand, resid: Expand) -> Expand | None:
    """What the new units of ``axis`` hold in a tensor that touches it as ``io`` (None: the
    gathered copies stay as they are)."""
    if axis == "resid":  # the writers carry the family's fill; a LayerNorm bias is 0 on new channels
        return {"out": resid, "normbias": ZERO}.get(io)
    return width if io == "in" else None  # a duplicate head or neuron: its readers' columns


def _apply_axis(t: torch.Tensor, dim: int, m: AxisMap, unit: int, fused_qkv: bool, expand: Expand | None,
                alloc: Alloc) -> torch.Tensor:
    if fused_qkv:  # split the fused [.., 3 * H * dh] into q, k, v; map each; re-fuse
        if m.is_identity and t.shape[dim] == 3 * len(m.idx) * unit:
            return t
        parts = [_apply_axis(part, dim, m, unit, False, expand, alloc) for part in t.chunk(3, dim)]
        shape = list(parts[0].shape)
        shape[dim] *= 3
        return torch.cat(parts, dim, out=alloc(tuple(shape), t.dtype))
    if m.is_identity and t.shape[dim] == len(m.idx) * unit:
        return t
    rows = m.cached(("rows", unit), lambda: _unit_rows(m.idx, unit))
    shape = list(t.shape)
    shape[dim] = len(rows)
    out = torch.index_select(t, dim, rows, out=alloc(tuple(shape), t.dtype))
    if not any(m.new) or expand is None:
        return out
    return expand.fill(out, dim, m, unit)  # ``out`` is a fresh copy: filled in place


def _unit_rows(idx: tuple[int, ...], unit: int) -> torch.Tensor:
    i = torch.tensor(idx, dtype=torch.long)
    return (i[:, None] * unit + torch.arange(unit)).reshape(-1) if unit > 1 else i


def _norm_scale(resid: AxisMap) -> float:
    """RMSNorm over a zero-padded residual: keep the real channels' normalised values."""
    def make() -> float:
        real = sum(1 for n in resid.new if not n)
        return 1.0 if real == len(resid.new) else math.sqrt(real / len(resid.new))

    return resid.cached(("norm_scale",), make)
