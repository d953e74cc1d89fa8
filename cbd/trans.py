"""Trans: map one model's weights onto a target shape (METHOD.md section 2). Pure functions.

Executes a :class:`~cbd.maps.Maps` tensor by tensor. Expansions are function preserving:

- residual width: new channels are zero in every tensor that writes the residual stream and
  every RMSNorm weight is scaled by ``sqrt(n_real / d_T)``, which keeps the normalised values
  of the real channels (RMS over zero-padded channels shrinks by that factor; exact up to the
  norm epsilon, whose relative weight grows by d_T / n_real);
- heads and FFN neurons (``clone``): duplicates share their reader's columns, divided by the
  number of copies (Net2Net / HyperCloning); (``zero``): the duplicates' reader columns are 0;
- kv heads: repeated (each query head keeps its own group's keys and values);
- depth (``identity``): an inserted block copies its neighbour with its attention-output and
  FFN-down projections zeroed, so it adds nothing to the residual stream; (``copy``) keeps them.

Subsets just drop units. ``trans_tensor`` computes one target tensor from a reader, so the
executor can stream a checkpoint as large as the teacher through memory one tensor at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Literal

import torch

from cbd import arch
from cbd.maps import AxisMap, Maps
from cbd.spec import ModelSpec

Reader = Callable[[str], torch.Tensor]
WidthExpand = Literal["clone", "zero"]
DepthExpand = Literal["identity", "copy"]


def trans_tensor(name: str, read: Reader, src: ModelSpec, tgt: ModelSpec, maps: Maps, *,
                 width_expand: WidthExpand = "clone", depth_expand: DepthExpand = "identity") -> torch.Tensor:
    """The target tensor ``name`` (a name of the target's checkpoint) from the source."""
    layer, key = arch.split_name(name)
    if layer is None:
        roles = arch.global_table(tgt)[key]
        out = read(name)
    else:
        roles = arch.layer_table(tgt)[key]
        out = read(arch.LAYER_PREFIX.format(i=maps.layers.idx[layer]) + key)
    for dim, (axis, io) in enumerate(roles):
        m = _axis_map(maps, axis, layer)
        if m is None:
            continue
        out = _apply_axis(out, dim, m, io, arch.unit(src, axis), axis, width_expand)
    if any(a == "resid" and io == "norm" for a, io in roles):
        out = out * _norm_scale(maps.resid)
    if layer is not None and maps.layers.new[layer] and depth_expand == "identity" \
            and key in arch.LLAMA_BLOCK_OUTPUTS:
        out = torch.zeros_like(out)
    return out


def trans_state(state: Mapping[str, torch.Tensor], src: ModelSpec, tgt: ModelSpec, maps: Maps,
                **opts) -> dict[str, torch.Tensor]:
    """Trans of a whole in-memory state dict (tests, calibration, chain building)."""
    return {n: trans_tensor(n, state.__getitem__, src, tgt, maps, **opts) for n in arch.param_names(tgt)}


def _axis_map(maps: Maps, axis: str, layer: int | None) -> AxisMap | None:
    if axis == "resid":
        return maps.resid
    if axis in ("q", "kv", "ffn"):
        return getattr(maps, axis)[layer]
    return None  # vocab, dh: unchanged


def _apply_axis(t: torch.Tensor, dim: int, m: AxisMap, io: str, unit: int, axis: str,
                width_expand: WidthExpand) -> torch.Tensor:
    if m.is_identity and t.shape[dim] == len(m.idx) * unit:
        return t
    idx = torch.tensor(m.idx, dtype=torch.long)
    rows = (idx[:, None] * unit + torch.arange(unit)).reshape(-1) if unit > 1 else idx
    out = t.index_select(dim, rows)
    if not any(m.new):
        return out
    if axis == "resid":
        if io == "out":  # new residual channels stay exactly zero
            out = _scale_units(out, dim, unit, [0.0 if n else 1.0 for n in m.new])
        return out
    if io != "in":
        return out
    if width_expand == "zero":
        factors = [0.0 if n else 1.0 for n in m.new]
    else:
        counts = {i: m.idx.count(i) for i in set(m.idx)}
        factors = [1.0 / counts[i] for i in m.idx]
    return _scale_units(out, dim, unit, factors)


def _scale_units(t: torch.Tensor, dim: int, unit: int, factors: list[float]) -> torch.Tensor:
    if all(f == 1.0 for f in factors):
        return t
    f = torch.tensor(factors, dtype=t.dtype).repeat_interleave(unit)
    shape = [1] * t.dim()
    shape[dim] = -1
    return t * f.view(shape)


def _norm_scale(resid: AxisMap) -> float:
    """RMSNorm over a zero-padded residual: keep the real channels' normalised values."""
    real = sum(1 for n in resid.new if not n)
    return 1.0 if real == len(resid.new) else math.sqrt(real / len(resid.new))
