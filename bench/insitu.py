"""Each subset operator's damage before and after repair, per held-out domain (a benchmark).

    OMP_NUM_THREADS=1 python bench/insitu.py --chain tiny     # -> docs/data/insitu-tiny.json
    OMP_NUM_THREADS=1 python bench/insitu.py --chain default --without-resid   # -> insitu-default.json

For anchors of a built chain, each subset below is made by plain Trans and by the service's
repair (``cbd.repair.refit.insitu_repair``: in situ, layer after layer, on the chain's calibration
batch), at every ridge of ``--ridges``; the ridge the service would pick is the one with the lowest
loss on the chain's validation batch (``check``). Scores: held-out loss (mean over the recipe's
domains, and each domain; ``--seeds`` vary the windows) of the anchor itself, the plain subset and
each repaired one; and the seconds each repair took. ``--without-resid``: each repair also without
its refit of the residual stream's readers and the final norm (the repair before they were refit).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from cbd.core.manifest import load_manifest
from cbd.core.recipe import chain_corpora
from cbd.data import batches as data
from cbd.inits.calibration import calibration_tokens, validation_batches
from cbd.repair.refit import insitu_repair
from cbd.shape import arch
from cbd.shape.maps import choose_maps
from cbd.shape.trans import trans_state
from cbd.store.anchors import load_anchor
from cbd.train.models import build_model, eval_loss

DATA = Path(__file__).resolve().parent.parent / "docs" / "data"
CASES = {  # (anchor, label, target shape changes)
    "tiny": [
        ("a0", "depth 30 -> 20", dict(num_hidden_layers=20)),
        ("a0", "FFN 1536 -> 1024", dict(intermediate_size=1024)),
        ("a0", "heads 9/3 -> 6/3", dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=576, head_dim=64)),
        ("a0", "all axes -> 20x384 6/2 1024 (default's a1)", dict(num_hidden_layers=20, hidden_size=384,
                                                                  num_attention_heads=6, num_key_value_heads=2,
                                                                  intermediate_size=1024)),
        # default's upper pair target (24x512, 8/4 heads, FFN 1280) one axis at a time, then whole
        ("a0", "depth 30 -> 24", dict(num_hidden_layers=24)),
        ("a0", "residual and heads 576 9/3 -> 512 8/4", dict(hidden_size=512, num_attention_heads=8,
                                                             num_key_value_heads=4, head_dim=64)),
        ("a0", "residual 576 -> 504", dict(hidden_size=504, head_dim=64)),
        ("a0", "FFN 1536 -> 1280", dict(intermediate_size=1280)),
        ("a0", "heads 9/3 -> 8/4", dict(num_attention_heads=8, num_key_value_heads=4, head_dim=64)),
        ("a0", "all axes -> 24x512 8/4 1280 (default's upper pair)", dict(num_hidden_layers=24, hidden_size=512,
                                                                           num_attention_heads=8,
                                                                           num_key_value_heads=4,
                                                                           intermediate_size=1280)),
        ("a1", "depth 12 -> 8", dict(num_hidden_layers=8)),
        ("a1", "all axes -> 6x256 4/2 640 (a2's shape)", dict(num_hidden_layers=6, hidden_size=256,
                                                              num_attention_heads=4, num_key_value_heads=2,
                                                              intermediate_size=640)),
        ("a2", "kv groups 2 -> 1", dict(num_key_value_heads=1)),
        ("a3", "below the smallest: 3 -> 2 layers", dict(num_hidden_layers=2)),
    ],
    "default": [  # one operator at a time, then whole prunes (the chain's a1 is 20x384 6/2 1024)
        ("a0", "depth 30 -> 24", dict(num_hidden_layers=24)),
        ("a0", "residual 576 -> 504", dict(hidden_size=504, head_dim=64)),
        ("a0", "FFN 1536 -> 1280", dict(intermediate_size=1280)),
        ("a0", "heads 9/3 -> 6/3", dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=576, head_dim=64)),
        ("a2", "kv groups 4/2 -> 4/1", dict(num_key_value_heads=1)),
        ("a0", "all axes -> 24x512 8/4 1280 (the upper pair's target)", dict(num_hidden_layers=24, hidden_size=512,
                                                                              num_attention_heads=8,
                                                                              num_key_value_heads=4,
                                                                              intermediate_size=1280)),
        ("a1", "all axes -> 16x256 4/2 704 (a2's shape)", dict(num_hidden_layers=16, hidden_size=256,
                                                               num_attention_heads=4, num_key_value_heads=2,
                                                               intermediate_size=704)),
        ("a3", "below the smallest: 12 -> 8 layers", dict(num_hidden_layers=8)),
    ],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chain", default="tiny")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--ridges", default="0.1,1")
    ap.add_argument("--only", help="comma-separated case labels")
    ap.add_argument("--name", help="writes docs/data/insitu-<chain>-<name>.json instead")
    ap.add_argument("--without-resid", action="store_true",
                    help="also score the repair without the residual stream's readers and the final norm")
    args = ap.parse_args()
    m = load_manifest(args.chain)
    domains = list(chain_corpora(m.recipe))
    windows = [{d: data.eval_batches(data.token_file(d, m.tokenizer, "heldout"), batch_size=4, seq_len=128,
                                     num_batches=2, seed=s) for d in domains} for s in range(args.seeds)]
    cal, check = list(calibration_tokens(m).split(4)), validation_batches(m)
    ridges = [float(x) for x in args.ridges.split(",")]

    def score(spec, state) -> dict:
        model = build_model(spec, state)
        per = [{d: eval_loss(model, b) for d, b in w.items()} for w in windows]
        means = [statistics.mean(p.values()) for p in per]
        return {"mean": round(statistics.mean(means), 4), "std": round(statistics.stdev(means), 4) if len(means) > 1 else 0.0,
                "by_domain": {d: round(statistics.mean(p[d] for p in per), 4) for d in domains},
                "check": round(eval_loss(model, check), 4)}

    rows = []
    for name, label, shape in CASES[args.chain]:
        if args.only and label not in args.only.split(","):
            continue
        a = load_anchor(m, name)
        state = {n: a.read(n) for n in arch.param_names(a.spec)}
        tgt = a.spec.with_shape(**shape)
        maps = choose_maps(a.spec, tgt, a.importance)
        row = {"anchor": name, "case": label, "shape": list(tgt.shape), "anchor_loss": score(a.spec, state),
               "plain": score(tgt, trans_state(state, a.spec, tgt, maps)), "repaired": {}}
        for lam in ridges:
            t0 = time.perf_counter()
            fixed, rep = insitu_repair(a.spec, state, tgt, maps, cal, ridge=lam, guard=False)
            row["repaired"][str(lam)] = {**score(tgt, fixed), "seconds": round(time.perf_counter() - t0, 1),
                                         "refit": rep["refit"]}
        if args.without_resid:
            row["repaired_without_resid"] = {}
            for lam in ridges:
                fixed, rep = insitu_repair(a.spec, state, tgt, maps, cal, ridge=lam, guard=False, resid=False)
                row["repaired_without_resid"][str(lam)] = score(tgt, fixed)
            got = row["repaired_without_resid"]
            pick = min(got, key=lambda k: got[k]["check"])
            row["service_without_resid"] = pick if got[pick]["check"] < row["plain"]["check"] else "plain"
            print("   without the stream readers and final norm: " + "  ".join(
                f"ridge {k}: {v['mean']:.3f}" for k, v in row["repaired_without_resid"].items()), flush=True)
        pick = min(row["repaired"], key=lambda k: row["repaired"][k]["check"])
        row["service"] = pick if row["repaired"][pick]["check"] < row["plain"]["check"] else "plain"
        rows.append(row)
        print(f"{name} {label:44s} anchor {row['anchor_loss']['mean']:.3f}  plain {row['plain']['mean']:.3f}  "
              + "  ".join(f"ridge {k}: {v['mean']:.3f}" for k, v in row["repaired"].items())
              + f"  service picks {row['service']}", flush=True)
    out = {"command": "python bench/insitu.py " + " ".join(sys.argv[1:]), "chain": args.chain, "domains": domains,
           "seeds": args.seeds, "windows": "2 x 4 x 128 per domain per seed", "rows": rows}
    (DATA / f"insitu-{args.chain}{'-' + args.name if args.name else ''}.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
