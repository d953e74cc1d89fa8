"""Benchmark: what the bridge to another tokenizer costs and buys (docs/bridge.md).

    python bench/bridge.py --chain tiny --tokenizer gpt2            # ~30M target, all variants
    python bench/bridge.py --chain tiny --variants random,fvt,bridge  # a subset

For one target shape (default 6 x 384, 6/2 heads, FFN 1024: ~29M parameters with GPT-2's
vocabulary) it measures held-out cross-entropy in the *target* tokenizer (nats/token, on the
recipe corpus' held-out work, which neither the chain nor the bridge trained on) of:

- ``chain``         the same target in the chain's own tokenizer (LInit, no bridge), on the same
                    text tokenised by the chain: the reference the bridge tries to keep;
- ``random``        transformers' own initialisation of the target;
- ``random-vocab``  LInit body, vocabulary rows random (normal, std 0.02): the body alone;
- ``fvt``           LInit body + FVT vocabulary, no training;
- ``bridge``        the service's default (``cbd.core.plan.BridgeOptions()``: the source as teacher,
                    KL on the shared tokens + CE), end to end through ``cbd.run.run_plan``
                    (timed: plan to published folder), loaded back with ``AutoModelForCausalLM``;
- ``ce-only``       cross-entropy on the target tokens only (no teacher);
- ``source-uld``, ``big-uld``, ``linit-uld``, ``linit-matched-kl``: other teachers (the
                    source a0, the bigger adjacent anchor, the chain-vocabulary LInit of the same
                    target) and logit losses (ULD, KL on the shared tokens);
- ``linit-uld-embeddings``  as ``linit-uld``, training the (tied) embedding only;
- ``random-vocab+linit-uld``  ``linit-uld`` from random vocabulary rows (what FVT adds after training).

Wall times are for whatever else runs on the machine; CPU seconds (process time, all threads)
are printed beside them. Losses in different tokenizers are compared in bits per character
(``loss * tokens / characters / ln 2`` over the held-out text). Results go to
``docs/data/bridge-<chain>-<tokenizer>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch

from cbd.bridge.aligned import heldout_batches
from cbd.bridge.runner import make_bridged
from cbd.bridge.vocab import bridge_spec
from cbd.core.manifest import load_manifest
from cbd.core.plan import BridgeOptions, make_plan
from cbd.core.request import InitRequest
from cbd.inits.run import linit_for
from cbd.run import run_plan
from cbd.train.models import build_model, eval_loss, random_state

DATA = Path(__file__).resolve().parent.parent / "docs" / "data"
VARIANTS = {  # name -> BridgeOptions overrides of the defaults (None: no training)
    "chain": None, "random": None, "random-vocab": None, "fvt": {"steps": 0}, "bridge": {},
    "ce-only": {"logit_weight": 0.0},
    "source-uld": {"logit_loss": "uld"},
    "big-uld": {"teacher": "big", "logit_loss": "uld"},
    "linit-uld": {"teacher": "linit", "logit_loss": "uld"},
    "linit-matched-kl": {"teacher": "linit"},
    "linit-uld-embeddings": {"teacher": "linit", "logit_loss": "uld", "train": "embeddings"},
    "random-vocab+linit-uld": {"teacher": "linit", "logit_loss": "uld"},
}


def heldout(corpus: str | list[str], tokenizer: str, seed: int) -> list[torch.Tensor]:
    """A larger held-out set than the service's own check: 8 x 4 windows of 256 tokens."""
    opts = BridgeOptions(eval_batches=8, eval_batch_size=4, eval_seq_len=256, seed=seed)
    return heldout_batches(corpus, tokenizer, opts)


SEED = [0]


def batches_corpus(plan, manifest) -> list[str]:
    """The corpora the bridge evaluates on: the plan's one corpus, else every corpus of the chain's mix."""
    from cbd.core.recipe import chain_corpora

    one = (plan.bridge_options or BridgeOptions()).corpus
    return [one] if one else list(chain_corpora(manifest.recipe))


def tokens_per_char(corpus: str | list[str], tokenizer: str) -> float:
    """Held-out tokens per character (bits per character = nats/token * this / ln 2)."""
    from cbd.data import batches as data
    from cbd.data.corpora import corpus as load_corpus

    names = [corpus] if isinstance(corpus, str) else corpus
    chars = sum(len(d) for n in names for d in load_corpus(n).heldout)
    return sum(len(data.token_file(n, tokenizer, "heldout")) for n in names) / chars


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, {"wall_s": round(time.perf_counter() - w, 1), "cpu_s": round(time.process_time() - c, 1)}


def run_variant(name: str, plan, manifest, batches, tmp: Path) -> dict:
    spec = bridge_spec(plan.target, _tok(plan.tokenizer), BridgeOptions().pad_vocab_multiple)
    if name == "random":
        return {"heldout_loss": eval_loss(build_model(spec, random_state(spec, seed=0)), batches)}
    if name == "chain":
        corpus = batches_corpus(plan, manifest)
        chain_batches = heldout(corpus, manifest.tokenizer, SEED[0])
        loss = eval_loss(build_model(plan.target, linit_for(plan, manifest).state()), chain_batches)
        return {"heldout_loss": loss, "tokenizer": manifest.tokenizer}
    if name == "bridge":  # end to end, as the worker runs it
        from transformers import AutoModelForCausalLM

        info, t = timed(lambda: run_plan(plan, artifacts_root=tmp, progress=_log(name)))
        model = AutoModelForCausalLM.from_pretrained(tmp / plan.id, dtype=torch.float32)
        return t | {"heldout_loss": eval_loss(model, batches), "metrics": info.metrics["bridge"]}
    overrides = VARIANTS.get(name)
    opts = (plan.bridge_options or BridgeOptions()).model_copy(update={"steps": 0} if overrides is None else overrides)
    li = linit_for(plan, manifest)
    transfer = _random_rows if name.startswith("random-vocab") else None
    out, t = timed(lambda: make_bridged(plan, manifest, li, plan.alpha, opts=opts, report=_log(name),
                                               transfer=transfer))
    return t | {"heldout_loss": eval_loss(build_model(out.spec, out.state), batches), "metrics": out.summary}


def _random_rows(chain_rows: torch.Tensor, vmap) -> torch.Tensor:
    """Vocabulary rows drawn at random (std 0.02, seed 0): the body without any transfer."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(vmap.vocab_size, chain_rows.shape[1], generator=g) * 0.02


def _tok(name: str):
    from cbd.data.tokenizers import load_tokenizer

    return load_tokenizer(name)


def _log(name: str):
    def report(e: dict) -> None:
        if "step" not in e or e["step"] % 20 == 0 or e["step"] == e.get("total"):
            print(f"  [{name}] " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in e.items()), flush=True)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chain", default="tiny")
    ap.add_argument("--tokenizer", default="gpt2")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=None, help="bridge steps (default: BridgeOptions().steps)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seed", type=int, default=0, help="held-out windows")
    ap.add_argument("--calibrate", action="store_true",
                    help="calibrate alpha (the API's default); off: every variant uses alpha0")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    manifest = load_manifest(args.chain)
    arch = dict(num_hidden_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                num_key_value_heads=args.kv_heads, intermediate_size=args.ffn)
    opts = BridgeOptions() if args.steps is None else BridgeOptions(steps=args.steps)
    req = InitRequest(chain=args.chain, architecture=arch, tokenizer=args.tokenizer, calibrate=args.calibrate)
    plan = make_plan(req, manifest, bridge_options=opts)
    corpus = batches_corpus(plan, manifest)
    SEED[0] = args.seed
    batches = heldout(corpus, args.tokenizer, args.seed)
    tpc = {t: tokens_per_char(corpus, t) for t in (args.tokenizer, manifest.tokenizer)}
    out_path = DATA / f"bridge-{args.chain}-{args.tokenizer}.json"
    results = json.loads(out_path.read_text())["results"] if out_path.is_file() else {}
    with tempfile.TemporaryDirectory(prefix="cbd-bridge-bench-") as tmp:
        for name in args.variants.split(","):
            print(f"{name} ...", flush=True)
            results[name] = run_variant(name, plan, manifest, batches, Path(tmp))
            print(f"{name}: held-out {results[name]['heldout_loss']:.4f}", flush=True)
            DATA.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps({
                "chain": args.chain, "tokenizer": args.tokenizer, "target": arch, "plan_id": plan.id, "alpha": plan.alpha, "calibrate": plan.calibrate,
                "num_params": bridge_spec(plan.target, _tok(args.tokenizer), 64).num_params(),
                "options": opts.model_dump(mode="json"), "heldout": {"corpus": corpus, "windows": "8 x 4 x 256",
                                                                     "seed": args.seed},
                "tokens_per_char": tpc, "threads": torch.get_num_threads(), "results": results}, indent=1))
    print("| variant | held-out loss (nats/token) | bits/char | wall s | CPU s |\n|---|---|---|---|---|")
    for name, r in results.items():
        bpc = r["heldout_loss"] * tpc[r.get("tokenizer", args.tokenizer)] / math.log(2)
        print(f"| {name} | {r['heldout_loss']:.3f} | {bpc:.3f} | {r.get('wall_s', '')} | {r.get('cpu_s', '')} |")


if __name__ == "__main__":
    main()
