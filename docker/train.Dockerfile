# syntax=docker/dockerfile:1
# Training image: `attnlm fit` on a CUDA host (GPUs via --gpus all / the NVIDIA container toolkit).
#   docker build -f docker/train.Dockerfile -t attnlm-train .
#   docker run --rm --gpus all --shm-size 8g -v "$PWD/runs:/runs" -v "$PWD/data_cache:/data/cache" attnlm-train
#   docker run ... attnlm-train fit --config configs/tiny.yaml
# Any PyTorch CUDA image with Python >= 3.10 serves as the base.
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

# TOKENIZERS_PARALLELISM is a switch, not a secret (DL3064 matches on the word TOKEN).
# hadolint ignore=DL3064
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TOKENIZERS_PARALLELISM=false

# configs/small.yaml sets model.compile: true. Triton JIT-builds a small C launcher at run time, and
# the PyTorch *runtime* images ship no C compiler (pytorch/pytorch#116696), so add one. Versions
# follow the base image's distribution release (unpinned on purpose: DL3008).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# The project is installed from pyproject.toml as the Makefile does, but non-editable and without
# the dev extras. torch is NOT reinstalled: it comes from the base image (its CUDA build), and the
# `torch>=2.4` range in pyproject.toml is satisfied by it, so pip keeps it.
COPY pyproject.toml README.md ./
COPY attnlm ./attnlm
COPY training ./training
COPY serving ./serving
RUN pip install --no-cache-dir . \
    && python -c "import torch, attnlm, training, serving; print('torch', torch.__version__)"

COPY configs ./configs

# Non-root user. Runs and data live in volumes, nothing is baked in: the configs' relative paths
# resolve into them (runs/small -> /runs/small, data_cache -> /data/cache), so any config or
# `--trainer.default_root_dir runs/X` lands on the /runs volume. Your own corpus: mount it under
# /data and pass --data.data_files /data/....
RUN (getent passwd 1000 >/dev/null || useradd --create-home --uid 1000 --shell /bin/bash attnlm) \
    && mkdir -p /runs /data/cache \
    && chown -R 1000:1000 /runs /data \
    && ln -s /runs /app/runs \
    && ln -s /data/cache /app/data_cache
USER 1000:1000
VOLUME ["/runs", "/data"]

ENTRYPOINT ["attnlm"]
CMD ["fit", "--config", "configs/small.yaml"]
