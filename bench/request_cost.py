"""What repair, calibration and the init card add to one cache miss (a benchmark, not a test).

    OMP_NUM_THREADS=1 python bench/request_cost.py --chain tiny    # -> docs/data/request-cost-tiny.json

For a teacher-sized target and a ~30M one, each configuration runs ``cbd.run.run_plan`` (the
worker's job: load anchors, repair, calibrate, card, LInit, write, publish) in a fresh process,
so peak RSS is that configuration's own and no anchor statistics are warm:

- ``linit+write``: ``repair: false, calibrate: false`` (the floor: LInit, the streamed write, and the
  init card, which every init carries: forward passes of the init, each single anchor's Trans and a
  random init over the validation batch);
- ``+calibrate``: one alpha from the grid (what the service did before repair);
- ``+repair+calibrate``: ridge repair of both terms and one alpha;
- ``default``: ridge repair, per-block alpha and the init card (what ``POST /initialize`` does now);
- ``default, anchor outputs cached``: the same, with the repair's anchor pass read from the cache
  a first run of it filled (``cbd.inits.calibration.anchor_cache``; the rows above run with it off);
- ``default, warm worker``: the same request a second time in one process, the second timed: what
  a worker that has served the chain before spends (anchors loaded and verified, batches read,
  the shape's random-init loss known);
- ``default, unseen shape, warm process``: three requests in one process, each with the FFN 64 wider
  than the one before (as ``bench/miss_path.py``'s rounds), the third timed: a warm worker asked for
  a shape it has not seen (the card measures a new random init).

With ``--baseline DIR`` (a checkout of an earlier commit: ``git worktree add --detach DIR REV``)
each configuration also runs on that code just before ours, on the same chain: ``x_baseline`` is
ours over theirs.

    OMP_NUM_THREADS=2 python bench/request_cost.py --chain tiny --only 30M --baseline /tmp/cbd-before

Ratios are against ``linit+write`` measured in the same run. Wall seconds on a shared machine are
upper bounds; the job's own stage times come from its progress reports.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "docs" / "data"
TARGETS = {
    "tiny": {
        "teacher-sized (28x576, 9/3, 1536)": dict(num_hidden_layers=28, hidden_size=576, num_attention_heads=9,
                                                  num_key_value_heads=3, intermediate_size=1536),
        "~30M (16x448, 7/1, 1280)": dict(num_hidden_layers=16, hidden_size=448, num_attention_heads=7,
                                         num_key_value_heads=1, intermediate_size=1280),
    },
}
TARGETS["default"] = TARGETS["tiny"]
CONFIGS = {
    "linit+write": {"repair": False, "calibrate": False},
    "+calibrate": {"repair": False, "alpha_scheme": "global"},
    "+repair+calibrate": {"alpha_scheme": "global"},
    "default": {},
}
WARM = "default, anchor outputs cached"  # the same request again, the repair's anchor pass read from its cache
WORKER = "default, warm worker"  # the same request a second time in one process: anchors loaded, batches and card known
NEW_SHAPE = "default, unseen shape, warm process"  # a third request in one process, each with the FFN 64 wider (as miss_path)

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from cbd.core.manifest import load_manifest
from cbd.core.plan import make_plan
from cbd.core.request import InitRequest
from cbd.run import run_plan
chain, body, out = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
repeats = int(sys.argv[4]) if len(sys.argv) > 4 else 1
widen = int(sys.argv[5]) if len(sys.argv) > 5 else 0  # each repeat's FFN this much wider: a shape the process has not seen
m = load_manifest(chain)
for k in range(repeats):  # the last run is measured (the others warm the process, as a worker's earlier jobs)
    arch = dict(body["architecture"], intermediate_size=body["architecture"]["intermediate_size"] + k * widen)
    plan = make_plan(InitRequest(chain=chain, **(body | {"architecture": arch})), m)
    stages, t0 = [], time.perf_counter()
    run_plan(plan, artifacts_root=out / str(k),
             progress=lambda p: stages.append((round(time.perf_counter() - t0, 3), p.get("stage"))))
    wall = time.perf_counter() - t0
first = {}
for t, s in stages:
    first.setdefault(s, t)
print(json.dumps({"wall_s": round(wall, 3), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  "stage_start_s": first, "params": plan.target.num_params()}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chain", default="tiny")
    ap.add_argument("--only", help="targets whose name contains this (e.g. 30M)")
    ap.add_argument("--configs", help="comma-separated parts of configuration names to run (default: all)")
    ap.add_argument("--json", type=Path, help="where to write (default docs/data/request-cost-CHAIN.json)")
    ap.add_argument("--baseline", type=Path, metavar="DIR",
                    help="a checkout of an earlier commit (git worktree add DIR REV): each configuration also "
                         "runs on its code, just before ours, in the same run; rows get x_baseline")
    args = ap.parse_args()
    rows = []
    for tname, arch in TARGETS[args.chain].items():
        if args.only and args.only not in tname:
            continue
        base = None
        for cname, extra in [*CONFIGS.items(), (WARM, {}), (WORKER, {}), (NEW_SHAPE, {})]:
            if args.configs and not any(c in cname for c in args.configs.split(",")):
                continue
            body = {"architecture": arch, **extra}
            runs = {"repeats": 2 if cname == WORKER else 3 if cname == NEW_SHAPE else 1,
                    "widen": 64 if cname == NEW_SHAPE else 0}
            cache = cname in (WARM, WORKER, NEW_SHAPE)  # the baseline's the same (it ran with the cache off before)
            before = _child(args.chain, body, args.baseline, cache=cache, **runs) \
                if args.baseline and cname != WARM else None
            if cname == WARM:  # fill the cache (not timed), then the measured run reads it
                _child(args.chain, body, None, cache=True)
            got = _child(args.chain, body, None, cache=cache, **runs)
            base = got if cname == "linit+write" else base
            row = {"target": tname, "config": cname, **got,
                   "x_linit_write": round(got["wall_s"] / base["wall_s"], 2) if base is not None else None}
            if before is not None:
                row |= {"baseline": before, "x_baseline": round(got["wall_s"] / before["wall_s"], 3)}
            rows.append(row)
            print(f"{tname:36s} {cname:18s} {got['wall_s']:7.2f} s  ({row['x_linit_write'] or 0:.2f}x)  "
                  f"peak RSS {got['peak_rss_mb']:7.1f} MB"
                  + (f"  baseline {before['wall_s']:7.2f} s ({row['x_baseline']:.2f}x)" if before else ""), flush=True)
    out = {"command": "python bench/request_cost.py " + " ".join(sys.argv[1:]), "chain": args.chain,
           "threads": os.environ.get("OMP_NUM_THREADS", "default"),
           "baseline": _revision(args.baseline) if args.baseline else None,
           "date": time.strftime("%Y-%m-%d"), "rows": rows,
           "bench_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    (args.json or DATA / f"request-cost-{args.chain}.json").write_text(json.dumps(out, indent=1) + "\n")


def _child(chain: str, body: dict, code: Path | None, *, cache: bool = False, repeats: int = 1, widen: int = 0) -> dict:
    """One configuration in a fresh process (``code``: the checkout whose cbd it imports; ``cache``:
    the anchor output cache of ``cbd.inits.calibration.anchor_cache`` on, else off: a cold miss)."""
    env = os.environ | ({"PYTHONPATH": str(code.resolve())} if code else {})
    env |= {} if cache else {"CBD_ANCHOR_CACHE_MAX_BYTES": "0"}
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-c", CHILD, chain, json.dumps(body), tmp, str(repeats), str(widen)], capture_output=True,
                           text=True, check=True, env=env, cwd=code or Path(__file__).resolve().parent.parent)
    return json.loads(r.stdout.strip().splitlines()[-1])


def _revision(code: Path) -> str:
    return subprocess.run(["git", "-C", str(code), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


if __name__ == "__main__":
    main()
