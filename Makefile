# Every target creates .venv and installs what it needs; `make demo` and `make test` are the
# two commands a fresh machine needs.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PYTEST := $(BIN)/python -m pytest

# The test targets share the test database and the services: one at a time, even under -j.
.NOTPARALLEL:

.PHONY: install demo test test-postgres test-sqlite test-lowest lint typecheck bench chaos docs tox services clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev,docs]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python demo_project/run_demo.py

test: install lint typecheck test-postgres test-sqlite test-lowest docs

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

# The main environment: Python 3.11, Django 5.2, PostgreSQL, RabbitMQ, Redis.
test-postgres: install
	RT_TEST_DB=postgres $(PYTEST) tests

# The embedded default: SQLite, one relay. The unit and integration suites, and the relay's
# faults on SQLite; the other end-to-end suites exercise workers, not the database, and run above.
test-sqlite: install
	rm -f test-reliable-tasks.sqlite3*
	RT_TEST_DB=sqlite $(PYTEST) tests/unit tests/integration tests/e2e/test_relay_faults.py -m "not postgres"

# The oldest dependencies pyproject.toml admits (constraints/lowest.txt), in a virtualenv of
# their own: the unit and integration suites on PostgreSQL.
LOWEST := .venv-lowest
$(LOWEST)/.installed: pyproject.toml constraints/lowest.txt
	rm -rf $(LOWEST)
	$(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/python -m pip install -q --upgrade pip
	$(LOWEST)/bin/python -m pip install -q -e ".[postgres,hiredis,sentry,metrics,test]" -c constraints/lowest.txt
	touch $@

test-lowest: $(LOWEST)/.installed
	RT_TEST_DB=postgres $(LOWEST)/bin/python -m pytest tests/unit tests/integration

bench: install
	$(BIN)/python benchmarks/run.py

# 10,000 tasks through two relays and three workers while workers and relays are SIGKILLed,
# RabbitMQ restarts and Redis stops; checks every effect happened exactly once. It prints its
# seed: `make chaos ARGS="--seed N"` replays a run (`--small` is the run inside `make test`).
chaos: install
	$(BIN)/python -m tests.chaos $(ARGS)

docs: install
	$(BIN)/sphinx-build -q -W --keep-going -b html docs docs/_build/html

# The whole Python x Django x database matrix (tox.ini). tox looks for python3.12 and python3.13
# on PATH; pyenv's versions, where installed, are put there. `make tox ARGS="-e py313-django6-sqlite"`
# runs one environment.
PYENV_BINS := $(shell ls -d $(HOME)/.pyenv/versions/3.1[23].*/bin 2>/dev/null | tr '\n' ':')
tox: install
	PATH="$(PYENV_BINS)$$PATH" $(BIN)/tox $(ARGS)

services:
	scripts/ensure-services

clean:
	rm -rf $(VENV) $(LOWEST) .tox docs/_build test-reliable-tasks.sqlite3*
