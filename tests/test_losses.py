"""Each loss against a direct torch reference on random logits; gradients stay finite."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cbd.train.losses import (
    TopK,
    cross_entropy,
    distill_loss,
    forward_kl,
    reverse_kl,
    reverse_kl_ce,
    reverse_kl_topk,
    topk_logprobs,
)

V = 99


def _logits(seed: int, shape=(2, 7, V), scale: float = 3.0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype) * scale


def _kl_ref(p_logits, q_logits, temperature):
    """KL(p || q) per token, by torch's kl_div (input = log q, target = log p)."""
    log_p = F.log_softmax(p_logits / temperature, -1)
    log_q = F.log_softmax(q_logits / temperature, -1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)


class Cfg:
    def __init__(self, kl_weight=0.5, ce_weight=0.5, temperature=1.0):
        self.kl_weight, self.ce_weight, self.temperature = kl_weight, ce_weight, temperature


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_reverse_kl_matches_kl_div(temperature):
    s, t = _logits(0), _logits(1)
    want = _kl_ref(s, t, temperature).mean() * temperature**2  # KL(q_s || p_t)
    torch.testing.assert_close(reverse_kl(s, t, temperature=temperature), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_kl_matches_kl_div(temperature):
    s, t = _logits(2), _logits(3)
    want = _kl_ref(t, s, temperature).mean() * temperature**2  # KL(p_t || q_s)
    torch.testing.assert_close(forward_kl(s, t, temperature=temperature), want, rtol=1e-12, atol=1e-12)


def test_kl_directions_differ_and_are_positive():
    s, t = _logits(4), _logits(5)
    r, f = reverse_kl(s, t), forward_kl(s, t)
    assert r > 0 and f > 0 and not torch.isclose(r, f)


def test_reverse_kl_of_identical_logits_is_zero():
    x = _logits(6, dtype=torch.float32)
    assert reverse_kl(x, x.clone()).item() == 0.0
    assert reverse_kl(x, x + 5.0).abs().item() < 1e-5  # a shift is the same distribution


def test_cross_entropy_matches_torch():
    logits = _logits(7)
    targets = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(7))
    want = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(cross_entropy(logits, targets), want, rtol=1e-12, atol=1e-12)


def test_mask_averages_over_selected_tokens_only():
    s, t = _logits(8), _logits(9)
    targets = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(9))
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, :3] = mask[1, 5:] = True
    torch.testing.assert_close(reverse_kl(s, t, mask=mask), _kl_ref(s, t, 1.0)[mask].mean())
    torch.testing.assert_close(forward_kl(s, t, mask=mask), _kl_ref(t, s, 1.0)[mask].mean())
    torch.testing.assert_close(cross_entropy(s, targets, mask), F.cross_entropy(s[mask], targets[mask]))


def test_low_precision_input_is_computed_in_float32():
    s, t = _logits(10, dtype=torch.bfloat16), _logits(11, dtype=torch.bfloat16)
    out = reverse_kl(s, t)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reverse_kl(s.float(), t.float()))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_with_k_equal_vocab_is_reverse_kl(temperature):
    s, t = _logits(12, dtype=torch.float32), _logits(13, dtype=torch.float32)
    top = topk_logprobs(t, V, temperature=temperature)
    got = reverse_kl_topk(s, top.values, top.indices, temperature=temperature)
    torch.testing.assert_close(got, reverse_kl(s, t, temperature=temperature), rtol=1e-6, atol=1e-7)


def test_topk_is_the_kl_of_the_bucketed_distributions():
    s, t, k = _logits(14), _logits(15), 5
    top = topk_logprobs(t, k)
    log_q, log_p = F.log_softmax(s, -1), F.log_softmax(t, -1)
    keep = torch.zeros_like(s, dtype=torch.bool).scatter(-1, top.indices, True)
    # buckets: the k kept ids, then one bucket holding everything else
    q = torch.cat([log_q.exp().gather(-1, top.indices), (log_q.exp() * ~keep).sum(-1, keepdim=True)], -1)
    p = torch.cat([log_p.exp().gather(-1, top.indices), (log_p.exp() * ~keep).sum(-1, keepdim=True)], -1)
    want = (q * (q.log() - p.log())).sum(-1).mean()
    torch.testing.assert_close(reverse_kl_topk(s, top.values, top.indices), want, rtol=1e-9, atol=1e-9)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(1, V), scale=st.floats(0.1, 8.0))
def test_topk_never_exceeds_full_reverse_kl(seed, k, scale):
    s, t = _logits(seed, scale=scale), _logits(seed + 1, scale=scale)
    top = topk_logprobs(t, k)
    got = reverse_kl_topk(s, top.values, top.indices)
    # the teacher's tail is floored at float32 eps, which can only lower the bucketed KL (by < eps)
    assert -1e-7 <= got.item() <= reverse_kl(s, t).item() + 1e-9


@pytest.mark.parametrize("k", [1, 7, V])
def test_gradients_are_finite_even_for_extreme_logits(k):
    s = _logits(16, dtype=torch.float32, scale=300.0).requires_grad_()
    t = _logits(17, dtype=torch.float32, scale=300.0)
    targets = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(17))
    top = topk_logprobs(t, k, temperature=2.0)
    losses = [
        reverse_kl(s, t, temperature=2.0),
        forward_kl(s, t),
        cross_entropy(s, targets),
        reverse_kl_topk(s, top.values, top.indices, temperature=2.0),
        reverse_kl_ce(s, t, targets, kl_weight=0.5, ce_weight=0.5, temperature=2.0)[0],
    ]
    for loss in losses:
        (grad,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_distill_loss_mixes_by_weight():
    s, t = _logits(18), _logits(19)
    targets = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(19))
    cfg = Cfg(kl_weight=0.3, ce_weight=0.7, temperature=2.0)
    loss, parts = distill_loss(s, targets, teacher=t, cfg=cfg)
    kl, ce = reverse_kl(s, t, temperature=2.0), cross_entropy(s, targets)
    torch.testing.assert_close(loss, 0.3 * kl + 0.7 * ce)
    torch.testing.assert_close(parts["kl"], kl)
    torch.testing.assert_close(parts["ce"], ce)
    assert not parts["loss"].requires_grad


def test_distill_loss_with_cached_topk_uses_the_topk_kl():
    s, t = _logits(20), _logits(21)
    targets = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(21))
    top = topk_logprobs(t, 9)
    _, parts = distill_loss(s, targets, teacher=TopK(*top), cfg=Cfg())
    torch.testing.assert_close(parts["kl"], reverse_kl_topk(s, top.values, top.indices))


def test_distill_loss_without_teacher():
    s = _logits(22)
    targets = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(22))
    loss, parts = distill_loss(s, targets, teacher=None, cfg=Cfg(kl_weight=0.0, ce_weight=1.0))
    torch.testing.assert_close(loss, cross_entropy(s, targets))
    assert parts["kl"].item() == 0.0
    with pytest.raises(ValueError, match="kl_weight is 0.5"):
        distill_loss(s, targets, teacher=None, cfg=Cfg())


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("chunk", [1, 3, None])  # 3 does not divide the 14 tokens
def test_fused_loss_equals_the_references_in_value_and_gradient(temperature, masked, chunk):
    s, t = _logits(23).requires_grad_(), _logits(24)
    targets = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(24))
    mask = (torch.rand(2, 7, generator=torch.Generator().manual_seed(25)) > 0.4) if masked else None
    kl_ref = reverse_kl(s, t, temperature=temperature, mask=mask)
    ce_ref = cross_entropy(s, targets, mask)
    ref = 0.3 * kl_ref + 0.7 * ce_ref
    loss, kl, ce = reverse_kl_ce(
        s, t, targets, kl_weight=0.3, ce_weight=0.7, temperature=temperature, mask=mask, chunk_tokens=chunk
    )
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kl, kl_ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ce, ce_ref.detach(), rtol=1e-12, atol=1e-12)
    (g_ref,) = torch.autograd.grad(ref, s)
    (g,) = torch.autograd.grad(2.5 * loss, s)  # an upstream gradient other than 1
    torch.testing.assert_close(g, 2.5 * g_ref, rtol=1e-10, atol=1e-14)


def test_fused_loss_keeps_the_input_dtype_of_the_gradient():
    s = _logits(26, dtype=torch.bfloat16).requires_grad_()
    t = _logits(27, dtype=torch.bfloat16)
    targets = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(27))
    loss, _, _ = reverse_kl_ce(s, t, targets, kl_weight=0.5, ce_weight=0.5)
    (g,) = torch.autograd.grad(loss, s)
    assert loss.dtype == torch.float32 and g.dtype == torch.bfloat16 and torch.isfinite(g).all()
    ref = 0.5 * reverse_kl(s.float(), t.float()) + 0.5 * cross_entropy(s.float(), targets)
    torch.testing.assert_close(loss, ref)
