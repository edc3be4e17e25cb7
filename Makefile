# One command each: `make run` (default experiment end to end), `make test` (the suite).
# Both create .venv and install the project first; the install is skipped when pyproject.toml is unchanged.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SPEC ?= experiments/mae_vit_tiny_digits.yaml
ARGS ?=
PYTEST_ARGS ?=
export PYTHONUNBUFFERED := 1
export RAY_USAGE_STATS_ENABLED := 0
export RAY_DEDUP_LOGS := 0

.PHONY: install run test lint format bench sweep chain services services-stop cluster cluster-stop cluster-status clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q --upgrade pip
	$(PY) -m pip install --disable-pip-version-check -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

run: install
	$(PY) -m ssl_platform run $(SPEC) $(ARGS)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check ssl_platform methods tests benchmarks

format: install
	$(VENV)/bin/ruff format ssl_platform methods tests benchmarks

bench: install
	$(PY) -m benchmarks.run

sweep: install
	$(PY) -m ssl_platform sweep $(or $(SWEEP),experiments/sweeps/mae_mask_ratio.yaml) $(ARGS)

chain: install
	$(PY) -m ssl_platform chain $(or $(CHAIN),experiments/chains/salt_digits.yaml) $(ARGS)

services: install
	bash infra/local/services.sh start

services-stop:
	bash infra/local/services.sh stop

# A local multi-node Ray cluster: head 127.0.0.2 (dashboard :8265) + worker nodes 127.0.0.3/.4, token auth.
cluster: install
	bash infra/local/cluster.sh start

cluster-stop:
	bash infra/local/cluster.sh stop

cluster-status:
	bash infra/local/cluster.sh status

clean:
	rm -rf mlruns mlruns.db checkpoints ray_results outputs .pytest_cache .ruff_cache

# Cluster submission and registry (ssl_platform/launch/jobs.py, ssl_platform/tracking/model_registry.py).
.PHONY: submit promote models
ADDRESS ?= $(or $(RAY_API_SERVER_ADDRESS),http://127.0.0.1:8265)
MODEL ?= ssl-encoder
submit: install
	$(PY) -m ssl_platform submit $(SPEC) --address $(ADDRESS) --follow $(ARGS)

promote: install
	$(PY) -m ssl_platform promote $(RUN) --model $(MODEL) $(ARGS)

models: install
	$(PY) -m ssl_platform models $(MODEL) $(ARGS)
