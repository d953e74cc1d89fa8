"""Does the init's head start survive training? The default init, the best single anchor and a random
init, each trained on the same tokens (a benchmark; issue 14's recovery row).

    OMP_NUM_THREADS=1 python bench/recovery.py --chain tiny --target "both (8x320)" --tokens 500000
        # -> docs/data/recovery-tiny.json, docs/recovery-tiny.png

For one paired target of ``bench/quality.py``: the init a ``POST /initialize`` hands out (``make_plan``
+ ``cbd.inits.run.prepare``: repair, calibration, the blend), the best single anchor (the repaired term
the chain's validation batch prefers, as ``bench/interp.py`` names it) and transformers' random init.
Each is trained with cross-entropy on the chain's training mix (``bench/study.recovery``: AdamW, lr
1e-3, 10 warm-up steps, cosine, batches of 4 x 128 tokens, the same batches for every init), and
scored on the held-out work of every domain (2 x 4 x 256 tokens per domain; mean over domains) every
``--eval-every`` tokens. One training seed: the spread of the step-0 scores over evaluation windows is
``bench/interp.py``'s.
"""

from __future__ import annotations

import argparse
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, curve in out["curves"].items():
        ax.plot([t for t, _ in curve], [v for _, v in curve], marker=".", label=name)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out loss, mean over domains (nats/token)")
    ax.set_title(f"{out['chain']}: {out['target']}, training seed {out['seed']}")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chain", default="tiny")
    ap.add_argument("--target", default="both (8x320)")
    ap.add_argument("--tokens", type=int, default=500_000)
    ap.add_argument("--eval-every", type=int, default=50_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    manifest = load_manifest(args.chain)
    ctx = context(manifest)
    arch = {**TARGETS[args.chain], **EXTRA[args.chain]}[args.target]
    plan = make_plan(InitRequest(chain=args.chain, architecture=arch), manifest)
    li, alpha, calib = prepare(plan, manifest, progress=lambda _: None)
    grid = {float(a): v for a, v in calib["calibration_loss"].items()}
    best = min((0.0, 1.0), key=grid.get)  # the repaired term the validation batch prefers
    inits = {"default init": li.state(alpha), f"best single anchor (alpha {best:g})": li.state(best),
             "random": random_state(plan.target, args.seed)}
    curves, seconds = {}, {}
    for name, state in inits.items():
        t0 = time.perf_counter()
        curves[name] = recovery(ctx, plan.target, state, tokens=args.tokens, eval_every_tokens=args.eval_every,
                                seed=args.seed, label=name, heldout_batches=2 * len(ctx.corpora))
        seconds[name] = round(time.perf_counter() - t0, 1)
    rows = []
    for name, curve in curves.items():
        rows.append({"init": name, "step0": round(curve[0][1], 4), "final": round(curve[-1][1], 4),
                     "tokens": curve[-1][0], "seconds": seconds[name],
                     "random_tokens_to_reach_its_step0": tokens_to_reach(curves["random"], curve[0][1])})
        print(f"{name:36s} step 0 {curve[0][1]:.3f}  after {curve[-1][0]:,} tokens {curve[-1][1]:.3f}", flush=True)
    out = {"command": "OMP_NUM_THREADS=1 python bench/recovery.py " + " ".join(sys.argv[1:]), "chain": args.chain,
           "target": args.target, "shape": list(plan.target.shape), "small": plan.small, "big": plan.big,
           "alpha": alpha if isinstance(alpha, float) else "per block", "seed": args.seed, "tokens": args.tokens,
           "windows": "2 x 4 x 256 per domain (held-out), mean over domains", "rows": rows, "curves": curves}
    (DATA / f"recovery-{args.chain}.json").write_text(json.dumps(out, indent=1) + "\n")
    plot(out, DATA.parent / f"recovery-{args.chain}.png")


if __name__ == "__main__":
    main()
