# Everything a fresh machine needs is installed by these targets; both README commands go through them.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv proto lint typecheck test demo bench clean

venv: $(VENV)/.installed

# The four distributions, one a folder (see the root pyproject.toml), editable: an edit needs no reinstall,
# and their llmgw.commands entry points give `llmgw` all its subcommands. llm-gateway-dev requires the other
# three at 0.1.0, which these folders satisfy.
PACKAGES := common proxy_image operator dev

$(VENV)/.installed: $(addsuffix /pyproject.toml,$(PACKAGES))
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@# A .venv made before the split holds the single llm-gateway wheel, whose entry points would double theirs.
	$(BIN)/pip uninstall --quiet --yes llm-gateway 2>/dev/null
	$(BIN)/pip install --quiet $(addprefix -e ./,$(PACKAGES))
	@touch $@

proto: venv
	$(BIN)/python hack/gen_proto.py

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

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
	rm -rf $(addsuffix /build,$(PACKAGES)) $(addsuffix /*.egg-info,$(PACKAGES))
