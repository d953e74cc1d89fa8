"""The evidence runs of docs/results.md: step-0 table, alpha sweeps, ablations, recovery curves.

    python bench/quality.py step0  --chain default          # -> docs/data/step0-default.json
    python bench/quality.py sweep  --chain default          # -> docs/data/sweep-default.json + plot
    python bench/quality.py ablate --chain default          # -> docs/data/ablate-default.json
    python bench/quality.py curves --chain default --tokens 200000 --target depth
    python bench/quality.py operators --chain default      # -> docs/data/operators-default.json
    python bench/quality.py directkd --chain default --target "small, both"   # merged into step0
    python bench/quality.py chainkd --chain default --anchor a2   # chain vs direct KD, same anchor
    python bench/quality.py cost   --chain default          # -> docs/data/cost-default.json
    python bench/quality.py report --chain default          # -> docs/results-<chain>.md tables + plots

Held-out text: the recipe corpus' held-out novel (Austen: *Persuasion*), never trained on.
Seeds 0, 1, 2 vary the evaluation windows and the random inits. Every number in the docs comes
from these files; rerun the command to regenerate them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch

from bench import study
from cbd.core import paths
from cbd.core.manifest import load_manifest
from cbd.core.plan import TransOptions
from cbd.core.recipe import load_recipe

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
# the build-seed experiment (bench/recipes/default-seed1.toml) is scored on the same targets
TARGETS["default-seed1"] = TARGETS["default"]


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
        from cbd.train.models import build_model, eval_loss

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


def cmd_operators(ctx, args):
    """Each Trans operator alone on each non-source anchor (the damage of each operator)."""
    out = {"command": args.command_line, "anchors": []}
    for a in ctx.manifest.anchors[1:]:
        if args.anchor and a.name != args.anchor:
            continue
        out["anchors"].append(study.operator_damage(ctx, a.name, seeds=tuple(range(args.seeds))))
        study.save(out, DATA / f"operators-{args.chain}.json")


def cmd_directkd(ctx, args):
    """Direct KD of a target from the source with one chain step's budget, merged into step0."""
    cache = paths.home() / "study" / args.chain  # direct-KD weights, outside git
    path = DATA / f"step0-{args.chain}.json"
    d = json.loads(path.read_text())
    kd = DATA / f"directkd-{args.chain}.json"
    runs = json.loads(kd.read_text()) if kd.is_file() else {"command": args.command_line, "runs": {}}
    for tname, arch in TARGETS[args.chain].items():
        if not tname.startswith(tuple(args.target.split(","))):
            continue
        target = study.spec_of(ctx, arch)
        state, metrics = study.direct_kd_state(ctx, target, cache=cache)
        runs["runs"][tname] = metrics
        study.save(runs, kd)
        from cbd.train.models import build_model, eval_loss

        losses = [eval_loss(build_model(target, state), ctx.heldout(s)) for s in range(args.seeds)]
        ref = next(r for r in d["rows"] if r["target"] == tname)
        row = {k: ref[k] for k in ("target", "shape", "non_embedding_params", "small", "big")}
        row |= {"method": "direct KD (one chain step)", "losses": losses, "mean": sum(losses) / len(losses),
                "std": statistics.stdev(losses)}
        d["rows"] = [r for r in d["rows"] if not (r["target"] == tname and r["method"] == row["method"])] + [row]
        if args.command_line not in d["command"]:
            d["command"] += f"; {args.command_line}"
        study.save(d, path)
        print(f"{tname}: direct KD {row['mean']:.3f} ± {row['std']:.3f}")


def cmd_chainkd(ctx, args):
    """Ablation: an anchor of the chain against its shape distilled straight from the source.

    The direct run gets the chain's source budget (one chain step: the same source-forward
    tokens as the whole chain) and starts, like the chain's first step, from the pruned source.
    """
    from cbd.train.models import build_model, eval_loss

    name = args.anchor or ctx.manifest.anchors[2].name
    spec = ctx.manifest.anchor(name).spec
    cache = paths.home() / "study" / args.chain  # direct-KD weights, outside git
    direct, metrics = study.direct_kd_state(ctx, spec, cache=cache)
    path = [a for a in ctx.manifest.anchors[1:] if a.name <= name]  # a1 .. name
    out = {"command": args.command_line, "anchor": name, "shape": list(spec.shape), "direct_kd": metrics,
           "chain": {"anchors": [a.name for a in path],
                     "source_forward_tokens": path[0].metrics.get("teacher_tokens", 0),
                     "training_tokens": sum(a.metrics.get("tokens", 0) for a in path),
                     "wall_s": sum(a.metrics.get("wall_s", 0.0) for a in path)}, "rows": {}}
    for label, state in ((f"chain anchor {name}", study.anchor_state(ctx, name)),
                         ("direct KD from the source, one chain step", direct)):
        losses = [eval_loss(build_model(spec, state), ctx.heldout(s)) for s in range(args.seeds)]
        out["rows"][label] = {"mean": sum(losses) / len(losses), "std": statistics.stdev(losses), "losses": losses}
        print(f"{label}: {out['rows'][label]['mean']:.3f} ± {out['rows'][label]['std']:.3f}")
    study.save(out, DATA / f"chainkd-{args.chain}.json")


def cmd_cost(ctx, args):
    """Teacher-forward and training tokens: the chain amortised over N targets vs direct KD each."""
    anchors = ctx.manifest.anchors
    src = anchors[0]
    rows = []
    for a in anchors[1:]:
        m = a.metrics
        parent = next(p for p in anchors if p.name == a.parent)
        rows.append({"anchor": a.name, "teacher": parent.name, "teacher_params": parent.num_params,
                     "student_params": a.num_params, "tokens": m.get("tokens", 0),
                     "teacher_tokens": m.get("teacher_tokens", 0), "wall_s": m.get("wall_s", 0.0)})
    kd = DATA / f"directkd-{args.chain}.json"
    direct = json.loads(kd.read_text())["runs"] if kd.is_file() else {}

    def flops(r):  # 2N per forward token of the teacher, 6N per training token of the student
        return 2 * r["teacher_params"] * r["teacher_tokens"] + 6 * r["student_params"] * r["tokens"]

    chain = {"source_forward_tokens": sum(r["teacher_tokens"] for r in rows if r["teacher"] == src.name),
             "teacher_forward_tokens": sum(r["teacher_tokens"] for r in rows),
             "training_tokens": sum(r["tokens"] for r in rows), "flops": sum(flops(r) for r in rows),
             "wall_s": sum(r["wall_s"] for r in rows)}
    first = rows[0]
    per_target = {"source_forward_tokens": first["teacher_tokens"], "training_tokens": first["tokens"],
                  "wall_s_measured": {k: v["wall_s"] for k, v in direct.items()}}
    study.save({"command": args.command_line, "anchors": rows, "chain": chain, "direct_kd_per_target": per_target,
                "source_params": src.num_params}, DATA / f"cost-{args.chain}.json")
    print(json.dumps(chain), json.dumps(per_target))


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
        latest = json.loads(path.read_text()) if path.is_file() else done  # another run may have added curves
        latest["curves"][key] = {"target": tname, "method": method, "tokens": args.tokens, "curve": curve,
                                 "command": args.command_line}
        study.save(latest, path)  # resumable: each finished curve is kept


def _plot(fig, name: str, alt: str) -> list[str]:
    """Save a report figure under docs/ and return the Markdown lines that show it."""
    fig.tight_layout()
    fig.savefig(DOCS / name, dpi=110)
    return ["", f"![{alt}]({name})", ""]


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
        lines += _plot(fig, f"step0-{chain}.png", "step 0")
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
        lines += _plot(fig, f"sweep-{chain}.png", "alpha sweeps")
    f = DATA / f"ablate-{chain}.json"
    if f.is_file():
        d = json.loads(f.read_text())
        lines += [f"### Ablations at step 0 (`{d['command']}`)", "", "| target | variant | alpha | loss |",
                  "|---|---|---|---|"]
        lines += [f"| {r['target']} | {r['variant']} | {r['alpha']:.3f} | {r['mean']:.3f} |" for r in d["rows"]]
        lines.append("")
    f = DATA / f"operators-{chain}.json"
    if f.is_file():
        d = json.loads(f.read_text())
        lines += [f"### Each Trans operator alone (`{d['command']}`)", "",
                  "| anchor | operator | selection | shape | loss | change |", "|---|---|---|---|---|---|"]
        fig, axes = plt.subplots(1, len(d["anchors"]), figsize=(6 * len(d["anchors"]), 5), squeeze=False)
        for ax, a in zip(axes[0], d["anchors"], strict=True):
            for r in a["rows"]:
                spread = f" ± {r['spread']:.3f} ({r['draws']} draws)" if r.get("draws", 1) > 1 else ""
                lines.append(f"| {a['anchor']} | {r['operator']} | {r['selection']} | {tuple(r['shape'])} | "
                             f"{r['mean']:.4f}{spread} | {r['delta']:+.4f} |")
            rows = [r for r in a["rows"] if r["selection"]]
            colors = {"importance": "tab:green", "random": "tab:orange", "least important": "tab:red"}
            ax.barh([f"{r['operator']} [{r['selection']}]" for r in rows], [r["delta"] for r in rows],
                    color=[colors.get(r["selection"], "tab:blue") for r in rows])
            ax.invert_yaxis()
            ax.set_xscale("symlog", linthresh=1e-3)
            ax.set_xlabel("held-out loss change (nats/token, symlog)")
            ax.set_title(f"anchor {a['anchor']} {tuple(a['shape'])}: {a['rows'][0]['mean']:.3f}")
            ax.tick_params(axis="y", labelsize=7)
        lines += _plot(fig, f"operators-{chain}.png", "operators")
    f = DATA / f"cost-{chain}.json"
    if f.is_file():
        d = json.loads(f.read_text())
        c, p = d["chain"], d["direct_kd_per_target"]
        lines += [f"### Cost (`{d['command']}`)", "", "| anchor | teacher | teacher-forward tokens | training tokens "
                  "| wall s (CPU) |", "|---|---|---|---|---|"]
        lines += [f"| {r['anchor']} | {r['teacher']} | {r['teacher_tokens']:,} | {r['tokens']:,} | {r['wall_s']:.0f} |"
                  for r in d["anchors"]]
        lines += ["", "| | source-forward tokens | all teacher-forward tokens | training tokens |", "|---|---|---|---|",
                  f"| chain (built once) | {c['source_forward_tokens']:,} | {c['teacher_forward_tokens']:,} | "
                  f"{c['training_tokens']:,} |"]
        for n in (1, 10):
            lines.append(f"| direct KD, {n} target(s), one chain step each | {n * p['source_forward_tokens']:,} | "
                         f"{n * p['source_forward_tokens']:,} | {n * p['training_tokens']:,} |")
        lines.append(f"| CBD, 10 targets (the chain + 10 LInits, no training) | {c['source_forward_tokens']:,} | "
                     f"{c['teacher_forward_tokens']:,} | {c['training_tokens']:,} |")
        if p["wall_s_measured"]:
            lines += ["", "Measured direct-KD wall time per target (s): " + ", ".join(
                f"{k}: {v:.0f}" for k, v in p["wall_s_measured"].items())]
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
            for c in cs:
                if rand is None or c is rand:
                    continue
                need = study.tokens_to_reach(rand["curve"], c["curve"][0][1])
                budget = rand["curve"][-1][0]
                reach = f"> {budget:,} (not reached)" if need is None else f"{need:,.0f}"
                lines.append(f"| {t} | scratch tokens to reach {c['method']}'s step-0 loss | | | {reach} |")
                own = study.tokens_to_reach(c["curve"], rand["curve"][-1][1])
                speed = "not reached" if own is None else (f"{budget / own:.0f}x ({own:,.0f} tokens)" if own
                                                           else "at step 0")
                lines.append(f"| {t} | {c['method']}: speed-up to scratch's final loss "
                             f"({rand['curve'][-1][1]:.3f}) | | | {speed} |")
            ax.set_title(t)
            ax.set_xlabel("training tokens")
            ax.set_ylabel("held-out loss")
            ax.legend(fontsize=8)
        lines += _plot(fig, f"curves-{chain}.png", "recovery curves")
    (DOCS / f"results-{chain}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["step0", "sweep", "ablate", "operators", "directkd", "chainkd", "cost", "curves",
                                        "report"])
    ap.add_argument("--anchor", default="", help="operators: only this anchor")
    ap.add_argument("--chain", default="default")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=200_000)
    ap.add_argument("--eval-every", type=int, default=20_000)
    ap.add_argument("--target", default="depth")
    ap.add_argument("--methods", default="cbd,single-small,random")
    ap.add_argument("--only", default="", help="step0: only these initialisers, merged into the file")
    ap.add_argument("--context", default="", help="curves, method random only: take the corpus, tokenizer and "
                    "base shape from this built chain (a random init needs no anchor; lets the scratch "
                    "curves start before --chain is built). Its source, tokenizer and corpus must match.")
    args = ap.parse_args()
    args.command_line = "python bench/quality.py " + " ".join(os.sys.argv[1:])
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    if args.what == "report":
        report(args.chain)
        return
    if args.context:
        if args.what != "curves" or set(args.methods.split(",")) != {"random"}:
            ap.error("--context is only for `curves --methods random`")
        ctx = study.context(load_manifest(args.context))
        recipe = load_recipe(args.chain)
        if (recipe.source_repo, recipe.tokenizer, list(recipe.data.weights)) != (ctx.manifest.source, ctx.tokenizer,
                                                                                  ctx.corpora):
            ap.error(f"chain {args.context!r} has another source, tokenizer or corpus than recipe {args.chain!r}")
    else:
        ctx = study.context(load_manifest(args.chain))
    {"step0": cmd_step0, "sweep": cmd_sweep, "ablate": cmd_ablate, "operators": cmd_operators,
     "directkd": cmd_directkd, "chainkd": cmd_chainkd, "cost": cmd_cost, "curves": cmd_curves}[args.what](ctx, args)


if __name__ == "__main__":
    main()
