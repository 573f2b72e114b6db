# Self-documenting: `make help` lists the targets.
PY ?= .venv/bin/python
.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

install: ## create .venv with the exact pins of requirements.lock
	python3.11 -m venv .venv
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .

sample: ## write the bundled sample into data/raw (refuses a folder holding your data)
	$(PY) -m imgclf.pipeline.sample

install-gpu: ## install, with TensorFlow's CUDA build (requirements-gpu.lock; Linux x86-64 + NVIDIA driver)
	python3.11 -m venv .venv
	$(PY) -m pip install -q -r requirements-gpu.lock
	$(PY) -m pip install -q --no-deps -e .

# `dvc repro` ends every run that ran a stage with "Use `dvc push` to send your updates to
# remote storage." (hard-coded in DVC): shown here only when a default remote is set.
DVC_REPRO = bash -o pipefail -c '"$$0" -m dvc repro | { if "$$0" -m dvc remote default >/dev/null 2>&1; then cat; else grep -v "^Use .dvc push. to send" || true; fi; }' $(PY)

run: ## the whole pipeline: your data/raw, or the bundled sample when you have none
	$(PY) -m imgclf.pipeline.sample --unless-user-data
	$(PY) -m dvc add -q data/raw
	$(DVC_REPRO)

repro: ## run the DVC pipeline (only what changed; "Use dvc push" only when a remote is set)
	$(DVC_REPRO)

best: ## the experiments of each baseline with their own figures and verdicts, and the best
	$(PY) -m imgclf.experiments

apply-best: ## dvc exp apply the best promoted experiment (its bundle is then served)
	$(PY) -m imgclf.experiments --apply

test: ## lint + every tier: unit, integration, e2e (the README's and CI's command)
	$(PY) -m pytest

test-fast: ## lint + the unit tier only: in-process, no DVC repo, no server process (< 1 min)
	$(PY) -m pytest -m unit

test-integration: ## real server processes, sockets and browsers (tests/integration)
	$(PY) -m pytest -m integration

test-e2e: ## the pipeline through DVC in throw-away repositories (tests/e2e)
	$(PY) -m pytest -m e2e

lint: ## fix lint and format
	.venv/bin/ruff check --fix . && .venv/bin/ruff format .

serve: ## serve the promoted bundle over HTTP, TCP 1235 and a web page
	$(PY) serve/server.py

tracking-server: ## MLflow on PostgreSQL on loopback (a team trial; data in .cache/tracking-server)
	$(PY) -m imgclf.tracking.server --dir .cache/tracking-server --port 5000

bench: ## run the benchmarks (about 8 min), write benchmarks/RESULTS.md
	$(PY) -m pip install -q --no-deps -r requirements-bench.lock
	$(PY) -m benchmarks

.PHONY: help install install-gpu sample run repro best apply-best test test-fast test-integration test-e2e lint serve \
	tracking-server bench
