"""Does the blend gain when the bigger anchor's own units come at full weight? (an experiment)

    OMP_NUM_THREADS=2 python bench/units.py --chain tiny      # -> docs/data/units-tiny.json

The issue's third item, measured. Between two aligned anchors S (smaller) and B (bigger), LInit
blends every target parameter: ``lerp(Trans(B), Trans(S), alpha)``. Where the target is bigger than
S on an axis, Trans(S) fills the extra units (clones of S's own, their outputs split, so S's
function is kept); the blend then mixes B's real unit with a clone of some other unit of S. The
variant measured here, ``bigger's own units at full weight``, blends only where Trans(S) holds one
of S's own parameters and takes B's value everywhere else (which positions those are: Trans(S) of
an all-ones S with new units zeroed). At alpha 0 both are Trans(B); at alpha 1 the variant is S's
units plus B's units that S lacks. And the service's fading blend (``LInitOptions.blend`` "fade",
the default since it was measured here): S's term holds B's units that S lacks with their writes
into the residual stream at 0, so at alpha 1 it is S's function, and the blend fades B's units in.

For every paired target of ``bench/interp.py``, both repaired terms as the service makes them
(``cbd.inits.calibration.repair_terms``), each scheme's alpha chosen on the chain's validation
batch from a grid, then scored on the held-out work of every corpus (3 seeds of windows).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from cbd.core.manifest import load_manifest
from cbd.core.plan import make_plan
from cbd.core.request import InitRequest
from cbd.inits.calibration import repair_terms, validation_batches
from cbd.inits.run import linit_for
from cbd.shape import arch
from cbd.train.models import build_model, eval_loss

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.interp import EXTRA, heldout, score  # noqa: E402
from bench.quality import DATA, TARGETS  # noqa: E402

GRID = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)


def own_mask(li) -> dict[str, torch.Tensor]:
    """name -> True where Trans(S) holds one of S's own units on every axis of the tensor (False:
    a unit S lacks, a duplicate or new one; every position of a layer S lacks)."""
    maps, tgt = li.maps_small, li.target
    table = arch.layer_table(tgt) | arch.family(tgt).global_table

    def own(axis: str, j: int | None) -> torch.Tensor:
        m = {"resid": maps.resid}.get(axis) or (getattr(maps, axis)[j] if axis in ("q", "kv", "ffn") else None)
        if m is None:  # vocabulary, head dim: shared
            return torch.ones(arch.axis_size(tgt, axis) * arch.unit(tgt, axis), dtype=torch.bool)
        return (~torch.tensor(m.new)).repeat_interleave(arch.unit(tgt, axis))

    out = {}
    for n in arch.param_names(tgt):
        j, key = arch.split_name(n)
        if j is not None and maps.layers.new[j]:
            out[n] = torch.zeros(arch.tensor_shape(tgt, n), dtype=torch.bool)
            continue
        mask = None
        for axis, _ in table[key]:
            v = own(axis, j)
            mask = v if mask is None else mask[..., None] & v
        out[n] = mask
    return out


def blend(small, big, mask, alpha: float, masked: bool) -> dict[str, torch.Tensor]:
    out = {}
    for n in small:
        t = torch.lerp(big[n], small[n], alpha)
        out[n] = torch.where(mask[n], t, big[n]) if masked else t
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chain", default="tiny")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--only-scheme", help="one scheme by its name")
    ap.add_argument("--only", help="comma-separated target names")
    ap.add_argument("--name", help="writes docs/data/units-<chain>-<name>.json instead")
    args = ap.parse_args()
    manifest = load_manifest(args.chain)
    windows = [heldout(manifest, s, batches=2, seq_len=128) for s in range(args.seeds)]
    val = validation_batches(manifest)
    rows = []
    for tname, shape in {**TARGETS[args.chain], **EXTRA[args.chain]}.items():
        if args.only and tname not in args.only.split(","):
            continue
        plan = make_plan(InitRequest(chain=args.chain, architecture=shape, blend="plain"), manifest)
        if plan.small is None or plan.big is None or plan.small == plan.big:
            continue
        t0 = time.perf_counter()
        li = linit_for(plan, manifest)
        repair_terms(li, {"small": plan.small, "big": plan.big}, manifest)
        small, big, mask = li.state(1.0), li.state(0.0), own_mask(li)
        # the service's fading blend (LInitOptions.blend "fade"): its alpha-1 end is the small term
        fplan = plan.model_copy(update={"trans": plan.trans.model_copy(update={"blend": "fade"})})
        lf = linit_for(fplan, manifest)
        repair_terms(lf, {"small": plan.small, "big": plan.big}, manifest)
        fade = lf.state(1.0)
        share = sum(int(m.sum()) for m in mask.values()) / sum(m.numel() for m in mask.values())
        model = build_model(plan.target, big)
        params = dict(model.named_parameters())
        schemes = {"plain blend": (small, False), "bigger's own units at full weight": (small, True),
                   "bigger's units faded in": (fade, False)}
        for scheme, (s_term, masked) in schemes.items():
            if args.only_scheme and scheme != args.only_scheme:
                continue
            grid = {}
            for a in GRID:
                with torch.no_grad():
                    for n, t in blend(s_term, big, mask, a, masked).items():
                        if n in params:
                            params[n].copy_(t)
                grid[a] = eval_loss(model, val)
            best = min(grid, key=grid.get)
            r = score(plan.target, blend(s_term, big, mask, best, masked), windows)
            rows.append({"target": tname, "shape": list(plan.target.shape), "small": plan.small, "big": plan.big,
                         "scheme": scheme, "validation_by_alpha": {str(a): round(v, 4) for a, v in grid.items()},
                         "alpha": best, "validation_loss": round(grid[best], 4), "own_share": round(share, 4), **r})
            print(f"{tname:22s} {scheme:36s} val " + " ".join(f"{a}:{v:.3f}" for a, v in grid.items())
                  + f"  -> alpha {best}  held-out {r['mean']:.3f} ± {r['std']:.3f}", flush=True)
        print(f"{tname:22s} ({time.perf_counter() - t0:.0f} s; S's own units: {share:.1%} of the target's parameters)",
              flush=True)
    out = {"command": "python bench/units.py " + " ".join(sys.argv[1:]), "chain": args.chain, "seeds": args.seeds,
           "grid": list(GRID), "rows": rows}
    stem = f"units-{args.chain}{'-' + args.name if args.name else ''}"
    (DATA / f"{stem}.json").write_text(json.dumps(out, indent=1) + "\n")
    plot(out, DATA.parent / f"{stem}.png")


def plot(out: dict, path: Path) -> None:
    """Validation loss along alpha, one panel per target, one line per scheme."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(dict.fromkeys(r["target"] for r in out["rows"]))
    fig, axes = plt.subplots(1, len(targets), figsize=(3.2 * len(targets), 3.4), squeeze=False)
    for ax, t in zip(axes[0], targets, strict=True):
        for r in (r for r in out["rows"] if r["target"] == t):
            xs = [float(a) for a in r["validation_by_alpha"]]
            ax.plot(xs, list(r["validation_by_alpha"].values()), marker=".", label=r["scheme"])
        ax.set_title(f"{t}\n{r['small']} (alpha 1) + {r['big']} (alpha 0)", fontsize=8)
        ax.set_xlabel("alpha (weight of the smaller anchor)", fontsize=7)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("validation loss at step 0 (nats/token)", fontsize=7)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"chain {out['chain']}: the loss along alpha, both terms repaired (the chain's validation batch)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
