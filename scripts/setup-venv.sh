#!/usr/bin/env bash
# Create (once) the virtual environment for this checkout and link it as .venv.
#
# The environment lives outside git, in $CBD_HOME/venvs/<hash of pyproject.toml>, so fresh
# clones on the same machine (CI) reuse it instead of downloading ~2 GB again; a change to the
# dependencies makes a new one. The checkout itself is put on the environment's path with a
# .pth file and a `cbd` launcher, so the environment serves whichever clone ran this last, and
# `python -m ...` from a checkout always imports that checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
home=${CBD_HOME:-$HOME/.cache/cbd}
hash=$(cat pyproject.toml | sha256sum | cut -c1-16)
venv="$home/venvs/$hash"
if [ ! -f "$venv/.installed" ]; then
  echo "creating the environment in $venv (once per dependency set)" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" - > "$venv/requirements.txt" <<'PY'
import tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(p["dependencies"] + p["optional-dependencies"]["service"] + p["optional-dependencies"]["dev"]))
PY
  "$venv/bin/python" -m pip install -q -r "$venv/requirements.txt"
  touch "$venv/.installed"
fi
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$root" > "$site/cbd-checkout.pth"
printf '#!%s\nimport sys\nfrom cbd.cli import main\nsys.exit(main())\n' "$venv/bin/python" > "$venv/bin/cbd"
chmod +x "$venv/bin/cbd"
if [ -L .venv ] || [ ! -e .venv ]; then
  ln -sfn "$venv" .venv
fi
