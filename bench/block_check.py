"""What the per-block alpha search and its check cost per cache miss, in one process.

    OMP_NUM_THREADS=2 .venv/bin/python bench/block_check.py --chain tiny --json docs/data/block-check-cost-tiny.json

For a ~30M target (16x448, 7/1 heads, FFN about 1280) on a built chain, ``cbd.run.run_plan`` (what a
worker's job runs: anchors, repair, calibration, card, LInit, streamed write, publish) is timed with
the default body under each check of ``cbd.inits.calibration.calibrate_blocks`` (``none``, ``half``:
the service's, ``twofold``) and with ``"alpha_scheme": "global"`` (one alpha: no per-block search),
after one warm-up request (the anchors loaded, their cached outputs written). Each request asks for a
shape no request before it asked for (the FFN 16 wider per request), so its checkpoint is made anew;
``--rounds`` rounds of the four. The check is not part of a checkpoint's id (it is the service's
code: cbd.core.plan.FORMAT_VERSION), so the bench sets it per request. Prints and writes seconds per
request; the machine and its load are recorded beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import cbd.inits.run as runner
from cbd.core.manifest import load_manifest
from cbd.core.plan import make_plan
from cbd.core.request import InitRequest
from cbd.core.threads import cpu_has_bf16
from cbd.run import run_plan

ARCH = dict(num_hidden_layers=16, hidden_size=448, num_attention_heads=7, num_key_value_heads=1,
            intermediate_size=1280)
CASES = {"none": ({}, "none"), "half (the default)": ({}, "half"), "twofold": ({}, "twofold"),
         "global (no per-block search)": ({"alpha_scheme": "global"}, "half")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chain", default="tiny")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    manifest = load_manifest(args.chain)
    out = Path(tempfile.mkdtemp(prefix="cbd-block-check-"))
    run_plan(make_plan(InitRequest(chain=args.chain, architecture=ARCH | {"intermediate_size": 1200}), manifest),
             artifacts_root=out)  # warm: anchors loaded, their outputs cached beside the chain
    seconds: dict[str, list[float]] = {name: [] for name in CASES}
    ffn = ARCH["intermediate_size"]
    for _ in range(args.rounds):
        for name, (body, check) in CASES.items():
            runner.BLOCK_CHECK = check
            ffn += 16  # a new shape: made anew
            plan = make_plan(InitRequest(chain=args.chain, architecture=ARCH | {"intermediate_size": ffn}, **body),
                             manifest)
            t0 = time.perf_counter()
            run_plan(plan, artifacts_root=out)
            seconds[name].append(round(time.perf_counter() - t0, 2))
            print(f"{name:30s} {seconds[name][-1]:6.2f} s", flush=True)
    result = {"command": "python bench/block_check.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
              "chain": args.chain, "target": ARCH, "threads": os.environ.get("OMP_NUM_THREADS"),
              "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                          "bf16_search": cpu_has_bf16(), "load_average": os.getloadavg()},
              "seconds": seconds, "median_s": {k: statistics.median(v) for k, v in seconds.items()}}
    print(json.dumps(result["median_s"], indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
