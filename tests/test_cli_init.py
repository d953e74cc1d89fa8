"""`cbd init` on the random test chain: the calibrate flag and the alpha it reports are the truth."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from cbd.cli.main import app
from cbd.core.plan import alpha0

SHAPE = ["--layers", "3", "--hidden", "80", "--heads", "5", "--kv-heads", "1", "--ffn", "72", "--chain", "test"]


def _init(tmp_path, *flags, spec: dict | None = None):
    args = ["init", "--out", str(tmp_path / "out"), *SHAPE, *flags]
    if spec is not None:
        (tmp_path / "spec.json").write_text(json.dumps(spec))
        args += ["--spec", str(tmp_path / "spec.json")]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    recipe = json.loads((tmp_path / "out" / "recipe.json").read_text())
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["cbd_recipe"]) == recipe
    return recipe


def _alpha0(random_chain, recipe) -> float:
    small, big = random_chain.anchor(recipe["small"]), random_chain.anchor(recipe["big"])
    return alpha0(small.size, big.size, _target_size(recipe))


def _target_size(recipe) -> int:
    from cbd.core.spec import ModelSpec

    return ModelSpec.model_validate(recipe["target"]).non_embedding_params()


def test_no_calibrate_gives_alpha0(random_chain, tmp_path):
    recipe = _init(tmp_path, "--no-calibrate")
    assert recipe["alpha_source"] == "distance" and "calibration_loss" not in recipe
    assert recipe["alpha"] == pytest.approx(_alpha0(random_chain, recipe), abs=1e-6)


@pytest.mark.parametrize("flags,spec", [((), None), (("--calibrate",), None), ((), {"calibrate": True})])
def test_calibrate_is_the_default_and_is_reported(random_chain, tmp_path, flags, spec):
    recipe = _init(tmp_path, *flags, spec=spec)
    assert recipe["alpha_source"] == "calibrate"
    grid = {float(a): v for a, v in recipe["calibration_loss"].items()}
    assert recipe["alpha"] == min(grid, key=grid.get)  # the grid's best, not alpha0


def test_spec_file_calibrate_false_is_honoured_without_a_flag(random_chain, tmp_path):
    recipe = _init(tmp_path, spec={"calibrate": False})
    assert recipe["alpha_source"] == "distance"


def test_explicit_alpha_comes_back_as_request(random_chain, tmp_path):
    recipe = _init(tmp_path, "--alpha", "0.25")
    assert recipe["alpha_source"] == "request" and recipe["alpha"] == 0.25
