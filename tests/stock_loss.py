"""Losses recomputed by the tests themselves, from published files, with stock transformers.

Nothing here calls cbd's own evaluation (``cbd.train``): a checkpoint folder is loaded with
``AutoModelForCausalLM.from_pretrained`` and scored with ``torch.nn.functional.cross_entropy``,
so a test that compares these numbers does not take the code's word for what it produced.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel


@torch.no_grad()
def nll(model: PreTrainedModel, batches: Iterable[torch.Tensor]) -> float:
    """Mean next-token cross-entropy in nats/token over ``(B, T+1)`` token batches (token-weighted)."""
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = model(input_ids=inputs).logits.float()
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                   reduction="sum").item()
        count += targets.numel()
    assert count > 0, "no tokens to score"
    return total / count


def folder_nll(folder: Path, batches: Iterable[torch.Tensor]) -> float:
    """:func:`nll` of the checkpoint folder as stock transformers loads it (float32)."""
    return nll(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), batches)


def random_init_nll(folder: Path, batches: Iterable[torch.Tensor], seed: int = 0) -> float:
    """:func:`nll` of transformers' own random init of the folder's config (the baseline)."""
    from transformers import AutoConfig

    torch.manual_seed(seed)
    return nll(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder)), batches)
