# Everything a fresh machine needs is installed by these targets; both README commands go through them.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv proto lint typecheck test demo bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

proto: venv
	$(BIN)/python hack/gen_proto.py

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/mypy

test: venv lint typecheck
	$(BIN)/pytest -q

demo: venv
	$(BIN)/llmgw demo

bench: venv
	$(BIN)/python bench/proxy_latency.py
	$(BIN)/python bench/payload.py
	$(BIN)/python bench/operator_reconcile.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
