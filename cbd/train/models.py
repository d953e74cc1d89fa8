"""transformers models from specs and state dicts, tied weights, and the held-out loss every study uses.

Tied weights, one rule in two halves: which *names* a checkpoint of a spec does not store is
``cbd.shape.arch.tied_names``; which names of a live *module* alias another (one storage under two
names) is ``unique_state`` here, and every saver and loader of modules goes through these two.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.initialization import no_init_weights

from cbd.core.spec import ModelSpec
from cbd.shape import arch


def hf_config(spec: ModelSpec):
    return AutoConfig.for_model(**spec.to_hf_config())


def build_model(spec: ModelSpec, state: Mapping[str, torch.Tensor] | None = None, *,
                seed: int | None = None) -> PreTrainedModel:
    """A stock transformers model of ``spec``: random (seeded) or loaded from ``state``."""
    if seed is not None:
        torch.manual_seed(seed)
    if state is None:
        model = AutoModelForCausalLM.from_config(hf_config(spec), dtype=torch.float32)
    else:  # every weight is loaded next: skip the random initialisation (about half the build time)
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(hf_config(spec), dtype=torch.float32)
        load_state(model, spec, state)
    return model.eval()


def load_state(model: PreTrainedModel, spec: ModelSpec, state: Mapping[str, torch.Tensor]) -> None:
    """Load a stored state (tied names absent, ``arch.tied_names``) and re-tie the head."""
    missing, unexpected = model.load_state_dict(dict(state), strict=False)
    allowed = arch.tied_names(spec)
    if set(missing) - allowed or unexpected:
        raise ValueError(f"state does not match {spec.model_type}: missing {sorted(set(missing) - allowed)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    if spec.tie_word_embeddings:
        model.tie_weights()


def state_of(model: PreTrainedModel, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """The stored tensors (tied head dropped), detached, in ``arch.param_names`` order."""
    sd = model.state_dict()
    return {n: sd[n].detach() for n in arch.param_names(spec)}


def random_state(spec: ModelSpec, seed: int) -> dict[str, torch.Tensor]:
    """transformers' own initialisation of ``spec`` (the 'random init' baseline)."""
    return state_of(build_model(spec, seed=seed), spec)


def unique_state(model: nn.Module) -> dict[str, Tensor]:
    """``state_dict`` without the aliases of tied weights (the first name of a storage wins), detached."""
    seen, out = set(), {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if key not in seen:
            seen.add(key)
            out[name] = t.detach()
    return out


def aliases(model: nn.Module) -> set[str]:
    """Names of ``model.state_dict()`` that alias an earlier one (a tied head)."""
    return set(model.state_dict()) - set(unique_state(model))


# ---- evaluation --------------------------------------------------------------------------------
@torch.no_grad()
def nll_sum(model: nn.Module, batches: Sequence[Tensor], device: torch.device,
            amp: Callable[[], Any] = nullcontext, *, chunked: bool = False) -> tuple[float, int]:
    """(summed next-token NLL in nats, target tokens) over ``(b, T+1)`` batches, eval mode.
    ``chunked``: the head and the loss a few rows at a time (:func:`head_nll`), for models whose
    logits are their head applied to the base model's last hidden state (every model cbd builds;
    not, say, Gemma's soft-capped logits)."""
    was_training, total, count = model.training, 0.0, 0
    model.eval()
    for batch in batches:
        batch = batch.to(device)
        with amp():
            nll, n = forward_nll(model, batch, chunked=chunked)
        total += nll
        count += n
    model.train(was_training)
    return total, count


def forward_nll(model: nn.Module, batch: Tensor, *, chunked: bool = False) -> tuple[float, int]:
    """One ``(b, T+1)`` batch through ``model``: (summed next-token NLL, target tokens); ``chunked``:
    the head and loss from the base model's last hidden state, a few rows at a time (:func:`head_nll`)."""
    if chunked:
        hidden = model.base_model(input_ids=batch[:, :-1], use_cache=False).last_hidden_state
        return head_nll(model, hidden, batch)
    return batch_nll(model(input_ids=batch[:, :-1], use_cache=False).logits, batch)


def head_nll(model: PreTrainedModel, hidden: Tensor, batch: Tensor, rows: int = 64) -> tuple[float, int]:
    """``batch_nll`` from the final hidden states (b, T, d), the head applied ``rows`` positions at a
    time and each chunk's log-sum-exp taken in float32: the (b*T, V) logits are never held at
    once (at a 49k vocabulary they are 200 MB per 1k tokens: 64 rows at a time the whole head and
    loss took 0.14 s per 1k tokens on 2 cores, against 0.20 s for all rows at once). The same sum
    as ``batch_nll`` up to float32 rounding."""
    head = model.get_output_embeddings()
    h, weight = hidden.flatten(0, 1), head.weight
    if torch.is_autocast_enabled(h.device.type):  # cast the head once, not once per chunk
        low = torch.get_autocast_dtype(h.device.type)
        h, weight = h.to(low), weight.to(low)
    targets = batch[:, 1:].flatten()
    total = 0.0
    for i in range(0, h.shape[0], rows):
        logits = F.linear(h[i:i + rows], weight, head.bias).float()
        total += (torch.logsumexp(logits, -1) - logits.gather(1, targets[i:i + rows, None])[:, 0]).sum().item()
    return total, targets.numel()


def batch_nll(logits: Tensor, batch: Tensor) -> tuple[float, int]:
    """(summed next-token NLL in nats, target tokens) of ``logits`` (b, T, V) for a ``(b, T+1)`` batch."""
    targets = batch[:, 1:]
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum").item(), targets.numel()


def bf16_autocast(device: torch.device | str = "cpu") -> Callable[[], Any]:
    """A context factory for ``nll_sum``'s ``amp``: matrix products in bf16, the loss in float32."""
    kind = torch.device(device).type
    return lambda: torch.autocast(kind, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Sequence[Tensor], *, chunked: bool = False) -> float:
    """Mean next-token cross-entropy in nats/token over ``(b, T+1)`` LongTensor batches
    (``chunked``: see :func:`nll_sum`)."""
    total, count = nll_sum(model, batches, next(model.parameters()).device, chunked=chunked)
    if count == 0:
        raise ValueError("evaluate() got no tokens: pass at least one (b, T+1) batch with T >= 1")
    return total / count


def batch_sums(model: nn.Module, batches: Sequence[Tensor], *, chunked: bool = False) -> list[tuple[float, int]]:
    """Each batch's (summed next-token NLL, target tokens), float32, eval mode: what :func:`nll_sum`
    adds up, kept per batch so a caller can score any subset of the batches without another pass
    (:func:`mean_nll` of a subset is :func:`eval_loss` of that subset, bit for bit)."""
    device = next(model.parameters()).device
    return [nll_sum(model, [b], device, chunked=chunked) for b in batches]


def mean_nll(sums: Iterable[tuple[float, int]]) -> float:
    """Mean NLL per token from per-batch sums, added in order from 0.0 as :func:`nll_sum` adds them
    (so the same float :func:`evaluate` returns for those batches)."""
    total, count = 0.0, 0
    for nll, n in sums:
        total += nll
        count += n
    if count == 0:
        raise ValueError("mean_nll() got no tokens")
    return total / count


def eval_loss(model: PreTrainedModel, batches: Iterable[torch.Tensor], *, chunked: bool = False) -> float:
    """Mean next-token cross-entropy in nats/token over (B, T+1) token batches."""
    return evaluate(model, list(batches), chunked=chunked)


def state_loss(spec: ModelSpec, state: Mapping[str, torch.Tensor], batches: Iterable[torch.Tensor]) -> float:
    """The loss of ``state`` as a model of ``spec`` (chunked: cbd builds it)."""
    return eval_loss(build_model(spec, state), batches, chunked=True)
