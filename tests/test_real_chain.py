"""The real thing: `cbd chain build tiny` from SmolLM2-135M on Austen, then LInit between its anchors.

Builds the chain once per session into a temporary CBD_CHAINS with the command line (the
teacher, tokenizer and corpus come from the shared asset cache, built from their packages on
first use). A few minutes on 2 CPU cores.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from bench.study import context, pruned_source_state
from cbd.core.artifacts import artifact_dir
from cbd.core.manifest import load_manifest
from cbd.core.plan import make_plan
from cbd.core.request import InitRequest
from cbd.run import run_plan
from cbd.train.models import build_model, eval_loss, random_state

pytestmark = [pytest.mark.slow, pytest.mark.teacher]


@pytest.fixture(scope="session")
def tiny_chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("real_chains")
    env = os.environ | {"CBD_CHAINS": str(root), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    r = subprocess.run([sys.executable, "-m", "cbd.cli", "chain", "build", "tiny"], env=env, capture_output=True,
                       text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "a3" in r.stdout  # the chain table was printed
    return load_manifest("tiny", root), root


def test_chain_is_built_stepwise(tiny_chain):
    m, _ = tiny_chain
    assert [a.name for a in m.anchors] == ["a0", "a1", "a2", "a3"]
    sizes = [a.non_embedding_params for a in m.anchors]
    assert sizes == sorted(sizes, reverse=True)
    assert [a.parent for a in m.anchors] == [None, "a0", "a1", "a2"]
    for a in m.anchors[1:]:  # distillation repaired what pruning broke
        assert a.metrics["heldout_loss"] < a.metrics["heldout_loss_pruned"] - 0.5
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
