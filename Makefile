# Fincrypt developer tasks. `make test` is the test command CI runs (via .ci/run).
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# Debian packages needed to build and run pyfuse3 (FUSE 3 + a C toolchain + Python headers) and the leaf
# hashing accelerator (OpenSSL headers).
APT_PACKAGES := fuse3 libfuse3-dev pkg-config python3-venv python3-dev gcc libssl-dev

.PHONY: help setup system-deps test lint bench run clean

help:
	@echo "make setup  - install system packages (as root, if missing) and create $(VENV)"
	@echo "make test   - run the test suite"
	@echo "make lint   - ruff + mypy"
	@echo "make bench  - run every bench/*.py"
	@echo "make run    - set everything up and run the main job"

setup: $(STAMP)

# Installs only what dpkg reports missing, and only as root; otherwise says what to install.
system-deps:
	@command -v dpkg >/dev/null 2>&1 || exit 0; \
	missing=""; \
	for p in $(APT_PACKAGES); do dpkg -s "$$p" >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	[ -z "$$missing" ] && exit 0; \
	if [ "$$(id -u)" = 0 ]; then \
		echo "apt-get install:$$missing"; \
		apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	else \
		echo "warning: missing Debian packages:$$missing (run 'make setup' as root, or apt-get install them)" >&2; \
	fi

# Rebuilt whenever the packaging metadata changes.
$(STAMP): setup.cfg setup.py pyproject.toml fincryptfs/core/_leafhash.c
	@$(MAKE) --no-print-directory system-deps
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	@echo "pip install -e '.[test]' into $(VENV)"
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@$(PY) -m compileall -q fincryptfs storaged mediatord >/dev/null  # as an install does: commands start faster
	@touch $@

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy fincryptfs storaged mediatord tests

bench: $(STAMP)
	@shopt -s nullglob; files=(bench/*.py); \
	if [ $${#files[@]} -eq 0 ]; then echo "no benchmarks in bench/"; exit 0; fi; \
	for f in "$${files[@]}"; do echo "== $$f"; $(PY) "$$f" || exit $$?; done

# The main job on the embedded default: one mediator and six storage nodes on 127.0.0.1 (bitcoinlib's offline
# test network, a funded account), mounted at ./Backed (or MOUNT=dir). Ctrl-C unmounts and stops everything.
MOUNT ?= Backed
DEVNET_HOME ?= .devnet
run: $(STAMP)
	$(VENV)/bin/fincryptfs devnet --home $(DEVNET_HOME) --mount $(MOUNT)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis .mypy_cache .ruff_cache
