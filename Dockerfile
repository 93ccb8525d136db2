# gpt2serve: the KServe predictor image. The model is not baked in: KServe's storage
# initializer puts it in /mnt/models (from a PVC or object storage).
#
# GPU (default):  docker build -t REGISTRY/gpt2serve:0.1.0 .
# CPU nodes:      docker build -t REGISTRY/gpt2serve:0.1.0-cpu \
#                   --build-arg BASE_IMAGE=ubuntu:24.04 \
#                   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
ARG BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

# PyPI's Linux torch wheels are CUDA builds and carry their own CUDA libraries; native FP16
# (no NVIDIA Apex). The CPU variant points this at PyTorch's CPU wheel index.
ARG TORCH_INDEX_URL=https://pypi.org/simple
ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install . && rm -rf /app/src

RUN useradd --uid 1000 --create-home --shell /usr/sbin/nologin gpt2serve
USER 1000

EXPOSE 8080
# Kubernetes uses the probes in deploy/kserve/; this is for plain `docker run`.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/v2/health/ready', timeout=2)"]

ENTRYPOINT ["gpt2serve", "serve"]
CMD ["--model_dir", "/mnt/models", "--model_name", "aitextgen", "--http_port", "8080"]
