# One entry point for people and CI. `make run` serves, `make test` proves it works.
SHELL := /bin/bash
UV := $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
PY := .venv/bin/python
TINY := models/tiny-shapes/model.yaml
PORT ?= 7777

.PHONY: uv sync sync-test run demo test test-gpu doctor lint format hadolint train-tiny eval-tiny bench \
	requirements

# Install uv with pip when it is missing (the only bootstrap step).
uv:
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv==0.13.9

sync: uv
	$(UV) sync --frozen

# Tests also need the `ray` group (the CLI's --ray); the service image does not carry it.
sync-test: uv
	$(UV) sync --frozen --group ray

run: sync
	$(PY) REST.py

# The whole service around the small model this project trains and ships.
demo: sync
	AUTO_UPDATE=$${AUTO_UPDATE:-false} MODEL_CONFIG=$(TINY) $(PY) REST.py --port $(PORT)

lint: sync-test
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: sync
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

hadolint: sync-test
	.venv/bin/hadolint Dockerfile

test: sync-test lint hadolint
	$(PY) -m pytest

# What this machine can run the model on, and why (exit status 1 when DEVICE cannot be used).
doctor: sync
	$(PY) blip2_model.py doctor

# The CUDA tests (skipped with the diagnosed reason by `make test` on machines without a GPU).
test-gpu: sync
	$(PY) -m pytest -m cuda

train-tiny: sync
	$(PY) scripts/train_tiny_shapes.py

eval-tiny: sync
	rm -rf /tmp/tiny-eval && $(PY) scripts/train_tiny_shapes.py --sample 200 --seed 991 --out /tmp/tiny-eval
	$(PY) scripts/eval_tiny_shapes.py /tmp/tiny-eval

bench: sync
	$(PY) benchmarks/model_speed.py
	$(PY) benchmarks/load.py

# requirements.installed.txt mirrors uv.lock for installs without uv (pip --no-deps).
requirements: uv
	$(UV) export --frozen --no-hashes --no-emit-project --all-groups -o requirements.installed.txt
