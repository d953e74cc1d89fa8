"""Which init does the service hand out: repair and alpha schemes, per held-out domain.

    OMP_NUM_THREADS=1 python bench/interp.py --chain tiny        # -> docs/data/interp-tiny.json
    OMP_NUM_THREADS=1 python bench/interp.py --chain default --seeds 3
    python bench/interp.py --chain tiny --report   # markdown tables, docs/interp-tiny.png

For every paired target of ``bench/quality.py``'s list (and one between the first anchor and the
source), each initialiser below is made by the service's own code (``cbd.core.plan.make_plan``
and ``cbd.inits.run.prepare``: the same repair, calibration and blend a ``POST /initialize``
runs) and scored at step 0 on the held-out work of *every* corpus of the chain's recipe
(whole works never trained on), seeds varying the windows:

- ``single small`` / ``single big``: one anchor's Trans onto the target (alpha 1 / 0);
- ``global``: one alpha picked on the chain's validation batch (the grid of ``alpha_grid``);
- ``blocks``: an alpha per block of layers (``cbd.inits.calibration.calibrate_blocks``) with the
  service's check (``BLOCK_CHECK``), and the other checks: ``unchecked`` (the search on the whole
  validation batch: the service before session 12), ``half-checked`` (searched on half, kept only
  where the other half agrees), ``twofold-checked`` (searched on each half, checked on the other);
- each with ``repair`` none (plain Trans, the service before repair) or ridge (``cbd.repair``), and
  ``blend`` fade (the default: the smaller anchor's term holds the bigger's units it lacks, faded in)
  or plain (the smaller anchor grown by clones, every parameter blended: the service before);
- ``random``: transformers' own init.

The validation batch (training text of every corpus) chooses; the held-out works only score.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from cbd.core.manifest import load_manifest
from cbd.core.plan import make_plan
from cbd.core.recipe import chain_corpora
from cbd.core.request import InitRequest
from cbd.data import batches as data
from cbd.inits.calibration import (
    BLOCK_CHECK,
    Blend,
    block_values,
    calibrate_blocks,
    search_bf16,
    validation_batches,
)
from cbd.inits.run import prepare
from cbd.train.models import build_model, eval_loss, random_state

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.quality import DATA, TARGETS  # noqa: E402

# (repair, blend): the service before repair, before the fading blend, and today's
VARIANTS = ((False, "plain"), (True, "plain"), (False, "fade"), (True, "fade"))
CHECK_NAMES = {"none": "unchecked", "half": "half-checked", "twofold": "twofold-checked"}

EXTRA = {  # between the first anchor and the source
    "tiny": {"upper (18x448)": dict(num_hidden_layers=18, hidden_size=448, num_attention_heads=7,
                                    num_key_value_heads=1, intermediate_size=1280),
             # default's upper pair target, here between tiny's a1 and the source (--only, --name upper)
             "upper pair (24x512)": TARGETS["default"]["upper pair (24x512)"]},
    "default": {},
    "default-seed1": {},
}


def heldout(manifest, seed: int, *, batches: int, seq_len: int) -> dict[str, list[torch.Tensor]]:
    return {name: data.eval_batches(data.token_file(name, manifest.tokenizer, "heldout"), batch_size=4,
                                    seq_len=seq_len, num_batches=batches, seed=seed)
            for name in chain_corpora(manifest.recipe)}


def experiment_main(script: str, doc: str, one_target, stem: str, default_chain: str = "default", **fields) -> None:
    """The command line of an experiment over the paired targets (``--chain``, ``--seeds``, ``--only``,
    ``--json``): :func:`each_target` with ``one_target``, written to ``docs/data/<stem>-<chain>.json``
    with the command that made it (quoted as a shell would need it) and ``fields``."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--chain", default=default_chain)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--only", nargs="+", help="target names (whole)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = each_target(args.chain, args.seeds, args.only, one_target)
    threads = os.environ.get("OMP_NUM_THREADS")
    out = {"command": (f"OMP_NUM_THREADS={threads} " if threads else "") + f"python bench/{script} "
           + shlex.join(sys.argv[1:]), "chain": args.chain, "seeds": args.seeds, "date": time.strftime("%Y-%m-%d"),
           **fields, "rows": rows}
    (args.json or DATA / f"{stem}-{args.chain}.json").write_text(json.dumps(out, indent=1) + "\n")


def service_init(chain: str, manifest, shape: dict):
    """The default request's init of a paired target, as the service prepares it: (plan, LInit, its
    global alpha, what the calibration measured, the alpha it hands out: per block or global); None
    where one anchor serves the target."""
    plan = make_plan(InitRequest(chain=chain, architecture=shape), manifest)
    if plan.small is None or plan.big is None or plan.small == plan.big:
        return None
    li, alpha, calib = prepare(plan, manifest, progress=lambda _: None)
    return plan, li, alpha, calib, calib.get("alphas") or alpha


def each_target(chain: str, seeds: int, only: list[str] | None, one_target) -> list[dict]:
    """``one_target(tname, manifest, init, windows, val)`` for each of the chain's paired targets
    (``only``: whole names) that two anchors serve, ``init`` the service's (:func:`service_init`), on
    ``seeds`` seeds of held-out windows (2 x 4 x 128 tokens per domain) and the chain's validation
    batch; the rows it returns, each with the ``seconds`` it took, the service's init included."""
    manifest = load_manifest(chain)
    windows = [heldout(manifest, s, batches=2, seq_len=128) for s in range(seeds)]
    val = validation_batches(manifest)
    rows = []
    for tname, shape in TARGETS[chain].items():
        if only and tname not in only:
            continue
        t0 = time.perf_counter()
        init = service_init(chain, manifest, shape)
        if init is not None:
            rows.append(one_target(tname, manifest, init, windows, val) | {"seconds": round(time.perf_counter() - t0, 1)})
    return rows


def default_and_best_single(rows: list[dict]) -> tuple[dict | None, dict | None]:
    """Of one target's rows in an interp file: the service's init (``blocks alpha, repair ridge``) and
    the best single anchor (the single-anchor row with the lowest validation loss, the end of the
    grid the service would pick alone); None where the file has none."""
    dflt = next((r for r in rows if r["method"] == "blocks alpha, repair ridge"), None)
    singles = [r for r in rows if r["method"].startswith("single") and "validation_loss" in r]
    return dflt, min(singles, key=lambda r: r["validation_loss"]) if singles else None


def score(target, state, windows: list[dict[str, list[torch.Tensor]]]) -> dict:
    model = build_model(target, state)
    per_seed = [{d: eval_loss(model, b) for d, b in w.items()} for w in windows]
    domains = list(per_seed[0])
    means = [statistics.mean(s.values()) for s in per_seed]
    return {"by_domain": {d: statistics.mean(s[d] for s in per_seed) for d in domains},
            "mean": statistics.mean(means), "std": statistics.stdev(means) if len(means) > 1 else 0.0,
            "per_seed_mean": means}


def run(chain: str, seeds: int, batches: int, seq_len: int, only: list[str] | None,
        variants: tuple[tuple[bool, str], ...] = VARIANTS) -> dict:
    manifest = load_manifest(chain)
    windows = [heldout(manifest, s, batches=batches, seq_len=seq_len) for s in range(seeds)]
    val = validation_batches(manifest)
    targets = {**TARGETS[chain], **EXTRA[chain]}
    rows = []
    for tname, arch in targets.items():
        if only and tname not in only:
            continue
        for repair, blend in variants:
            t0 = time.perf_counter()
            plan = make_plan(InitRequest(chain=chain, architecture=arch, repair=repair, blend=blend), manifest)
            tag = ("ridge" if repair else "none") + (", plain blend" if blend == "plain" else "")
            if plan.small is None or plan.big is None or plan.small == plan.big:  # one anchor: its subset
                if blend == "plain":
                    continue
                tag = "ridge" if repair else "none"
                li, alpha, calib = prepare(plan, manifest, progress=lambda _: None, card=True)
                r = score(plan.target, li.state(alpha), windows)
                one = plan.small or plan.big
                rows.append({"target": tname, "shape": list(plan.target.shape), "small": plan.small, "big": plan.big,
                             "method": f"single anchor {one}, repair {tag}", "alpha": alpha,
                             "validation_loss": calib["card"]["step0_loss"], **r,
                             "anchor_own": manifest.anchor(one).metrics.get("heldout_loss_mean")})
                print(f"{tname:22s} {rows[-1]['method']:40s} held-out {r['mean']:.3f} ± {r['std']:.3f}", flush=True)
                continue
            li, alpha, calib = prepare(plan, manifest, progress=lambda _: None)
            prep_s = time.perf_counter() - t0
            grid = {float(a): v for a, v in calib["calibration_loss"].items()}
            inits = {f"single small (alpha 1), repair {tag}": (1.0, grid[1.0]),
                     f"single big (alpha 0), repair {tag}": (0.0, grid[0.0]),
                     f"global alpha, repair {tag}": (alpha, grid[alpha])}
            # the service's choice (cbd.inits.calibration.BLOCK_CHECK), then the other checks
            inits[f"blocks alpha, repair {tag}"] = (calib["alphas"], calib["alphas_loss"])
            check = calib["alphas_search"]
            block_s, passes = {}, {}
            for mode in (m for m in CHECK_NAMES if m != BLOCK_CHECK):
                t1 = time.perf_counter()
                # the service's search precision (bf16 where the CPU has it), a blend of its own
                blocks, bloss, passes[mode] = calibrate_blocks(li, val, alpha, grid[alpha], check=mode,
                                                               blocks=check["blocks"], values=block_values(alpha),
                                                               blend=Blend(li, val, bf16=search_bf16()))
                inits[f"blocks alpha {CHECK_NAMES[mode]}, repair {tag}"] = (blocks, bloss)
                block_s[mode] = round(time.perf_counter() - t1, 2)
            for method, (a, vloss) in inits.items():
                r = score(plan.target, li.state(a), windows)
                rows.append({"target": tname, "shape": list(plan.target.shape), "small": plan.small, "big": plan.big,
                             "method": method, "alpha": a, "validation_loss": round(vloss, 4), **r,
                             "prepare_s": round(prep_s, 2),
                             **({"blocks_s": block_s, "blocks_passes": passes} if method.startswith("blocks alpha ") else {}),
                             **({"search": check} if method.startswith("blocks alpha, ") else {})})
                print(f"{tname:22s} {method:40s} val {vloss:.3f}  held-out {r['mean']:.3f} ± {r['std']:.3f}  "
                      + " ".join(f"{d} {v:.2f}" for d, v in r["by_domain"].items()), flush=True)
        r = score(plan.target, random_state(plan.target, 0), windows)
        rows.append({"target": tname, "method": "random", **r})
        print(f"{tname:22s} {'random':40s} held-out {r['mean']:.3f}", flush=True)
    return {"chain": chain, "seeds": seeds, "windows": f"{batches} x 4 x {seq_len} per domain per seed",
            "domains": list(chain_corpora(manifest.recipe)), "rows": rows, "anchors": anchors(manifest, windows)}


def anchors(manifest, windows: list[dict[str, list[torch.Tensor]]]) -> dict[str, dict]:
    """Each anchor of the chain (the source a0 included) scored on the same windows as the inits: the
    levels a target's init is held to ("within 1.0 nat of the source", "within 0.5 of the smallest
    anchor") on equal text, not on the build's own (longer) windows."""
    from cbd.shape import arch
    from cbd.store.anchors import load_anchor

    out = {}
    for a in manifest.anchors:
        anchor = load_anchor(manifest, a.name)
        out[a.name] = {"shape": list(a.spec.shape),
                       **score(a.spec, {n: anchor.read(n) for n in arch.param_names(a.spec)}, windows)}
        print(f"anchor {a.name:16s} held-out {out[a.name]['mean']:.3f} ± {out[a.name]['std']:.3f}", flush=True)
    return out


def paired(a: dict, b: dict) -> str:
    """`` ± s``: the std over seeds of a's mean minus b's on the same windows (the spread of the
    difference itself, smaller than either row's own)."""
    if len(a.get("per_seed_mean", ())) < 2 or len(a["per_seed_mean"]) != len(b.get("per_seed_mean", ())):
        return ""
    return f" ± {statistics.stdev(x - y for x, y in zip(a['per_seed_mean'], b['per_seed_mean'], strict=True)):.3f}"


def stem(chain: str, tag: str | None) -> str:
    return f"interp-{chain}" + (f"-{tag}" if tag else "")


def report(chain: str, tag: str | None = None) -> str:
    """Markdown tables and a plot (docs/<stem>.png) from docs/data/<stem>.json (``stem``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = json.loads((DATA / f"{stem(chain, tag)}.json").read_text())
    domains = d["domains"]
    lines = ([f"*{d['note']}*", ""] if d.get("note") else []) + [f"Command: `{d['command']}`; {d['seeds']} seeds ({d['windows']}); nats/token, mean over the "
             f"held-out works of {', '.join(domains)} (± std over seeds of that mean), then each domain.", "",
             "| target | anchors | init | validation (chooses) | held-out mean | " + " | ".join(domains) + " |",
             "|---|---|---|---|---|" + "---|" * len(domains)]
    refs = d.get("anchors", {})
    for name, r in refs.items():  # the anchors themselves, on the same windows
        lines.append(f"| anchor {name} ({'x'.join(map(str, r['shape'][:2]))}) | | the anchor itself | | "
                     f"{r['mean']:.3f} ± {r['std']:.3f} | " + " | ".join(f"{r['by_domain'][x]:.3f}" for x in domains) + " |")

    def minus_anchor(t: str, r: dict, name: str, what: str) -> None:
        if name in refs:
            lines.append(f"| {t} | | *{r['method'].split(',')[0]} minus {what} ({name}, same windows)* | | "
                         f"{r['mean'] - refs[name]['mean']:+.3f}{paired(r, refs[name])} | "
                         + " | ".join(f"{r['by_domain'][x] - refs[name]['by_domain'][x]:+.3f}" for x in domains) + " |")

    targets = list(dict.fromkeys(r["target"] for r in d["rows"]))
    for t in targets:
        rows = [r for r in d["rows"] if r["target"] == t]

        for r in rows:
            name = r["method"] + (" **(default)**" if r["method"] in ("blocks alpha, repair ridge", )
                                  or (r["method"].startswith("single anchor") and r["method"].endswith("ridge")) else "")
            pair = f"{r.get('small') or ''} + {r.get('big') or ''}" if (r.get("small") or r.get("big")) else ""
            val = f"{r['validation_loss']:.3f}" if "validation_loss" in r else ""
            lines.append(f"| {t} | {pair} | {name} | {val} | {r['mean']:.3f} ± {r['std']:.3f} | "
                         + " | ".join(f"{r['by_domain'][x]:.3f}" if x in r["by_domain"] else "" for x in domains) + " |")
        dflt, best_single = default_and_best_single(rows)
        if dflt is None:  # one anchor: held to that anchor's own loss
            one_anchor = next((r for r in rows if r["method"].startswith("single anchor")
                               and r["method"].endswith("repair ridge")), None)
            if one_anchor is not None:
                minus_anchor(t, one_anchor, one_anchor.get("small") or one_anchor.get("big"), "its anchor's own loss")
            continue
        if refs and dflt.get("big") == next(iter(refs)):  # between the first anchor and the source
            minus_anchor(t, dflt, dflt["big"], "the source")
        old = next((r for r in rows if r["method"] in ("global alpha, repair none, plain blend",
                                                       "global alpha, repair none")), None)
        plain = next((r for r in rows if r["method"] == "blocks alpha, repair ridge, plain blend"), None)
        one = next((r for r in rows if r["method"] == "global alpha, repair ridge"), None)
        others = [(f"the {name} search (blocks alpha {name}, repair ridge)", r) for name in CHECK_NAMES.values()
                  for r in rows if r["method"] == f"blocks alpha {name}, repair ridge"]
        lines.append(f"| {t} | | *default minus best single anchor (by validation: {best_single['method']})* | | "
                     f"{dflt['mean'] - best_single['mean']:+.3f}{paired(dflt, best_single)} | "
                     + " | ".join(f"{dflt['by_domain'][x] - best_single['by_domain'][x]:+.3f}" for x in domains) + " |")
        if old is not None:
            lines.append(f"| {t} | | *default minus the service before (global alpha, no repair)* | | "
                         f"{dflt['mean'] - old['mean']:+.3f} | "
                         + " | ".join(f"{dflt['by_domain'][x] - old['by_domain'][x]:+.3f}" for x in domains) + " |")
        if plain is not None:
            lines.append(f"| {t} | | *default minus the plain blend (blocks alpha, repair ridge, plain blend)* | | "
                         f"{dflt['mean'] - plain['mean']:+.3f}{paired(dflt, plain)} | "
                         + " | ".join(f"{dflt['by_domain'][x] - plain['by_domain'][x]:+.3f}" for x in domains) + " |")
        for label, other in [("one alpha (global alpha, repair ridge)", one), *others]:
            if other is not None:
                lines.append(f"| {t} | | *default minus {label}* | | {dflt['mean'] - other['mean']:+.3f}"
                             f"{paired(dflt, other)} | "
                             + " | ".join(f"{dflt['by_domain'][x] - other['by_domain'][x]:+.3f}" for x in domains)
                             + " |")
    fig, ax = plt.subplots(figsize=(9, 4.5))
    methods = [m for m in dict.fromkeys(r["method"] for r in d["rows"]) if m != "random"]
    width = 0.8 / len(methods)
    for k, m in enumerate(methods):
        xs, ys, es = [], [], []
        for i, t in enumerate(targets):
            r = next((r for r in d["rows"] if r["target"] == t and r["method"] == m), None)
            if r:
                xs.append(i + k * width)
                ys.append(r["mean"])
                es.append(r["std"])
        ax.bar(xs, ys, width, yerr=es, label=m, capsize=2)
    lo = min(r["mean"] for r in d["rows"] if r["method"] != "random")
    ax.set_ylim(lo - 0.5, max(r["mean"] for r in d["rows"] if r["method"] != "random") + 0.3)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(targets))], targets, fontsize=8)
    ax.set_ylabel("held-out loss at step 0 (nats/token, mean over domains)")
    ax.set_title(f"chain {chain}: init schemes, {d['seeds']} seeds (error bars: std over seeds)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(DATA.parent / f"{stem(chain, tag)}.png", dpi=110)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chain", default="tiny")
    ap.add_argument("--report", action="store_true", help="tables and plot from the saved data only")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--batches", type=int, default=2, help="held-out batches per domain per seed")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--only", help="comma-separated target names")
    ap.add_argument("--repaired-only", action="store_true", help="only the variants with repair (both blends)")
    ap.add_argument("--default-only", action="store_true", help="only the service's variant (repair, fading blend)")
    ap.add_argument("--name", help="a suffix of the data file and plot (docs/data/interp-<chain>-<name>.json), "
                                   "so a run of some targets keeps the full run's file")
    ap.add_argument("--add-anchors", action="store_true",
                    help="score the chain's anchors on the saved file's windows and add them to it (a file "
                         "from before anchors were part of every run)")
    args = ap.parse_args()
    if args.add_anchors:
        path = DATA / f"{stem(args.chain, args.name)}.json"
        d = json.loads(path.read_text())
        if d["windows"] != f"{args.batches} x 4 x {args.seq_len} per domain per seed":
            raise SystemExit(f"{path.name} was scored on {d['windows']}: pass its --batches and --seq-len")
        manifest = load_manifest(args.chain)
        windows = [heldout(manifest, s, batches=args.batches, seq_len=args.seq_len) for s in range(d["seeds"])]
        d["anchors"] = anchors(manifest, windows)
        d["command"] += f"; python bench/interp.py {' '.join(sys.argv[1:])}"
        path.write_text(json.dumps(d, indent=1) + "\n")
        return
    if args.report:
        print(report(args.chain, args.name))
        return
    variants = tuple(v for v in VARIANTS if v[0] and (v[1] == "fade" or not args.default_only)) \
        if args.repaired_only or args.default_only else VARIANTS
    out = run(args.chain, args.seeds, args.batches, args.seq_len, args.only.split(",") if args.only else None,
              variants)
    out["command"] = "python bench/interp.py " + " ".join(sys.argv[1:])
    path = DATA / f"{stem(args.chain, args.name)}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
