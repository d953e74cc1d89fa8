"""Trans: map one model's weights onto a target shape (METHOD.md section 2). Pure functions.

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
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Literal

import torch

from cbd.core.spec import ModelSpec
from cbd.shape import arch
from cbd.shape.maps import AxisMap, Maps

Reader = Callable[[str], torch.Tensor]
Alloc = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]  # (shape, dtype) -> new uninitialised tensor
WidthExpand = Literal["clone", "zero"]
DepthExpand = Literal["identity", "copy"]


def fresh(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The default :data:`Alloc`: plain new memory."""
    return torch.empty(shape, dtype=dtype)


def trans_tensor(name: str, read: Reader, src: ModelSpec, tgt: ModelSpec, maps: Maps, *,
                 width_expand: WidthExpand = "clone", depth_expand: DepthExpand = "identity",
                 alloc: Alloc = fresh) -> torch.Tensor:
    """The target tensor ``name`` (a name of the target's checkpoint) from the source.

    Intermediates (and the result) come from ``alloc``; none is freed here (module docstring).
    """
    if src.family != tgt.family:
        raise ValueError(f"Trans maps within one family: {src.model_type!r} -> {tgt.model_type!r}")
    if src.family == "gpt2" and src.max_position_embeddings != tgt.max_position_embeddings:
        raise ValueError(f"learned positions are kept as they are: max_position_embeddings "
                         f"{src.max_position_embeddings} -> {tgt.max_position_embeddings}")
    layer, key = arch.split_name(name)
    if layer is None:
        roles = arch.global_table(tgt)[key]
        out = read(name)
    else:
        roles = arch.layer_table(tgt)[key]
        out = read(arch.layer_prefix(src).format(i=maps.layers.idx[layer]) + key)
    fill = "mean" if arch.family(tgt).norm == "layer" else "zero"
    # the strided gathers (dims >= 1) first, on the smaller source; the row gather (whole rows,
    # contiguous copies) last. Gathers copy exactly and each dimension is scaled once, so the
    # order changes no value.
    for dim in sorted(range(len(roles)), key=lambda d: d == 0):
        axis, io = roles[dim]
        m = _axis_map(maps, axis, layer)
        if m is None:
            continue
        out = _apply_axis(out, dim, m, io, arch.unit(src, axis), axis, width_expand, fill, alloc)
    if any(a == "resid" and io == "norm" for a, io in roles):
        out = out * _norm_scale(maps.resid)
    if layer is not None and maps.layers.new[layer] and depth_expand == "identity" \
            and key in arch.block_outputs(tgt):
        out = alloc(tuple(out.shape), out.dtype).zero_()
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


def _axis_map(maps: Maps, axis: str, layer: int | None) -> AxisMap | None:
    if axis == "resid":
        return maps.resid
    if axis in ("q", "kv", "ffn"):
        return getattr(maps, axis)[layer]
    if axis == "qkv":  # GPT-2's fused q, k, v: no GQA, so the query-head map serves all three
        return maps.q[layer]
    return None  # vocab, dh, pos: unchanged


def _apply_axis(t: torch.Tensor, dim: int, m: AxisMap, io: str, unit: int, axis: str,
                width_expand: WidthExpand, fill: str, alloc: Alloc) -> torch.Tensor:
    if axis == "qkv":  # split the fused [.., 3 * H * dh] into q, k, v; map each; re-fuse
        if m.is_identity and t.shape[dim] == 3 * len(m.idx) * unit:
            return t
        parts = [_apply_axis(part, dim, m, io, unit, "q", width_expand, fill, alloc) for part in t.chunk(3, dim)]
        shape = list(parts[0].shape)
        shape[dim] *= 3
        return torch.cat(parts, dim, out=alloc(tuple(shape), t.dtype))
    if m.is_identity and t.shape[dim] == len(m.idx) * unit:
        return t
    rows = m.cached(("rows", unit), lambda: _unit_rows(m.idx, unit))
    shape = list(t.shape)
    shape[dim] = len(rows)
    out = torch.index_select(t, dim, rows, out=alloc(tuple(shape), t.dtype))
    if not any(m.new):
        return out
    # ``out`` is a fresh copy from here on: scale it in place
    if axis == "resid":
        if io == "out" and fill == "mean":  # LayerNorm: new channels carry the real channels' mean
            return _fill_mean(out, dim, m.new)
        if io == "out" or io == "normbias":  # RMSNorm: new residual channels stay exactly zero
            out = _scale_units(out, dim, m, unit, "zero")
        return out
    if io != "in":
        return out
    return _scale_units(out, dim, m, unit, width_expand)


def _unit_rows(idx: tuple[int, ...], unit: int) -> torch.Tensor:
    i = torch.tensor(idx, dtype=torch.long)
    return (i[:, None] * unit + torch.arange(unit)).reshape(-1) if unit > 1 else i


def _scale_units(t: torch.Tensor, dim: int, m: AxisMap, unit: int, kind: WidthExpand) -> torch.Tensor:
    """New units x 0 (``zero``), or every copy of a unit / its number of copies (``clone``)."""
    def make() -> torch.Tensor | None:
        if kind == "zero":
            factors = [0.0 if n else 1.0 for n in m.new]
        else:
            counts = Counter(m.idx)
            factors = [1.0 / counts[i] for i in m.idx]
        if all(f == 1.0 for f in factors):
            return None
        return torch.tensor(factors, dtype=torch.float32).repeat_interleave(unit)

    f = m.cached(("scale", kind, unit), make)
    if f is None:
        return t
    shape = [1] * t.dim()
    shape[dim] = -1
    return t.mul_(f.to(t.dtype).view(shape))  # only called on index_select's fresh output


def _fill_mean(t: torch.Tensor, dim: int, new: tuple[bool, ...]) -> torch.Tensor:
    """Set the new entries along ``dim`` to the mean of the real ones (in place on a fresh ``t``)."""
    real = torch.tensor([i for i, n in enumerate(new) if not n], dtype=torch.long)
    added = torch.tensor([i for i, n in enumerate(new) if n], dtype=torch.long)
    mean = t.index_select(dim, real).mean(dim, keepdim=True, dtype=torch.float32).to(t.dtype)
    shape = list(t.shape)
    shape[dim] = len(added)
    return t.index_copy_(dim, added, mean.expand(shape))


def _norm_scale(resid: AxisMap) -> float:
    """RMSNorm over a zero-padded residual: keep the real channels' normalised values."""
    def make() -> float:
        real = sum(1 for n in resid.new if not n)
        return 1.0 if real == len(resid.new) else math.sqrt(real / len(resid.new))

    return resid.cached(("norm_scale",), make)
