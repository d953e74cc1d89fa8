"""The same request gives the same tensors, bit for bit, across code changes and processes.

The digests below were taken before ``cbd/`` was regrouped into subpackages (commit 79f35d8) on
the random test chain, for plain Trans and one alpha (``"repair": false``, ``"alpha_scheme":
"global"``, what every init was before repair); ``repaired`` pins today's default (the pruned
readers refit in situ by ridge least squares, an alpha per block of layers; re-pinned when the
refit pass began running each layer alone and adding the FFN reader's change to the layer output
without a rerun: the same fit up to float32 rounding, ~1e-6 in the refit weights; and again when
the refit's ridge system was solved in float32 instead of float64: the tiny chain's check losses
the same to 5 decimals, a seventh less time per repair; and again when the fading blend became the
default: the smaller anchor's term holds the bigger's units it lacks; and again when the repair
began refitting the residual stream's readers and the final norm where the residual width is
pruned: on this random chain that refit no longer beats plain Trans on the validation batch, so
``repaired`` now pins the guard's choice, and ``test_the_refit_tensors_are_the_pinned_ones`` pins
the refit's own tensors). The first cases ask for ``"blend": "plain"``, the blend they pinned; ``faded`` pins the fading blend at one alpha. A
refactoring that changes any of them changed what users get. A change that is *meant* to change
the bytes updates them in the same commit and says why.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cbd.core.artifacts import artifact_dir
from cbd.core.plan import make_plan
from cbd.core.request import InitRequest
from cbd.run import run_plan

ARCH_A = dict(num_hidden_layers=3, hidden_size=80, num_attention_heads=5, num_key_value_heads=1, intermediate_size=72)
CASES = {  # name: (request body, sha256 of every tensor's name, dtype, shape and bytes)
    "calibrated": ({"architecture": ARCH_A, "repair": False, "alpha_scheme": "global", "blend": "plain"},
                   "c86acdca14905d4c56c7578edaa43bf4b29012584212bfe8e6c7cc5dbfdbe617"),
    "alpha0": ({"architecture": ARCH_A, "calibrate": False, "repair": False, "blend": "plain"},
               "5e5d33310c427e29d5ece5b010a22e7e4f90c7afe59d397cfb0cceaf07df967e"),
    "explicit": ({"architecture": dict(num_hidden_layers=3, hidden_size=48, num_attention_heads=3,
                                       num_key_value_heads=1), "alpha": 0.3, "repair": False, "blend": "plain"},
                 "9dc37328707df819c8612006128480612cf25b133b1dff137f4686eda49bf97c"),
    "below": ({"architecture": dict(num_hidden_layers=1, hidden_size=16, num_attention_heads=1,
                                    intermediate_size=24), "repair": False},
              "3f82893e0cc0287fdaa4be35da89b9b14c647b812ee70b4a944c6d48863a812c"),
    "above": ({"architecture": dict(num_hidden_layers=5, hidden_size=128, num_attention_heads=8,
                                    num_key_value_heads=4, intermediate_size=160), "repair": False},
              "043b147e1e28c059caf6c66f404b697f8534aceb262d086396d743a91ed832c2"),
    "bf16": ({"architecture": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4), "dtype": "bfloat16",
              "repair": False, "alpha_scheme": "global", "blend": "plain"},
             "d076fd008909993ef5854e6846029c75d4183e0780585635dfbb58b7c51875d9"),
    "faded": ({"architecture": dict(num_hidden_layers=3, hidden_size=48, num_attention_heads=3, num_key_value_heads=1),
               "alpha": 0.3, "repair": False},
              "b296c9febfae6ed2d521cda65238e0c8fc5ad3f415db0b71701201cf1b47ecdb"),
    "repaired": ({"architecture": ARCH_A}, "2530a6c55022326842462bff993bdb3cd6aeb0339c4ca958230ca6c5f6feb890"),
}


def tensor_digest(path: Path) -> str:
    h = hashlib.sha256()
    with safe_open(str(path), "pt") as f:
        for k in sorted(f.keys()):  # noqa: SIM118 (safe_open is not a dict)
            t = f.get_tensor(k)
            h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def digests(chains: Path, artifacts: Path) -> dict[str, str]:
    from cbd.core.manifest import load_manifest

    m = load_manifest("test", chains)
    out = {}
    for name, (body, _) in CASES.items():
        plan = make_plan(InitRequest(chain="test", **body), m)
        run_plan(plan, chains_root=chains, artifacts_root=artifacts)
        out[name] = tensor_digest(artifact_dir(plan.id, artifacts) / "model.safetensors")
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_tensors_are_the_pinned_ones(random_chain, cbd_home, tmp_path, name):
    body, want = CASES[name]
    plan = make_plan(InitRequest(chain="test", **body), random_chain)
    run_plan(plan, chains_root=cbd_home / "chains", artifacts_root=tmp_path)
    assert tensor_digest(artifact_dir(plan.id, tmp_path) / "model.safetensors") == want


SCRIPT = """
import json, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from random_chain import build_random_chain
from test_bytes_pinned import digests
root = Path(sys.argv[1])
build_random_chain(root / "chains", "test")
files = {{}}
print(json.dumps(digests(root / "chains", root / "artifacts")))
"""


def test_same_bytes_across_processes_hash_seeds_and_thread_counts(tmp_path):
    """Two fresh processes (each building the random chain itself) with other hash seeds and
    torch thread counts give the pinned tensors, and byte-identical files."""
    tests = str(Path(__file__).parent)
    runs = []
    for seed, threads in (("1", "1"), ("12345", "2")):
        root = tmp_path / f"run-{seed}"
        env = {**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        out = subprocess.run([sys.executable, "-c", SCRIPT.format(tests=tests), str(root)], env=env,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        runs.append((root, json.loads(out.stdout.strip().splitlines()[-1])))
    for _, got in runs:
        assert got == {name: want for name, (_, want) in CASES.items()}
    (a, _), (b, _) = runs
    files_a = sorted(p.relative_to(a / "artifacts") for p in (a / "artifacts").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b / "artifacts") for p in (b / "artifacts").rglob("*") if p.is_file())
    assert files_a == files_b and files_a
    for rel in files_a:
        if rel.name == "artifact.json":  # holds the creation time
            continue
        assert (a / "artifacts" / rel).read_bytes() == (b / "artifacts" / rel).read_bytes(), rel


# The in-situ refit itself, kept whatever the guard says: on the random chain the refit of a0 onto
# ARCH_A (its FFN readers, its residual stream's readers and final norm refit) scores worse than plain Trans on the
# validation batch (random weights: flatter logits win), so the ``repaired`` request above pins the
# guard's choice, plain Trans; this pins the refit's own tensors (every reader, the residual
# stream's readers and the final norm), at the ridge a request would use for a0.
REFIT_DIGEST = "988cd47894190c34e829f1429c7eacb82df494c75fcd13505b49ba7c100df5a9"


def test_the_refit_tensors_are_the_pinned_ones(random_chain, cbd_home):
    from cbd.inits.calibration import calibration_tokens, validation_batches
    from cbd.repair.refit import insitu_repair
    from cbd.shape import arch
    from cbd.shape.maps import choose_maps
    from cbd.store.anchors import load_anchor

    a = load_anchor(random_chain, "a0", cbd_home / "chains")
    state = {n: a.read(n) for n in arch.param_names(a.spec)}
    tgt = a.spec.with_shape(**ARCH_A)
    maps = choose_maps(a.spec, tgt, a.importance)
    fixed, report = insitu_repair(a.spec, state, tgt, maps, list(calibration_tokens(random_chain, cbd_home / "chains").split(4)),
                                  check=validation_batches(random_chain, cbd_home / "chains"), ridge=1.0, guard=False)
    assert report["refit"] == ["ffn", "resid"] and report["stream_ridge"] == 0.1
    h = hashlib.sha256()
    for k in sorted(fixed):
        t = fixed[k].contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    assert h.hexdigest() == REFIT_DIGEST
