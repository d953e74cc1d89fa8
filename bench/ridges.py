"""Does one ridge per anchor do? The refit's ridge winner for an anchor pruned to many targets,
against its winner for the anchor pruned to the next anchor's shape (a benchmark).

    OMP_NUM_THREADS=2 python bench/ridges.py --chain tiny      # -> docs/data/ridges-tiny.json

The service's repair (``cbd.inits.calibration.repair_terms``) refits each pruned term at every
ridge of ``cbd.repair.refit.INSITU_RIDGE`` and keeps the one with the lowest loss on the chain's
validation batch: a layer-by-layer fit and a forward pass per ridge. If the winner is a property of
the anchor (how much its calibration fit overfits), it can be chosen once per anchor, on a prune
fixed by the chain (the next anchor's shape), and a request pays for one ridge. For every anchor
but the smallest, this runs the in-situ refit at each ridge for that fixed prune and for targets
between the next anchor and the anchor itself (the ones a request prunes it to: the anchor is the
bigger term of the pair), and prints each target's winner, whether it is the fixed prune's, and
what the fixed prune's ridge costs there (its check loss minus the best).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from cbd.core.manifest import load_manifest
from cbd.core.spec import make_spec
from cbd.inits.calibration import ridge_trial
from cbd.repair.refit import INSITU_RIDGE

DATA = Path(__file__).resolve().parent.parent / "docs" / "data"


def between(big, small) -> list[dict]:
    """Targets a request prunes ``big`` to (between ``small`` and ``big`` on every axis, head dim
    kept): depth only, width only, both at a third and two thirds of the way."""
    def at(f: float, depth: bool, width: bool) -> dict:
        heads = round(small.num_attention_heads + f * (big.num_attention_heads - small.num_attention_heads))
        kv = max(k for k in range(1, big.num_key_value_heads + 1) if heads % k == 0)
        out = {}
        if depth:
            out["num_hidden_layers"] = round(small.num_hidden_layers + f * (big.num_hidden_layers - small.num_hidden_layers))
        if width:
            out |= {"num_attention_heads": heads, "num_key_value_heads": kv, "hidden_size": heads * big.head_dim,
                    "intermediate_size": round(small.intermediate_size + f * (big.intermediate_size - small.intermediate_size))}
        return out
    cases = [at(f, d, w) for f in (1 / 3, 2 / 3) for d, w in ((True, False), (False, True), (True, True))]
    return [c for c in cases if c]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chain", default="tiny")
    args = ap.parse_args()
    m = load_manifest(args.chain)
    rows = []
    for i, entry in enumerate(m.anchors[:-1]):
        spec, nxt = entry.spec, m.anchors[i + 1].spec
        targets = [("next anchor's shape", nxt)] + [
            (json.dumps(c), make_spec(spec.model_dump() | c)) for c in between(spec, nxt)]
        fixed = None
        for label, tgt in targets:
            t0 = time.perf_counter()
            by, plain = ridge_trial(m, entry.name, tgt)  # what cbd.inits.calibration.anchor_ridge measures
            win = min(by, key=by.get)
            fixed = win if fixed is None else fixed
            row = {"anchor": entry.name, "target": label,
                   "shape": [tgt.num_hidden_layers, tgt.hidden_size, tgt.num_attention_heads, tgt.num_key_value_heads,
                             tgt.intermediate_size],
                   "check_loss_plain": plain, "check_loss_by_ridge": by, "winner": win,
                   "fixed_ridge": fixed, "agrees": win == fixed, "cost_of_fixed": round(by[fixed] - by[win], 5),
                   "seconds": round(time.perf_counter() - t0, 2)}
            rows.append(row)
            print(f"{entry.name} {label:70s} plain {plain:.4f} " + " ".join(f"{k}: {v:.4f}" for k, v in by.items())
                  + f"  winner {win}  fixed {fixed}  cost {row['cost_of_fixed']:.4f}", flush=True)
    judged = [r for r in rows if r["target"] != "next anchor's shape"]
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    out = {"command": f"OMP_NUM_THREADS={threads} python bench/ridges.py " + " ".join(sys.argv[1:]), "chain": args.chain,
           "ridges": list(INSITU_RIDGE), "date": time.strftime("%Y-%m-%d"), "rows": rows,
           "agree": sum(r["agrees"] for r in judged), "of": len(judged),
           "max_cost_of_fixed": max((r["cost_of_fixed"] for r in judged), default=0.0)}
    (DATA / f"ridges-{args.chain}.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"the fixed prune's ridge wins {out['agree']} of {out['of']} targets; "
          f"where not, it costs at most {out['max_cost_of_fixed']:.4f} nats")


if __name__ == "__main__":
    main()
