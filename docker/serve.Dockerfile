# syntax=docker/dockerfile:1
# Serving image: Ray Serve (`serve run` starts a single-node Ray head inside the container) with
# the attnlm app on 0.0.0.0:8000. The exported model folder (`attnlm export`) is mounted at
# /artifacts/model, never baked in.
#   docker build -f docker/serve.Dockerfile -t attnlm-serve .
#   docker run --rm --shm-size 2g -p 127.0.0.1:8000:8000 -v "$PWD/artifacts/tiny:/artifacts/model:ro" attnlm-serve
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

# TOKENIZERS_PARALLELISM is a switch, not a secret (DL3064 matches on the word TOKEN).
# hadolint ignore=DL3064
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TOKENIZERS_PARALLELISM=false \
    RAY_AUTH_MODE=disabled \
    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serving.proxy:middlewares

WORKDIR /app

# The project is installed from pyproject.toml as the Makefile does, but non-editable and without
# the dev extras. torch is NOT reinstalled: it comes from the base image (its CUDA build), and the
# `torch>=2.4` range in pyproject.toml is satisfied by it, so pip keeps it.
COPY pyproject.toml README.md ./
COPY attnlm ./attnlm
COPY training ./training
COPY serving ./serving
RUN pip install --no-cache-dir . \
    && python -c "import torch, attnlm, serving.app; print('torch', torch.__version__)"

# configs/serve.yaml binds 127.0.0.1 (host use); the container copy binds 0.0.0.0 and serves
# /artifacts/model. Everything else (deployments, batching, limits) is the same.
COPY configs ./configs
COPY docker/serve.docker.yaml ./configs/serve.docker.yaml

RUN (getent passwd 1000 >/dev/null || useradd --create-home --uid 1000 --shell /bin/bash attnlm) \
    && mkdir -p /artifacts/model \
    && chown -R 1000:1000 /artifacts
USER 1000:1000

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request, sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status == 200 else 1)"]

CMD ["serve", "run", "configs/serve.docker.yaml"]
