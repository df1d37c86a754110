# One-command entry points. `make test` is what CI runs (.ci/run).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install jars test test-classic container-test check lint types up db bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Fetch the Apache Kafka jars from Maven Central once (cached under ~/.cache/ordermesh).
jars: $(STAMP)
	$(BIN)/ordermesh broker fetch

# The consumer tests (rebalances, kills, restarts) once more under the classic group
# protocol; the whole suite runs under KIP-848's, the default.
CLASSIC_TESTS := tests/integration/test_inventory_pipeline.py tests/integration/test_tracker.py \
	tests/chaos/test_inventory_kill.py

test: install jars
	$(BIN)/pytest -q
	ORDERMESH_GROUP_PROTOCOL=classic $(BIN)/pytest -q $(CLASSIC_TESTS)

test-classic: install jars
	ORDERMESH_GROUP_PROTOCOL=classic $(BIN)/pytest -q $(CLASSIC_TESTS)

# The image and compose.yaml for real with podman (docs/deploy.md); `make test` runs it too.
container-test: install jars
	$(BIN)/pytest -q -m container tests/container

lint: install
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

types: install
	$(BIN)/mypy

check: lint types test

up: install jars
	$(BIN)/ordermesh up

# A local PostgreSQL for the services' state; prints the ORDERMESH_DATABASE_URL to export.
db: install
	$(BIN)/ordermesh db up

bench: install jars
	$(BIN)/ordermesh bench inventory

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
