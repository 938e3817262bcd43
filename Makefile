# The two quick-start commands are `make run` and `make test`; everything
# else here is what they are made of.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test lint check-deploy bench clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else "Python 3.12 or newer is needed (see .python-version); found " + sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet ".[dev]"
	touch $(VENV)/.installed $@

$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet ".[dev,bench]"
	touch $(VENV)/.installed $(VENV)/.installed-dev $@

## Run the service on the embedded defaults: SQLite, in-memory channel layer.
run: $(VENV)/.installed
	$(BIN)/python manage.py migrate --noinput
	PUBLIC_URL=$${PUBLIC_URL:-http://$(HOST):$(PORT)} $(BIN)/python manage.py runserver $(HOST):$(PORT)

## Run the whole test suite. Tests needing PostgreSQL, Redis, NATS or
## chromium skip, saying why, when those are not configured or installed.
test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## Run every benchmark on this machine's PostgreSQL and Redis (started when
## missing), each on a database of its own; see docs/performance.md.
## BENCH_ARGS names some of them, e.g. BENCH_ARGS=heartbeats.
bench: $(VENV)/.installed-bench
	$(BIN)/python -m bench $(BENCH_ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .pytest-db.sqlite3* .mypy_cache .ruff_cache .pytest_cache build *.egg-info
