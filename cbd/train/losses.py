"""Distillation losses: documented pure functions on logits (DistillKit style).

Every function takes logits of shape ``(..., V)`` (usually ``(B, T, V)``), computes in at least
float32 whatever the input dtype (bf16 logits from autocast would lose the small probabilities
that KL lives on), and returns a scalar: the mean over tokens, or over the tokens where
``mask`` is true. Nothing here touches a model, a file or global state.

The chain's loss is reverse KL on logits (docs/method.md §1),
optionally mixed with next-token cross-entropy on the data (our design):

>>> s, t = torch.zeros(2, 3, 5), torch.zeros(2, 3, 5)
>>> float(reverse_kl(s, t))
0.0
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable


class TopK(NamedTuple):
    """A teacher's top-k log-probabilities at some temperature, as cached per batch.

    ``values``: ``(..., k)`` log p_T(x) of the k most likely ids, ``indices``: ``(..., k)`` ids.
    The tail mass is implied: ``1 - exp(values).sum(-1)``.
    """

    values: Tensor
    indices: Tensor


class LossConfig(Protocol):
    """What ``distill_loss`` reads from a run config (``cbd.train.DistillConfig`` has it)."""

    kl_weight: float
    ce_weight: float
    temperature: float


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _log_softmax(logits: Tensor, temperature: float) -> Tensor:
    logits = logits.to(_compute_dtype(logits))
    return F.log_softmax(logits / temperature if temperature != 1 else logits, dim=-1)


def _token_mean(per_token: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of a ``(...)`` per-token loss, over the tokens where ``mask`` is true."""
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, mask: Tensor | None = None
) -> Tensor:
    """KL(q_s || p_t) = sum_x q_s(x) (log q_s(x) - log p_t(x)), mean over tokens, times T^2.

    Reverse KL is mode seeking: a small student puts its mass where the teacher is confident
    instead of spreading it over every mode (MiniLLM, Gu et al. 2024), which is why the paper
    distils each chain step with it. Both distributions are softened by the same temperature T;
    the gradient with respect to the logits then shrinks as 1/T^2 (Hinton et al. 2015, sec. 2),
    so the loss is scaled by T^2 to keep its magnitude, and its balance against cross-entropy,
    independent of T.
    """
    log_q = _log_softmax(student_logits, temperature)
    log_p = _log_softmax(teacher_logits, temperature)
    per_token = (log_q.exp() * (log_q - log_p)).sum(-1)  # (B, T)
    return _token_mean(per_token, mask) * temperature**2


def forward_kl(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, mask: Tensor | None = None
) -> Tensor:
    """KL(p_t || q_s) = sum_x p_t(x) (log p_t(x) - log q_s(x)), mean over tokens, times T^2.

    Classic (mean seeking) knowledge distillation; the T^2 factor is the same as in
    ``reverse_kl``. Kept for comparison runs.
    """
    log_q = _log_softmax(student_logits, temperature)
    log_p = _log_softmax(teacher_logits, temperature)
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1)  # (B, T)
    return _token_mean(per_token, mask) * temperature**2


def cross_entropy(logits: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean next-token negative log-likelihood in nats/token (``targets``: ``(...)`` ids)."""
    logits = logits.to(_compute_dtype(logits))
    per_token = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="none")
    return _token_mean(per_token.view(targets.shape), mask)


def topk_logprobs(teacher_logits: Tensor, k: int, *, temperature: float = 1.0) -> TopK:
    """What to cache of a teacher: its k largest log-probabilities at ``temperature`` and ids.

    Log-probabilities rather than logits, because the normaliser needs the whole vocabulary: with
    them the tail mass ``1 - sum(exp(values))`` is known exactly and needs no extra tensor.
    """
    values, indices = _log_softmax(teacher_logits, temperature).topk(k, dim=-1)
    return TopK(values, indices)


def reverse_kl_topk(
    student_logits: Tensor,
    teacher_topk_values: Tensor,
    teacher_topk_indices: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """Reverse KL against a cached teacher: its top-k ids kept, the rest lumped into one bucket.

    ``teacher_topk_values`` are the teacher's log-probabilities at the same ``temperature``
    (``topk_logprobs``), so the teacher's tail bucket holds exactly ``1 - sum(exp(values))``
    (floored at float32 epsilon, below which the cached values carry no information). The
    student's tail bucket is its mass on every id outside the teacher's top-k, taken as a
    logsumexp over those ids (no cancellation in ``1 - sum``). The result is the KL between the
    two (k+1)-bucket distributions: never above the full reverse KL (coarse-graining cannot
    increase a KL), equal to it when k = V, and the student still pays for mass it leaks into
    ids the teacher finds unlikely.
    """
    log_q_all = _log_softmax(student_logits, temperature)  # (B, T, V)
    idx = teacher_topk_indices.long()
    log_q = log_q_all.gather(-1, idx)  # (B, T, k)
    log_p = teacher_topk_values.to(log_q.dtype)
    head = (log_q.exp() * (log_q - log_p)).sum(-1)  # (B, T)
    # The most negative finite number, not -inf, marks the top-k ids: with k = V the tail is
    # exp(min) = 0 and every gradient stays finite (-inf would give 0 * inf = nan in backward).
    hidden = log_q_all.scatter(-1, idx, torch.finfo(log_q_all.dtype).min)
    log_q_tail = hidden.logsumexp(-1)  # (B, T)
    p_tail = (-torch.expm1(log_p.logsumexp(-1))).clamp_min(torch.finfo(torch.float32).eps)
    tail = log_q_tail.exp() * (log_q_tail - p_tail.log())
    return _token_mean(head + tail, mask) * temperature**2


class _FusedReverseKLCE(torch.autograd.Function):
    """Forward computes the loss and, chunk by chunk, its gradient; backward only scales it.

    Gradients with respect to the student logits z (q = softmax(z / T), N tokens, weight w):
      reverse KL * T^2:  (T / N) * q_j * (log q_j - log p_j - KL_t)
      cross-entropy:     (1 / N) * (softmax(z)_j - [j == y_t])
    """

    @staticmethod
    def forward(ctx, z, t, y, weights, kl_w, ce_w, temperature, chunk):
        V = z.shape[-1]
        zf, tf, yf, wf = z.reshape(-1, V), t.reshape(-1, V), y.reshape(-1), weights.reshape(-1)
        grad = torch.empty(zf.shape, dtype=_compute_dtype(z), device=z.device)
        sums = torch.zeros(2, dtype=torch.float64, device=z.device)  # (kl, ce) weighted sums
        for lo in range(0, zf.shape[0], chunk):
            rows = slice(lo, lo + chunk)  # the last chunk may be shorter
            w = wf[rows, None].to(grad.dtype)  # (c, 1)
            log_q = _log_softmax(zf[rows], temperature)  # (c, V)
            q = log_q.exp()
            picked = yf[rows, None]
            if ce_w:  # cross-entropy at T = 1: reuse log q when the temperature is 1
                log_q1 = log_q if temperature == 1 else _log_softmax(zf[rows], 1.0)
                sums[1] += (-log_q1.gather(-1, picked) * w).sum()
            d = torch.sub(log_q, _log_softmax(tf[rows], temperature), out=grad[rows])
            kl_t = (q * d).sum(-1, keepdim=True)  # (c, 1)
            sums[0] += (kl_t * w).sum()
            d.sub_(kl_t).mul_(q).mul_(w * (kl_w * temperature))
            if ce_w:
                d.add_((q if temperature == 1 else log_q1.exp()) * (w * ce_w))
                d.scatter_add_(-1, picked, -(w * ce_w))
        ctx.save_for_backward(grad)
        ctx.shape, ctx.dtype = z.shape, z.dtype
        kl, ce = (sums * torch.tensor([temperature**2, 1.0], device=z.device, dtype=sums.dtype)).to(
            grad.dtype
        )
        ctx.mark_non_differentiable(kl, ce)
        return kl_w * kl + ce_w * ce, kl, ce

    @staticmethod
    @once_differentiable
    def backward(ctx, g_loss, _g_kl, _g_ce):
        (grad,) = ctx.saved_tensors
        return (grad * g_loss).view(ctx.shape).to(ctx.dtype), None, None, None, None, None, None, None


def reverse_kl_ce(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    *,
    kl_weight: float,
    ce_weight: float,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    chunk_tokens: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``kl_weight * reverse_kl + ce_weight * cross_entropy`` in one pass: (loss, kl, ce).

    Equal to the two reference functions above (tests compare values and gradients) but made
    for speed: it shares one log-softmax between both terms at T = 1, writes the gradient during
    the forward pass (nothing (B, T, V) is kept but that gradient) and walks ``chunk_tokens``
    tokens at a time, so temporaries stay (chunk, V). On a CPU with a 49k vocabulary it takes
    about half the time of plain autograd. Chunks are large on purpose: with tiny ones, every op
    is a parallel region, and on an oversubscribed machine each one waits for a descheduled
    thread (measured: 5 tokens per chunk ran 10x slower under load, 128 did not). The teacher
    gets no gradient.
    """
    if chunk_tokens is None:  # about 32 MiB per temporary on CPU, 256 MiB on a GPU
        budget = 1 << 28 if student_logits.is_cuda else 1 << 25
        chunk_tokens = max(1, budget // (4 * student_logits.shape[-1]))
    dtype = _compute_dtype(student_logits)
    if mask is None:  # per-token weights of the mean
        weights = torch.full(targets.shape, 1.0 / targets.numel(), dtype=dtype, device=targets.device)
    else:
        weights = mask.to(dtype) / mask.to(dtype).sum().clamp_min(1.0)
    return _FusedReverseKLCE.apply(
        student_logits,
        teacher_logits.detach(),
        targets,
        weights,
        float(kl_weight),
        float(ce_weight),
        float(temperature),
        chunk_tokens,
    )


def distill_loss(
    student_logits: Tensor,
    targets: Tensor,
    *,
    teacher: Tensor | TopK | None,
    cfg: LossConfig,
    mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``kl_weight * reverse KL + ce_weight * cross-entropy``; returns (loss, detached parts).

    ``teacher`` is the teacher's full logits, a cached ``TopK``, or None when ``kl_weight`` is 0
    (plain language-model training). Parts: ``{"kl", "ce", "loss"}``, zero where a weight is 0
    (a zero-weight term is not computed).
    """
    zero = student_logits.new_zeros((), dtype=_compute_dtype(student_logits))
    kl = ce = zero
    if cfg.kl_weight:
        if teacher is None:
            raise ValueError(
                f"kl_weight is {cfg.kl_weight} but no teacher logits were given; "
                "pass the teacher's logits or a TopK, or set kl_weight=0"
            )
        if isinstance(teacher, TopK):
            kl = reverse_kl_topk(
                student_logits, teacher.values, teacher.indices, temperature=cfg.temperature, mask=mask
            )
        else:  # the fast path: both terms fused (equal to reverse_kl and cross_entropy)
            loss, kl, ce = reverse_kl_ce(
                student_logits,
                teacher,
                targets,
                kl_weight=cfg.kl_weight,
                ce_weight=cfg.ce_weight,
                temperature=cfg.temperature,
                mask=mask,
            )
            return loss, {"kl": kl, "ce": ce, "loss": loss.detach()}
    if cfg.ce_weight:
        ce = cross_entropy(student_logits, targets, mask)
    loss = cfg.kl_weight * kl + cfg.ce_weight * ce
    return loss, {"kl": kl.detach(), "ce": ce.detach(), "loss": loss.detach()}
