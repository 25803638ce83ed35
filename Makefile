# Marquee: `make run` sets up, builds and starts everything locally; `make test` runs every test.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
CACHE ?= $(or $(MARQUEE_CACHE),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/marquee)
VENV := $(CACHE)/venv
export PATH := $(VENV)/bin:$(HOME)/.cargo/bin:$(PATH)
export MARQUEE_MODEL_REPO := $(CURDIR)/model-repository

.PHONY: help setup build build-release models run test test-rust test-python test-clients test-deploy test-docs bench lint fmt clean

help:
	@echo "make run    set up, build, start the gateway and the three model services locally, print how to call them"
	@echo "make test   set up, build, run every test (Rust unit + end-to-end, Python clients, docs examples)"
	@echo "make bench  benchmarks; figures go to bench/RESULTS.md"
	@echo "make lint   cargo fmt --check and clippy -D warnings"

setup:
	@bash scripts/bootstrap.sh

models: setup

build: setup
	cargo build --workspace --bins

build-release: setup
	cargo build --release --workspace --bins

run: build-release
	@bash scripts/run-local.sh target/release

test: setup
	cargo build --workspace --bins
	cargo test --workspace --no-fail-fast 2>&1 | tee target/cargo-test.log
	$(MAKE) --no-print-directory test-clients
	$(MAKE) --no-print-directory test-deploy
	$(MAKE) --no-print-directory test-python
	$(MAKE) --no-print-directory test-docs

# The Helm chart, dashboards, alert rules and tracing (tests/deploy): offline, real tools
# (helm-python-sdk, kubernetes-validate, promtool), and the real services with the chart's configs.
test-deploy:
	MARQUEE_BIN_DIR=$(CURDIR)/target/debug $(VENV)/bin/python -m pytest -q tests/deploy

test-python:
	MARQUEE_BIN_DIR=$(CURDIR)/target/debug $(VENV)/bin/python -m pytest -q tests/python

# The polyglot clients (Python package generated from proto/, Node example, the `marquee` CLI)
# against a real gateway. A separate pytest process: the generated OIP stubs and tritonclient's
# both define proto package `inference`, which protobuf refuses to load twice in one process.
PY_CLIENT_STAMP := target/.stamps/marquee-client
NODE_DEPS := clients/node/node_modules/.package-lock.json

$(PY_CLIENT_STAMP): $(shell find proto clients/python/setup.py clients/python/pyproject.toml clients/python/src -name '*.proto' -o -name '*.py' -o -name '*.toml' 2>/dev/null)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps --force-reinstall ./clients/python
	@mkdir -p $(@D) && touch $@

$(NODE_DEPS): clients/node/package-lock.json
	npm ci --prefix clients/node --no-audit --no-fund --prefer-offline

test-clients: $(PY_CLIENT_STAMP) $(NODE_DEPS)
	MARQUEE_BIN_DIR=$(CURDIR)/target/debug $(VENV)/bin/python -m pytest -q clients

# The runnable examples of README.md and docs/*.md (tests/docs): grpcurl, the `marquee` CLI,
# Python and Node, run against the real services so a stale example fails.
test-docs: $(PY_CLIENT_STAMP) $(NODE_DEPS)
	MARQUEE_BIN_DIR=$(CURDIR)/target/debug $(VENV)/bin/python -m pytest -q tests/docs

bench: build-release
	MARQUEE_BENCH_PYTHON=$(VENV)/bin/python target/release/marquee-bench all --repo $(MARQUEE_MODEL_REPO) --out bench/RESULTS.md

lint: setup
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

fmt:
	cargo fmt --all

clean:
	cargo clean
	rm -f model-repository
