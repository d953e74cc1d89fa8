"""The same checkpoint loads in transformers 5.x and 4.57 with equal logits.

A second virtual environment with transformers 4.57 (and the same torch) is built once under
``$CBD_HOME/venv-transformers-4.57`` (outside git; pip only needs PyPI). The checkpoint, made
by this environment's transformers 5, is loaded there by a plain script and its logits are
compared with ours.
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
    venv = paths.home() / f"venv-transformers-{VERSION}"
    py = venv / "bin" / "python"
    if not (venv / ".ok").is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        r = subprocess.run([str(py), "-m", "pip", "install", "-q", f"transformers=={VERSION}",
                            f"torch=={torch.__version__.split('+')[0]}", "numpy", "safetensors", "tokenizers"],
                           capture_output=True, text=True)
        if r.returncode:
            pytest.fail(f"could not build the transformers {VERSION} environment: {r.stderr[-2000:]}")
        (venv / ".ok").write_text("ok")
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
