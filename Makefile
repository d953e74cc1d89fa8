# The two Quick start commands: `make serve` and `make test` (README.md). Both create the
# virtual environment on first use (scripts/setup-venv.sh: cached by dependency set outside
# git, linked as .venv); CI (`.ci/run`) calls `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup serve test lint bench

setup:
	bash scripts/setup-venv.sh

serve: setup
	$(VENV)/bin/cbd serve

test: setup lint
	bash scripts/ensure-redis.sh
	bash scripts/ensure-chromium.sh
	$(PY) -m pytest $(PYTEST_ARGS)

# ruff, then the import-linter contracts of pyproject.toml (layers, torch-free core and web process,
# no cycles): a broken contract fails `make test`.
lint: setup
	$(VENV)/bin/ruff check cbd app worker tests bench
	$(VENV)/bin/lint-imports
