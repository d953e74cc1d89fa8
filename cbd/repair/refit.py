"""Ridge refit of the projections that read dropped FFN neurons and query heads, of the FFN
reader before a dropped span of layers, and (in situ) of the residual stream's readers and the
final norm where the residual width is pruned (:func:`_solve_resid`, :func:`_solve_final`).

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

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from cbd.core.spec import ModelSpec
from cbd.errors import ForwardDone
from cbd.shape import arch
from cbd.shape.linit import prune_maps
from cbd.shape.maps import Alignment, Maps
from cbd.shape.trans import trans_tensor
from cbd.train.models import batch_sums, build_model, mean_nll

READERS = ("ffn", "q")  # axes whose dropped units are repaired through the tensor that reads them
# The ridge of a reader that also carries a dropped span of layers: a span's contribution is a
# larger, less linear target than a pruned reader's own output, and 1e-3 overfits the calibration
# batch (source 30 -> 20 layers on the tiny chain's mix: held-out 5.25 dropped, 5.38 refit at 1e-3,
# 4.98 at 0.1, 5.01 at 1; the a1 anchor 12 -> 8: 7.84, 6.10, 6.05, 6.06)
SPAN_RIDGE = 0.1
INSITU_RIDGE = (0.1, 1.0)  # tried in turn, the best on the check batch kept (insitu_refits)
# The residual stream's readers and the final norm take a tenth of that ridge: they want less
# shrinkage than the pruned units' readers (held-out, tiny's source to 24x512 8/4 1280 at ridge 1
# with the stream's at 1: 5.346, 0.3: 5.266, 0.1: 5.251, 0.03: 5.327; its a1 to 6x256 at ridge 0.1
# with the stream's at 0.1: 6.168, 0.03: 6.144, 0.01: 6.120)
STREAM_RIDGE_RATIO = 0.1


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


def resid_groups(spec: ModelSpec) -> dict[str, tuple[str, ...]]:
    """``"resid.<axis>"`` -> the layer keys that read the residual stream (after the norm) in the
    sub-block of the reader of ``axis`` (llama: ``q_proj``, ``k_proj``, ``v_proj`` before
    ``o_proj``; ``gate_proj``, ``up_proj`` before ``down_proj``): the tensors a pruned residual
    width refits (:func:`insitu_refits`). Empty for a LayerNorm family (its fused ``c_attn`` and
    centred norm are not refit)."""
    if arch.family(spec).norm != "rms":
        return {}
    table = arch.layer_table(spec)
    out = {}
    for axis, r in reader_keys(spec).items():
        parent = r.module.rsplit(".", 1)[0] + "."
        out[f"resid.{axis}"] = tuple(k for k, roles in table.items()
                                     if k.startswith(parent) and ("resid", "in") in roles and k.endswith(".weight"))
    return out


def _resid_module(spec: ModelSpec, group: str) -> str:
    """The module whose input is a residual group's (normalised) input: its first reader."""
    return resid_groups(spec)[group][0].rsplit(".", 1)[0]


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
    return trans_with(spec, state, tgt, maps, per_layer, width_expand=width_expand, depth_expand=depth_expand)


def trans_with(spec: ModelSpec, state: Mapping[str, Tensor], tgt: ModelSpec, maps: Maps,
               per_layer: Mapping[tuple[int | None, str], Tensor], **opts) -> dict[str, Tensor]:
    """Trans of ``state`` onto ``tgt`` reading the refit tensors ``per_layer`` (``(target layer,
    layer key) -> tensor`` in the anchor's coordinates) instead of the anchor's own."""
    prefix = arch.layer_prefix(spec)
    out = {}
    for name in arch.param_names(tgt):
        layer, key = arch.split_name(name)
        read = state.__getitem__
        if (layer, key) in per_layer:  # (None, name): a global tensor (the final norm)
            own = key if layer is None else prefix.format(i=maps.layers.idx[layer]) + key
            read = _swapped(state, own, per_layer[(layer, key)])
        out[name] = trans_tensor(name, read, spec, tgt, maps, **opts)
    return out


def repaired_prune(state: Mapping[str, Tensor], spec: ModelSpec, importance, child: ModelSpec, opts,
                   batch: Tensor | Sequence[Tensor], check: Sequence[Tensor] | None = None,
                   ) -> tuple[dict[str, Tensor], Alignment, dict]:
    """:func:`cbd.shape.linit.prune` with the pruned readers refit in situ on ``batch``
    (:func:`insitu_repair`): the start of the next anchor of a chain whose recipe says
    ``repair = "ridge"``. Returns (state, alignment, the repair's report)."""
    maps = prune_maps(spec, importance, child, opts)
    out, report = insitu_repair(spec, state, child, maps, batch, check=check, width_expand=opts.width_expand,
                                depth_expand=opts.depth_expand)
    return out, Alignment.from_maps(maps), report


def _swapped(state: Mapping[str, Tensor], want: str, t: Tensor):
    """A reader of ``state`` that gives ``t`` for ``want``."""
    def read(n: str) -> Tensor:
        return t if n == want else state[n]
    return read


# ---- in situ: the pruned model's own inputs, the anchor's outputs ------------------------------
@dataclass
class Fit:
    """Normal equations of one target reader: its inputs ``X'`` in the *pruned* model (kept units,
    target order) against the anchor's output ``Y`` of the same reader (plus a dropped span's ``D``):
    ``X'^T X'``, ``X'^T Y``, ``sum X'``, ``sum Y``, N (float64)."""

    gram: Tensor
    cross: Tensor
    xsum: Tensor
    ysum: Tensor
    count: int = 0

    @classmethod
    def zeros(cls, k: int, d: int) -> Fit:
        """Empty statistics for ``k`` inputs and ``d`` outputs."""
        f64 = torch.float64
        return cls(torch.zeros(k, k, dtype=f64), torch.zeros(k, d, dtype=f64), torch.zeros(k, dtype=f64),
                   torch.zeros(d, dtype=f64))

    def add(self, x: Tensor, y: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        y = y.detach().reshape(-1, y.shape[-1]).float()
        self.gram.add_((x.T @ x).double())
        self.cross.add_((x.T @ y).double())
        self.xsum.add_(x.sum(0).double())
        self.ysum.add_(y.sum(0).double())
        self.count += x.shape[0]


@torch.no_grad()
def insitu_refits(spec: ModelSpec, state: Mapping[str, Tensor], tgt: ModelSpec, maps: Maps,
                  batch: Tensor | Sequence[Tensor], *, ridge: float | Sequence[float] = INSITU_RIDGE,
                  check: Sequence[Tensor] | None = None, depth: bool = True, resid: bool = True,
                  stream_ridge: float | None = None,
                  width_expand: str = "clone", depth_expand: str = "identity", guard: bool = True,
                  outputs: Callable[..., list[dict]] | None = None,
                  check_sums: list[tuple[float, int]] | None = None,
                  ) -> tuple[dict[tuple[int | None, str], Tensor], dict]:
    """The readers of an anchor's pruned units refit *in situ*: on the inputs they get inside the
    pruned target (plain Trans of the anchor), toward the outputs the anchor's own readers give on
    the same tokens (for the FFN reader before a dropped span of layers: plus what the span adds).

    Fitting on the anchor's own inputs (:func:`refits`) is exact for FFN and head pruning alone, but
    once the residual width or earlier layers are pruned the kept units see other inputs than the
    anchor's, and that fit made the start worse (the tiny chain's source pruned to 20x384: held-out
    7.57 plain, 9.65 refit on the anchor's inputs). In situ, the target of each fit is the anchor's
    output and its inputs are the pruned model's, so the fit corrects what the pruned model
    actually computes, layer after layer (each layer's fit sees the layers before it refit).

    The fit is a few thousand tokens for up to ~1.5k inputs per reader, over up to 30 layers in a
    row: in sample it always looks better, out of sample a weak ridge overfits badly (the tiny
    chain's source pruned to 20x384: held-out 7.57 plain; refit at ridge 0.01: 9.86, 0.1: 6.50,
    1: 6.43, 10: 6.93; its a1 pruned to 6x256: 8.09 plain; 0.001: 6.29, 0.1: 6.24, 1: 6.33). So
    each ``ridge`` given is tried and scored on ``check`` (other windows of training text: the
    chain's validation batch), the best kept, and none if none beats plain Trans there (the report
    says which). Costs: one forward pass of the anchor, and per ridge about half a forward pass
    per refit layer plus one over ``check``.

    ``stream_ridge``: the ridge of the residual stream's readers and the final norm (default: each
    ridge tried times :data:`STREAM_RIDGE_RATIO`); ``resid=False`` leaves them as Trans makes them.

    ``outputs``: where the anchor's outputs come from (default :func:`anchor_outputs`, computed
    here; a caller may give a cached copy with the same signature and at least those entries).
    ``check_sums``: a list that receives the per-batch sums over ``check`` of what is returned (the
    kept refit, or plain Trans where none is kept; :func:`cbd.train.models.batch_sums`), so a caller
    can score part of ``check`` without another pass.

    Returns (``(target layer, layer key) -> tensor`` in the anchor's coordinates for Trans to read,
    as :func:`refits` does; the report: losses before and after, what was refit, whether kept)."""
    readers = reader_keys(spec)
    todo = dropped(spec, maps)
    spans = dropped_spans(spec, maps) if depth else {}
    for j in spans:
        todo.setdefault((j, "ffn"), frozenset(maps.ffn[j].idx))
    # a reader whose kept units repeat (a grown axis) is left to Trans: its inputs are not independent
    todo = {k: v for k, v in todo.items() if len(set(getattr(maps, k[1])[k[0]].idx)) == len(getattr(maps, k[1])[k[0]].idx)}
    if resid:
        todo |= _resid_todo(spec, maps)
    batches = _batches(batch)
    if not todo:
        return {}, {"refit": []}
    # 1. the anchor: each needed reader's output, and the spans' contributions
    need_y = {(maps.layers.idx[j], axis) for j, axis in todo}
    need_h = {i for p, q in spans.values() for i in (p, q)}
    # the final norm too where the residual width is pruned (elsewhere its fit lost 0.03 nats on the
    # tiny chain's source cut 30 -> 24 layers: the L2 fit of logits is not the loss)
    final = _final_norm(spec) is not None and any(axis.startswith("resid.") for _, axis in todo)
    if final:  # the final norm's input: the anchor's last block's output
        need_h.add(spec.num_hidden_layers - 1)
    ys = (outputs or anchor_outputs)(spec, state, batches, need_y, need_h)
    # 2. the pruned target (plain Trans), refit layer after layer: layer j's readers are fit on the
    # inputs they get with every layer before j already refit (fitting all layers at once on the
    # plain model's inputs makes each correct the drift the layers before it also correct: 30 layers
    # of the tiny chain's source, FFN 1536 -> 1024, went 4.71 -> 11.2 on the calibration batch)
    plain = {n: trans_tensor(n, state.__getitem__, spec, tgt, maps, width_expand=width_expand,
                             depth_expand=depth_expand) for n in arch.param_names(tgt)}
    check = list(check) if check is not None else batches
    ridges = [ridge] if isinstance(ridge, (int, float)) else list(ridge)
    model = build_model(tgt, plain)  # one model: each ridge's pass resets what it refits
    plain_sums = batch_sums(model, check, chunked=True)
    loss_plain = mean_nll(plain_sums)
    starts = [_layer_calls(model, tgt, b[:, :-1]) for b in batches]  # the same for every ridge
    tried, best, best_sums = {}, (loss_plain, None, {}), plain_sums
    stream_of = {lam: lam * STREAM_RIDGE_RATIO if stream_ridge is None else stream_ridge for lam in ridges}
    for lam in ridges:
        per_layer = _sequential(state, spec, tgt, maps, model, plain, starts, todo, spans, ys, readers, lam,
                                width_expand, depth_expand, final, stream_of[lam])
        sums = batch_sums(model, check, chunked=True)
        loss = mean_nll(sums)
        tried[str(lam)] = round(loss, 5)
        if loss < best[0] or (not guard and best[1] is None):
            best, best_sums = (loss, lam, per_layer), sums
    report = {"refit": sorted({axis.split(".")[0] for _, axis in todo} | ({"depth"} if spans else set())),
              "check_loss_plain": round(loss_plain, 5), "check_loss_by_ridge": tried, "ridge": best[1],
              "kept": best[1] is not None, "check_loss": best[0]}
    if check_sums is not None:
        check_sums[:] = best_sums
    if final and best[1] is not None:  # the residual stream's readers and the final norm were refit at
        report["stream_ridge"] = stream_of[best[1]]
    return best[2], report


def _resid_todo(spec: ModelSpec, maps: Maps) -> dict[tuple[int, str], frozenset[int]]:
    """``(target layer, "resid.<axis>") -> kept residual channels`` for every layer the target keeps
    from the anchor, when ``maps`` prunes the residual width (a pure subset: a grown or repeated
    channel is left to Trans)."""
    idx = maps.resid.idx
    if len(idx) >= spec.hidden_size or any(maps.resid.new) or len(set(idx)) < len(idx):
        return {}
    return {(j, group): frozenset(idx) for j in range(len(maps.layers.idx)) if not maps.layers.new[j]
            for group in resid_groups(spec)}


@torch.no_grad()
def anchor_outputs(spec: ModelSpec, state: Mapping[str, Tensor], batches: Sequence[Tensor],
                   need_y: set[tuple[int, str]] | None = None, need_h: set[int] | None = None) -> list[dict]:
    """Per batch, the anchor's own outputs the in-situ refit fits toward: ``(layer, axis) ->`` that
    reader's output (``axis`` in :data:`READERS`) for ``need_y``, ``("h", layer) ->`` the block's
    output for ``need_h`` (None: every reader, every block). One forward pass per batch, stopped
    after the last layer needed."""
    readers = reader_keys(spec)
    prefix = arch.layer_prefix(spec)
    layers = range(spec.num_hidden_layers)
    need_y = {(i, a) for i in layers for a in [*readers, *resid_groups(spec)]} if need_y is None else need_y
    need_h = set(layers) if need_h is None else need_h
    if not need_y and not need_h:
        return [{} for _ in batches]
    last = max([i for i, _ in need_y] + list(need_h))
    anchor = build_model(spec, state)
    out: list[dict] = []
    for b in batches:
        held, hooks = {}, []
        for (i, axis) in need_y:
            if axis.startswith("resid."):  # a residual group's normalised input
                mod = anchor.get_submodule(prefix.format(i=i) + _resid_module(spec, axis))
                hooks.append(mod.register_forward_pre_hook(
                    lambda m, a, k=(i, axis), held=held: held.__setitem__(k, a[0])))
                continue
            mod = anchor.get_submodule(prefix.format(i=i) + readers[axis].module)
            hooks.append(mod.register_forward_hook(lambda m, a, o, k=(i, axis), held=held: held.__setitem__(k, o)))
        for i in need_h:
            mod = anchor.get_submodule(prefix.format(i=i).rstrip("."))
            hooks.append(mod.register_forward_hook(lambda m, a, o, k=("h", i), held=held: held.__setitem__(k, _out(o))))

        def stop(m, a, o):
            raise ForwardDone  # nothing after the last layer needed
        hooks.append(anchor.get_submodule(prefix.format(i=last).rstrip(".")).register_forward_hook(stop))
        try:
            with contextlib.suppress(ForwardDone):
                anchor(input_ids=b[:, :-1], use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        out.append(held)
    return out


class _Recorder(torch.nn.Module):
    """Stands in for a decoder layer during :func:`_layer_calls`: records what the layer is called
    with and passes its hidden states on unchanged (the last one stops the forward pass)."""

    def __init__(self, calls: list, first: list, i: int, last: bool):
        super().__init__()
        self.calls, self.first, self.i, self.last = calls, first, i, last

    def forward(self, *args, **kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        if self.i == 0:
            self.first.append(h)
        self.calls[self.i] = (tuple(args[1:]), {k: v for k, v in kwargs.items() if k != "hidden_states"})
        if self.last:
            raise ForwardDone  # the final norm and head are not needed
        return h


def _layer_calls(model: torch.nn.Module, spec: ModelSpec, batch: Tensor) -> tuple[Tensor, list[tuple[tuple, dict]]]:
    """What each decoder layer of ``model`` is called with on ``batch``: (the first layer's input
    hidden states, per layer the other positional and keyword arguments: masks, position
    embeddings; they depend on the tokens, not the weights). With them a layer can be run alone
    on hidden states that the layers before it produced (the "catcher" of sequential
    post-training quantisation), instead of re-running the model from its embeddings. The layers
    are swapped for recorders while the embeddings run, so no layer computes anything here."""
    layers = model.get_submodule(arch.layer_prefix(spec).split(".{i}")[0])
    n = spec.num_hidden_layers
    calls: list = [None] * n
    first: list[Tensor] = []
    own = list(layers)
    try:
        for i in range(n):
            layers[i] = _Recorder(calls, first, i, i == n - 1)
        with contextlib.suppress(ForwardDone):
            model(input_ids=batch, use_cache=False)
    finally:
        for i, m in enumerate(own):
            layers[i] = m
    return first[0], calls


def _run_layer(block: torch.nn.Module, h: Tensor, call: tuple[tuple, dict]) -> Tensor:
    args, kwargs = call
    return _out(block(h, *args, **kwargs))


def _sequential(state, spec, tgt, maps, model, plain, starts, todo, spans, ys, readers, ridge, width_expand,
                depth_expand, final: bool = False, stream_ridge: float = 0.0
                ) -> dict[tuple[int | None, str], Tensor]:
    """One in-situ refit pass at ``ridge`` on ``model`` (the target, reset here to ``plain``;
    refit in place, so it is the refit target afterwards); ``starts``: per batch, what
    :func:`_layer_calls` recorded; ``stream_ridge``: the residual readers' and final norm's (with
    ``final``, the final norm is refit after the last layer). Returns the refits.

    Layer after layer, the hidden states entering target layer j are kept (every layer before j
    already refit), and only layer j is run to collect its readers' inputs: at most two partial
    or whole runs of the layer (o_proj's inputs, then down_proj's with o_proj refit), the layer's
    new output being the old one plus the FFN reader's change; not a pass from the embeddings per
    reader."""
    prefix_s, prefix_t = arch.layer_prefix(spec), arch.layer_prefix(tgt)
    params = dict(model.named_parameters())
    groups = resid_groups(spec)
    for name in {prefix_t.format(i=j) + key for j, axis in todo for key in _todo_keys(axis, readers, groups, tgt)}:
        params[name].data.copy_(plain[name])  # what an earlier pass refit
    per_layer: dict[tuple[int | None, str], Tensor] = {}
    hs = [h for h, _ in starts]
    calls = [c for _, c in starts]
    if final:
        norm = _final_norm(spec)
        params[norm].data.copy_(plain[norm])
    last = tgt.num_hidden_layers - 1 if final else max(j for j, _ in todo)
    shortcut = None  # whether a layer's output moves exactly by its refit FFN reader's change (checked once)
    for j in range(last + 1):
        block = model.get_submodule(prefix_t.format(i=j).rstrip("."))
        # the readers in the order the layer computes them (the attention's residual readers, o_proj,
        # the FFN's residual readers, down_proj: each one's inputs depend on those refit before it)
        axes = [a for a in ("resid.q", "q", "resid.ffn", "ffn") if (j, a) in todo]
        outs = None  # per batch (the reader's input, its output, the layer's output) before the refit
        for axis in axes:
            if axis.startswith("resid."):
                f = _collect(model.get_submodule(prefix_t.format(i=j) + _resid_module(spec, axis)), block, hs,
                             [c[j] for c in calls], [held[(maps.layers.idx[j], axis)] for held in ys])
                got = _solve_resid(state, spec, maps, groups[axis], j, f, stream_ridge, prefix_s)
                _load(params, got, state, spec, tgt, maps, j, prefix_s, prefix_t, width_expand, depth_expand)
                per_layer |= {(j, key): t for key, t in got.items()}
                continue
            r, p = readers[axis], maps.layers.idx[j]
            k = arch.axis_size(tgt, axis) * arch.unit(tgt, axis)
            mod = model.get_submodule(prefix_t.format(i=j) + r.module)
            # the FFN reader comes last in the layer: it runs on, and the layer's output is kept
            through = axis == "ffn" and shortcut is not False
            fit: list[Fit] = []
            got_io: list = []
            for h, call, held in zip(hs, calls, ys, strict=True):
                def fit_hook(m, args, held=held, p=p, axis=axis, j=j, k=k, fit=fit, through=through):
                    y = held[(p, axis)]
                    if axis == "ffn" and j in spans:
                        s0, s1 = spans[j]
                        y = y + (held[("h", s1)] - held[("h", s0)])
                    if not fit:
                        fit.append(Fit.zeros(k, y.shape[-1]))
                    fit[0].add(args[0], y)
                    if not through:
                        raise ForwardDone  # nothing after this reader is needed

                def out_hook(m, args, out, got_io=got_io):
                    got_io.append((args[0], out))
                hooks = [mod.register_forward_pre_hook(fit_hook)]
                if through:
                    hooks.append(mod.register_forward_hook(out_hook))
                try:
                    out = _run_layer(block, h, call[j])
                    if through:
                        got_io[-1] += (out,)
                except ForwardDone:
                    pass
                finally:
                    for hk in hooks:
                        hk.remove()
            if through:
                outs = got_io
            got = _solve(state, spec, maps, r, j, axis, fit[0],
                         max(ridge, SPAN_RIDGE) if (axis == "ffn" and j in spans) else ridge, prefix_s)
            per_layer |= {(j, key): t for key, t in got.items()}
            _load(params, got, state, spec, tgt, maps, j, prefix_s, prefix_t, width_expand, depth_expand)
        if j == last and not final:
            break
        if outs is None:
            hs = [_run_layer(block, h, call[j]) for h, call in zip(hs, calls, strict=True)]
            continue
        # The FFN reader's output is added to the residual stream as it is (llama: down_proj,
        # GPT-2: c_proj then dropout, the identity in eval mode), so the refit layer's output is
        # the old one plus the reader's change: no second run of the layer. Checked against a
        # rerun on the first batch the first time; a family where it does not hold reruns.
        mod = model.get_submodule(prefix_t.format(i=j) + readers["ffn"].module)
        new = [h_old + (mod(x) - y_old) for x, y_old, h_old in outs]
        if shortcut is None:
            shortcut = bool(torch.allclose(new[0], _run_layer(block, hs[0], calls[0][j]), rtol=1e-4, atol=1e-4))
            if not shortcut:
                new = [_run_layer(block, h, call[j]) for h, call in zip(hs, calls, strict=True)]
        hs = new
    if final:
        norm = _final_norm(spec)
        g = _solve_final(state, spec, tgt, maps, hs, [held[("h", spec.num_hidden_layers - 1)] for held in ys],
                         stream_ridge)
        per_layer[(None, norm)] = g
        params[norm].data.copy_(trans_tensor(norm, _swapped(state, norm, g), spec, tgt, maps,
                                             width_expand=width_expand, depth_expand=depth_expand))
    return per_layer


def _final_norm(spec: ModelSpec) -> str | None:
    """The final norm's weight, for a family whose residual readers are refit (RMSNorm)."""
    if arch.family(spec).norm != "rms":
        return None
    return next(n for n, roles in arch.global_table(spec).items() if roles == (("resid", "norm"),))


def _solve_final(state, spec: ModelSpec, tgt: ModelSpec, maps: Maps, hs: Sequence[Tensor],
                 targets: Sequence[Tensor], lam: float) -> Tensor:
    """The final norm's weight refit on the kept channels, toward the anchor's logits.

    The head (tied to the embedding, or not) keeps its plain columns ``E_K``; only the norm's
    weight ``g'`` (k values) changes, so that ``E_K (g' * u)`` is the least-squares fit of the
    anchor's logits ``E (g * v)`` over the calibration tokens (``u``, ``v``: the pruned model's and
    the anchor's final hidden states divided by their RMS). Normal equations, with ``P = E_K^T E_K``,
    ``Q = E_K^T E``: ``((P * U^T U / N) + lam I) g' = (Q * U^T V / N) g + lam g_K`` (``*``
    elementwise), the ridge pulling toward the plain prune's weight. The channels the prune drops
    and the RMS it changes otherwise shift every logit (the tiny chain's source 576 -> 504: one
    scale on the plain weight alone was worth 0.06 nats after the layers' refit). Returns the
    weight in the anchor's coordinates (dropped channels 0)."""
    table = arch.family(spec).global_table  # the untied head's role included
    want = ("resid", "out") if spec.tie_word_embeddings else ("resid", "in")
    e = state[next(n for n, roles in table.items() if roles == (("vocab", "-"), want))].float()  # (V, d)
    norm = _final_norm(spec)
    g = state[norm].double()
    cols = torch.tensor(list(maps.resid.idx), dtype=torch.long)
    k, eps = len(cols), spec.norm_eps
    uu = torch.zeros(k, k, dtype=torch.float64)
    uv = torch.zeros(k, e.shape[1], dtype=torch.float64)
    n = 0
    for x, y in zip(hs, targets, strict=True):
        u = x.reshape(-1, x.shape[-1]).float()
        v = y.reshape(-1, y.shape[-1]).float()
        u = u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + eps)
        v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)
        uu += (u.T @ u).double()
        uv += (u.T @ v).double()
        n += u.shape[0]
    e_k = e[:, cols]
    eke = (e_k.T @ e).double()  # (k, d), float32 products (the vocabulary's sums), then float64
    a = eke[:, cols] * (uu / n)
    b = (eke * (uv / n)) @ g
    scale = float(a.diagonal().mean())
    lam *= scale if scale > 0 else 1.0
    sol = _spd_solve(a + lam * torch.eye(k, dtype=torch.float64), (b + lam * g[cols])[:, None])[:, 0]
    out = torch.zeros_like(g)
    out[cols] = sol
    return out.to(state[norm].dtype)


def _keys(r: Reader) -> list[str]:
    return [r.key] + ([r.bias] if r.bias else [])


def _todo_keys(axis: str, readers: dict[str, Reader], groups: dict[str, tuple[str, ...]], spec: ModelSpec
               ) -> list[str]:
    """The layer keys a refit of ``axis`` writes (a residual group's biases included)."""
    if axis in readers:
        return _keys(readers[axis])
    table = arch.layer_table(spec)
    return [k for key in groups[axis] for k in (key, _bias_of(key)) if k in table]


def _bias_of(key: str) -> str:
    return key.rsplit(".", 1)[0] + ".bias"


def _load(params, got: Mapping[str, Tensor], state, spec, tgt, maps, j, prefix_s, prefix_t, width_expand,
          depth_expand) -> None:
    """Refit tensors (the anchor's coordinates) into the target model's layer ``j`` through Trans, so
    what follows sees them refit."""
    p = maps.layers.idx[j]
    for key, t in got.items():
        name = prefix_t.format(i=j) + key
        read = _swapped(state, prefix_s.format(i=p) + key, t)
        params[name].data.copy_(trans_tensor(name, read, spec, tgt, maps, width_expand=width_expand,
                                             depth_expand=depth_expand))


def _collect(mod: torch.nn.Module, block: torch.nn.Module, hs: Sequence[Tensor], calls: Sequence,
             targets: Sequence[Tensor]) -> Fit:
    """The normal equations of ``mod``'s input inside the target's layer ``block`` (run on the hidden
    states ``hs`` up to ``mod`` only) against ``targets`` (per batch, the anchor's input to the same
    module)."""
    fit: list[Fit] = []
    target: list[Tensor] = []

    def hook(m, args):
        x, y = args[0], target[0]
        if not fit:
            fit.append(Fit.zeros(x.shape[-1], y.shape[-1]))
        fit[0].add(x, y)
        raise ForwardDone  # nothing after this module is needed

    handle = mod.register_forward_pre_hook(hook)
    try:
        for h, call, y in zip(hs, calls, targets, strict=True):
            target[:] = [y]
            with contextlib.suppress(ForwardDone):
                _run_layer(block, h, call)
    finally:
        handle.remove()
    return fit[0]


def _solve_resid(state, spec: ModelSpec, maps: Maps, keys: Sequence[str], j: int, f: Fit, lam: float,
                 prefix: str) -> dict[str, Tensor]:
    """The residual readers ``keys`` of target layer ``j`` refit on the kept channels.

    With ``X'`` the pruned model's normalised input (k kept channels) and ``H`` the anchor's (all d
    channels), every reader ``W`` (out x d) gets ``W_K' = W A^T`` with one map ``A`` (d x k) for
    the whole group, ``A^T = (X'^T X' / N + lam I)^-1 (X'^T H / N + lam E_K)`` (``E_K`` picks the
    kept channels: the plain prune is the ridge's anchor point). That is each reader's own ridge
    fit of its output ``H W^T`` (least squares is linear in the target, and the ridge pulls toward
    ``E_K W^T``), for the price of one solve. A reader with a bias (Qwen2's q, k, v) is fit centred
    and its bias takes the means' difference."""
    p = maps.layers.idx[j]
    cols = torch.tensor(list(maps.resid.idx), dtype=torch.long)
    k = len(cols)
    g, c = f.gram / f.count, f.cross / f.count
    mu, hmu = f.xsum / f.count, f.ysum / f.count
    table = arch.layer_table(spec)
    biased = any(_bias_of(key) in table for key in keys)
    if biased:
        g, c = g - torch.outer(mu, mu), c - torch.outer(mu, hmu)
    scale = float(g.diagonal().mean())
    lam *= scale if scale > 0 else 1.0
    pick = torch.zeros(k, c.shape[1], dtype=torch.float64)
    pick[torch.arange(k), cols] = 1.0
    a_t = _spd_solve(g + lam * torch.eye(k, dtype=torch.float64), c + lam * pick)  # (k, d)
    out = {}
    for key in keys:
        w = state[prefix.format(i=p) + key]
        dim = [io for _, io in table[key]].index("in")
        wd = (w if dim == 1 else w.T).double()  # (out, d)
        new = torch.zeros_like(wd)
        new[:, cols] = wd @ a_t.T
        out[key] = (new if dim == 1 else new.T).to(w.dtype).contiguous()
        if _bias_of(key) in table:
            b = state[prefix.format(i=p) + _bias_of(key)]
            out[_bias_of(key)] = (b.double() + wd @ (hmu - mu @ a_t)).to(b.dtype)
    return out


def _solve(state, spec: ModelSpec, maps: Maps, r: Reader, j: int, axis: str, f: Fit, lam: float,
           prefix: str) -> dict[str, Tensor]:
    """The ridge solution of one target reader, in the anchor's coordinates (unkept columns 0)."""
    p = maps.layers.idx[j]
    w = state[prefix.format(i=p) + r.key]
    bias = state[prefix.format(i=p) + r.bias] if r.bias else None
    wd = (w if r.dim == 1 else w.T).double()  # (d, n)
    cols = _ordered_cols(getattr(maps, axis)[j].idx, arch.unit(spec, axis))
    g, c = f.gram / f.count, f.cross / f.count
    mu, ymu = f.xsum / f.count, f.ysum / f.count
    if bias is not None:  # centred: the bias absorbs the means
        g, c = g - torch.outer(mu, mu), c - torch.outer(mu, ymu)
    w_k = wd[:, cols]  # (d, k): the plain subset's columns, in target order
    scale = float(g.diagonal().mean())
    lam *= scale if scale > 0 else 1.0
    sol = _spd_solve(g + lam * torch.eye(len(cols), dtype=torch.float64), c + lam * w_k.T)  # (k, d)
    new = torch.zeros_like(wd)
    new[:, cols] = sol.T
    out = {r.key: (new if r.dim == 1 else new.T).to(w.dtype).contiguous()}
    if bias is not None:
        out[r.bias] = (ymu - mu @ sol).to(bias.dtype)
    return out


def _spd_solve(a: Tensor, b: Tensor) -> Tensor:
    """``a^-1 b`` for a symmetric positive definite ``a`` (a Gram matrix plus a ridge of at least a
    tenth of its mean diagonal): Cholesky in float32, where the ridge keeps the system well
    conditioned (the statistics are accumulated and centred in float64 before). On the tiny chain's
    source pruned to three targets the refit's check losses matched float64's to 5 decimals, and
    the ~30M target's repair took 6.7 s instead of 7.8. LU in float64 where rounding left ``a`` not
    numerically positive definite in float32. Returns float64."""
    low, info = torch.linalg.cholesky_ex(a.float())
    if int(info) == 0:
        return torch.cholesky_solve(b.float(), low).double()
    return torch.linalg.solve(a, b)


def _ordered_cols(idx: Sequence[int], unit: int) -> Tensor:
    """Columns of units ``idx`` in that order (a target's unit order), ``unit`` columns each."""
    u = torch.tensor(list(idx), dtype=torch.long)
    return (u[:, None] * unit + torch.arange(unit)).reshape(-1)


def insitu_repair(spec: ModelSpec, state: Mapping[str, Tensor], tgt: ModelSpec, maps: Maps,
                  batch: Tensor | Sequence[Tensor], **kw) -> tuple[dict[str, Tensor], dict]:
    """Trans of ``state`` onto ``tgt`` with the in-situ refits (:func:`insitu_refits`); and its report."""
    per_layer, report = insitu_refits(spec, state, tgt, maps, batch, **kw)
    opts = {k: kw[k] for k in ("width_expand", "depth_expand") if k in kw}
    return trans_with(spec, state, tgt, maps, per_layer, **opts), report
