"""The per-block alpha search's moves and blocks: which variant chooses best for held-out text.

    OMP_NUM_THREADS=1 python bench/block_moves.py --chain default      # -> docs/data/block-moves-default.json
    OMP_NUM_THREADS=1 python bench/block_moves.py --chain default --only "depth only,width only"
    python bench/block_moves.py --chain default --report     # the markdown table, docs/block-moves-default.png

For every paired target of ``bench/interp.py`` (both terms repaired, the fading blend: what the
service makes), the grid's best alpha is found as the service finds it, then the per-block search
(``cbd.inits.calibration.calibrate_blocks``, the service's half check) runs in each variant below
from that start, on one shared :class:`~cbd.inits.calibration.Blend`; every result is scored on
the held-out works of every corpus (3 seeds of windows, as ``bench/interp.py``):

- ``b6 v(0,.5,1)``: 6 blocks, each group tried at 0, 0.5 and 1 (the service until session 14);
- ``b6 rel.125``: 6 blocks, each group tried 0.125 either side of the start;
- ``b3 rel.125/.25``, ``b6 rel.125/.25``: 3 or 6 blocks, 0.125 and 0.25 either side;
- ``b12 rel.125``: up to 12 blocks (one layer each up to 12 layers), 0.125 either side;

beside the grid's best (``global``) and each single anchor. Seconds are wall time of the search
alone, one thread, on a shared machine; ``passes`` as ``calibrate_blocks`` counts them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.interp import EXTRA, heldout, score  # noqa: E402
from bench.quality import DATA, TARGETS  # noqa: E402
from cbd.inits.calibration import block_values  # noqa: E402

VARIANTS = {
    "global": None,
    "b6 v(0,.5,1)": lambda a: dict(blocks=6, values=(0.0, 0.5, 1.0)),
    "b6 rel.125": lambda a: dict(blocks=6, values=block_values(a, (-0.125, 0.125))),
    "b3 rel.125/.25": lambda a: dict(blocks=3, values=block_values(a, (-0.25, -0.125, 0.125, 0.25))),
    "b6 rel.125/.25": lambda a: dict(blocks=6, values=block_values(a, (-0.25, -0.125, 0.125, 0.25))),
    "b12 rel.125": lambda a: dict(blocks=12, values=block_values(a, (-0.125, 0.125))),
}
OLD = "b6 v(0,.5,1)"


def run(chain: str, only: list[str] | None) -> list[dict]:
    from cbd.core.manifest import load_manifest
    from cbd.core.plan import make_plan
    from cbd.core.request import InitRequest
    from cbd.inits.calibration import Blend, calibrate_blocks, search_bf16, validation_batches
    from cbd.inits.run import prepare

    m = load_manifest(chain)
    windows = [heldout(m, s, batches=2, seq_len=128) for s in range(3)]
    val = validation_batches(m)
    rows = []
    for tname, arch in {**TARGETS[chain], **EXTRA[chain]}.items():
        if only and not any(o in tname for o in only):
            continue
        plan = make_plan(InitRequest(chain=chain, architecture=arch, alpha_scheme="global"), m)
        if not plan.small or not plan.big or plan.small == plan.big:
            continue
        li, alpha, calib = prepare(plan, m, progress=lambda _: None)
        grid = {float(a): v for a, v in calib["calibration_loss"].items()}
        blend = Blend(li, val, bf16=search_bf16())
        blend.remember(grid)
        for name, make in VARIANTS.items():
            t0 = time.perf_counter()
            if make is None:
                a, vloss, passes = alpha, grid[alpha], 0
            else:
                a, vloss, passes = calibrate_blocks(li, val, alpha, grid[alpha], blend=blend, check="half", **make(alpha))
            secs = time.perf_counter() - t0
            r = score(plan.target, li.state(a), windows)
            rows.append({"target": tname, "variant": name, "alpha": a, "val": vloss, "passes": passes,
                         "s": round(secs, 1), "per_seed": r["per_seed_mean"], "mean": r["mean"],
                         "by_domain": r["by_domain"]})
            print(f"{tname:24s} {name:18s} val {vloss:.4f} held {r['mean']:.4f} passes {passes} {secs:.1f}s", flush=True)
        for name, a in (("single small", 1.0), ("single big", 0.0)):
            r = score(plan.target, li.state(a), windows)
            rows.append({"target": tname, "variant": name, "alpha": a, "val": grid[a], "per_seed": r["per_seed_mean"],
                         "mean": r["mean"], "by_domain": r["by_domain"]})
    return rows


def report(d: dict) -> str:
    """Per target: each variant's held-out mean, minus the best single anchor (by validation) and
    minus the old search, paired over the seeds (mean ± std)."""
    by: dict[str, dict[str, dict]] = {}
    for r in d["rows"]:
        by.setdefault(r["target"], {})[r["variant"]] = r

    def diff(a: dict, b: dict) -> str:
        x = [p - q for p, q in zip(a["per_seed"], b["per_seed"], strict=True)]
        return f"{statistics.mean(x):+.3f} ± {statistics.stdev(x) if len(x) > 1 else 0.0:.3f}"

    out = [f"`{d['command']}` ({d['date']}); nats/token, held-out mean over the domains, 3 seeds of windows.", "",
           "| target | variant | validation (chooses) | held-out mean | minus the best single anchor | minus the old search "
           "| search passes | search s |", "|---|---|---|---|---|---|---|---|"]
    for t, v in by.items():
        best = min((v[k] for k in ("single small", "single big")), key=lambda r: r["val"])
        for k, r in v.items():
            if k.startswith("single"):
                continue
            out.append(f"| {t} | {k} | {r['val']:.4f} | {r['mean']:.3f} | {diff(r, best)} | {diff(r, v[OLD])} "
                       f"| {r.get('passes', '')} | {r.get('s', '')} |")
        out.append(f"| {t} | best single ({best['variant']}) | {best['val']:.4f} | {best['mean']:.3f} | | | | |")
    return "\n".join(out)


def plot(d: dict, path: Path) -> None:
    """Each variant's held-out mean minus the best single anchor's, per target (bars: the paired
    spread over the seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by: dict[str, dict[str, dict]] = {}
    for r in d["rows"]:
        by.setdefault(r["target"], {})[r["variant"]] = r
    names = list(VARIANTS)
    fig, ax = plt.subplots(figsize=(9, 4.2))
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        xs, ys, es = [], [], []
        for i, v in enumerate(by.values()):
            best = min((v[x] for x in ("single small", "single big")), key=lambda r: r["val"])
            diff = [p - q for p, q in zip(v[name]["per_seed"], best["per_seed"], strict=True)]
            xs.append(i + (k - (len(names) - 1) / 2) * width)
            ys.append(statistics.mean(diff))
            es.append(statistics.stdev(diff) if len(diff) > 1 else 0.0)
        ax.bar(xs, ys, width, yerr=es, capsize=2, label=name)
    ax.axhline(-0.05, color="grey", ls="--", lw=0.8, label="0.05 below the best single anchor")
    ax.set_xticks(range(len(by)), [t.replace(" (", "\n(") for t in by], fontsize=8)
    ax.set_ylabel("held-out loss minus the best single anchor\n(nats/token, domain mean)")
    ax.set_title(f"per-block alpha search variants, chain {d['chain']} (3 seeds of held-out windows; bars: paired std)",
                 fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chain", default="tiny")
    ap.add_argument("--only", help="comma-separated parts of target names")
    ap.add_argument("--report", action="store_true", help="the table from the saved data only")
    args = ap.parse_args()
    path = DATA / f"block-moves-{args.chain}.json"
    if args.report:
        d = json.loads(path.read_text())
        print(report(d))
        plot(d, DATA.parent / f"block-moves-{args.chain}.png")
        return
    rows = run(args.chain, args.only.split(",") if args.only else None)
    d = {"command": "OMP_NUM_THREADS=1 python bench/block_moves.py " + " ".join(sys.argv[1:]),
         "chain": args.chain, "date": time.strftime("%Y-%m-%d"), "rows": rows}
    path.write_text(json.dumps(d, indent=1) + "\n")
    print(report(d))
    plot(d, DATA.parent / f"block-moves-{args.chain}.png")


if __name__ == "__main__":
    main()
