# BLIP2 caption service: `docker run --gpus all -p 7777:7777 -v blip2-models:/models IMAGE`
# PyPI's torch wheels carry CUDA, so this slim base runs on GPU hosts and on CPU-only hosts.
# Two stages: the build stage bootstraps uv and installs the locked environment; the service
# stage copies it once, already owned by the service user, so no layer rewrites another's files.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build

ENV UV_LINK_MODE=copy \
    UV_PROJECT_ENVIRONMENT=/app/.venv \
    UV_PYTHON_DOWNLOADS=never \
    UV_NO_CACHE=1

WORKDIR /app

# uv into a private venv of the build stage (scripts/setup/uv.sh does the same on a host).
# Behind a TLS-intercepting proxy, give its CA as a build secret: `--secret id=extra_ca,src=ca.pem`
# (`make image EXTRA_CA=ca.pem`). It is trusted for this stage's downloads only, never stored.
COPY scripts/setup/build_env.sh /usr/local/bin/build-env
RUN --mount=type=secret,id=extra_ca \
    build-env python -m venv /opt/uv \
    && build-env /opt/uv/bin/pip install --no-cache-dir --disable-pip-version-check uv==0.13.9

# The locked environment only: it depends on pyproject.toml and uv.lock alone, so a code change
# rebuilds nothing but the small code layer. The service runs from /app (`python REST.py`), which
# puts the project's modules on sys.path; the project itself needs no install.
COPY pyproject.toml uv.lock ./
RUN --mount=type=secret,id=extra_ca \
    build-env /opt/uv/bin/uv sync --frozen --no-dev --no-install-project --compile-bytecode

FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/app/.venv/bin:$PATH \
    MODEL_DIR=/models \
    EMOJI_CACHE_DIR=/models/emoji-cache \
    PORT=7777

RUN useradd --create-home --uid 10001 blip \
    && mkdir -p /models /app \
    && chown blip:blip /models /app
WORKDIR /app

# One layer for the environment, one for the code; both owned by the service user from the start.
COPY --from=build --chown=10001:10001 /app/.venv /app/.venv
COPY --chown=10001:10001 . /app
USER 10001

# Weights (~1.8 GB) and the emoji cache survive container restarts.
VOLUME ["/models"]
EXPOSE 7777

# No curl in the image: ask /health with Python's standard library.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os,sys,urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '7777'), timeout=4).status == 200 else 1)"]

# SIGTERM starts a graceful drain (DRAIN_TIMEOUT, default 30 s): give `docker stop` longer,
# e.g. `docker stop -t 45` or `docker run --stop-timeout 45` (see docs/operations.md).
STOPSIGNAL SIGTERM
CMD ["python", "REST.py"]
