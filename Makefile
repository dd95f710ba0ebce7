# hypeman-ingress — `make run` and `make test` work on a fresh machine (they create .venv themselves).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?= $(CURDIR)/.run/data
ADMIN_PORT ?= 2019
DEMO_PORT ?= 9080

.PHONY: run test unit lint bench system-deps clean help

help:
	@echo "make run    - start the reconciler + embedded Caddy on examples/ (http://demo.localhost:8080)"
	@echo "make test   - install everything and run the whole suite (lint, types, tests)"
	@echo "make bench  - benchmarks (prints figures, writes bench-results.json)"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Debian packages the test suite needs (pebble for ACME tests, systemd for `systemd-analyze verify` of
# deploy/systemd, chromium for the dashboard's browser test). Skipped when already present.
system-deps:
	@missing=""; \
	if ! command -v pebble >/dev/null 2>&1 && [ ! -x /usr/bin/pebble ]; then missing="$$missing pebble"; fi; \
	if ! command -v systemd-analyze >/dev/null 2>&1; then missing="$$missing systemd"; fi; \
	if ! command -v chromium >/dev/null 2>&1; then missing="$$missing chromium"; fi; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian test deps:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null || \
	      echo "warning: could not install$$missing; their tests will fail under make test (skipped elsewhere)"; \
	  fi; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check reconciler tests bench examples
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q -m "not caddy"

test: $(STAMP) system-deps lint
	HYPEMAN_REQUIRE_PEBBLE=1 HYPEMAN_REQUIRE_FAULTS=1 HYPEMAN_REQUIRE_SYSTEMD=1 HYPEMAN_REQUIRE_CHROMIUM=1 $(BIN)/pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(BIN)/python -m bench

run: $(STAMP)
	@mkdir -p $(DATA)
	@$(BIN)/python examples/demo_backend.py --port $(DEMO_PORT) & echo $$! > .run/demo-backend.pid; \
	trap 'kill $$(cat .run/demo-backend.pid) 2>/dev/null' EXIT; \
	echo "demo backend on 127.0.0.1:$(DEMO_PORT); try:  curl -H 'Host: demo.localhost' http://127.0.0.1:8080/"; \
	CADDY_ADMIN_PORT=$(ADMIN_PORT) CADDY_LISTEN_ADDRESS=127.0.0.1 CADDY_HTTP_PORT=8080 CADDY_HTTPS_PORT=8443 CADDY_STOP_ON_SHUTDOWN=true \
	  $(BIN)/hypeman-ingress --log-format console run --data-dir $(DATA) \
	  --manifests examples/manifests --instances examples/instances

clean:
	rm -rf $(VENV) .run .pytest_cache .mypy_cache .ruff_cache bench-results.json test-artifacts
