# The two commands of the quick start: `make demo` (everything end to end) and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
# --durations: CI logs name the slowest tests, the first place to look when the suite grows.
# -n: tests run in PYTEST_WORKERS processes (pytest-xdist). Most of the suite waits on Redis,
# worker processes and Ray rather than computing, so two processes on two cores take the
# whole suite from ~24 to ~16 minutes; every test starts its own servers on free ports.
PYTEST_WORKERS ?= 2
PYTEST_ARGS ?= --durations=25 -n $(PYTEST_WORKERS)

.PHONY: setup demo test test-unit test-integration lint bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/headrace demo

test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-integration: setup
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

# ruff (style, function length/complexity), mypy (src/headrace), import-linter (layering
# and no import cycles: [tool.importlinter] in pyproject.toml).
lint: setup
	$(VENV)/bin/ruff check client workers models cluster tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

bench: setup
	$(PY) -m benchmarks.e2e_vs_raw

clean:
	rm -rf $(VENV) model_repo .pytest_cache .mypy_cache .ruff_cache
