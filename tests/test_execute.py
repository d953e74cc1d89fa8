"""Plans executed into checkpoint folders that stock transformers loads."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from cbd.core.artifacts import artifact_dir
from cbd.core.plan import make_plan
from cbd.core.request import InitRequest
from cbd.run import run_plan


def _plan(chain, **arch):
    return make_plan(InitRequest(chain=chain.name, architecture=arch), chain)


def test_checkpoint_loads_in_transformers(random_chain, tmp_path):
    plan = _plan(random_chain, num_hidden_layers=3, hidden_size=80, num_attention_heads=5, num_key_value_heads=1,
                 intermediate_size=72)
    info = run_plan(plan, artifacts_root=tmp_path)
    folder = artifact_dir(plan.id, tmp_path)
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "README.md", "recipe.json"} <= set(info.files)
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert sum(p.numel() for p in model.parameters()) == plan.target.num_params()
    ids = torch.tensor([tok("the man said that it was time").input_ids])
    assert torch.isfinite(model(ids).logits).all()
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    recipe = json.loads(meta["cbd_recipe"])
    assert recipe["id"] == plan.id and recipe["anchors"][0]["sha256"] == random_chain.anchor(plan.small).sha256
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n") and "pipeline_tag: text-generation" in card


def test_deterministic_bytes(random_chain, tmp_path):
    plan = _plan(random_chain, num_hidden_layers=3, hidden_size=48, num_attention_heads=3, num_key_value_heads=1)
    a = run_plan(plan, artifacts_root=tmp_path / "a")
    b = run_plan(plan, artifacts_root=tmp_path / "b")
    assert a.files == b.files  # sizes and sha256 of every file


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_requested_dtype_is_written(random_chain, tmp_path, dtype):
    req = InitRequest(chain="test", architecture=dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4),
                      dtype=dtype)
    plan = make_plan(req, random_chain)
    run_plan(plan, artifacts_root=tmp_path)
    folder = artifact_dir(plan.id, tmp_path)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {getattr(torch, dtype)}  # noqa: SIM118
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == dtype


def test_calibrated_alpha_is_best_of_grid(random_chain, tmp_path):
    req = InitRequest(chain="test", architecture=dict(num_hidden_layers=3, hidden_size=80, num_attention_heads=5,
                                                      num_key_value_heads=5), calibrate=True)
    info = run_plan(make_plan(req, random_chain), artifacts_root=tmp_path)
    losses = {float(k): v for k, v in info.metrics["calibration_loss"].items()}
    assert info.alpha in losses and losses[info.alpha] == min(losses.values())


shapes = st.builds(
    lambda L, h, r, g, f: dict(num_hidden_layers=L, hidden_size=16 * h * g, num_attention_heads=h * g,
                               num_key_value_heads=g, intermediate_size=f),
    L=st.integers(1, 6), h=st.integers(1, 2), g=st.integers(1, 3), r=st.just(0), f=st.integers(1, 200))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(arch=shapes)
def test_any_valid_shape_loads_with_its_parameter_count(random_chain, tmp_path_factory, arch):
    plan = _plan(random_chain, **arch)
    root = tmp_path_factory.mktemp("sweep")
    run_plan(plan, artifacts_root=root)
    model = AutoModelForCausalLM.from_pretrained(artifact_dir(plan.id, root))
    assert sum(p.numel() for p in model.parameters()) == plan.target.num_params()
    assert model.config.num_hidden_layers == arch["num_hidden_layers"]
    logits = model(torch.tensor([[3, 4, 5, 6, 7]])).logits
    assert logits.shape == (1, 5, 128) and torch.isfinite(logits).all()


def test_inspect_reports_a_checkpoint_and_refuses_a_missing_path(random_chain, tmp_path, monkeypatch, capsys):
    import sys

    from cbd.cli import main as cli

    info = run_plan(make_plan(InitRequest(chain="test", architecture=dict(num_hidden_layers=3, hidden_size=64,
                                                                          num_attention_heads=4,
                                                                          num_key_value_heads=2,
                                                                          intermediate_size=64)), random_chain))
    for args, code in (([str(artifact_dir(info.id))], 0), ([str(tmp_path / "nothing")], 3)):
        monkeypatch.setattr(sys, "argv", ["cbd", "inspect", *args])
        with pytest.raises(SystemExit) as exc:
            cli.main()
        assert exc.value.code == code
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert "is not a checkpoint" in err and "Traceback" not in err
