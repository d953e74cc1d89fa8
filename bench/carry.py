"""Carrying the pruned residual channels (``"carry": "pca"``) against the prune by importance.

    OMP_NUM_THREADS=1 python bench/carry.py --chain tiny       # -> docs/data/carry-tiny.json
    OMP_NUM_THREADS=1 python bench/carry.py --chain default
    python bench/carry.py --chain tiny --report                # markdown table, docs/carry-tiny.png
    OMP_NUM_THREADS=1 python bench/carry.py --chain default --lone   # below the smallest anchor's width

For every target of ``bench/interp.py``'s list whose init prunes an anchor's residual width, the
service's own code (``cbd.inits.run.prepare``: repair, calibration, the per-block search) makes the
init twice, with ``"carry": "none"`` (the prune keeps channels by importance: the service before)
and ``"pca"`` (the channels the prune may drop turned onto their principal directions first:
``cbd.repair.carry``), and scores on the held-out work of every corpus, 3 seeds of windows, paired:
each single anchor's Trans (alpha 1 and 0) and the default init. The validation batch chooses, the
held-out works only score. ``--lone``: targets narrower than the smallest anchor (one anchor's
subset, whose most important channels stay fixed and the rest turn), the service's init each way.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from cbd.core.manifest import load_manifest
from cbd.core.plan import make_plan
from cbd.core.recipe import chain_corpora
from cbd.core.request import InitRequest
from cbd.inits.run import prepare

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.interp import EXTRA, heldout, paired, score  # noqa: E402
from bench.quality import DATA, TARGETS  # noqa: E402
from bench.study import save  # noqa: E402

METHODS = ("single small (alpha 1)", "single big (alpha 0)", "default")
# --lone: targets narrower than the smallest anchor, one anchor's subset (the anchor keeps its most
# important channels fixed and turns the rest: cbd.repair.carry.fixed_channels)
LONE = {
    "tiny": {"2x64": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=1, num_key_value_heads=1,
                          intermediate_size=256),
             "3x64 (a3's depth)": dict(num_hidden_layers=3, hidden_size=64, num_attention_heads=1, num_key_value_heads=1,
                                       intermediate_size=384)},
    "default": {"8x64": dict(num_hidden_layers=8, hidden_size=64, num_attention_heads=1, num_key_value_heads=1,
                             intermediate_size=512),
                "12x64 (a3's depth)": dict(num_hidden_layers=12, hidden_size=64, num_attention_heads=1,
                                           num_key_value_heads=1, intermediate_size=640)},
}


def run_lone(chain: str, seeds: int) -> dict:
    """The service's init of each LONE target with ``carry`` none and pca, scored as ``run``."""
    manifest = load_manifest(chain)
    windows = [heldout(manifest, s, batches=2, seq_len=128) for s in range(seeds)]
    rows = []
    for tname, arch in LONE[chain].items():
        for carry in ("none", "pca"):
            plan = make_plan(InitRequest(chain=chain, architecture=arch, carry=carry), manifest)
            li, alpha, calib = prepare(plan, manifest, progress=lambda _: None, card=True)
            r = score(plan.target, li.state(alpha), windows)
            rows.append({"target": tname, "shape": list(plan.target.shape), "anchor": plan.small or plan.big,
                         "carry": carry, "validation_loss": calib["card"]["step0_loss"], **r, "note": calib.get("carry")})
            print(f"{tname:22s} carry {carry:4s} val {rows[-1]['validation_loss']:.3f} held-out {r['mean']:.3f} ± {r['std']:.3f}",
                  flush=True)
    return {"chain": chain, "seeds": seeds, "windows": "2 x 4 x 128 per domain per seed",
            "domains": list(chain_corpora(manifest.recipe)), "rows": rows}


def run_shares(chain: str, seeds: int, shares: list[float]) -> dict:
    """The LONE targets with a lone anchor's fixed channels at other shares of the target's width
    than the service's half (``cbd.repair.carry.fixed_channels``, swapped here for the run)."""
    import math

    import cbd.repair.carry as carry

    manifest = load_manifest(chain)
    windows = [heldout(manifest, s, batches=2, seq_len=128) for s in range(seeds)]
    rows, own = [], carry.fixed_channels
    try:
        for share in shares:
            def fixed(spec, width, importance, aligned=None, share=share):
                if aligned is not None:
                    return own(spec, width, importance, aligned)
                n = max(2 * width - spec.hidden_size, math.ceil(width * share))
                return sorted(importance["resid"].argsort(descending=True)[:n].tolist())

            carry.fixed_channels = fixed
            for tname, arch in LONE[chain].items():
                plan = make_plan(InitRequest(chain=chain, architecture=arch), manifest)
                li, alpha, calib = prepare(plan, manifest, progress=lambda _: None, card=True)
                r = score(plan.target, li.state(alpha), windows)
                rows.append({"target": tname, "share": share, "validation_loss": calib["card"]["step0_loss"], **r,
                             "note": calib.get("carry")})
                print(f"{tname:22s} share {share:.2f} val {rows[-1]['validation_loss']:.3f} held-out {r['mean']:.3f}",
                      flush=True)
    finally:
        carry.fixed_channels = own
    return {"chain": chain, "seeds": seeds, "rows": rows}


def report_lone(chain: str) -> str:
    d = json.loads((DATA / f"carry-{chain}-lone.json").read_text())
    lines = [f"Command: `{d['command']}`; {d['seeds']} seeds ({d['windows']}); held-out mean over the domains.", "",
             "| target | anchor | turned (fixed, kept of rotated, energy kept) | validation: none -> pca "
             "| held-out: none -> pca |", "|---|---|---|---|---|"]
    for t in dict.fromkeys(r["target"] for r in d["rows"]):
        n, p = (next(r for r in d["rows"] if r["target"] == t and r["carry"] == c) for c in ("none", "pca"))
        note = next(iter(p["note"].values()))
        lines.append(f"| {t} | {n['anchor']} | {note['fixed']}, {note['kept']} of {note['rotated']}, {note['energy_kept']:.2f} "
                     f"| {n['validation_loss']:.3f} -> {p['validation_loss']:.3f} "
                     f"| {n['mean']:.3f} -> {p['mean']:.3f} ({p['mean'] - n['mean']:+.3f}{paired(p, n)}) |")
    return "\n".join(lines)


def run(chain: str, seeds: int, only: list[str] | None) -> dict:
    manifest = load_manifest(chain)
    windows = [heldout(manifest, s, batches=2, seq_len=128) for s in range(seeds)]
    rows = []
    for tname, arch in {**TARGETS[chain], **EXTRA[chain]}.items():
        if only and tname not in only:
            continue
        for carry in ("none", "pca"):
            plan = make_plan(InitRequest(chain=chain, architecture=arch, carry=carry), manifest)
            if plan.small is None or plan.big is None or plan.small == plan.big:
                break  # one anchor: bench/interp.py's other rows
            t0 = time.perf_counter()
            li, alpha, calib = prepare(plan, manifest, progress=lambda _: None, card=True)
            prep = round(time.perf_counter() - t0, 2)
            if carry == "pca" and "carry" not in calib:
                rows = [r for r in rows if r["target"] != tname]  # no residual width pruned: nothing to compare
                break
            grid = {float(a): v for a, v in calib["calibration_loss"].items()}
            for method, a, vloss in (("single small (alpha 1)", 1.0, grid[1.0]), ("single big (alpha 0)", 0.0, grid[0.0]),
                                     ("default", calib["alphas"], calib["alphas_loss"])):
                r = score(plan.target, li.state(a), windows)
                rows.append({"target": tname, "shape": list(plan.target.shape), "small": plan.small, "big": plan.big,
                             "carry": carry, "method": method, "validation_loss": round(vloss, 4), **r,
                             "prepare_s": prep, "note": calib.get("carry")})
                print(f"{tname:22s} carry {carry:4s} {method:24s} val {vloss:.3f} held-out {r['mean']:.3f} ± {r['std']:.3f}",
                      flush=True)
    return {"chain": chain, "seeds": seeds, "windows": "2 x 4 x 128 per domain per seed",
            "domains": list(chain_corpora(manifest.recipe)), "rows": rows}


def report(chain: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = json.loads((DATA / f"carry-{chain}.json").read_text())
    lines = [f"Command: `{d['command']}`; {d['seeds']} seeds ({d['windows']}); nats/token, held-out mean over "
             f"{', '.join(d['domains'])} (± std over seeds; a difference's ± is the std of the paired difference).", "",
             "| target | anchors | turned (kept of rotated, energy kept) | single big: none -> pca | default: none -> pca "
             "| default minus best single: none -> pca |", "|---|---|---|---|---|---|"]
    targets = list(dict.fromkeys(r["target"] for r in d["rows"]))
    got = {}
    for t in targets:
        row = {(r["carry"], r["method"]): r for r in d["rows"] if r["target"] == t}
        note = row[("pca", "default")]["note"]["big"]

        def best(carry, row=row):  # the better single anchor, chosen on the validation batch as the service does
            return min((row[(carry, m)] for m in METHODS[:2]), key=lambda x: x["validation_loss"])

        def diff(a, b):
            return f"{a['mean'] - b['mean']:+.3f}{paired(a, b)}"

        big_n, big_p, dn, dp = row[("none", METHODS[1])], row[("pca", METHODS[1])], row[("none", "default")], row[("pca", "default")]
        lines.append(f"| {t} | {dn['small']} + {dn['big']} | {note['kept']} of {note['rotated']}, {note['energy_kept']:.2f} "
                     f"| {big_n['mean']:.3f} -> {big_p['mean']:.3f} ({diff(big_p, big_n)}) "
                     f"| {dn['mean']:.3f} -> {dp['mean']:.3f} ({diff(dp, dn)}) "
                     f"| {diff(dn, best('none'))} -> {diff(dp, best('pca'))} |")
        got[t] = (dn, dp, big_n, big_p)
    fig, ax = plt.subplots(figsize=(8, 4))
    w = 0.2
    for k, (label, i) in enumerate((("single big, by importance", 2), ("single big, carried", 3),
                                    ("default, by importance", 0), ("default, carried", 1))):
        xs = [n + (k - 1.5) * w for n in range(len(targets))]
        ax.bar(xs, [got[t][i]["mean"] for t in targets], w, yerr=[got[t][i]["std"] for t in targets], capsize=2, label=label)
    lo = min(r["mean"] for r in d["rows"])
    ax.set_ylim(lo - 0.3, max(r["mean"] for r in d["rows"]) + 0.2)
    ax.set_xticks(range(len(targets)), targets, fontsize=8)
    ax.set_ylabel("held-out loss at step 0 (nats/token, domain mean)")
    ax.set_title(f"chain {chain}: the residual prune by importance or carried, {d['seeds']} seeds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(DATA.parent / f"carry-{chain}.png", dpi=110)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chain", default="tiny")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--only", help="comma-separated target names")
    ap.add_argument("--report", action="store_true", help="table and plot from the saved data only")
    ap.add_argument("--lone", action="store_true", help="the targets narrower than the smallest anchor "
                                                        "(docs/data/carry-<chain>-lone.json)")
    ap.add_argument("--shares", help="with --lone: comma-separated shares of the target's width a lone anchor "
                                     "keeps fixed, each run in place of the service's 0.5 "
                                     "(docs/data/carry-<chain>-shares.json)")
    args = ap.parse_args()
    if args.lone and args.shares:
        out = run_shares(args.chain, args.seeds, [float(x) for x in args.shares.split(",")])
        out["command"] = "OMP_NUM_THREADS=1 python bench/carry.py " + " ".join(sys.argv[1:])
        save(out, DATA / f"carry-{args.chain}-shares.json")
        return
    if args.lone:
        if not args.report:
            out = run_lone(args.chain, args.seeds)
            out["command"] = "OMP_NUM_THREADS=1 python bench/carry.py " + " ".join(sys.argv[1:])
            save(out, DATA / f"carry-{args.chain}-lone.json")
        print(report_lone(args.chain))
        return
    if args.report:
        print(report(args.chain))
        return
    out = run(args.chain, args.seeds, args.only.split(",") if args.only else None)
    out["command"] = "OMP_NUM_THREADS=1 python bench/carry.py " + " ".join(sys.argv[1:])
    save(out, DATA / f"carry-{args.chain}.json")
    print(report(args.chain))


if __name__ == "__main__":
    main()
