"""Bridge training: token-aligned logit losses and the loop."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cbd.bridge.aligned import BridgeData
from cbd.bridge.vocab import VocabMap
from cbd.core.plan import BridgeOptions
from cbd.core.training import lr_at
from cbd.shape import arch


# ---- losses (pure) ----------------------------------------------------------------------------
def uld_loss(p_student: Tensor, p_teacher: Tensor, *, k: int) -> Tensor:
    """Universal Logit Distillation: L1 between the sorted probability vectors, mean over rows.

    ``p_student`` ``(N, V_s)`` and ``p_teacher`` ``(N, V_t)`` are probabilities at aligned
    positions; vocabularies differ, so only the *shape* of the distributions is compared, the
    shorter vector padded with zeros (Boizard et al. 2024). The k largest of each are compared
    exactly and the rest as one tail mass: equal to ULD when k >= both vocabularies, a lower
    bound otherwise (the tail's probabilities are tiny; a full sort of 50k per token is not).
    """
    k_s, k_t = min(k, p_student.shape[-1]), min(k, p_teacher.shape[-1])
    top_s, top_t = p_student.topk(k_s, dim=-1).values, p_teacher.topk(k_t, dim=-1).values
    width = max(k_s, k_t)
    top_s, top_t = F.pad(top_s, (0, width - k_s)), F.pad(top_t, (0, width - k_t))
    tail = ((1 - top_s.sum(-1)) - (1 - top_t.sum(-1))).abs()
    return ((top_s - top_t).abs().sum(-1) + tail).mean()


def matched_kl(student: Tensor, teacher: Tensor, shared: tuple[Tensor, Tensor]) -> Tensor:
    """KL(p_t || q_s) on the tokens both vocabularies spell the same, each renormalised there.

    ``student`` ``(N, V_s)`` and ``teacher`` ``(N, V_t)`` are logits or log-probabilities (the
    renormalisation makes them equivalent); ``shared`` = (student ids, teacher ids) of identical
    strings (e.g. 37k of GPT-2's 50k tokens are single SmolLM2 tokens). Unlike ULD it says
    *which* token the teacher expects, so the student learns the teacher's predictions.
    """
    lq = F.log_softmax(student[:, shared[0]].float(), dim=-1)
    lp = F.log_softmax(teacher[:, shared[1]].float(), dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1).mean()


def bridge_loss(student_logits: Tensor, targets: Tensor, teacher_logits: Tensor | None, pairs: Tensor,
                opts: BridgeOptions, shared: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, dict[str, float]]:
    """``ce_weight * CE(target tokens) + logit_weight * logit loss(aligned positions)``; (loss, parts)."""
    log_p = F.log_softmax(student_logits.float(), dim=-1)  # (B, T, V_s)
    ce = -log_p.gather(-1, targets[..., None]).mean()
    kd = log_p.new_zeros(())
    if opts.logit_weight and len(pairs):
        lq = log_p[pairs[:, 0], pairs[:, 1]]  # (N, V_s)
        t = teacher_logits[pairs[:, 0], pairs[:, 2]]  # (N, V_t)
        if opts.logit_loss == "matched-kl":
            kd = matched_kl(lq, t, shared)
        else:
            kd = uld_loss(lq.exp(), F.softmax(t.float(), dim=-1), k=opts.uld_topk)
    loss = opts.ce_weight * ce + opts.logit_weight * kd
    return loss, {"loss": float(loss.detach()), "ce": float(ce.detach()), opts.logit_loss: float(kd.detach())}


def shared_tokens(vmap: VocabMap) -> tuple[Tensor, Tensor]:
    """(target ids, chain ids) of tokens that are one chain token with the same bytes."""
    pairs = [(i, p[0]) for i, p in enumerate(vmap.pieces) if len(p) == 1 and i not in vmap.special]
    t = torch.tensor(pairs, dtype=torch.long).view(-1, 2)
    return t[:, 0], t[:, 1]


# ---- the bridge run ----------------------------------------------------------------------------
def trainable(student, train: str) -> list:
    """The parameters a bridge trains: all, or (``embeddings``) only those indexed by the
    vocabulary (llama's ``embed_tokens``/``lm_head``, GPT-2's ``wte``/``lm_head``); the rest frozen."""
    if train == "embeddings":
        for name, p in student.named_parameters():
            p.requires_grad_(name in arch.VOCAB_PARAMS)
    return [p for p in student.parameters() if p.requires_grad]


def bridge_train(student, teacher, data: BridgeData, opts: BridgeOptions, *, shared=None, report=None) -> dict:
    """Train ``student`` in place; returns the step losses and the teacher's token count."""
    params = trainable(student, opts.train)
    settings = opts.optimization(opts.steps)  # the chain's AdamW, warmup + cosine schedule and clipping
    opt = torch.optim.AdamW(params, lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay)
    student.train()
    if teacher is not None:
        teacher.eval()
    history, teacher_tokens = [], 0
    for step in range(opts.steps):
        b = data.batch(step)
        t_logits = None
        if teacher is not None:  # None: cross-entropy only (logit_weight 0)
            with torch.no_grad():
                t_logits = teacher(input_ids=b.teacher, use_cache=False).logits  # (B, U, V_t)
            teacher_tokens += b.teacher.numel()
        s_logits = student(input_ids=b.student[:, :-1], use_cache=False).logits  # (B, T, V_s)
        loss, parts = bridge_loss(s_logits, b.student[:, 1:], t_logits, b.pairs, opts, shared)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, settings, opts.steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if settings.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
        opt.step()
        history.append(parts | {"aligned": len(b.pairs) / b.student[:, 1:].numel()})
        if report is not None:  # the bridge is the 10%..90% stretch of a bridge job
            report({"stage": "bridge distillation", "fraction": 0.1 + 0.8 * (step + 1) / opts.steps,
                    "step": step + 1, "total": opts.steps, **parts})
    for p in student.parameters():
        p.requires_grad_(True)
    student.eval()
    return {"history": history, "teacher_tokens": teacher_tokens}
