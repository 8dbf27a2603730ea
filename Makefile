# ipam — one entry point for set-up, code generation, running, tests and benchmarks.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
GHZ_VERSION := v0.121.0
GOBIN ?= $(CURDIR)/.bin
GHZ := $(GOBIN)/ghz

.PHONY: setup proto run test lint bench load ghz clean redis-server

# Debian's redis-server, installed only when missing (apt-get update once, then install).
redis-server:
	@command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; }

# The generated package (gen/ipam) must exist before the editable install, which maps it.
$(VENV)/.installed: pyproject.toml proto/ipam/v1/*.proto
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q 'grpcio-tools>=1.66'
	$(MAKE) --no-print-directory proto
	$(PIP) install -q -e '.[dev]'
	@touch $@

setup: redis-server $(VENV)/.installed

# Generated Python code for proto/ipam/v1 (importable as ipam.v1); never edited by hand.
proto:
	@rm -rf gen/ipam && mkdir -p gen
	$(PY) -m grpc_tools.protoc -Iproto --python_out=gen --pyi_out=gen --grpc_python_out=gen proto/ipam/v1/*.proto
	@touch gen/ipam/__init__.py gen/ipam/v1/__init__.py

run: setup
	$(PY) -m services.devcluster

test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests

lint: setup
	$(VENV)/bin/ruff check services clients tests bench

$(GHZ):
	GOBIN=$(GOBIN) go install github.com/bojand/ghz/cmd/ghz@$(GHZ_VERSION)

ghz: $(GHZ)

# Allocator throughput against a no-op ceiling, memory, and the worker's burst scenario.
bench: setup $(GHZ)
	$(PY) bench/run_bench.py --ghz $(GHZ)

# Load profiles (bench/ghz/) against the running cluster (`make run` elsewhere); report in bench/out/load-<time>/.
load: setup $(GHZ)
	$(PY) -m bench.load --ghz $(GHZ)

clean:
	rm -rf gen/ipam $(VENV) .bin
