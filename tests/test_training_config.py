"""One copy of the optimisation settings (cbd.core.training): every place that trains agrees with it.

Torch-free except where a consumer (the chain step, seq-KD) is imported; no model is built.
"""

from __future__ import annotations

import hashlib
import math

import pytest
from pydantic import ValidationError

from cbd.core.files import canonical_json
from cbd.core.plan import BridgeOptions
from cbd.core.recipe import Recipe, SeqKDOptions, SeqKDRecipe, TrainRecipe, list_recipes, load_recipe
from cbd.core.training import OPTIMIZATION_FIELDS, Optimization, lr_at


def _sha(obj) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:16]


PIN_RECIPE = {"name": "pin", "anchors": [{"name": "a1", "num_hidden_layers": 2, "hidden_size": 64,
                                          "num_attention_heads": 2}],
              "anchor_zero": {"foreign": "gemma3-270m", "num_hidden_layers": 2, "hidden_size": 64,
                              "num_attention_heads": 2}}


def test_the_hashed_dumps_are_the_pinned_ones():
    """BridgeOptions is part of every bridge plan's id, and a chain counts as built only while its
    manifest's recipe equals the recipe's dump (cbd.chain.build.built_manifest): a change to either
    dump (a field added, a default changed) changes ids or unpublishes built chains."""
    assert _sha(BridgeOptions().model_dump(mode="json")) == "73ab38f0ac5e6543"
    # 927f9259...: [prune] defaults to repair = "none" (plain prunes as anchor starts: they end lower after
    # the same steps; docs/results.md); chains built with repaired starts are rebuilt, as they must be
    assert _sha(Recipe.model_validate(PIN_RECIPE).model_dump(mode="json")) == "927f92599279edf3"


def test_every_place_names_the_shared_settings_with_the_shared_bounds():
    for model in (TrainRecipe, BridgeOptions, SeqKDOptions):
        for name in OPTIMIZATION_FIELDS & set(model.model_fields):
            ours, shared = model.model_fields[name], Optimization.model_fields[name]
            assert set(shared.metadata) <= set(ours.metadata), (model.__name__, name)
    with pytest.raises(ValidationError, match="greater than 0"):
        BridgeOptions(lr=0)
    with pytest.raises(ValidationError, match="less than or equal to 1"):
        TrainRecipe(min_lr_ratio=1.5)


def test_seqkd_recipe_is_seqkd_options_unset():
    assert list(SeqKDRecipe.model_fields) == [n for n in SeqKDOptions.model_fields if n != "teacher"]
    assert all(v is None for v in SeqKDRecipe().model_dump().values())
    for name, info in SeqKDRecipe.model_fields.items():
        assert info.description == SeqKDOptions.model_fields[name].description
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        SeqKDRecipe(steps=0)
    with pytest.raises(ValidationError, match="greater than or equal to 8"):
        SeqKDRecipe(seq_len=4)


@pytest.mark.parametrize("name", list_recipes())
def test_the_chain_step_config_is_the_recipes_train_table(name):
    from cbd.chain.build import step_config
    from cbd.train.config import DistillConfig

    recipe = load_recipe(name)
    t = recipe.train
    assert set(TrainRecipe.model_fields) - {"steps"} <= set(DistillConfig.model_fields)
    for a in recipe.anchors:
        for steps in {1, 3, a.steps or t.steps or 1}:
            cfg = step_config(recipe, a, steps)
            assert cfg.model_dump(include=set(TrainRecipe.model_fields) - {"steps", "lr", "warmup_steps"}) == \
                t.model_dump(exclude={"steps", "lr", "warmup_steps"})
            assert (cfg.lr, cfg.warmup_steps, cfg.total_steps) == (a.lr or t.lr, min(t.warmup_steps, steps), steps)
            assert (cfg.seed, cfg.device) == (recipe.seed, recipe.device)
            defaults = Optimization()
            assert (cfg.betas, cfg.grad_clip) == (defaults.betas, defaults.grad_clip)


def test_the_bridge_and_seqkd_settings():
    opts = BridgeOptions(steps=7, lr=2e-3, warmup_steps=9, seed=3)
    s = opts.optimization(opts.steps)
    assert (s.lr, s.warmup_steps, s.min_lr_ratio, s.batch_size, s.seq_len, s.seed) == (2e-3, 7, 0.1, 4, 128, 3)
    assert (s.betas, s.weight_decay, s.grad_clip) == ((0.9, 0.95), 0.0, 1.0)  # what the bridge always used
    kd = SeqKDOptions(steps=5, warmup_steps=10, seed=2).optimization(5, seq_len=40)
    assert (kd.lr, kd.warmup_steps, kd.seq_len, kd.seed, kd.min_lr_ratio) == (5e-4, 5, 40, 2, 0.1)


def test_lr_at_is_one_schedule():
    from cbd.train.config import DistillConfig

    cfg = DistillConfig(total_steps=20, warmup_steps=4, lr=1e-3, min_lr_ratio=0.1)
    opt = Optimization(warmup_steps=4, lr=1e-3, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(20)]
    assert lrs == [lr_at(s, opt, 20) for s in range(20)]
    assert lrs[3] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)
    assert lrs[10] == pytest.approx(1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi * 6 / 15)))
