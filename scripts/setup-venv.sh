#!/usr/bin/env bash
# Create (once) the virtual environment for this checkout and link it as .venv.
#
# The environment lives outside git, in $CBD_HOME/venvs/<hash of the pinned dependencies>, so
# fresh clones on the same machine (CI) reuse it instead of downloading ~2 GB again; a change to
# the dependencies makes a new one. The checkout itself is installed editable (compat mode: a
# .pth file naming this folder), so the `cbd` command and its entry points (`cbd serve` and
# `cbd worker` come from worker/ through the `cbd.commands` group) serve whichever clone ran
# this last, and `python -m ...` from a checkout always imports that checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
home=${CBD_HOME:-$HOME/.cache/cbd}
requirements=$(python3 - <<'PY'
import tomllib
p = tomllib.load(open("pyproject.toml", "rb"))
deps = p["project"]["dependencies"] + p["project"]["optional-dependencies"]["service"] + p["project"]["optional-dependencies"]["dev"]
print("\n".join(deps + p["build-system"]["requires"]))
PY
)
hash=$(printf '%s\n' "$requirements" | sha256sum | cut -c1-16)
venv="$home/venvs/$hash"
if [ ! -f "$venv/.installed" ]; then
  echo "creating the environment in $venv (once per dependency set)" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  printf '%s\n' "$requirements" > "$venv/requirements.txt"
  "$venv/bin/python" -m pip install -q -r "$venv/requirements.txt"
  touch "$venv/.installed"
fi
# metadata (entry points, the console script) for this checkout; no dependency is touched
"$venv/bin/python" -m pip install -q --no-deps --no-build-isolation --disable-pip-version-check \
  -e . --config-settings editable_mode=compat 2>&1 | grep -v "^WARNING: Location" >&2 || true
"$venv/bin/python" -c "import cbd.cli.main" >/dev/null
if [ -L .venv ] || [ ! -e .venv ]; then
  ln -sfn "$venv" .venv
fi
