# jobsvc: `make run` serves, `make test` proves. Both bootstrap .venv on a fresh Debian 12 machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LISTEN ?= 127.0.0.1:50051
STATE ?= .jobsvc
# cgroup v2 forbids processes beside delegated controllers: on a v2 host with systemd, the server and the system
# tests start in a scope of their own with the controllers delegated (a v1 or hybrid host needs nothing)
DELEGATE := $(shell [ "$$(stat -fc %T /sys/fs/cgroup 2>/dev/null)" = cgroup2fs ] && [ -d /run/systemd/system ] \
	&& command -v systemd-run >/dev/null && echo "systemd-run --scope -p Delegate=yes --quiet --")

.PHONY: all venv test unit-test system-test lint proto run serve-dev clean bench vm-box vm-test

all: test

$(PY):
	@if ! $(PYTHON) -c 'import ensurepip, venv' 2>/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv python3-pip; fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q -e '.[dev]'
	@# an editable install leaves the project uncompiled; with PYTHONDONTWRITEBYTECODE every jobctl run would
	@# compile it again (about 15 ms of its start-up)
	$(PY) -m compileall -q jobsvc cli >/dev/null
	@touch $@

venv: $(STAMP)

test: unit-test system-test

unit-test: $(STAMP)
	$(PY) -m pytest -q tests/unit

system-test: $(STAMP)
	@# -rs: a skipped system test says why (not root, no cgroups), e.g. when `make test` runs as another user
	$(DELEGATE) $(PY) -m pytest -q -rs tests/system

# mypy --strict on jobsvc, jobctl and the tests. The tests import jobctl, the installed name of cli/ (setuptools maps
# it; mypy cannot follow that): a link $(TYPING)/jobctl -> cli/ lets mypy check cli/ once, under that name.
TYPING := $(VENV)/typing

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	@mkdir -p $(TYPING) && ln -sfn $(CURDIR)/cli $(TYPING)/jobctl
	MYPYPATH=$(TYPING) $(VENV)/bin/mypy jobsvc $(TYPING)/jobctl tests
	@# the dependency direction of docs/ARCHITECTURE.md ([tool.importlinter] in pyproject.toml)
	$(VENV)/bin/lint-imports --no-cache

proto: $(STAMP)
	$(PY) proto/generate.py jobsvc/_pb

bench: $(STAMP)
	@$(PY) -c 'import matplotlib' 2>/dev/null || $(PY) -m pip install -q -e '.[bench]'
	$(PY) -m bench $(BENCH_ARGS)

# the root check comes first, before anything is installed: jobsvc creates cgroups and runs jobs as their own uids
run:
	@if [ "$$(id -u)" != 0 ]; then \
		echo "jobsvc serve must run as root (it creates cgroups and runs each job as its own uid): sudo make run" >&2; \
		exit 1; fi
	@$(MAKE) --no-print-directory serve-dev

serve-dev: $(STAMP)
	@if [ -z "$$(ls -A $(STATE)/pki 2>/dev/null)" ]; then \
		$(VENV)/bin/jobsvc pki init $(STATE)/pki --user alice --user bob; fi
	@echo "# point jobctl at this server (these are also jobctl's defaults when run from this directory):"
	@echo "export JOBCTL_TARGET=$(LISTEN)"
	@echo "export JOBCTL_CA_CERT=$(CURDIR)/$(STATE)/pki/ca.pem"
	@echo "export JOBCTL_CLIENT_CERT=$(CURDIR)/$(STATE)/pki/alice.pem JOBCTL_CLIENT_KEY=$(CURDIR)/$(STATE)/pki/alice-key.pem"
	@echo "export PATH=$(CURDIR)/$(VENV)/bin:\$$PATH"
	@echo "# jobsvc stays in the foreground on $(LISTEN); Ctrl-C stops it and its jobs"
	exec $(DELEGATE) $(VENV)/bin/jobsvc serve --listen $(LISTEN) --state-dir $(STATE)/state \
		--ca-cert $(STATE)/pki/ca.pem --server-cert $(STATE)/pki/server.pem --server-key $(STATE)/pki/server-key.pem

# -- VM harness (vm/README.md): the system tests inside a cgroup-v1 Debian guest, built offline -------------
VM_VENV := vm/.venv
VM_STAMP := $(VM_VENV)/.installed

$(VM_STAMP): vm/requirements.txt
	@if ! $(PYTHON) -c 'import ensurepip, venv' 2>/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv python3-pip; fi
	$(PYTHON) -m venv $(VM_VENV)
	$(VM_VENV)/bin/python -m pip install -q -r vm/requirements.txt
	@touch $@

vm-box: $(VM_STAMP)
	$(VM_VENV)/bin/python vm/harness.py box

# CGROUP=v2 (or JOBSVC_VM_CGROUP=v2): the same box booted with the unified hierarchy; v1 by default
vm-test: $(VM_STAMP)
	JOBSVC_VM_CGROUP=$(or $(CGROUP),$(JOBSVC_VM_CGROUP),v1) $(VM_VENV)/bin/python vm/harness.py test

clean:
	rm -rf $(VENV) $(VM_VENV) vm/.out build *.egg-info .pytest_cache .mypy_cache .ruff_cache .import_linter_cache bench/results/*.tmp
	find . -name __pycache__ -prune -exec rm -rf {} +
