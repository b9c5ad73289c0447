# Two commands do everything on a fresh clone: `make demo` and `make test` (each sets up .venv itself).
PYTHON ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup model demo test test-long bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -e '.[api,test]'
	touch $(STAMP)

setup: $(STAMP)

model: setup
	$(BIN)/corolla fetch-model

demo: model
	$(BIN)/corolla demo

test: model
	$(BIN)/python -m pytest -q -rs --durations=15

test-long: model
	COROLLA_LONG=1 $(BIN)/python -m pytest -q -rs

bench: model
	$(BIN)/python benchmarks/swarm_latency.py

clean:
	rm -rf $(VENV) .pytest_cache test-output
