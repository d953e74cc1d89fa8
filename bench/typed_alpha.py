"""Does an alpha per kind of tensor (attention, MLP) gain over the service's alpha per block? (an experiment)

    OMP_NUM_THREADS=2 python bench/typed_alpha.py --chain default   # -> docs/data/typed-alpha-default.json

The service blends the two repaired LInit terms with one alpha per block of target layers
(``cbd.inits.calibration.calibrate_blocks``): a block's attention and MLP tensors move together.
The variants measured here start from exactly what the service chose (``cbd.inits.run.prepare``,
the default request) and give the attention tensors (``self_attn.*``, ``input_layernorm``) and the
MLP tensors (``mlp.*``, ``post_attention_layernorm``) alphas of their own:

- ``typed grid``: one offset for all attention tensors and one for all MLP tensors, added to the
  service's per-layer alphas (clipped to [0, 1]), on a 9 x 9 grid of offsets;
- ``typed blocks``: from the grid's best, coordinate descent over (block, kind) groups, each
  moved by +-0.125 and +-0.25;

each scored in float32 on the first half of the chain's validation batch (the service's search
half), kept only where the second half agrees (the service's ``"half"`` check), then scored on the
held-out work of every corpus (3 seeds of windows) beside the service's init and the best single
anchor (the better end of the service's own grid, by validation).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from cbd.inits.calibration import layer_blocks
from cbd.shape import arch
from cbd.train.models import build_model, eval_loss

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.interp import experiment_main, paired, score  # noqa: E402

OFFSETS = (-0.5, -0.375, -0.25, -0.125, 0.0, 0.125, 0.25, 0.375, 0.5)
MOVES = (-0.25, -0.125, 0.125, 0.25)


def kind(name: str) -> str:
    """``outer``, or ``attn``/``mlp`` of a layer tensor."""
    layer, key = arch.split_name(name)
    if layer is None:
        return "outer"
    return "mlp" if ("mlp." in key or "post_attention" in key) else "attn"


def main() -> None:
    experiment_main("typed_alpha.py", __doc__, one_target, "typed-alpha", offsets=list(OFFSETS), moves=list(MOVES))


def one_target(tname: str, manifest, init, windows, val) -> dict:
    """The service's init of one target and the two typed variants, scored."""
    first, second = val[0::2], val[1::2]
    plan, li, alpha, calib, service = init
    n_layers = plan.target.num_hidden_layers
    per_layer = {g: (service[g] if isinstance(service, dict) else float(service))
                 for g in ["outer"] + [f"L{j}" for j in range(n_layers)]}
    names = arch.param_names(plan.target)
    small, big = li.state(1.0), li.state(0.0)
    own = {n: li.own(n) if li.fades else None for n in names}
    model = build_model(plan.target, big)
    params = dict(model.named_parameters())

    def base(n: str) -> float:
        layer, _ = arch.split_name(n)
        return per_layer["outer" if layer is None else f"L{layer}"]

    def state_of(offset_of) -> dict[str, torch.Tensor]:
        out = {}
        for n in names:
            a = min(1.0, max(0.0, base(n) + offset_of(n)))
            t = torch.lerp(big[n], small[n], a)
            if own[n] is not None:
                t = torch.where(own[n], t, big[n])
            out[n] = t
        return out

    cache: dict = {}

    def loss(key, offset_of, batches) -> float:
        k = (key, id(batches))
        if k not in cache:
            with torch.no_grad():
                for n, t in state_of(offset_of).items():
                    if n in params:
                        params[n].copy_(t)
            cache[k] = eval_loss(model, batches, chunked=True)
        return cache[k]

    zero = (0.0, 0.0)

    def typed(off):  # off: (attn, mlp) offsets
        return lambda n: {"attn": off[0], "mlp": off[1]}.get(kind(n), 0.0)

    grid = {(a, m): loss(("g", a, m), typed((a, m)), first) for a in OFFSETS for m in OFFSETS}
    gbest = min(grid, key=grid.get)
    cut = layer_blocks(n_layers, min(6, n_layers))
    groups = [(k, kd) for k in range(len(cut)) for kd in ("attn", "mlp")]
    block_of = {j: k for k, layers in enumerate(cut) for j in layers}
    current = {g: gbest[0] if g[1] == "attn" else gbest[1] for g in groups}

    def blocks_fn(cur):
        def f(n):
            layer, _ = arch.split_name(n)
            return 0.0 if layer is None else cur[(block_of[layer], kind(n))]
        return f

    key_of = lambda cur: ("b", tuple(sorted(cur.items())))  # noqa: E731
    best = loss(key_of(current), blocks_fn(current), first)
    for g in groups:
        for mv in MOVES:
            cand = current | {g: current[g] + mv}
            v = loss(key_of(cand), blocks_fn(cand), first)
            if v < best - 1e-6:
                best, current = v, cand
    found = {"typed grid": (typed(gbest), ("g", *gbest)), "typed blocks": (blocks_fn(current), key_of(current))}
    service_second = loss(("g", *zero), typed(zero), second)
    results = {}
    for vname, (fn, key) in found.items():
        checked = loss(key, fn, second)
        kept = checked < service_second - 1e-6
        results[vname] = {"first_half": round(loss(key, fn, first), 5), "second_half": round(checked, 5),
                          "kept": kept, "heldout": score(plan.target, state_of(fn), windows)}
    svc = score(plan.target, state_of(typed(zero)), windows)
    grid_losses = {float(a): v for a, v in calib["calibration_loss"].items()}
    end = 1.0 if grid_losses[1.0] <= grid_losses[0.0] else 0.0
    single = score(plan.target, state_of(lambda n, e=end: e - base(n)), windows)
    row = {"target": tname, "shape": list(plan.target.shape), "small": plan.small, "big": plan.big,
           "service_alphas": service, "grid_best_offsets": list(gbest),
           "grid": {f"{a},{m}": round(v, 5) for (a, m), v in grid.items()},
           "blocks_offsets": {f"B{k}.{kd}": v for (k, kd), v in current.items()},
           "service_first_half": round(grid[zero], 5), "service_second_half": round(service_second, 5),
           "service": svc, "best_single": {"alpha": end, **single}, "variants": results}
    print(f"{tname:26s} service {svc['mean']:.3f}  single({end:.0f}) {single['mean']:.3f} "
          f"(service-single {svc['mean'] - single['mean']:+.3f}{paired(svc, single)})", flush=True)
    for vname, r in results.items():
        h = r["heldout"]
        print(f"{'':26s} {vname:13s} {h['mean']:.3f}  minus service {h['mean'] - svc['mean']:+.3f}"
              f"{paired(h, svc)}  minus single {h['mean'] - single['mean']:+.3f}{paired(h, single)}  "
              f"val halves {r['first_half']:.4f}/{r['second_half']:.4f} (service {grid[zero]:.4f}/"
              f"{service_second:.4f}) kept={r['kept']}", flush=True)
    return row


if __name__ == "__main__":
    main()
