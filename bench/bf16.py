"""bf16 autocast against float32 for one chain step on this CPU (a benchmark, not a test).

    OMP_NUM_THREADS=1 python bench/bf16.py --chain tiny --steps 40   # -> docs/data/bf16-tiny.json

The first anchor of the recipe, started from its repaired prune of the source exactly as
``cbd chain build`` starts it, is distilled from the source for ``--steps`` steps twice on the
same batches: once with bf16 autocast (``cbd.train.loop.cpu_bf16``: on CPUs with AVX512-BF16 or
AMX) and once in float32. Prints and records held-out loss (mean over the recipe's domains),
wall time and tokens/s of each, and their ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from cbd.chain.build import ChainData, step_batches, step_config
from cbd.core.manifest import load_manifest
from cbd.core.plan import target_spec
from cbd.core.recipe import load_recipe
from cbd.repair.refit import repaired_prune
from cbd.shape import arch
from cbd.store.anchors import load_anchor
from cbd.train.loop import cpu_bf16, distill, evaluate
from cbd.train.models import build_model

DATA = Path(__file__).resolve().parent.parent / "docs" / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chain", default="tiny")
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    recipe, manifest = load_recipe(args.chain), load_manifest(args.chain)
    data = ChainData(recipe)
    a = recipe.anchors[0]
    src = load_anchor(manifest, manifest.anchors[0].name)
    parent = {n: src.read(n) for n in arch.param_names(src.spec)}
    spec = target_spec(a, src.spec)
    start, _, _ = repaired_prune(parent, src.spec, src.importance, spec, recipe.prune,
                                 list(data.calibration.split(4)), check=data.validation)
    teacher = build_model(src.spec, parent)
    rows = {}
    import os

    os.environ["CBD_CPU_BF16"] = "1"  # this benchmark measures it; chain builds keep it off by default
    cpu_bf16.cache_clear()
    for bf16 in (True, False):
        student = build_model(spec, start)
        student.train()
        t0 = time.perf_counter()
        res = distill(student, teacher, step_batches(recipe, data, a, args.steps), data.heldout,
                      step_config(recipe, a, args.steps, bf16=bf16))
        wall = time.perf_counter() - t0
        student.eval()
        key = "bf16" if bf16 else "float32"
        rows[key] = {"heldout_loss": round(evaluate(student, data.heldout), 4), "wall_s": round(wall, 1),
                     "tokens_per_s": round(res.tokens_per_s, 1)}
        print(key, rows[key], flush=True)
    out = {"command": "python bench/bf16.py " + " ".join(sys.argv[1:]), "chain": args.chain, "anchor": a.name,
           "steps": args.steps, "cpu_bf16": cpu_bf16(), "rows": rows,
           "speedup": round(rows["bf16"]["tokens_per_s"] / rows["float32"]["tokens_per_s"], 2),
           "loss_difference_bf16_minus_fp32": round(rows["bf16"]["heldout_loss"] - rows["float32"]["heldout_loss"], 4)}
    print(json.dumps({k: out[k] for k in ("speedup", "loss_difference_bf16_minus_fp32")}))
    (DATA / f"bf16-{args.chain}.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
