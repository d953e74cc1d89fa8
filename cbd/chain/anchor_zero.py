"""Anchor zero taught by a model of another family: sequence-level KD (``SeqKDOptions``)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from cbd.core.recipe import SeqKDOptions
from cbd.core.spec import ModelSpec
from cbd.data.corpora import WORD_START, corpus_text
from cbd.train.config import DistillConfig
from cbd.train.models import build_model, state_of

__all__ = ["SeqKDOptions", "corpus_prompts", "foreign_anchor_zero", "generate_texts", "seq_kd"]


def corpus_prompts(text: str, n: int, words: int, seed: int) -> list[str]:
    """``n`` prompts of ``words`` words, each starting at a word boundary at a seeded position."""
    rng = np.random.default_rng([seed, 7])
    out = []
    for start in rng.integers(0, max(1, len(text) - 64 * words), size=n):
        m = WORD_START.search(text, int(start))
        out.append(" ".join(text[m.start() + 1 if m else int(start):].split()[:words]))
    return out


@torch.no_grad()
def generate_texts(teacher: str, prompts: list[str], opts: SeqKDOptions, report=None) -> tuple[list[str], int]:
    """The foreign teacher's continuations of ``prompts`` (prompt + continuation), and its token count."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cbd.data.teachers import teacher_dir

    folder = teacher_dir(teacher)
    tok = AutoTokenizer.from_pretrained(folder, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    texts, tokens = [], 0
    for k in range(0, len(prompts), opts.gen_batch):
        enc = tok(prompts[k: k + opts.gen_batch], return_tensors="pt", padding=True)
        torch.manual_seed(opts.seed * 1_000_003 + k)
        ids = model.generate(**enc, do_sample=True, temperature=opts.temperature, top_p=opts.top_p,
                             max_new_tokens=opts.new_tokens, pad_token_id=tok.pad_token_id)
        new = ids[:, enc["input_ids"].shape[1]:]  # (b, new_tokens)
        tokens += int(enc["attention_mask"].sum()) + new.numel()
        texts += [p + c for p, c in zip(prompts[k: k + opts.gen_batch],
                                         tok.batch_decode(new, skip_special_tokens=True), strict=True)]
        if report is not None:
            report({"stage": f"{teacher} writing", "fraction": min(1.0, (k + opts.gen_batch) / len(prompts))})
    return texts, tokens


def seq_kd(student, chain_tok, texts: list[str], opts: SeqKDOptions, *, eval_batches=(), report=None):
    """Train ``student`` in place on ``texts`` in the chain's tokenizer (cross-entropy only)."""
    from cbd.data.batches import encode_documents, train_batches
    from cbd.train.loop import distill

    tokens = encode_documents(chain_tok, texts)
    settings = opts.optimization(opts.steps, seq_len=min(opts.seq_len, len(tokens) - 1))
    cfg = DistillConfig.of(settings, kl_weight=0.0, ce_weight=1.0, total_steps=opts.steps, eval_every=0,
                           ckpt_every=0, device="cpu")

    def batch(step: int) -> Tensor:
        return next(train_batches(tokens, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=opts.seed,
                                  start_step=step))

    return distill(student, None, batch, list(eval_batches), cfg, progress=report or False)


def foreign_anchor_zero(spec: ModelSpec, chain_tok, corpus_name: str, opts: SeqKDOptions, *,
                        init_state: dict[str, Tensor] | None = None, report=None) -> tuple[dict[str, Tensor], dict]:
    """An anchor zero of ``spec`` (the chain's family and vocabulary) taught by a foreign model.

    ``init_state``: where the proxy starts (e.g. the chain's own source); random when None.
    Returns its state and what it cost (teacher tokens, training tokens, losses).
    """
    from cbd.data.batches import eval_batches as fixed_batches

    prompts = corpus_prompts(corpus_text(corpus_name), opts.prompts, opts.prompt_words, opts.seed)
    texts, teacher_tokens = generate_texts(opts.teacher, prompts, opts, report)
    student = build_model(spec, init_state, seed=opts.seed)
    cut = len(texts) - max(1, len(texts) // 8) if len(texts) > 1 else 1  # the last eighth: held out
    from cbd.data.batches import encode_documents

    held_tokens = encode_documents(chain_tok, texts[cut:])
    held = fixed_batches(held_tokens, batch_size=1, seq_len=min(opts.seq_len, len(held_tokens) - 1), num_batches=1)
    result = seq_kd(student, chain_tok, texts[:cut], opts, eval_batches=held, report=report)
    return state_of(student.eval(), spec), {
        "teacher": opts.teacher, "prompts": len(prompts), "teacher_tokens": teacher_tokens,
        "tokens": result.tokens, "steps": result.steps, "train_loss_first": round(result.train_loss[0], 4),
        "train_loss_last": round(result.train_loss[-1], 4),
        "heldout_generated_loss": [round(x, 4) for _, x in result.eval_loss], "sample": texts[0][:300]}
