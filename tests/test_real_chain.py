"""The real thing: `cbd chain build tiny` from SmolLM2-135M on the four-domain mix, then LInit between its anchors.

The chain is built once per session into a temporary CBD_CHAINS with the command line (the
``tiny_chain`` fixture of tests/conftest.py, shared with the real bridge test of test_bridge.py).
A few minutes on 2 CPU cores.
"""

from __future__ import annotations

import json

import pytest
import torch
from stock_loss import folder_nll
from transformers import AutoModelForCausalLM

from bench.study import context, pruned_source_state
from cbd.core.artifacts import artifact_dir
from cbd.core.plan import make_plan
from cbd.core.request import InitRequest
from cbd.run import run_plan
from cbd.train.models import build_model, eval_loss, random_state

pytestmark = [pytest.mark.slow, pytest.mark.teacher]


def test_chain_is_built_stepwise(tiny_chain):
    m, _ = tiny_chain
    assert [a.name for a in m.anchors] == ["a0", "a1", "a2", "a3"]
    sizes = [a.non_embedding_params for a in m.anchors]
    assert sizes == sorted(sizes, reverse=True)
    assert [a.parent for a in m.anchors] == [None, "a0", "a1", "a2"]
    for a in m.anchors[1:]:
        assert a.metrics["heldout_loss"] < a.metrics["heldout_loss_pruned"]  # distillation improved on its start
        assert "repair" not in a.metrics  # the recipe's plain prune was the start (repair = "none")
    # only step 1 ran the source: later steps were taught by the anchor before them
    assert m.anchors[1].metrics["teacher_tokens"] > 0


def test_linit_between_real_anchors_beats_random_and_pruning(tiny_chain, monkeypatch):
    m, root = tiny_chain
    monkeypatch.setenv("CBD_CHAINS", str(root))
    ctx = context(m)
    req = InitRequest(chain="tiny", architecture=dict(num_hidden_layers=8, hidden_size=320, num_attention_heads=5,
                                                      num_key_value_heads=1, intermediate_size=768))
    plan = make_plan(req, m)
    assert (plan.small, plan.big) == ("a2", "a1")
    info = run_plan(plan, chains_root=root)
    model = AutoModelForCausalLM.from_pretrained(artifact_dir(info.id))
    batches = ctx.heldout(0)
    cbd = eval_loss(model, batches)
    rand = eval_loss(build_model(plan.target, random_state(plan.target, 0)), batches)
    pruned = eval_loss(build_model(plan.target, pruned_source_state(ctx, plan.target)), batches)
    print(f"held-out loss: cbd {cbd:.3f}, pruned source {pruned:.3f}, random {rand:.3f}")
    assert cbd < rand - 3.0  # random init ~10.8 nats/token
    assert cbd < pruned


def test_quickstart_request_loads(tiny_chain, monkeypatch):
    m, root = tiny_chain
    monkeypatch.setenv("CBD_CHAINS", str(root))
    req = InitRequest(architecture=dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=512), chain="tiny")
    info = run_plan(make_plan(req, m), chains_root=root)
    model = AutoModelForCausalLM.from_pretrained(artifact_dir(info.id))
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_calibrated_alpha_is_no_worse_than_alpha0_or_either_anchor(tiny_chain, monkeypatch, tmp_path):
    """Recomputed here from the published files (stock transformers, the chain's validation tokens:
    the batches calibration scores): the default checkpoint is no worse than alpha0's and than each
    single anchor's (alpha 1 and 0, asked for explicitly), and is the file calibration scored."""
    from cbd.inits.calibration import validation_batches

    m, root = tiny_chain
    monkeypatch.setenv("CBD_CHAINS", str(root))
    shape = dict(num_hidden_layers=8, hidden_size=320, num_attention_heads=5, num_key_value_heads=1,
                 intermediate_size=768)  # between a2 and a1
    batches = validation_batches(m, root)
    loss, recipe = {}, {}
    for key, extra in {"calibrated": {}, "alpha0": {"calibrate": False}, "small": {"alpha": 1.0},
                       "big": {"alpha": 0.0}}.items():
        plan = make_plan(InitRequest(chain="tiny", architecture=shape, **extra), m)
        info = run_plan(plan, chains_root=root, artifacts_root=tmp_path)
        folder = artifact_dir(info.id, tmp_path)
        loss[key] = folder_nll(folder, batches)
        recipe[key] = json.loads((folder / "recipe.json").read_text())
    print("validation loss by init:", {k: round(v, 4) for k, v in loss.items()},
          "alpha", recipe["calibrated"]["alpha"], "alpha0", recipe["alpha0"]["alpha"])
    assert recipe["calibrated"]["alpha_source"] == "calibrate"
    assert (recipe["small"]["small"], recipe["small"]["big"]) == (recipe["calibrated"]["small"], recipe["calibrated"]["big"])
    for other in ("alpha0", "small", "big"):
        assert loss["calibrated"] <= loss[other] + 1e-4, (other, loss)
    # the file is the one the card scored (an alpha per block of layers, from the grid's best)
    assert recipe["calibrated"]["card"]["step0_loss"] == pytest.approx(loss["calibrated"], abs=2e-3)
    scored = {float(a): v for a, v in recipe["calibrated"]["calibration_loss"].items()}
    assert loss["calibrated"] <= scored[recipe["calibrated"]["alpha"]] + 2e-3


def test_the_carry_lowers_a_width_pruned_anchors_trans_on_held_out_text(tiny_chain, monkeypatch):
    """a2 (6x256) cut to 192 channels with a3's 128 kept: turning the other 128 onto their principal
    directions before the cut (``"carry": "pca"``) keeps more of a2 than the cut by importance, on
    held-out text (measured on 3 seeds of windows: 6.123 -> 6.048; docs/results.md)."""
    from cbd.inits.run import prepare

    m, root = tiny_chain
    monkeypatch.setenv("CBD_CHAINS", str(root))
    batches = context(m).heldout(0)
    arch = dict(num_hidden_layers=6, hidden_size=192, num_attention_heads=3, num_key_value_heads=1,
                intermediate_size=640)
    loss = {}
    for carry in ("none", "pca"):
        plan = make_plan(InitRequest(chain="tiny", architecture=arch, calibrate=False, card=False, carry=carry), m)
        assert (plan.small, plan.big) == ("a3", "a2")
        li, _, calib = prepare(plan, m, progress=lambda _: None, chains_root=root)
        assert ("carry" in calib) == (carry == "pca")
        loss[carry] = eval_loss(build_model(plan.target, li.state(0.0)), batches)  # a2's Trans alone
    print(f"a2 cut to 6x192, held-out: by importance {loss['none']:.3f}, carried {loss['pca']:.3f}")
    assert loss["pca"] < loss["none"] - 0.03
