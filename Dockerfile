# BLIP2 caption service: `docker run --gpus all -p 7777:7777 -v blip2-models:/models IMAGE`
# PyPI's torch wheels carry CUDA, so this slim base runs on GPU hosts and on CPU-only hosts.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PROJECT_ENVIRONMENT=/app/.venv \
    PATH=/app/.venv/bin:$PATH \
    MODEL_DIR=/models \
    EMOJI_CACHE_DIR=/models/emoji-cache \
    PORT=7777

WORKDIR /app

# The same install commands as `make sync`: uv from pip, then the locked environment.
RUN pip install --no-cache-dir uv==0.13.9
COPY pyproject.toml uv.lock ./
RUN uv sync --frozen --no-dev --no-cache --no-install-project

COPY . .
RUN uv sync --frozen --no-dev --no-cache \
    && useradd --create-home --uid 10001 blip \
    && mkdir -p /models \
    && chown -R blip:blip /models /app
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
