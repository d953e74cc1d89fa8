"""Two ways to correct the blend after the alpha search (an experiment; neither is in the service)

    OMP_NUM_THREADS=1 python bench/post_refit.py --chain default --only 'width only (16x192)'
    # -> docs/data/post-refit-<chain>.json

The service's init (``cbd.inits.run.prepare``, the default request: both terms repaired, the
per-block alphas searched and checked) is a blend of two Trans: its features are a mix of both
anchors'. Two corrections of that blend, each teacher-free and gradient-free, on the chain's
calibration batch:

- ``q+ffn ridge R``: the tensors that *write* each block's result into the residual stream
  (``o_proj``, ``down_proj``) refit in situ, layer after layer, by ridge least squares on the
  inputs they get inside the blended model (every layer before already refit), toward what the
  bigger anchor's own ``o_proj``/``down_proj`` write at the layer the target keeps (on the kept
  residual channels; before a dropped span of its layers, plus what the span adds: the repair's
  cached anchor outputs). The ridge pulls toward the blend's own writer (ridge R times the mean
  diagonal of the inputs' Gram matrix), so a large ridge is the blend itself.
- ``rescale``: REPAIR (Jordan et al. 2022, "REPAIR: REnormalizing Permuted Activations for
  Interpolation Repair"): an interpolated network's units lose variance where the endpoints'
  units are not perfectly correlated; each unit's contribution to the residual stream (an FFN
  neuron's, a head's) is set, by scaling its writer's columns, to the RMS the same unit has in
  the two terms, interpolated at the block's alpha, layer after layer (factors clipped to
  [0.5, 2]).

Each scored in float32 on the two halves of the chain's validation batch (the service's search
half and check half: ``kept`` says whether both halves improve), then on the held-out work of
every corpus (seeds of windows) beside the service's init and the best single anchor.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import torch

from cbd.errors import ForwardDone
from cbd.inits.calibration import _Lazy, anchor_cache, calibration_tokens
from cbd.repair.refit import Fit, _layer_calls, _run_layer, _spd_solve, dropped_spans, reader_keys
from cbd.shape import arch
from cbd.train.models import build_model, eval_loss

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.interp import experiment_main, paired, score  # noqa: E402

RIDGES = (0.1, 0.3, 1.0)


def _contrib_rms(x: torch.Tensor, w: torch.Tensor, unit: int) -> torch.Tensor:
    """Per unit of ``unit`` inputs (an FFN neuron: 1, a head: head_dim), the RMS over tokens of what
    it writes through ``w`` (d_out x k_in) into the residual stream."""
    x = x.reshape(-1, x.shape[-1]).float()
    if unit == 1:
        return x.pow(2).mean(0).sqrt() * w.float().norm(dim=0)
    n = x.shape[-1] // unit
    out = torch.empty(n)
    for h in range(n):
        y = x[:, h * unit:(h + 1) * unit] @ w[:, h * unit:(h + 1) * unit].float().T
        out[h] = y.pow(2).sum(-1).mean().sqrt()
    return out


@torch.no_grad()
def writer_rms(tgt, state, tokens, *, rescale=None) -> dict[tuple[int, str], torch.Tensor]:
    """``(layer, axis) ->`` each unit's contribution RMS over ``tokens`` in the model of ``state``.
    ``rescale`` ((layer, axis) -> target RMS per unit): the writer's columns are rescaled in place,
    layer after layer as the pass reaches them (REPAIR, Jordan et al. 2022: an interpolated
    network's units lose variance; each is set back to the interpolation of the endpoints'),
    so every layer's statistics are those of the model with the layers before it corrected.
    Returns the statistics before any rescale of that unit; with ``rescale``, also the tensors."""
    model = build_model(tgt, state)
    readers = reader_keys(tgt)
    prefix = arch.layer_prefix(tgt)
    got, new, hooks = {}, {}, []
    units = {"ffn": 1, "q": tgt.head_dim}
    for j in range(tgt.num_hidden_layers):
        for axis, r in readers.items():
            mod = model.get_submodule(prefix.format(i=j) + r.module)

            def hook(m, args, j=j, axis=axis, key=prefix.format(i=j) + r.key):
                rms = _contrib_rms(args[0], m.weight, units[axis])
                got[(j, axis)] = rms
                if rescale is not None and (j, axis) in rescale:
                    c = (rescale[(j, axis)] / rms.clamp_min(1e-12)).clamp(0.5, 2.0)
                    m.weight.mul_(c.repeat_interleave(units[axis])[None, :])
                    new[key] = m.weight.detach().clone()
            hooks.append(mod.register_forward_pre_hook(hook))
    try:
        model(input_ids=tokens[:, :-1], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return (got, new) if rescale is not None else got


@torch.no_grad()
def writer_refit(li, model, batches, ys, ridge: float, axes=("q", "ffn")) -> dict[str, torch.Tensor]:
    """Refit ``model``'s (the blend's) writers in place toward the bigger anchor's outputs ``ys``
    (per batch, ``(anchor layer, axis) -> output`` and ``("h", layer)`` for the spans); returns
    the refit tensors (target names)."""
    spec, tgt, maps = li.big.spec, li.target, li.maps_big
    readers = reader_keys(tgt)
    prefix = arch.layer_prefix(tgt)
    cols = torch.tensor(list(maps.resid.idx), dtype=torch.long)
    spans = dropped_spans(spec, maps)
    starts = [_layer_calls(model, tgt, b[:, :-1]) for b in batches]
    hs, calls = [h for h, _ in starts], [c for _, c in starts]
    out = {}
    for j in range(tgt.num_hidden_layers):
        block = model.get_submodule(prefix.format(i=j).rstrip("."))
        if not maps.layers.new[j]:
            p = maps.layers.idx[j]
            for axis in axes:
                r = readers[axis]
                mod = model.get_submodule(prefix.format(i=j) + r.module)
                fit: list[Fit] = []
                for h, call, held in zip(hs, calls, ys, strict=True):
                    y = held[(p, axis)]
                    if axis == "ffn" and j in spans:
                        s0, s1 = spans[j]
                        y = y + (held[("h", s1)] - held[("h", s0)])
                    y = y[..., cols]

                    def hook(m, args, y=y, fit=fit):
                        if not fit:
                            fit.append(Fit.zeros(args[0].shape[-1], y.shape[-1]))
                        fit[0].add(args[0], y)
                        raise ForwardDone
                    hk = mod.register_forward_pre_hook(hook)
                    try:
                        with contextlib.suppress(ForwardDone):
                            _run_layer(block, h, call[j])
                    finally:
                        hk.remove()
                f = fit[0]
                w = mod.weight  # (d_out, k_in): llama writers read on dim 1, no bias
                g, c = f.gram / f.count, f.cross / f.count
                scale = float(g.diagonal().mean())
                lam = ridge * (scale if scale > 0 else 1.0)
                sol = _spd_solve(g + lam * torch.eye(g.shape[0], dtype=torch.float64), c + lam * w.double().T)
                w.copy_(sol.T.to(w.dtype))
                out[prefix.format(i=j) + r.key] = w.detach().clone()
        hs = [_run_layer(block, h, call[j]) for h, call in zip(hs, calls, strict=True)]
    return out


def main() -> None:
    experiment_main("post_refit.py", __doc__, one_target, "post-refit", ridges=list(RIDGES))


def one_target(tname: str, manifest, init, windows, val) -> dict:
    """The service's init of one target, each correction of it, and the best single anchor, scored."""
    first, second = val[0::2], val[1::2]
    plan, li, alpha, calib, service_alpha = init
    state = li.state(service_alpha)
    tokens = calibration_tokens(manifest)
    batches = list(tokens.split(4))
    spec, maps = li.big.spec, li.maps_big
    spans = dropped_spans(spec, maps)
    need_y = {(p, a) for j, p in enumerate(maps.layers.idx) if not maps.layers.new[j] for a in ("q", "ffn")}
    need_h = {i for s in spans.values() for i in s}
    ys = anchor_cache(manifest, plan.big, tokens, tag=li.big.tag)(spec, _Lazy(li.big.read, arch.param_names(spec)),
                                                                   batches, need_y, need_h)
    model = build_model(plan.target, state)
    svc = {"first": eval_loss(model, first, chunked=True), "second": eval_loss(model, second, chunked=True)}
    svc_held = score(plan.target, state, windows)
    grid = calib["calibration_loss"]
    end = 1.0 if grid["1.0"] <= grid["0.0"] else 0.0
    single = score(plan.target, li.state(end), windows)
    variants = {}
    rms_small, rms_big = writer_rms(plan.target, li.state(1.0), tokens), writer_rms(plan.target, li.state(0.0), tokens)

    def scored(name: str, new: dict, model, note: str, **extra) -> None:
        v = {"first": eval_loss(model, first, chunked=True), "second": eval_loss(model, second, chunked=True), **extra}
        v["kept"] = v["first"] < svc["first"] and v["second"] < svc["second"]
        v["heldout"] = h = score(plan.target, new, windows)
        variants[name] = v
        print(f"{tname:26s} {name:16s} val {v['first']:.4f}/{v['second']:.4f} (service {svc['first']:.4f}/"
              f"{svc['second']:.4f}) held-out {h['mean']:.3f} minus service {h['mean'] - svc_held['mean']:+.3f}"
              f"{paired(h, svc_held)} minus single {h['mean'] - single['mean']:+.3f}{paired(h, single)} {note}",
              flush=True)

    def a_of(j):
        return float(service_alpha[f"L{j}"]) if isinstance(service_alpha, dict) else float(service_alpha)
    for which in (("q", "ffn"), ("ffn",)):
        want = {k: torch.lerp(rms_big[k], rms_small[k], a_of(k[0])) for k in rms_big if k[1] in which}
        before, got = writer_rms(plan.target, state, tokens, rescale=want)
        new = state | got
        shrink = {"+".join(which): round(float(torch.cat([before[k] / want[k].clamp_min(1e-12) for k in want]).median()), 4)}
        scored(f"rescale {'+'.join(which)}", new, build_model(plan.target, new),
               f"median blend/target rms {shrink}", shrink=shrink)
    for ridge in RIDGES:
        m = build_model(plan.target, state)
        t1 = time.perf_counter()
        got = writer_refit(li, m, batches, ys, ridge)
        secs = time.perf_counter() - t1
        scored(f"q+ffn ridge {ridge}", state | got, m, f"[{secs:.1f} s]", seconds=round(secs, 2))
    print(f"{tname:26s} service {svc_held['mean']:.3f} single({end:.0f}) {single['mean']:.3f} "
          f"(service-single {svc_held['mean'] - single['mean']:+.3f}{paired(svc_held, single)})", flush=True)
    return {"target": tname, "shape": list(plan.target.shape), "small": plan.small, "big": plan.big,
            "service_alphas": service_alpha, "service_val": svc, "service": svc_held,
            "best_single": {"alpha": end, **single}, "variants": variants}


if __name__ == "__main__":
    main()
