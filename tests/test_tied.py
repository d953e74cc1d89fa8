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
