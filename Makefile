# Two commands on a fresh machine: `make demo` (install + run the bundled sweeps) and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home
# No usage reports leave the machine. (The embedded Ray's loopback-only switch is set by imgtune
# itself, only for the embedded Ray: a client of a real multi-host cluster must not carry it.)
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: install install-app demo test dev clean system-deps ui-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# What the demo and the UI need; `install` adds the tests' tools (pytest, scikit-image, moto, playwright).
install-app: $(BIN)/python
	$(BIN)/pip install --quiet -e .

install: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'

$(DAGSTER_HOME)/dagster.yaml: dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp dagster.yaml $(DAGSTER_HOME)/dagster.yaml

demo: install-app $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/python -m imgtune_assets.cli sweep --all

# The tests drive real services: PostgreSQL's server programs (the tests start their own server on
# 127.0.0.1) and Debian's chromium (the UI check). Installed from Debian's packages when missing.
system-deps:
	@need=""; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need="$$need postgresql"; \
	command -v chromium >/dev/null 2>&1 || need="$$need chromium"; \
	if [ -n "$$need" ]; then \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  echo "installing from Debian's packages:$$need"; \
	  $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq $$need; \
	fi

test: install system-deps
	$(BIN)/pytest -q

# The UI in a real headless browser (Debian's chromium: apt-get install -y chromium): a small sweep,
# webserver + daemon on 127.0.0.1, lineage/report checks, Materialize clicks; screenshots in .artifacts/ui/.
ui-check: install
	$(BIN)/pytest -q imgtune_assets_tests/test_ui.py

dev: install-app $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/dg dev --host 127.0.0.1 --port 3000

# The demo's generated data sets, outputs and instance only: data/ may hold a user's own images.
clean:
	rm -rf outputs .dagster_home data/denoise data/segment
