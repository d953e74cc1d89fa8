"""The evidence runs of docs/results.md: step-0 table, alpha sweeps, ablations, recovery curves.

    python bench/quality.py step0  --chain default          # -> docs/data/step0-default.json
    python bench/quality.py sweep  --chain default          # -> docs/data/sweep-default.json + plot
    python bench/quality.py ablate --chain default          # -> docs/data/ablate-default.json
    python bench/quality.py curves --chain default --tokens 200000 --target depth
    python bench/quality.py report --chain default          # -> docs/results-<chain>.md tables + plots

Held-out text: the recipe corpus' held-out novel (Austen: *Persuasion*), never trained on.
Seeds 0, 1, 2 vary the evaluation windows and the random inits. Every number in the docs comes
from these files; rerun the command to regenerate them.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from cbd import study
from cbd.manifest import load_manifest
from cbd.plan import TransOptions

DOCS = Path(__file__).resolve().parent.parent / "docs"
DATA = DOCS / "data"

# Targets that are not anchors of `default` (20x384 6/2, 16x256 4/2, 12x128 2/1; source 30x576 9/3)
TARGETS = {
    "default": {
        "depth only (12x256)": dict(num_hidden_layers=12, hidden_size=256, num_attention_heads=4,
                                    num_key_value_heads=2, intermediate_size=704),
        "width only (16x192)": dict(num_hidden_layers=16, hidden_size=192, num_attention_heads=3,
                                    num_key_value_heads=1, intermediate_size=704),
        "both (14x320)": dict(num_hidden_layers=14, hidden_size=320, num_attention_heads=5,
                              num_key_value_heads=1, intermediate_size=896),
        "below smallest (8x128)": dict(num_hidden_layers=8, hidden_size=128, num_attention_heads=2,
                                       num_key_value_heads=1, intermediate_size=384),
        "small, both axes (10x192)": dict(num_hidden_layers=10, hidden_size=192, num_attention_heads=3,
                                          num_key_value_heads=1, intermediate_size=640),
        "upper pair (24x512)": dict(num_hidden_layers=24, hidden_size=512, num_attention_heads=8,
                                    num_key_value_heads=4, intermediate_size=1280),
    },
    "tiny": {
        "depth only (4x256)": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=640),
        "width only (6x192)": dict(num_hidden_layers=6, hidden_size=192, num_attention_heads=3,
                                   num_key_value_heads=1, intermediate_size=640),
        "both (8x320)": dict(num_hidden_layers=8, hidden_size=320, num_attention_heads=5,
                             num_key_value_heads=1, intermediate_size=768),
        "below smallest (2x128)": dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=2,
                                       num_key_value_heads=1, intermediate_size=256),
    },
}


def cmd_step0(ctx, args):
    """All initialisers, or (``--only``) some of them merged into the existing file."""
    path = DATA / f"step0-{args.chain}.json"
    only = args.only.split(",") if args.only else None
    rows = study.step0(ctx, TARGETS[args.chain], seeds=tuple(range(args.seeds)), methods=only)
    if only and path.is_file():
        old = json.loads(path.read_text())
        keep = [r for r in old["rows"] if r["method"] not in only]
        order = {t: i for i, t in enumerate(TARGETS[args.chain])}
        rows = sorted(keep + rows, key=lambda r: order.get(r["target"], 99))
        study.save({"command": old["command"] + f"; {args.command_line}", "rows": rows}, path)
        return
    study.save({"command": args.command_line, "rows": rows}, path)


def cmd_sweep(ctx, args):
    out = {}
    for name, arch in TARGETS[args.chain].items():
        target = study.spec_of(ctx, arch)
        s, b = study.pair(ctx, target)
        if s and b:
            out[name] = study.alpha_sweep(ctx, target)
            print(name, json.dumps({k: v for k, v in out[name].items() if k != "losses"}))
    study.save({"command": args.command_line, "sweeps": out}, DATA / f"sweep-{args.chain}.json")


def cmd_ablate(ctx, args):
    """Step-0 ablations: depth expansion, width selection, alignment, chain density."""
    rows = []
    batches = [ctx.heldout(s) for s in range(args.seeds)]

    def score(target, state):
        from cbd.model import build_model, eval_loss

        model = build_model(target, state)
        return [eval_loss(model, b) for b in batches]

    anchors = [a.name for a in ctx.manifest.anchors]
    for name, arch in TARGETS[args.chain].items():
        target = study.spec_of(ctx, arch)
        s, b = study.pair(ctx, target)
        if not (s and b):
            continue
        variants = {
            "default (identity blocks, importance, aligned)": {},
            "depth expand: copy": {"opts": TransOptions(depth_expand="copy")},
            "depth subset: even": {"opts": TransOptions(depth_subset="even")},
            "width subset: prefix": {"opts": TransOptions(width_subset="prefix")},
            "width expand: zero": {"opts": TransOptions(width_expand="zero")},
            "anchors independent (no alignment)": {"aligned": False},
        }
        i = anchors.index(s)
        if i + 1 < len(anchors):  # skip S: interpolate the next smaller anchor with B
            variants[f"sparser chain ({anchors[i + 1]} + {b})"] = {"small": anchors[i + 1]}
        for vname, kw in variants.items():
            state, alpha = study.linit_state(ctx, target, **kw)
            losses = score(target, state)
            rows.append({"target": name, "variant": vname, "alpha": alpha, "mean": sum(losses) / len(losses),
                         "losses": losses})
            print(f"{name:24s} {vname:44s} alpha={alpha:.3f} {rows[-1]['mean']:.3f}")
    study.save({"command": args.command_line, "rows": rows}, DATA / f"ablate-{args.chain}.json")


def cmd_curves(ctx, args):
    path = DATA / f"curves-{args.chain}.json"
    done = json.loads(path.read_text()) if path.is_file() else {"command": args.command_line, "curves": {}}
    arch = next(v for k, v in TARGETS[args.chain].items() if k.startswith(args.target))
    target = study.spec_of(ctx, arch)
    tname = next(k for k in TARGETS[args.chain] if k.startswith(args.target))
    inits = study.initialisers(ctx, target)
    for method in args.methods.split(","):
        key = f"{tname} | {method}"
        if key in done["curves"]:
            continue
        fn = next(v for k, v in inits.items() if k.startswith(method))
        curve = study.recovery(ctx, target, fn(0), tokens=args.tokens, eval_every_tokens=args.eval_every,
                               label=key)
        done["curves"][key] = {"target": tname, "method": method, "tokens": args.tokens, "curve": curve}
        study.save(done, path)  # resumable: each finished curve is kept


def report(chain: str) -> None:
    """Markdown tables and PNG plots from the JSON files (no model is run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: list[str] = []
    f = DATA / f"step0-{chain}.json"
    if f.is_file():
        d = json.loads(f.read_text())
        rows = d["rows"]
        methods = list(dict.fromkeys(r["method"] for r in rows))
        targets = list(dict.fromkeys(r["target"] for r in rows))
        lines += [f"### Loss at step 0 (`{d['command']}`)", "",
                  "| target | anchors | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
        for t in targets:
            rs = {r["method"]: r for r in rows if r["target"] == t}
            first = next(iter(rs.values()))
            cells = [f"{rs[m]['mean']:.3f} ± {rs[m]['std']:.3f}" if m in rs else "" for m in methods]
            lines.append(f"| {t} | {first['small']} + {first['big']} | " + " | ".join(cells) + " |")
        fig, ax = plt.subplots(figsize=(10, 4.5))
        width = 0.8 / len(methods)
        for k, m in enumerate(methods):
            ys = [next((r["mean"] for r in rows if r["target"] == t and r["method"] == m), float("nan")) for t in targets]
            es = [next((r["std"] for r in rows if r["target"] == t and r["method"] == m), 0) for t in targets]
            ax.bar([i + k * width for i in range(len(targets))], ys, width, yerr=es, label=m)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(targets))], targets, rotation=15, fontsize=8)
        ax.set_ylabel("held-out loss at step 0 (nats/token)")
        ax.set_title(f"chain {chain}: initialisers at step 0 (mean ± std, 3 seeds)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(DOCS / f"step0-{chain}.png", dpi=110)
        lines += ["", f"![step 0](step0-{chain}.png)", ""]
    f = DATA / f"sweep-{chain}.json"
    if f.is_file():
        d = json.loads(f.read_text())
        fig, ax = plt.subplots(figsize=(7, 4.5))
        lines += [f"### alpha sweeps (`{d['command']}`)", "",
                  "| target | pair | best alpha (loss) | alpha0 (loss) | calibrated (loss) | calibrated vs best |",
                  "|---|---|---|---|---|---|"]
        for name, sw in d["sweeps"].items():
            best = min(range(len(sw["alphas"])), key=lambda i: sw["losses"][i])
            ax.plot(sw["alphas"], sw["losses"], marker="o", ms=3, label=name)
            ax.scatter([sw["alpha0"]], [sw["alpha0_loss"]], marker="x", color="k")
            ax.scatter([sw["calibrated"]], [sw["calibrated_loss"]], marker="*", s=80, color="r")
            gap = 100 * (sw["calibrated_loss"] - sw["losses"][best]) / sw["losses"][best]
            lines.append(f"| {name} | {sw['small']} + {sw['big']} | {sw['alphas'][best]:.1f} ({sw['losses'][best]:.3f})"
                         f" | {sw['alpha0']:.3f} ({sw['alpha0_loss']:.3f}) | {sw['calibrated']:.3f} "
                         f"({sw['calibrated_loss']:.3f}) | {gap:+.2f}% |")
        ax.set_xlabel("alpha (weight of the smaller anchor)")
        ax.set_ylabel("held-out loss at step 0")
        ax.set_title(f"chain {chain}: alpha sweeps (x: alpha0, *: calibrated)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(DOCS / f"sweep-{chain}.png", dpi=110)
        lines += ["", f"![alpha sweeps](sweep-{chain}.png)", ""]
    f = DATA / f"ablate-{chain}.json"
    if f.is_file():
        d = json.loads(f.read_text())
        lines += [f"### Ablations at step 0 (`{d['command']}`)", "", "| target | variant | alpha | loss |",
                  "|---|---|---|---|"]
        lines += [f"| {r['target']} | {r['variant']} | {r['alpha']:.3f} | {r['mean']:.3f} |" for r in d["rows"]]
        lines.append("")
    f = DATA / f"curves-{chain}.json"
    if f.is_file():
        d = json.loads(f.read_text())
        by_target: dict[str, list] = {}
        for c in d["curves"].values():
            by_target.setdefault(c["target"], []).append(c)
        fig, axes = plt.subplots(1, len(by_target), figsize=(6 * len(by_target), 4.5), squeeze=False)
        lines += ["### Recovery curves", "", "| target | method | step 0 | final | tokens |", "|---|---|---|---|---|"]
        for ax, (t, cs) in zip(axes[0], by_target.items(), strict=True):
            for c in cs:
                xs, ys = zip(*c["curve"], strict=True)
                ax.plot(xs, ys, marker="o", ms=3, label=c["method"])
                lines.append(f"| {t} | {c['method']} | {ys[0]:.3f} | {ys[-1]:.3f} | {xs[-1]:,} |")
            rand = next((c for c in cs if c["method"] == "random"), None)
            cbd = next((c for c in cs if c["method"] == "cbd"), None)
            if rand and cbd:
                need = study.tokens_to_reach(rand["curve"], cbd["curve"][0][1])
                budget = rand["curve"][-1][0]
                reach = f"> {budget:,} (not reached)" if need is None else f"{need:,.0f}"
                lines.append(f"| {t} | scratch tokens to reach CBD's step-0 loss | | | {reach} |")
            ax.set_title(t)
            ax.set_xlabel("training tokens")
            ax.set_ylabel("held-out loss")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(DOCS / f"curves-{chain}.png", dpi=110)
        lines += ["", f"![recovery curves](curves-{chain}.png)", ""]
    (DOCS / f"results-{chain}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["step0", "sweep", "ablate", "curves", "report"])
    ap.add_argument("--chain", default="default")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=200_000)
    ap.add_argument("--eval-every", type=int, default=20_000)
    ap.add_argument("--target", default="depth")
    ap.add_argument("--methods", default="cbd,single-small,random")
    ap.add_argument("--only", default="", help="step0: only these initialisers, merged into the file")
    args = ap.parse_args()
    args.command_line = "python bench/quality.py " + " ".join(os.sys.argv[1:])
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    if args.what == "report":
        report(args.chain)
        return
    ctx = study.context(load_manifest(args.chain))
    {"step0": cmd_step0, "sweep": cmd_sweep, "ablate": cmd_ablate, "curves": cmd_curves}[args.what](ctx, args)


if __name__ == "__main__":
    main()
