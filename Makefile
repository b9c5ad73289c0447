# Two commands do everything on a fresh clone: `make demo` and `make test` (each sets up .venv itself).
PYTHON ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup model browser demo test test-long bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -e '.[api,test]'
	touch $(STAMP)

setup: $(STAMP)

model: setup
	$(BIN)/corolla fetch-model

# The web test drives Debian's chromium through chromium-driver; install them if missing (needs root or sudo).
# If that fails, the web test is skipped and says why.
SUDO := $(shell [ "$$(id -u)" = 0 ] || command -v sudo)
browser:
	@if ! command -v chromedriver >/dev/null 2>&1 || ! { command -v chromium >/dev/null 2>&1 || \
	      command -v chromium-browser >/dev/null 2>&1; }; then \
	  echo "Installing chromium and chromium-driver (for the web test) ..."; \
	  { $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium \
	    chromium-driver; } || echo "could not install chromium + chromium-driver: the web test will be skipped"; \
	fi

demo: model
	$(BIN)/corolla demo

test: model browser
	$(BIN)/python -m pytest -q -rs --durations=15

test-long: model browser
	COROLLA_LONG=1 $(BIN)/python -m pytest -q -rs

bench: model
	$(BIN)/python benchmarks/swarm_latency.py

clean:
	rm -rf $(VENV) .pytest_cache test-output
