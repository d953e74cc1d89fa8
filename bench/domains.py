"""Held-out loss per domain of a built chain's anchors, the source and a random init.

    python bench/domains.py --chain tiny                       # table on stdout
    python bench/domains.py --chain tiny --json out.json       # and the numbers as JSON

Each corpus of ``cbd.core.catalog.CORPORA`` is scored on its own held-out work (austen
*Persuasion*, shakespeare *Hamlet*, fortunes *wisdom*), which no chain trained on: ``--batches``
fixed batches of ``--batch-size`` x ``--seq-len`` tokens spread over the work (seed ``--seed``),
mean next-token cross-entropy in nats/token; the last column is the mean over domains. The
random init is transformers' own initialisation of the smallest anchor's shape (seed 0).
A chain distilled on one corpus shows here how far its anchors are specialists.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cbd.core.catalog import list_corpora
from cbd.core.manifest import load_manifest
from cbd.data import batches as data
from cbd.data.corpora import corpus as corpus_info
from cbd.shape import arch
from cbd.store.anchors import load_anchor
from cbd.train.models import build_model, evaluate, random_state


def heldout(tokenizer: str, *, batches: int, batch_size: int, seq_len: int, seed: int) -> dict[str, list]:
    return {c: data.eval_batches(data.token_file(c, tokenizer, "heldout"), batch_size=batch_size, seq_len=seq_len,
                                 num_batches=batches, seed=seed) for c in list_corpora()}


def shape_of(spec) -> str:
    L, d, H, G, _, f = spec.shape
    return f"{L}x{d} {H}/{G} f{f}"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--chain", default="tiny")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    m = load_manifest(args.chain)
    evals = heldout(m.tokenizer, batches=args.batches, batch_size=args.batch_size, seq_len=args.seq_len,
                    seed=args.seed)
    domains = list(evals)
    rows: dict[str, dict] = {}

    def score(label: str, spec, state, shape: str) -> None:
        t0 = time.perf_counter()
        model = build_model(spec, state)
        by = {d: evaluate(model, evals[d]) for d in domains}
        rows[label] = {"shape": shape, **{d: round(v, 4) for d, v in by.items()},
                       "mean": round(sum(by.values()) / len(by), 4), "wall_s": round(time.perf_counter() - t0, 1)}
        del model
        print(f"  {label}: {rows[label]}", flush=True)

    for entry in m.anchors:
        a = load_anchor(m, entry.name)
        state = {n: a.read(n) for n in arch.param_names(a.spec)}
        label = f"{entry.name} ({'source' if entry.parent is None else 'anchor'})"
        score(label, a.spec, state, shape_of(a.spec))
    small = m.anchors[-1].spec
    score("random init", small, random_state(small, 0), shape_of(small))

    corpus = m.recipe.get("data", {}).get("corpus") or [c["name"] for c in m.recipe["data"]["corpora"]]
    print(f"\nchain {args.chain!r} (trained on {corpus}); held-out loss, nats/token; "
          f"{args.batches} batches x {args.batch_size} x {args.seq_len} tokens per domain, seed {args.seed}\n")
    titles = {c: corpus_info(c).heldout_title for c in domains}
    head = ["model", "shape", *(f"{d} ({titles[d]})" for d in domains), "mean"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for label, r in rows.items():
        print(f"| {label} | {r['shape']} | " + " | ".join(f"{r[d]:.3f}" for d in domains) + f" | {r['mean']:.3f} |")
    out = {"chain": args.chain, "trained_on": corpus, "args": {k: str(v) for k, v in vars(args).items()},
           "heldout": {c: data.token_file(c, m.tokenizer, "heldout").shape[0] for c in domains}, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
