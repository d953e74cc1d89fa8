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
	$(PY) -m cbd.cli serve

test: setup
	bash scripts/ensure-redis.sh
	$(VENV)/bin/ruff check cbd app worker tests bench
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check cbd app worker tests bench
