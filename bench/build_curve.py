"""An anchor's held-out learning curve during its chain step, against another build's end point.

    OMP_NUM_THREADS=1 cbd chain build default 2>&1 | tee build.log
    python bench/build_curve.py --chain default --anchor a1 --log build.log \\
        --compare "a1 at 120 steps (the recipe before)=docs/data/chain-default-a1-120.json"
        # -> docs/data/curve-default-a1.json, docs/curve-default-a1.png

The curve is the build's own held-out readings (``[train] eval_every``; the mean over the recipe's
held-out works, the same windows as the anchor's final ``heldout_loss``): from the chain's manifest
(``heldout_curve``, recorded by builds since 2026-12-07) or, with ``--log``, parsed from the build's
log lines (``step=N/M tokens=T ... eval_loss=X``). ``--compare LABEL=FILE`` adds the end point of the
same anchor in another build's ``bench/chain_table.py`` data file.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from cbd.core.manifest import load_manifest

DATA = Path(__file__).resolve().parent.parent / "docs" / "data"
LINE = re.compile(r"step=(\d+)/(\d+) tokens=(\d+) .*eval_loss=([0-9.]+)")


def from_log(path: Path, anchor_steps: int) -> list[list[float]]:
    """(tokens, held-out loss) of the run with ``anchor_steps`` steps in a build log (the first such run)."""
    points, seen_end = [], False
    for line in path.read_text().splitlines():
        m = LINE.search(line)
        if not m or seen_end or int(m.group(2)) != anchor_steps:
            continue
        points.append([int(m.group(3)), float(m.group(4))])
        seen_end = int(m.group(1)) == anchor_steps
    return points


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chain", default="default")
    ap.add_argument("--anchor", default="a1")
    ap.add_argument("--log", type=Path, help="a build log to read the curve from (builds before heldout_curve)")
    ap.add_argument("--compare", action="append", default=[], metavar="LABEL=FILE")
    args = ap.parse_args()
    m = load_manifest(args.chain)
    a = m.anchor(args.anchor)
    train = m.recipe["train"]
    steps = a.metrics["tokens"] // (train["batch_size"] * train["seq_len"])
    curve = a.metrics.get("heldout_curve")
    if curve is None:
        if args.log is None:
            raise SystemExit(f"{args.chain}/{args.anchor} records no heldout_curve: pass --log with its build log")
        curve = [[0, a.metrics["heldout_loss_pruned"]], *from_log(args.log, steps)]
    if curve[-1][1] != a.metrics["heldout_loss"]:
        raise SystemExit(f"the curve ends at {curve[-1][1]}, the anchor at {a.metrics['heldout_loss']}: another run?")
    source = m.anchors[0].metrics["heldout_loss_mean"]
    compare = []
    for item in args.compare:
        label, _, file = item.partition("=")
        other = json.loads(Path(file).read_text())
        row = next(r for r in other["anchors"] if r["name"] == args.anchor)
        compare.append({"label": label, "file": file, "tokens": row["metrics"]["tokens"],
                        "heldout_loss_mean": row["metrics"]["heldout_loss_mean"], "wall_s": row["metrics"]["wall_s"]})
    out = {"command": "python bench/build_curve.py " + " ".join(a if " " not in a else repr(a) for a in sys.argv[1:]),
           "chain": args.chain, "anchor": args.anchor, "created": m.created, "steps": steps,
           "batch": [train["batch_size"], train["seq_len"]], "lr": train["lr"],
           "source_heldout": source, "curve": curve, "teacher_gap": round(curve[-1][1] - source, 4),
           "tokens_per_s": a.metrics["tokens_per_s"], "wall_s": a.metrics["wall_s"], "compare": compare}
    stem = f"curve-{args.chain}-{args.anchor}"
    (DATA / f"{stem}.json").write_text(json.dumps(out, indent=1) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot([t for t, _ in curve], [v for _, v in curve], marker="o",
            label=f"{args.anchor}, {steps} steps (lr {train['lr']:g}, cosine to {train['min_lr_ratio']:g} x)")
    for c in compare:
        ax.plot([c["tokens"]], [c["heldout_loss_mean"]], marker="s", linestyle="", label=c["label"])
    ax.axhline(source, color="grey", linestyle=":", label=f"the source a0 ({source:.2f})")
    ax.axhline(source + 1.0, color="grey", linestyle="--", label="source + 1.0 nat")
    ax.set_xlabel("training tokens (the teacher runs on every one)")
    ax.set_ylabel("held-out loss, mean over domains (nats/token)")
    ax.set_ylim(source - 0.2, min(8.0, max(v for _, v in curve) + 0.2))
    ax.set_title(f"chain {args.chain}: {args.anchor} during its step (one build, seed 0)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(DATA.parent / f"{stem}.png", dpi=110)
    print(json.dumps({k: out[k] for k in ("curve", "teacher_gap", "compare")}))


if __name__ == "__main__":
    main()
