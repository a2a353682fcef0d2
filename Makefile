# `make run`: set up and run the whole pipeline on the built-in default.
# `make test`: set up and run the linters and the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export RAY_USAGE_STATS_ENABLED := 0
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120

.PHONY: setup run test test-faults lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch and torchvision first, pinned as a pair (pip finds them on the build machines' disk).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

# Browser tests drive Debian's Chromium (Playwright never downloads a browser here).
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
$(CHROMIUM):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/prunepipe run --config default

lint: $(STAMP)
	$(BIN)/ruff check .

# The long tiers run in CI after `make test`: whole flows on a multi-node Ray cluster and further Ray Train
# fits (test-long), and the fault-injection tests (SIGKILLed flows, a dying tracking server; test-faults).
test: $(STAMP) $(CHROMIUM) lint
	$(BIN)/pytest -q -m "not fault and not long" --durations=15

test-long: $(STAMP)
	$(BIN)/pytest -q -m long --durations=5

test-faults: $(STAMP)
	$(BIN)/pytest -q -m fault

clean:
	rm -rf runs mlruns mlflow.db .pytest_cache
