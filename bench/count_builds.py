"""The default init against the best single anchor on several builds of `default` (a plot from saved data).

    python bench/count_builds.py     # -> docs/count-builds-default.png, markdown on stdout

The issue's bar: the default init 0.05 nats or more below the best single anchor (the better end
of the service's own grid, by validation loss) on at least 4 of the 5 paired targets, held-out
domain mean. Each build's numbers come from the file that scored the service's init on it, on the
same held-out windows (3 seeds; the paired difference's mean and std over seeds):

- seed 0, built on an Intel machine with AMX (session 13), scored with session 14's code:
  ``docs/data/block-moves-default.json``, variant ``b12 rel.125`` (the service's search since then);
- seed 0, built on an AMD EPYC with AVX-512 (sessions 18 and 19, the same build to 4 decimals):
  ``docs/data/interp-default-s18.json``;
- seed 1, the same machine (session 19): ``docs/data/interp-default-seed1.json``.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.interp import DATA, default_and_best_single  # noqa: E402

TARGETS = ("depth only (12x256)", "width only (16x192)", "both (14x320)", "small, both axes (10x192)",
           "upper pair (24x512)")
BAR = 0.05


def from_block_moves(path: Path) -> dict[str, list[float]]:
    rows = json.loads(path.read_text())["rows"]
    out = {}
    for t in TARGETS:
        by = {r["variant"]: r for r in rows if r["target"] == t}
        single = min((by["single small"], by["single big"]), key=lambda r: r["val"])
        out[t] = [a - b for a, b in zip(by["b12 rel.125"]["per_seed"], single["per_seed"], strict=True)]
    return out


def from_interp(path: Path) -> dict[str, list[float]]:
    rows = json.loads(path.read_text())["rows"]
    out = {}
    for t in TARGETS:
        dflt, single = default_and_best_single([r for r in rows if r["target"] == t])
        out[t] = [a - b for a, b in zip(dflt["per_seed_mean"], single["per_seed_mean"], strict=True)]
    return out


BUILDS = {
    "seed 0, Intel AMX build": lambda: from_block_moves(DATA / "block-moves-default.json"),
    "seed 0, AMD AVX-512 build": lambda: from_interp(DATA / "interp-default-s18.json"),
    "seed 1, AMD AVX-512 build": lambda: from_interp(DATA / "interp-default-seed1.json"),
}


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    got = {name: load() for name, load in BUILDS.items()}
    lines = ["| target | " + " | ".join(got) + " |", "|---|" + "---|" * len(got)]
    for t in TARGETS:
        cells = [f"{statistics.mean(d[t]):+.3f} ± {statistics.stdev(d[t]):.3f}" for d in got.values()]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    counts = [sum(statistics.mean(d[t]) <= -BAR for t in TARGETS) for d in got.values()]
    lines.append(f"| targets {BAR} below (goal 4) | " + " | ".join(str(c) for c in counts) + " |")
    print("\n".join(lines))
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(got)
    for k, (name, d) in enumerate(got.items()):
        xs = [i + k * width for i in range(len(TARGETS))]
        ax.bar(xs, [statistics.mean(d[t]) for t in TARGETS], width, yerr=[statistics.stdev(d[t]) for t in TARGETS],
               capsize=2, label=f"{name} ({counts[k]} of 5)")
    ax.axhline(-BAR, color="k", ls="--", lw=0.8, label=f"the bar: {BAR} below")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(TARGETS))], [t.replace(" (", "\n(") for t in TARGETS],
                  fontsize=8)
    ax.set_ylabel("default init minus best single anchor\n(held-out nats/token, domain mean)")
    ax.set_title("chain default, three builds: 3 seeds of held-out windows (error bars: std of the paired difference)",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(DATA.parent / "count-builds-default.png", dpi=110)


if __name__ == "__main__":
    main()
