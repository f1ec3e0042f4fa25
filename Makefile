# Two commands on a fresh machine: `make demo` (install + run the demo sweep) and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home
# Ray listens on loopback only (see README, "Safe defaults").
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: install demo test dev clean ui-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'

$(DAGSTER_HOME)/dagster.yaml: dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp dagster.yaml $(DAGSTER_HOME)/dagster.yaml

demo: install $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/python -m imgtune_assets.cli sweep

test: install
	$(BIN)/pytest -q

# The UI in a real headless browser (Debian's chromium: apt-get install -y chromium): a small sweep,
# webserver + daemon on 127.0.0.1, lineage/report checks, Materialize clicks; screenshots in .artifacts/ui/.
ui-check: install
	$(BIN)/pytest -q imgtune_assets_tests/test_ui.py

dev: install $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/dagster dev -h 127.0.0.1 -p 3000

clean:
	rm -rf outputs .dagster_home data
