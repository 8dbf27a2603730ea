# ipam — one entry point for set-up, code generation, running, tests and benchmarks.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
GHZ_VERSION := v0.121.0
GOBIN ?= $(CURDIR)/.bin
GHZ := $(GOBIN)/ghz
# The CNI plugin (clients/cni) and its tools, every version pinned.
CNI_VERSION := v1.3.1
PROTOC_GEN_GO_VERSION := v1.36.12
PROTOC_GEN_GO_GRPC_VERSION := v1.6.2
CNITOOL := $(GOBIN)/cnitool
PROTOC_GEN_GO := $(GOBIN)/protoc-gen-go
PROTOC_GEN_GO_GRPC := $(GOBIN)/protoc-gen-go-grpc
CNI_PLUGIN := $(GOBIN)/cni/ipam-cni
CNI_GO_MODULE := ipam/clients/cni

.PHONY: setup proto run run-ha test lint bench bench-ha bench-scale bench-cni load ghz clean system-packages redis-server promtool cni cni-proto cni-system cnitool

# Debian's packages, installed only when missing (apt-get update once, then install): redis-server,
# and prometheus for promtool (it checks deploy/'s alert rules).
system-packages:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	if [ -n "$$missing" ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

redis-server promtool: system-packages

# The generated package (gen/ipam) must exist before the editable install, which maps it.
$(VENV)/.installed: pyproject.toml proto/ipam/v1/*.proto
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q 'grpcio-tools>=1.66'
	$(MAKE) --no-print-directory proto
	@# setuptools' informational box on every editable install of a multi-folder layout (gen/ and .)
	@# says nothing actionable here: filtered by its exact message, every other warning still shows.
	PYTHONWARNINGS='ignore:Editable installation' $(PIP) install -q -e '.[dev]'
	@touch $@

setup: system-packages $(VENV)/.installed

# What the CNI tests run besides our code, from Debian when missing (one apt-get update): the
# reference plugins (bridge, ptp, host-local in /usr/lib/cni), ip and ping; and redis-server and
# prometheus (promtool), setup's packages, so that `make test` updates the package lists once.
cni-system:
	@missing=; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	test -x /usr/lib/cni/bridge || missing="$$missing containernetworking-plugins"; \
	command -v ip >/dev/null || missing="$$missing iproute2"; \
	command -v ping >/dev/null || missing="$$missing iputils-ping"; \
	if [ -n "$$missing" ]; then apt-get update -qq && apt-get install -y -qq $$missing; fi

$(PROTOC_GEN_GO):
	GOBIN=$(GOBIN) go install google.golang.org/protobuf/cmd/protoc-gen-go@$(PROTOC_GEN_GO_VERSION)

$(PROTOC_GEN_GO_GRPC):
	GOBIN=$(GOBIN) go install google.golang.org/grpc/cmd/protoc-gen-go-grpc@$(PROTOC_GEN_GO_GRPC_VERSION)

$(CNITOOL):
	GOBIN=$(GOBIN) go install github.com/containernetworking/cni/cnitool@$(CNI_VERSION)

cnitool: $(CNITOOL)

# Generated Go code for the Allocator service (clients/cni/gen/ipamv1); never edited by hand.
cni-proto: $(VENV)/.installed $(PROTOC_GEN_GO) $(PROTOC_GEN_GO_GRPC)
	@rm -rf clients/cni/gen && mkdir -p clients/cni/gen/ipamv1
	$(PY) -m grpc_tools.protoc -Iproto \
	  --plugin=protoc-gen-go=$(PROTOC_GEN_GO) --plugin=protoc-gen-go-grpc=$(PROTOC_GEN_GO_GRPC) \
	  --go_out=clients/cni --go_opt=module=$(CNI_GO_MODULE) \
	  --go_opt=Mipam/v1/allocator.proto=$(CNI_GO_MODULE)/gen/ipamv1 \
	  --go-grpc_out=clients/cni --go-grpc_opt=module=$(CNI_GO_MODULE) \
	  --go-grpc_opt=Mipam/v1/allocator.proto=$(CNI_GO_MODULE)/gen/ipamv1 \
	  proto/ipam/v1/allocator.proto

# The CNI IPAM plugin, built into .bin/cni/ (a CNI_PATH entry of its own). It runs once per
# container, so its start-up is on the pod's path: static (no dynamic loader, no libc; the pure-Go
# resolver), without grpc-go's x/net/trace (grpcnotrace: it links net/http's html/template for a
# debug page), stripped. bench/README.md has what each of these saves.
CNI_BUILD_FLAGS := -trimpath -tags grpcnotrace -ldflags="-s -w"
cni: cni-proto
	cd clients/cni && CGO_ENABLED=0 go build $(CNI_BUILD_FLAGS) -o $(CNI_PLUGIN) .

# Generated Python code for proto/ipam/v1 (importable as ipam.v1); never edited by hand.
proto:
	@rm -rf gen/ipam && mkdir -p gen
	$(PY) -m grpc_tools.protoc -Iproto --python_out=gen --pyi_out=gen --grpc_python_out=gen proto/ipam/v1/*.proto
	@touch gen/ipam/__init__.py gen/ipam/v1/__init__.py

# The cluster of docker-compose.yml as local processes; `IPAM_CLOUD=cluster-pool make run`: the
# same with no cloud for the nodes (bare-metal nodes, /28 blocks from the cluster pool).
run: setup
	$(PY) -m dev.devcluster

# The same with the ha profile: redis's replica and three Sentinels, the services through them
# (deploy/ha.env). `kill -9` the primary and watch `ipamctl status` follow the new master.
run-ha: setup
	set -a && . deploy/ha.env && set +a && $(PY) -m dev.devcluster --profile ha

test: cni-system setup cni $(CNITOOL)
	cd clients/cni && CGO_ENABLED=0 go test -tags grpcnotrace ./...
	IPAM_TESTS_REQUIRE_REDIS=1 $(PY) -m pytest -q -p no:cacheprovider tests

lint: setup
	$(VENV)/bin/ruff check services clients dev tests bench
	$(VENV)/bin/ruff format --check services clients dev tests bench

$(GHZ):
	GOBIN=$(GOBIN) go install github.com/bojand/ghz/cmd/ghz@$(GHZ_VERSION)

ghz: $(GHZ)

# Allocator throughput against a no-op ceiling, memory, and the worker's burst scenario.
bench: setup $(GHZ)
	$(PY) -m bench.run_bench --ghz $(GHZ)
	$(PY) -m bench.scale
	$(PY) -m bench.ha --ghz $(GHZ)

# Redis with a replica: AllocateNext with IPAM_REDIS_MIN_REPLICAS 1 against 0, and what callers see of
# a Sentinel failover (bench/ha.py).
bench-ha: setup $(GHZ)
	$(PY) -m bench.ha --ghz $(GHZ)

# The cloud worker at cluster scale: one full resync at 100, 300 and 1,000 nodes (bench/scale.py).
bench-scale: setup
	$(PY) -m bench.scale

# The CNI plugin against host-local: ADD then DEL, sequential and 8 in parallel (bench/cni.py).
bench-cni: cni-system setup cni $(CNITOOL)
	$(PY) -m bench.cni --plugin $(CNI_PLUGIN)

# Load profiles (bench/ghz/) against the running cluster (`make run` elsewhere); report in bench/out/load-<time>/.
load: setup $(GHZ)
	$(PY) -m bench.load --ghz $(GHZ)

clean:
	rm -rf gen/ipam clients/cni/gen $(VENV) .bin
