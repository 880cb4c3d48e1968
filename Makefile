# One entry point for people and CI. `make run` serves, `make test` proves it works.
SHELL := /bin/bash
# uv: the one on PATH, else a private copy in the user's cache (scripts/setup/uv.sh); the system
# Python is never touched (PEP 668 refuses `pip install` there on Debian 12 and Ubuntu 23.04+).
UV := scripts/setup/uv.sh
PY := .venv/bin/python
TINY := models/tiny-shapes/model.yaml
PORT ?= 7777

.PHONY: sync sync-test system-deps run demo test test-gpu doctor lint format hadolint train-tiny \
	eval-tiny bench requirements image test-image test-fresh gpu-kit

sync:
	$(UV) sync --frozen

# Tests also need the `ray` group (the CLI's --ray); the service image does not carry it.
sync-test:
	$(UV) sync --frozen --group ray

# The real programs the tests drive (redis-server, haproxy, chromium, the emoji font): installed
# with apt-get when missing and this is root; otherwise one message names them and the command.
system-deps:
	@scripts/setup/system_deps.sh test

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

test: system-deps sync-test lint hadolint
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

# The service image, built with docker or podman (a stand-in base when no registry answers).
image:
	@scripts/setup/system_deps.sh image
	scripts/image/build.sh

# Build the image, run it around the tiny model and check it from outside (docs/deploy.md).
test-image: image sync
	$(PY) scripts/image/check_image.py

# The README's two commands on a bare Debian 12 root (debootstrap + chroot; needs root).
test-fresh:
	scripts/fresh/test_fresh.sh

# requirements.installed.txt mirrors uv.lock for installs without uv (pip --no-deps).
requirements:
	$(UV) export --frozen --no-hashes --no-emit-project --all-groups -o requirements.installed.txt

# The GPU kit: pure-Python wheels, stubs and run.sh for a GPU host whose own Python stack is not
# ours (docs/gpu.md). Writes gpu-kit/ (ignored by git, at most 64 MiB).
gpu-kit: sync-test
	bash scripts/gpu_kit/build.sh
