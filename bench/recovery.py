"""Does the init's head start survive training? The default init, the best single anchor and a random
init, each trained on the same tokens (a benchmark; issue 14's recovery row).

    OMP_NUM_THREADS=1 python bench/recovery.py --chain tiny --target "both (8x320)" --tokens 500000
        # -> docs/data/recovery-tiny.json, docs/recovery-tiny.png
    # one init per process (one core each), merged into the same file:
    OMP_NUM_THREADS=1 python bench/recovery.py --chain default --target "both (14x320)" --inits default &
    OMP_NUM_THREADS=1 python bench/recovery.py --chain default --target "both (14x320)" --inits single,random

For one paired target of ``bench/quality.py``: the init a ``POST /initialize`` hands out (``make_plan``
+ ``cbd.inits.run.prepare``: repair, calibration, the blend at the per-block alphas ``run_linit``
writes), the best single anchor (the repaired term
the chain's validation batch prefers, as ``bench/interp.py`` names it) and transformers' random init.
Each is trained with cross-entropy on the chain's training mix (``bench/study.recovery``: AdamW, lr
1e-3, 10 warm-up steps, cosine, batches of 4 x 128 tokens, the same batches for every init; ``--lr``
and ``--warmup`` set another schedule, written to ``recovery-<chain>-lr<lr>-w<warmup>.json``), and
scored on the held-out work of every domain (2 x 4 x 256 tokens per domain; mean over domains) every
``--eval-every`` tokens. One training seed: the spread of the step-0 scores over evaluation windows is
``bench/interp.py``'s. ``--plot`` redraws the plot from the saved file.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import sys
import time
from pathlib import Path

from cbd.core.manifest import load_manifest
from cbd.core.plan import make_plan
from cbd.core.request import InitRequest
from cbd.inits.run import prepare
from cbd.train.models import random_state

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.interp import EXTRA  # noqa: E402
from bench.quality import DATA, TARGETS  # noqa: E402
from bench.study import context, recovery, tokens_to_reach  # noqa: E402


def plot(out: dict, path: Path) -> None:
    """Left: every init's held-out curve; right: the default init minus each other init, per point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = out["curves"]
    fig, (ax, dx) = plt.subplots(1, 2, figsize=(10, 4.0))
    for name, curve in curves.items():
        ax.plot([t for t, _ in curve], [v for _, v in curve], marker=".", label=name)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out loss, mean over domains (nats/token)")
    ax.set_title(f"{out['chain']}: {out['target']}, training seed {out['seed']}, lr {out.get('lr', 1e-3):g} after "
                 f"{out.get('warmup', 10)} warm-up steps", fontsize=9)
    ax.legend(fontsize=8)
    dflt = curves.get("default init")
    if dflt:
        for name, curve in curves.items():
            if name == "default init" or name == "random" or len(curve) != len(dflt):
                continue
            dx.plot([t for t, _ in dflt], [a - b for (_, a), (_, b) in zip(dflt, curve, strict=True)], marker=".",
                    label=f"default init minus {name}")
        dx.axhline(0.0, color="grey", linestyle=":")
        dx.set_xlabel("training tokens")
        dx.set_ylabel("difference (nats/token; below 0: the default is ahead)")
        dx.set_title("the default init against the other trained inits", fontsize=10)
        dx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chain", default="tiny")
    ap.add_argument("--target", default="both (8x320)")
    ap.add_argument("--tokens", type=int, default=500_000)
    ap.add_argument("--eval-every", type=int, default=50_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of every run (AdamW, cosine)")
    ap.add_argument("--warmup", type=int, default=10, help="linear warm-up steps of every run")
    ap.add_argument("--inits", default="default,single,random",
                    help="which inits to train (comma separated: default, single, random); the others already "
                         "in the file for the same chain, target, tokens and seed are kept")
    ap.add_argument("--plot", action="store_true", help="only redraw the plot from the saved data")
    args = ap.parse_args()
    # the schedule of issue 14's recovery row (lr 1e-3, 10 warm-up steps) keeps the old file names
    tag = args.chain + ("" if (args.lr, args.warmup) == (1e-3, 10) else f"-lr{args.lr:g}-w{args.warmup}")
    path = DATA / f"recovery-{tag}.json"
    if args.plot:
        plot(json.loads(path.read_text()), DATA.parent / f"recovery-{tag}.png")
        return
    manifest = load_manifest(args.chain)
    ctx = context(manifest)
    arch = {**TARGETS[args.chain], **EXTRA[args.chain]}[args.target]
    plan = make_plan(InitRequest(chain=args.chain, architecture=arch), manifest)
    li, alpha, calib = prepare(plan, manifest, progress=lambda _: None)
    grid = {float(a): v for a, v in calib["calibration_loss"].items()}
    best = min((0.0, 1.0), key=grid.get)  # the repaired term the validation batch prefers
    blend = calib.get("alphas", alpha)  # what run_linit writes: the per-block alphas where the plan searched them
    makers = {"default": ("default init", lambda: li.state(blend)),
              "single": (f"best single anchor (alpha {best:g})", lambda: li.state(best)),
              "random": ("random", lambda: random_state(plan.target, args.seed))}
    wanted = [w.strip() for w in args.inits.split(",") if w.strip()]
    unknown = sorted(set(wanted) - set(makers))
    if unknown:
        raise SystemExit(f"--inits: unknown {unknown}; choose from {sorted(makers)}")
    curves, seconds = {}, {}
    for key in wanted:
        name, make = makers[key]
        t0 = time.perf_counter()
        curves[name] = recovery(ctx, plan.target, make(), tokens=args.tokens, eval_every_tokens=args.eval_every,
                                seed=args.seed, lr=args.lr, warmup=args.warmup, label=name,
                                heldout_batches=2 * len(ctx.corpora))
        seconds[name] = round(time.perf_counter() - t0, 1)
    # the other inits of the same run (chain, target, tokens, seed), as the file holds them now: another
    # process may have written its inits meanwhile; read, merged and written under an exclusive lock on
    # the file, so two processes finishing together cannot each write back what it read without the other's
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        saved = json.loads(text) if (text := path.read_text()).strip() else {}
        # (a file from before the schedule was an option holds issue 14's: lr 1e-3, 10 warm-up steps)
        if any(saved.get(k) != getattr(args, k) for k in ("chain", "target", "tokens", "seed")) \
                or (saved.get("lr", 1e-3), saved.get("warmup", 10)) != (args.lr, args.warmup):
            saved = {}
        for r in saved.get("rows", []):
            if r["init"] not in curves:
                curves[r["init"]], seconds[r["init"]] = saved["curves"][r["init"]], r["seconds"]
        command = "OMP_NUM_THREADS=1 python bench/recovery.py " + " ".join(
            a if a.startswith("-") or " " not in a else repr(a) for a in sys.argv[1:])
        rand, rows = curves.get("random"), []
        for name, curve in curves.items():
            rows.append({"init": name, "step0": round(curve[0][1], 4), "final": round(curve[-1][1], 4),
                         "tokens": curve[-1][0], "seconds": seconds[name],
                         "random_tokens_to_reach_its_step0": tokens_to_reach(rand, curve[0][1]) if rand else None})
            print(f"{name:36s} step 0 {curve[0][1]:.3f}  after {curve[-1][0]:,} tokens {curve[-1][1]:.3f}", flush=True)
        out = {"commands": sorted(set(saved.get("commands", [])) | {command}), "chain": args.chain,
               "target": args.target, "shape": list(plan.target.shape), "small": plan.small, "big": plan.big,
               "alpha": alpha, "alphas": calib.get("alphas"), "seed": args.seed, "tokens": args.tokens,
               "lr": args.lr, "warmup": args.warmup,
               "windows": "2 x 4 x 256 per domain (held-out), mean over domains", "rows": rows, "curves": curves,
               **({"note": saved["note"]} if "note" in saved else {})}
        path.write_text(json.dumps(out, indent=1) + "\n")
    plot(out, DATA.parent / f"recovery-{tag}.png")


if __name__ == "__main__":
    main()
