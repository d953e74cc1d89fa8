"""Ridge refit of the projections that read dropped FFN neurons and query heads, and of the FFN
reader before a dropped span of layers.

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

**Dropped layers.** Where depth pruning drops source layers p+1..q after a kept layer p, the
FFN reader of layer p (``down_proj``) is refit so that it also writes what the dropped span added
to the residual stream, ``D = h_q - h_p``, as far as a linear function of layer p's FFN
activations can: the target becomes ``Y + D`` (cross statistics ``X^T D``, :class:`Cross`), with
the larger ridge ``SPAN_RIDGE``. The unrepaired weight stays a feasible point, so the calibration
error of ``Y + D`` never grows; measured on held-out text, dropping alone loses 0.5-1.8 nats that
this wins back to within 0.03-0.12 of the anchor (``bench/repair.py``).

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
from cbd.shape.linit import LInit, prune_maps
from cbd.shape.maps import Alignment, Maps
from cbd.shape.trans import trans_tensor
from cbd.train.models import build_model

READERS = ("ffn", "q")
SPAN_RIDGE = 0.1
# The ridge of a reader that also carries a dropped span of layers: a span's contribution is a
# larger, less linear target than a pruned reader's own output, and 1e-3 overfits the calibration
# batch (source 30 -> 20 layers on the tiny chain's mix: held-out 5.25 dropped, 5.38 refit at 1e-3,
# 4.98 at 0.1, 5.01 at 1; the a1 anchor 12 -> 8: 7.84, 6.10, 6.05, 6.06)  # axes whose dropped units are repaired through the tensor that reads them


@dataclass
class Stats:
    """Sufficient statistics of one reader's input over a calibration batch (float64)."""

    gram: Tensor  # (n, n) X^T X
    total: Tensor  # (n,) column sums of X
    count: int = 0  # tokens N

    def add(self, x: Tensor) -> None:
        # one batch's X^T X in float32 (a few thousand tokens: rounding far below the ridge term;
        # float64 matmuls cost ~4x more), accumulated over batches in float64
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.gram.add_((x.T @ x).double())
        self.total.add_(x.sum(0).double())
        self.count += x.shape[0]


@dataclass
class Cross:
    """What a dropped span of layers adds to the residual stream, against the FFN activations of the
    kept layer just before it: ``X^T D`` and ``sum D`` (float64), D = h_after_span - h_before_span."""

    xd: Tensor  # (n, d)
    dsum: Tensor  # (d,)
    count: int = 0

    def add(self, x: Tensor, d: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        d = d.detach().reshape(-1, d.shape[-1]).float()
        self.xd.add_((x.T @ d).double())
        self.dsum.add_(d.sum(0).double())
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


def _out(out):
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def calibration_stats(spec: ModelSpec, state: Mapping[str, Tensor], batch: Tensor | Sequence[Tensor],
                      wanted: set[tuple] | None = None) -> dict[tuple, Stats | Cross]:
    """Statistics of forward passes of the anchor over ``batch`` ((B, T) token ids, or a list):
    ``(layer, axis) -> Stats`` of each reader's input, and for a wanted ``(p, "span", q)`` (layers
    p+1..q dropped) ``-> Cross`` of layer p's FFN activations against what the span adds to the
    residual stream. ``wanted`` limits what is computed (None: every reader, no span)."""
    readers = reader_keys(spec)
    model = build_model(spec, state)
    prefix = arch.layer_prefix(spec)
    want = set(wanted) if wanted is not None else {(i, a) for i in range(spec.num_hidden_layers) for a in readers}
    spans = [k for k in want if len(k) == 3]
    want |= {(p, "ffn") for p, _, _ in spans}
    stats: dict[tuple, Stats | Cross] = {}
    held: dict[tuple[str, int], Tensor] = {}  # ("x", p): layer p's FFN activations; ("h", i): block i's output
    hooks = []
    span_at = {}
    for p, _, q in spans:
        d = spec.hidden_size
        n = arch.axis_size(spec, "ffn") * arch.unit(spec, "ffn")
        stats[(p, "span", q)] = Cross(torch.zeros(n, d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64))
        span_at.setdefault(q, []).append(p)
    keep_x = {p for p, _, _ in spans}
    for i in range(spec.num_hidden_layers):
        for axis, r in readers.items():
            if (i, axis) not in want:
                continue
            mod = model.get_submodule(prefix.format(i=i) + r.module)
            n = arch.axis_size(spec, axis) * arch.unit(spec, axis)
            st = stats[(i, axis)] = Stats(torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64))

            def pre(m, args, st=st, i=i, axis=axis):
                st.add(args[0])
                if axis == "ffn" and i in keep_x:
                    held[("x", i)] = args[0]
            hooks.append(mod.register_forward_pre_hook(pre))
        if i in keep_x or i in span_at:
            block = model.get_submodule(prefix.format(i=i).rstrip("."))

            def post(m, args, out, i=i):
                h = _out(out)
                held[("h", i)] = h
                for p in span_at.get(i, []):
                    stats[(p, "span", i)].add(held[("x", p)], h - held[("h", p)])
            hooks.append(block.register_forward_hook(post))
    try:
        for b in _batches(batch):
            model(input_ids=b, use_cache=False)
            held.clear()
    finally:
        for h in hooks:
            h.remove()
    return stats


def refit(w: Tensor, bias: Tensor | None, dim: int, cols: Tensor, st: Stats, ridge: float,
          cross: Cross | None = None) -> tuple[Tensor, Tensor | None]:
    """The reader ``w`` (its input on ``dim``) refit on the input columns ``cols``; the other
    input columns become 0. With ``cross`` (an FFN reader before a dropped span of layers), the
    fit's target is the reader's output plus what the span added to the residual stream.
    Returns (weight, bias) in ``w``'s layout and dtype."""
    wd = (w if dim == 1 else w.T).double()  # (d, n)
    mu = st.total / st.count  # (n,)
    g = st.gram / st.count  # (n, n) second moment; covariance when a bias absorbs the mean
    if bias is not None:
        g = g - torch.outer(mu, mu)
    g_kk = g[cols][:, cols]  # (k, k)
    rhs = g[cols] @ wd.T  # (k, d): X_K^T Y / N (centred with a bias)
    dmean = None
    if cross is not None:  # Y += D: the span's contribution, regressed on the same inputs
        dmean = cross.dsum / cross.count
        xd = cross.xd / cross.count
        if bias is not None:
            xd = xd - torch.outer(mu, dmean)
        rhs = rhs + xd[cols]
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
    b = bias.double() + mu @ wd.T - mu[cols] @ sol + (dmean if dmean is not None else 0.0)
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


def dropped_spans(spec: ModelSpec, maps: Maps) -> dict[int, tuple[int, int]]:
    """``target layer j -> (p, q)`` where j is source layer p and the map drops source layers
    p+1..q right after it (the last kept layer before a gap, or before the end)."""
    idx, new = maps.layers.idx, maps.layers.new
    out = {}
    for j, p in enumerate(idx):
        if new[j]:
            continue
        nxt = idx[j + 1] if j + 1 < len(idx) and not new[j + 1] else (spec.num_hidden_layers if j + 1 == len(idx) else None)
        if nxt is not None and nxt > p + 1:
            out[j] = (p, nxt - 1)
    return out


def refits(spec: ModelSpec, state: Mapping[str, Tensor], maps: Maps, batch: Tensor | Sequence[Tensor] | None = None,
           *, stats: dict[tuple, Stats | Cross] | None = None, ridge: float = 1e-3, depth: bool = True
           ) -> dict[tuple[int, str], Tensor]:
    """``(target layer, layer key) -> refit tensor`` in the anchor's (source) coordinates, for every
    reader of an axis that ``maps`` prunes (dropped columns 0): what Trans reads instead of the
    anchor's own tensor. ``stats`` (from :func:`calibration_stats`, may hold more readers than
    needed) or a calibration ``batch`` of the anchor's own forward passes."""
    readers = reader_keys(spec)
    todo = dropped(spec, maps)
    spans = dropped_spans(spec, maps) if depth else {}
    for j in spans:  # the FFN reader before a dropped span also carries the span (all its units if none dropped)
        todo.setdefault((j, "ffn"), frozenset(maps.ffn[j].idx))
    need = {(maps.layers.idx[j], axis) for j, axis in todo} | {(p, "span", q) for p, q in spans.values()}
    stats = {} if stats is None else stats  # filled in place: a caller's cache keeps what was computed
    if need - set(stats):
        if batch is None:
            raise ValueError("repair needs a calibration batch or stats")
        stats.update(calibration_stats(spec, state, batch, need - set(stats)))
    prefix = arch.layer_prefix(spec)
    fitted: dict[tuple, dict[str, Tensor]] = {}
    per_layer: dict[tuple[int, str], Tensor] = {}
    for (j, axis), kept in todo.items():
        b, r = maps.layers.idx[j], readers[axis]
        span = spans.get(j) if axis == "ffn" else None
        k = (b, axis, kept, span)
        if k not in fitted:
            src = prefix.format(i=b)
            w, bias = refit(state[src + r.key], state[src + r.bias] if r.bias else None, r.dim,
                            _cols(set(kept), arch.unit(spec, axis)), stats[(b, axis)],
                            max(ridge, SPAN_RIDGE) if span else ridge,
                            stats[(b, "span", span[1])] if span else None)
            fitted[k] = {r.key: w} | ({r.bias: bias} if r.bias else {})
        for key, t in fitted[k].items():
            per_layer[(j, key)] = t
    return per_layer


def repair(spec: ModelSpec, state: Mapping[str, Tensor], tgt: ModelSpec, maps: Maps,
           batch: Tensor | Sequence[Tensor] | None = None, *, stats: dict[tuple, Stats | Cross] | None = None,
           ridge: float = 1e-3, width_expand: str = "clone", depth_expand: str = "identity",
           depth: bool = True) -> dict[str, Tensor]:
    """Trans of ``state`` (an anchor of ``spec``) onto ``tgt`` by ``maps``, with the reader of every
    axis that drops units refit on the anchor's activations over ``batch`` (or precomputed
    ``stats`` from :func:`calibration_stats`). Returns the target state (``arch.param_names(tgt)``)."""
    per_layer = refits(spec, state, maps, batch, stats=stats, ridge=ridge, depth=depth)
    prefix = arch.layer_prefix(spec)
    out = {}
    for name in arch.param_names(tgt):
        layer, key = arch.split_name(name)
        read = state.__getitem__
        if layer is not None and (layer, key) in per_layer:
            read = _swapped(state, prefix.format(i=maps.layers.idx[layer]) + key, per_layer[(layer, key)])
        out[name] = trans_tensor(name, read, spec, tgt, maps, width_expand=width_expand, depth_expand=depth_expand)
    return out


def repaired_prune(state: Mapping[str, Tensor], spec: ModelSpec, importance, child: ModelSpec, opts,
                   batch: Tensor | Sequence[Tensor]) -> tuple[dict[str, Tensor], Alignment]:
    """:func:`cbd.shape.linit.prune` with the pruned readers refit on ``state``'s own activations
    over ``batch``: the start of the next anchor of a chain whose recipe says ``repair = "ridge"``."""
    maps = prune_maps(spec, importance, child, opts)
    return repair(spec, state, child, maps, batch, width_expand=opts.width_expand,
                  depth_expand=opts.depth_expand), Alignment.from_maps(maps)


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
