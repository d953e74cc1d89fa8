"""Ridge refit of the projections that read dropped FFN neurons and query heads.

For one reader (a layer's ``down_proj``/``o_proj``, or GPT-2's ``c_proj``) of an anchor, with
input ``X`` (N tokens x n units, the anchor's own activations on a calibration batch) and weight
``W`` (d x n, in ``[out, in]`` orientation whatever the storage), the unpruned output is
``Y = X W^T (+ b)``. A subset keeps the columns ``K`` of ``X``; the repaired weight is

    W_K' = argmin ||X_K W_K'^T - Y||^2 / N + lam ||W_K' - W_K||^2,
    i.e. (X_K^T X_K / N + lam I) W_K'^T = X_K^T Y / N + lam W_K^T,      lam = ridge * mean diag(X_K^T X_K / N)

solved in float64. This is plain ridge regression of the *correction* ``W_K' - W_K`` on the
unpruned output's residual, so ``W_K`` itself (the unrepaired subset) is a feasible point: the
repaired reader's calibration error is never larger than the unrepaired one's. Where the family
has an output bias (GPT-2) the fit is centred and the bias refit too (``b' = b + mu W^T -
mu_K W_K'^T``); llama has none and gets none.

Everything needed is in the sufficient statistics ``X^T X``, ``sum X`` and ``N`` of each reader's
input (:class:`Stats`), so one forward pass of the anchor serves every subset of it.

The repaired reader is written back in the *source* coordinates (dropped columns 0) and the
target is produced by Trans as usual (``cbd.shape.trans.trans_tensor``), so the residual map,
depth map, duplicates (clone or zero), Conv1D layouts and identity blocks are handled exactly
as in an unrepaired Trans.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from cbd.core.spec import ModelSpec
from cbd.shape import arch
from cbd.shape.linit import LInit
from cbd.shape.maps import Maps
from cbd.shape.trans import trans_tensor
from cbd.train.models import build_model

READERS = ("ffn", "q")  # axes whose dropped units are repaired through the tensor that reads them


@dataclass
class Stats:
    """Sufficient statistics of one reader's input over a calibration batch (float64)."""

    gram: Tensor  # (n, n) X^T X
    total: Tensor  # (n,) column sums of X
    count: int = 0  # tokens N

    def add(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        self.gram.addmm_(x.T, x)
        self.total.add_(x.sum(0))
        self.count += x.shape[0]


@dataclass(frozen=True)
class Reader:
    """The tensor that reads ``axis`` in one layer: its layer key, the dim it reads on, its module
    (inside the block) and its output bias key (None: the family has none)."""

    axis: str
    key: str
    dim: int
    module: str
    bias: str | None = field(default=None)


def reader_keys(spec: ModelSpec) -> dict[str, Reader]:
    """axis -> its :class:`Reader`, from the weight-role table (``(axis, "in")`` roles)."""
    table = arch.layer_table(spec)
    out = {}
    for key, roles in table.items():
        for dim, (axis, io) in enumerate(roles):
            if axis in READERS and io == "in":
                module = key.rsplit(".", 1)[0]
                bias = next((k for k, r in table.items() if k != key and k.rsplit(".", 1)[0] == module
                             and r == (("resid", "out"),)), None)
                out[axis] = Reader(axis, key, dim, module, bias)
    if set(out) != set(READERS):
        raise ValueError(f"{spec.model_type}: no reader for {sorted(set(READERS) - set(out))}")
    return out


def _batches(batch: Tensor | Sequence[Tensor]) -> list[Tensor]:
    return [batch] if isinstance(batch, Tensor) else list(batch)


@torch.no_grad()
def calibration_stats(spec: ModelSpec, state: Mapping[str, Tensor], batch: Tensor | Sequence[Tensor],
                      wanted: set[tuple[int, str]] | None = None) -> dict[tuple[int, str], Stats]:
    """``(layer, axis) -> Stats`` of the readers' inputs on forward passes of the anchor over
    ``batch`` ((B, T) token ids, or a list of them); ``wanted`` limits the readers (None: all)."""
    readers = reader_keys(spec)
    model = build_model(spec, state)
    prefix = arch.layer_prefix(spec)
    stats: dict[tuple[int, str], Stats] = {}
    hooks = []
    for i in range(spec.num_hidden_layers):
        for axis, r in readers.items():
            if wanted is not None and (i, axis) not in wanted:
                continue
            mod = model.get_submodule(prefix.format(i=i) + r.module)
            n = arch.axis_size(spec, axis) * arch.unit(spec, axis)
            st = stats[(i, axis)] = Stats(torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64))
            hooks.append(mod.register_forward_pre_hook(lambda m, args, st=st: st.add(args[0])))
    try:
        for b in _batches(batch):
            model(input_ids=b, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return stats


def refit(w: Tensor, bias: Tensor | None, dim: int, cols: Tensor, st: Stats, ridge: float
          ) -> tuple[Tensor, Tensor | None]:
    """The reader ``w`` (its input on ``dim``) refit on the input columns ``cols``; the other
    input columns become 0. Returns (weight, bias) in ``w``'s layout and dtype."""
    wd = (w if dim == 1 else w.T).double()  # (d, n)
    mu = st.total / st.count  # (n,)
    g = st.gram / st.count  # (n, n) second moment; covariance when a bias absorbs the mean
    if bias is not None:
        g = g - torch.outer(mu, mu)
    g_kk = g[cols][:, cols]  # (k, k)
    rhs = g[cols] @ wd.T  # (k, d): X_K^T Y / N (centred with a bias)
    w_k = wd[:, cols]  # (d, k): the unrepaired subset's columns
    scale = float(g_kk.diagonal().mean()) if len(cols) else 0.0
    lam = ridge * (scale if scale > 0 else 1.0)
    eye = torch.eye(len(cols), dtype=torch.float64)
    sol = torch.linalg.solve(g_kk + lam * eye, rhs + lam * w_k.T)  # (k, d)
    new = torch.zeros_like(wd)
    new[:, cols] = sol.T
    out_w = (new if dim == 1 else new.T).to(w.dtype).contiguous()
    if bias is None:
        return out_w, None
    b = bias.double() + mu @ wd.T - mu[cols] @ sol
    return out_w, b.to(bias.dtype)


def _cols(units: set[int], unit: int) -> Tensor:
    u = torch.tensor(sorted(units), dtype=torch.long)
    return (u[:, None] * unit + torch.arange(unit)).reshape(-1)


def dropped(spec: ModelSpec, maps: Maps) -> dict[tuple[int, str], frozenset[int]]:
    """``(target layer, axis) -> source units it keeps`` wherever the map drops some."""
    out = {}
    for j in range(len(maps.layers.idx)):
        for axis in READERS:
            kept = frozenset(getattr(maps, axis)[j].idx)
            if len(kept) < arch.axis_size(spec, axis):
                out[(j, axis)] = kept
    return out


def repair(spec: ModelSpec, state: Mapping[str, Tensor], tgt: ModelSpec, maps: Maps,
           batch: Tensor | Sequence[Tensor] | None = None, *, stats: dict[tuple[int, str], Stats] | None = None,
           ridge: float = 1e-3, width_expand: str = "clone", depth_expand: str = "identity") -> dict[str, Tensor]:
    """Trans of ``state`` (an anchor of ``spec``) onto ``tgt`` by ``maps``, with the reader of every
    axis that drops units refit on the anchor's activations over ``batch`` (or precomputed
    ``stats`` from :func:`calibration_stats`). Returns the target state (``arch.param_names(tgt)``)."""
    readers = reader_keys(spec)
    todo = dropped(spec, maps)
    need = {(maps.layers.idx[j], axis) for j, axis in todo}
    if stats is None and need:
        if batch is None:
            raise ValueError("repair needs a calibration batch or stats")
        stats = calibration_stats(spec, state, batch, need)
    prefix = arch.layer_prefix(spec)
    fitted: dict[tuple[int, str, frozenset[int]], dict[str, Tensor]] = {}
    per_layer: dict[tuple[int, str], Tensor] = {}  # (target layer, layer key) -> source-coordinate tensor
    for (j, axis), kept in todo.items():
        b, r = maps.layers.idx[j], readers[axis]
        k = (b, axis, kept)
        if k not in fitted:
            src = prefix.format(i=b)
            w, bias = refit(state[src + r.key], state[src + r.bias] if r.bias else None, r.dim,
                            _cols(set(kept), arch.unit(spec, axis)), stats[(b, axis)], ridge)
            fitted[k] = {r.key: w} | ({r.bias: bias} if r.bias else {})
        for key, t in fitted[k].items():
            per_layer[(j, key)] = t
    out = {}
    for name in arch.param_names(tgt):
        layer, key = arch.split_name(name)
        read = state.__getitem__
        if layer is not None and (layer, key) in per_layer:
            read = _swapped(state, prefix.format(i=maps.layers.idx[layer]) + key, per_layer[(layer, key)])
        out[name] = trans_tensor(name, read, spec, tgt, maps, width_expand=width_expand, depth_expand=depth_expand)
    return out


def _swapped(state: Mapping[str, Tensor], want: str, t: Tensor):
    """A reader of ``state`` that gives ``t`` for ``want``."""
    def read(n: str) -> Tensor:
        return t if n == want else state[n]
    return read


def repaired_linit_state(li: LInit, batch: Tensor | Sequence[Tensor], alpha: float | None = None, *,
                         ridge: float = 1e-3) -> dict[str, Tensor]:
    """``alpha * repair(Trans(S)) + (1 - alpha) * repair(Trans(B))``: each anchor's term repaired on
    its own activations, then blended as :meth:`LInit.state` blends the unrepaired terms."""
    a = li.alpha if alpha is None else alpha
    terms = []
    for anchor, maps, w in ((li.small, li.maps_small, a), (li.big, li.maps_big, 1.0 - a)):
        if anchor is None or w == 0.0:
            continue
        state = {n: anchor.read(n) for n in arch.param_names(anchor.spec)}
        terms.append((w, repair(anchor.spec, state, li.target, maps, batch, ridge=ridge,
                                width_expand=li.opts.width_expand, depth_expand=li.opts.depth_expand)))
    if len(terms) == 1:
        return terms[0][1]
    (wa, sa), (_, sb) = terms
    return {n: torch.lerp(sb[n], sa[n], wa) for n in sb}
