# Every target sets itself up: a local .venv with the pinned CPU torch, then the package.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
EXTRAS ?= postgres,mysql,dashboard,grpc,dev
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test check lint format typecheck bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/automl run search_spaces/digits_mlp.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests ran"; exit 0; fi; exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check automl tests bench
	$(BIN)/ruff format --check automl tests bench

format: $(STAMP)
	$(BIN)/ruff format automl tests bench
	$(BIN)/ruff check --fix automl tests bench

typecheck: $(STAMP)
	$(BIN)/mypy automl

check: lint typecheck test

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
