# The two Quick start commands: `make serve` and `make test` (README.md). Both create the
# virtual environment on first use; CI (`.ci/run`) calls `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup serve test lint bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[service,dev]'
	touch $@

serve: setup
	$(VENV)/bin/cbd serve

test: setup
	bash scripts/ensure-redis.sh
	$(VENV)/bin/ruff check cbd app worker tests bench
	$(VENV)/bin/pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check cbd app worker tests bench
