# Two commands do everything on a fresh clone: `make demo` and `make test` (each sets up .venv itself).
PYTHON ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup model browser netbench demo test test-long bench bench-petals clean

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

# The network tests (tests/network) build a small internet from network namespaces: they need iproute2 (ip, tc)
# and nftables, and root. Installed here if missing; without them those tests are skipped and say why.
netbench:
	@if ! command -v nft >/dev/null 2>&1 || ! command -v ip >/dev/null 2>&1 || ! command -v tc >/dev/null 2>&1; then \
	  echo "Installing nftables and iproute2 (for the network tests) ..."; \
	  { $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q nftables \
	    iproute2; } || echo "could not install nftables + iproute2: the network tests will be skipped"; \
	fi

demo: model
	$(BIN)/corolla demo

test: model browser netbench
	$(BIN)/python -m pytest -q -rs --durations=15

test-long: model browser netbench
	COROLLA_LONG=1 $(BIN)/python -m pytest -q -rs

bench: model
	$(BIN)/python benchmarks/swarm_latency.py
	@echo "Petals 2.2 side by side in the same run, same model files: make bench-petals (docs/benchmarks.md)"

# Petals 2.2 measured in the same run as Corolla (benchmarks/petals_compare.py). The Petals venv and the tiny-llama
# model are made by the anchor's own setup.sh / make_models.py, called where they are (shared/anchors/petals).
# Options: PETALS_ANCHOR=dir ANCHORS=dir (venv + models, the anchor's variable) BENCH_ARGS='--runs 5 --json out.json'
PETALS_ANCHOR ?= $(abspath $(CURDIR)/../shared/anchors/petals)
ANCHORS ?= $(HOME)/.cache/corolla-anchors
PETALS_VENV := $(ANCHORS)/petals-venv
BENCH_ARGS ?=
bench-petals: setup
	@test -f "$(PETALS_ANCHOR)/setup.sh" || { echo "no Petals anchor at $(PETALS_ANCHOR) (set PETALS_ANCHOR=...)"; exit 1; }
	@if ! "$(PETALS_VENV)/bin/python" -c 'import petals' >/dev/null 2>&1; then \
	  echo "Making the Petals venv with the anchor's setup.sh -> $(PETALS_VENV) ..."; \
	  VENV="$(PETALS_VENV)" bash "$(PETALS_ANCHOR)/setup.sh"; \
	fi
	$(BIN)/python benchmarks/petals_compare.py --anchor-dir "$(PETALS_ANCHOR)" --petals-venv "$(PETALS_VENV)" \
	  --models "$(ANCHORS)/models" $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache test-output
