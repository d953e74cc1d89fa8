"""How much validation text the alpha search needs: the chain's 1,024 tokens against more.

    OMP_NUM_THREADS=1 python bench/valsize.py --chain tiny       # -> docs/data/valsize-tiny.json
    OMP_NUM_THREADS=1 python bench/valsize.py --chain default --rows 2,8,32
    python bench/valsize.py --chain tiny --report                # markdown table

The grid and the per-block search choose an init by its loss on the chain's validation batch:
two rows of 128 tokens per corpus (1,024 tokens on the packaged four-corpus chains). On so little
text a search over a few dozen candidates keeps part of that text's noise, which is why the
service checks what the search finds on the other half (docs/method.md §2). This measures what
the same grid and search choose when they see more text of the same kind: ``--rows`` rows per
corpus drawn from the chains' *training* split (as the validation batch is; a seed no build
uses), the same repaired terms, the service's check and blocks. Each choice is scored on the
held-out work of every corpus, 3 seeds of windows, beside the best single anchor (chosen on the
same text) and the service's init. The held-out works only score.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from cbd.chain.build import ChainData
from cbd.core.manifest import load_manifest
from cbd.core.plan import make_plan
from cbd.core.recipe import Recipe
from cbd.core.request import InitRequest
from cbd.data.mix import mixed_fixed_batch
from cbd.inits.calibration import (
    BLOCK_CHECK,
    Blend,
    block_values,
    calibrate_blocks,
    grid_losses,
    search_bf16,
    validation_batches,
)
from cbd.inits.run import prepare

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.interp import EXTRA, heldout, score  # noqa: E402
from bench.quality import DATA, TARGETS  # noqa: E402
from bench.study import save  # noqa: E402

SEED = 7919  # the extra validation rows' windows: no build draws with it


def training_rows(manifest, rows: int, seed: int = SEED) -> list[torch.Tensor]:
    """``rows`` windows per corpus of the chain's training split, drawn and dealt as the build draws
    the validation batch (``cbd.data.mix.mixed_fixed_batch``, rows by the recipe's shares), in
    batches of one row per corpus."""
    recipe = Recipe.model_validate(manifest.recipe)
    cd = ChainData(recipe)
    n = len(cd.domains)
    return list(mixed_fixed_batch(list(cd.train_by_domain.values()), cd.shares, n_rows=rows * n,
                                  seq_len=recipe.data.calibration_seq_len, seed=seed).split(n))


def run(chain: str, rows: list[int], seeds: int, only: list[str] | None, path: Path) -> dict:
    """Every paired target (``only``: those named), the service's init and one per ``rows``; the file
    at ``path`` is written after each target, so a run cut short keeps what it measured."""
    res = {"chain": chain, "seeds": seeds, "windows": "2 x 4 x 128 per domain per seed",
           "command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python bench/valsize.py "
                      + " ".join(a if " " not in a else repr(a) for a in sys.argv[1:]), "rows": []}
    manifest = load_manifest(chain)
    windows = [heldout(manifest, s, batches=2, seq_len=128) for s in range(seeds)]
    val_tokens = sum(int(b[:, 1:].numel()) for b in validation_batches(manifest))
    out = res["rows"]
    for tname, arch in {**TARGETS[chain], **EXTRA[chain]}.items():
        if only and tname not in only:
            continue
        plan = make_plan(InitRequest(chain=chain, architecture=arch), manifest)
        if plan.small is None or plan.big is None or plan.small == plan.big:
            continue
        t0 = time.perf_counter()
        li, alpha, calib = prepare(plan, manifest, progress=lambda _: None)
        grid = {float(a): v for a, v in calib["calibration_loss"].items()}
        single = 1.0 if grid[1.0] <= grid[0.0] else 0.0
        blocks = calib["alphas_search"]["blocks"]
        base = {"target": tname, "shape": list(plan.target.shape), "small": plan.small, "big": plan.big}
        service = score(plan.target, li.state(calib["alphas"]), windows)
        one = score(plan.target, li.state(single), windows)
        out.append(base | {"rows_per_corpus": "service", "tokens": val_tokens, "single": single, "alpha": alpha,
                           "alphas": calib["alphas"], "default": service, "best_single": one,
                           "seconds": round(time.perf_counter() - t0, 1)})
        print(f"{tname:24s} service   default {service['mean']:.3f}  single({single:.0f}) {one['mean']:.3f}  "
              f"diff {service['mean'] - one['mean']:+.3f}", flush=True)
        for r in rows:
            t0 = time.perf_counter()
            batches = training_rows(manifest, r)
            blend = Blend(li, batches, bf16=search_bf16())
            scores = grid_losses(li, batches, blend)
            a = min(scores, key=lambda x: (scores[x], abs(x - li.alpha)))
            s = 1.0 if scores[1.0] <= scores[0.0] else 0.0
            found, loss, _ = calibrate_blocks(li, batches, a, scores[a], blocks=blocks, values=block_values(a),
                                              blend=blend, check=BLOCK_CHECK)
            del blend
            d, o = score(plan.target, li.state(found), windows), score(plan.target, li.state(s), windows)
            paired = [x - y for x, y in zip(d["per_seed_mean"], o["per_seed_mean"], strict=True)]
            out.append(base | {"rows_per_corpus": r, "tokens": sum(int(b[:, 1:].numel()) for b in batches),
                               "single": s, "alpha": a, "grid": scores, "alphas": found, "alphas_loss": loss,
                               "default": d, "best_single": o, "diff": statistics.mean(paired),
                               "diff_std": statistics.stdev(paired) if len(paired) > 1 else 0.0,
                               "seconds": round(time.perf_counter() - t0, 1)})
            print(f"{tname:24s} rows {r:3d}  default {d['mean']:.3f}  single({s:.0f}) {o['mean']:.3f}  "
                  f"diff {out[-1]['diff']:+.3f} ± {out[-1]['diff_std']:.3f}  grid best {a}  ({out[-1]['seconds']} s)",
                  flush=True)
        save(res, path)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chain", default="tiny")
    p.add_argument("--rows", default="2,8,32", help="rows of 128 tokens per corpus, comma-separated")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--only", nargs="*")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    path = a.json or DATA / f"valsize-{a.chain}.json"
    run(a.chain, [int(x) for x in a.rows.split(",")], a.seeds, a.only, path)


if __name__ == "__main__":
    main()
