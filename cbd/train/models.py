"""transformers models from specs and state dicts, and the held-out loss every study uses."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from cbd.core.spec import ModelSpec
from cbd.shape import arch


def hf_config(spec: ModelSpec):
    return AutoConfig.for_model(**spec.to_hf_config())


def build_model(spec: ModelSpec, state: Mapping[str, torch.Tensor] | None = None, *,
                seed: int | None = None) -> PreTrainedModel:
    """A stock transformers model of ``spec``: random (seeded) or loaded from ``state``."""
    if seed is not None:
        torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(spec), dtype=torch.float32)
    if state is not None:
        load_state(model, spec, state)
    return model.eval()


def load_state(model: PreTrainedModel, spec: ModelSpec, state: Mapping[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(dict(state), strict=False)
    allowed = {"lm_head.weight"} if spec.tie_word_embeddings else set()
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


def eval_loss(model: PreTrainedModel, batches: Iterable[torch.Tensor]) -> float:
    """Mean next-token cross-entropy in nats/token over (B, T+1) token batches."""
    from cbd.train.loop import evaluate

    return evaluate(model, list(batches))


def state_loss(spec: ModelSpec, state: Mapping[str, torch.Tensor], batches: Iterable[torch.Tensor]) -> float:
    return eval_loss(build_model(spec, state), batches)
