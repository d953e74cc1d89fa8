"""The same checkpoint loads in transformers 5.x and 4.57 with equal logits.

transformers 4.57 and what it needs (its own huggingface_hub 0.x, tokenizers, numpy) are installed
once into ``$CBD_HOME/transformers-<VERSION>`` (outside git; pip only needs PyPI) and run by this
environment's Python with that folder first on ``sys.path``: the same torch, without installing it
a second time (a full second virtual environment cost the suite ~50 s). The checkpoint, made by
this environment's transformers 5, is loaded there by a plain script and its logits are compared
with ours.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cbd.core import paths
from cbd.core.artifacts import artifact_dir
from cbd.core.plan import make_plan
from cbd.core.request import InitRequest
from cbd.run import run_plan

pytestmark = pytest.mark.slow
VERSION = "4.57.1"
SCRIPT = """
import sys, json, numpy as np, torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, out = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder)
ids = torch.tensor([tok("the man said that it was time to go").input_ids])
with torch.no_grad():
    np.save(out, model(ids).logits.float().numpy())
print(transformers.__version__, model.config.rope_theta)
"""


def _venv() -> Path:
    """A ``python`` that imports transformers 4.57 (a wrapper: this interpreter, the 4.57 folder first)."""
    folder = paths.home() / f"transformers-{VERSION}"
    py = folder / "bin" / "python"
    if not (folder / ".ok").is_file():
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--upgrade", "--target", str(folder / "lib"),
                            f"transformers=={VERSION}"], capture_output=True, text=True)
        if r.returncode:
            pytest.fail(f"could not install transformers {VERSION}: {r.stderr[-2000:]}")
        py.parent.mkdir(parents=True, exist_ok=True)
        py.write_text(f'#!/bin/sh\nPYTHONPATH="{folder / "lib"}" exec "{sys.executable}" "$@"\n')
        py.chmod(0o755)
        (folder / ".ok").write_text("ok")
    return py


def test_loads_in_transformers_457_with_equal_logits(random_chain, tmp_path):
    req = InitRequest(chain="test", architecture=dict(num_hidden_layers=3, hidden_size=80, num_attention_heads=5,
                                                      num_key_value_heads=1, intermediate_size=72))
    plan = make_plan(req, random_chain)
    run_plan(plan, artifacts_root=tmp_path)
    folder = artifact_dir(plan.id, tmp_path)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor([tok("the man said that it was time to go").input_ids])
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(folder)(ids).logits.float().numpy()
    out = tmp_path / "theirs.npy"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([str(_venv()), "-c", SCRIPT, str(folder), str(out)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    version, rope = r.stdout.split()[-2:]
    assert version == VERSION and float(rope) == plan.target.rope_theta
    theirs = np.load(out)
    assert theirs.shape == ours.shape
    assert np.abs(theirs - ours).max() <= 1e-4
