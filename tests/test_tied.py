"""Tied weights, one rule: arch.tied_names (stored names) and cbd.train.models.unique_state (modules)."""

from __future__ import annotations

import pytest
import torch

from cbd.shape import arch
from cbd.train.checkpoints import load_checkpoint, save_checkpoint
from cbd.train.models import aliases, build_model, state_of, unique_state
from tests.random_chain import tiny_gpt2_spec, tiny_spec


@pytest.mark.parametrize("make", [tiny_spec, tiny_gpt2_spec])
@pytest.mark.parametrize("tied", [True, False])
def test_stored_names_and_module_aliases_agree(make, tied, tmp_path):
    spec = make(tie_word_embeddings=tied)
    model = build_model(spec, seed=0)
    assert aliases(model) == set(arch.tied_names(spec)) == ({"lm_head.weight"} if tied else set())
    assert list(unique_state(model)) == [n for n in model.state_dict() if n not in arch.tied_names(spec)]
    assert set(state_of(model, spec)) == set(arch.param_names(spec)) == set(unique_state(model))
    again = build_model(spec, state_of(model, spec))
    assert (again.get_output_embeddings().weight is again.get_input_embeddings().weight) == tied
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path, model, opt, {"step": 1})
    fresh = build_model(spec, seed=1)
    load_checkpoint(tmp_path, fresh, torch.optim.AdamW(fresh.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(unique_state(fresh).values(), unique_state(model).values(),
                                                 strict=True))


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "gpt2"])
@pytest.mark.parametrize("tied", [True, False])
def test_a_model_built_from_a_state_equals_its_source(model_type, tied):
    """build_model(spec, state) skips transformers' random initialisation (every weight is loaded
    next): the model it gives computes exactly what the model the state came from computes, its
    buffers (rotary frequencies) included, and the head is tied again where the spec ties it."""
    spec = (tiny_gpt2_spec(tie_word_embeddings=tied) if model_type == "gpt2"
            else tiny_spec(tie_word_embeddings=tied, model_type=model_type))
    source = build_model(spec, seed=3)
    again = build_model(spec, state_of(source, spec))
    ids = torch.randint(0, spec.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(source(ids).logits, again(ids).logits)
    theirs = dict(again.named_buffers())
    assert all(torch.equal(b, theirs[n]) for n, b in source.named_buffers())
    assert (again.get_output_embeddings().weight is again.get_input_embeddings().weight) == tied
