PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8080

.PHONY: up test check bench bench-quick clean

$(BIN)/ember: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

$(VENV)/.bench: $(BIN)/ember
	$(BIN)/pip install -q -e '.[dev,bench]'
	touch $@

up: $(BIN)/ember
	$(BIN)/ember up --host $(HOST) --port $(PORT) --deploy examples/hello

test: $(BIN)/ember
	$(BIN)/pytest -q

check: $(BIN)/ember
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: $(VENV)/.bench
	$(BIN)/python -m bench.run_all

bench-quick: $(VENV)/.bench
	$(BIN)/python -m bench.run_all --quick --out $(VENV)/bench-quick.json

clean:
	rm -rf $(VENV) build *.egg-info
