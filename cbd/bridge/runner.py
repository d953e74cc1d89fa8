"""The bridge runner: a plan in, a published checkpoint in the target tokenizer out."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cbd.bridge.aligned import BridgeData, heldout_batches
from cbd.bridge.train import bridge_train, shared_tokens
from cbd.bridge.vocab import TRANSFERS, bridge_spec, vocab_map, vocab_tensors
from cbd.core.artifacts import ArtifactInfo
from cbd.core.manifest import ChainManifest
from cbd.core.plan import BridgeOptions, Plan
from cbd.core.recipe import chain_corpora
from cbd.core.spec import ModelSpec
from cbd.data.corpora import mixed_text
from cbd.data.tokenizers import tokenizer_dir as tokenizer_dir_by_name
from cbd.inits.publish import Progress, publish_checkpoint, recipe_of
from cbd.inits.run import prepare
from cbd.shape import arch
from cbd.store.anchors import load_anchor, tokenizer_dir
from cbd.train.models import build_model, eval_loss, state_of


@dataclass
class Bridged:
    """What ``make_bridged`` returns: the target spec, its state and what the bridge measured."""

    spec: ModelSpec
    state: dict[str, Tensor]
    summary: dict
    wall_s: dict[str, float]


def make_bridged(plan: Plan, manifest: ChainManifest, li, alpha, *, opts: BridgeOptions, chains_root=None,
                 report=None, transfer=None) -> Bridged:
    """Body by LInit, vocabulary by FVT, then the bridge run (the work of ``run_bridge``).

    ``transfer`` replaces ``TRANSFERS[opts.transfer]`` (benchmarks: random rows).
    """
    from transformers import AutoTokenizer

    from cbd.data.tokenizers import load_tokenizer

    report = report or (lambda _: None)
    t0 = time.perf_counter()
    tok = load_tokenizer(plan.tokenizer)
    chain_tok = AutoTokenizer.from_pretrained(tokenizer_dir(manifest, chains_root))
    spec = bridge_spec(plan.target, tok, opts.pad_vocab_multiple)
    base = manifest.base
    vmap = vocab_map(tok, chain_tok, vocab_size=spec.vocab_size, chain_special={
        "bos": base.bos_token_id, "eos": base.eos_token_id, "pad": base.pad_token_id,
        "unk": chain_tok.unk_token_id})
    teacher_state = li.state(alpha)  # the chain-vocabulary LInit of the same target
    transfer = transfer or TRANSFERS[opts.transfer]
    state = {n: transfer(teacher_state[n], vmap) if n in vocab_tensors(spec) else teacher_state[n]
             for n in arch.param_names(spec)}
    wall = {"transfer": time.perf_counter() - t0}
    report({"stage": "vocabulary transfer", "fraction": 0.1})
    weights = {opts.corpus: 1.0} if opts.corpus else chain_corpora(manifest.recipe)
    corpus_name = "+".join(weights)
    heldout = heldout_batches(list(weights), plan.tokenizer, opts)
    student = build_model(spec, state)
    loss_fvt = eval_loss(student, heldout)
    summary = {"method": method_name(opts), "corpus": corpus_name, "corpora": list(weights), "vocab": vmap.stats,
               "heldout_loss_fvt": round(loss_fvt, 4), "steps": opts.steps, "tokens": 0, "teacher_tokens": 0}
    if opts.steps:
        t1 = time.perf_counter()
        teacher = _teacher(plan, manifest, teacher_state, opts, chains_root) if opts.logit_weight else None
        data = BridgeData(mixed_text(weights), tok, chain_tok, batch_size=opts.batch_size,
                          seq_len=opts.seq_len, seed=opts.seed)
        run = bridge_train(student, teacher, data, opts, shared=shared_tokens(vmap), report=report)
        del teacher
        h = run["history"]
        summary |= {"tokens": opts.steps * opts.batch_size * opts.seq_len, "teacher_tokens": run["teacher_tokens"],
                    "heldout_loss": round(eval_loss(student, heldout), 4),
                    "train_loss_first": {k: round(v, 4) for k, v in h[0].items()},
                    "train_loss_last": {k: round(v, 4) for k, v in h[-1].items()},
                    "aligned_fraction": round(float(np.mean([x["aligned"] for x in h])), 4)}
        wall["train"] = time.perf_counter() - t1
    else:
        summary["heldout_loss"] = summary["heldout_loss_fvt"]
    return Bridged(spec, state_of(student, spec), summary, wall)


def method_name(opts: BridgeOptions) -> str:
    """``fvt``, ``fvt+ce`` or ``fvt+<logit loss>+ce``."""
    if not opts.steps:
        return opts.transfer
    kd = f"+{opts.logit_loss}" if opts.logit_weight else ""
    return f"{opts.transfer}{kd}+ce" if opts.ce_weight else f"{opts.transfer}{kd}"


def _teacher(plan: Plan, manifest: ChainManifest, linit_state: dict[str, Tensor], opts: BridgeOptions, chains_root):
    """The chain-vocabulary model the bridge distils from."""
    name = {"big": plan.big, "source": manifest.anchors[0].name}.get(opts.teacher)
    if name is not None:
        a = load_anchor(manifest, name, chains_root)
        return build_model(a.spec, {n: a.read(n) for n in arch.param_names(a.spec)})
    return build_model(plan.target, linit_state)


def run_bridge(plan: Plan, manifest: ChainManifest, *, progress: Progress, chains_root: Path | None = None,
               artifacts_root: Path | None = None) -> ArtifactInfo:
    """Execute a bridge plan into a published checkpoint folder (atomic; ``cbd.run.run_plan`` dispatches here)."""
    opts = plan.bridge_options or BridgeOptions()
    li, alpha, calib = prepare(plan, manifest, progress=progress, chains_root=chains_root)
    with torch.random.fork_rng():
        torch.manual_seed(opts.seed)
        out = make_bridged(plan, manifest, li, calib.get("alphas", alpha), opts=opts, chains_root=chains_root, report=progress)
    recipe = recipe_of(plan, manifest, alpha, calib) | {
        "target": out.spec.model_dump(mode="json") | {"num_key_value_heads": out.spec.kv_heads},
        "num_params": out.spec.num_params(), "bridge": {**opts.model_dump(mode="json"), **out.summary}}
    progress({"stage": "writing", "fraction": 0.92})
    metrics = calib | {"bridge": out.summary | {"wall_s": {k: round(v, 1) for k, v in out.wall_s.items()}}}
    info = publish_checkpoint(
        plan, manifest, out.spec, ((n, out.state[n]) for n in arch.param_names(out.spec)), recipe=recipe,
        alpha=alpha, metrics=metrics, tokenizer_src=tokenizer_dir_by_name(plan.tokenizer),
        extra_card=bridge_card(recipe), finish=lambda folder: _ensure_fast_tokenizer(folder, plan.tokenizer),
        artifacts_root=artifacts_root)
    progress({"stage": "done", "fraction": 1.0})
    return info


def _ensure_fast_tokenizer(folder: Path, name: str) -> None:
    """Registered tokenizers may lack a config or name another class: save as PreTrainedTokenizerFast."""
    from cbd.data.fast_tokenizer import FAST_TOKENIZER_CLASS, save_fast_tokenizer
    from cbd.data.tokenizers import load_tokenizer

    cfg = folder / "tokenizer_config.json"
    if not cfg.is_file() or json.loads(cfg.read_text()).get("tokenizer_class") != FAST_TOKENIZER_CLASS:
        save_fast_tokenizer(load_tokenizer(name), folder)


def bridge_card(recipe: dict) -> str:
    """The model card's bridge section: what was transferred, trained and measured."""
    b, v = recipe["bridge"], recipe["bridge"]["vocab"]
    teacher = {"big": "bigger adjacent anchor", "source": "source (a0)"}.get(b["teacher"], "LInit model")
    kd = {"uld": "ULD (sorted-probability L1)", "matched-kl": "KL on the shared tokens"}[b["logit_loss"]]
    train = (f"**{b['steps']} bridge steps** ({b['tokens']:,} target tokens, {b['teacher_tokens']:,} teacher "
             f"tokens) from the chain-vocabulary {teacher}: {b['logit_weight']:g} x {kd} on character-aligned "
             f"positions + {b['ce_weight']:g} x cross-entropy, lr {b['lr']:g}, training {b['train']} parameters."
             if b["steps"] else "no bridge training (vocabulary transfer only).")
    return f"""
## Bridge to tokenizer `{recipe['request']['tokenizer']}`

The body is LInit's; the vocabulary ({v['tokenizer_size']:,} tokens, padded to {v['vocab_size']:,}: rows
{v['tokenizer_size']:,}..{v['vocab_size'] - 1:,} are never produced by the tokenizer) was initialised by FVT:
each token's bytes tokenised by the chain's tokenizer, its row the mean of those pieces' rows
({v['fvt']:,} tokens, {v['single_piece']:,} of them a single chain token). Special tokens copying the chain's
row of the same role: {v['special_mapped']}; tokens starting at the mean chain row: {v['mean_row']:,} and the
padding rows. Then {train}

| held-out loss (nats/token, `{b['corpus']}` held-out, target tokens) | |
|---|---|
| FVT alone | {b['heldout_loss_fvt']:.4f} |
| this checkpoint | {b['heldout_loss']:.4f} |
"""
