# gpt2serve: the KServe predictor image. The model is not baked in: KServe mounts it (PVC) or
# its storage initializer copies it (S3) to /mnt/models. One Dockerfile, three tags
# (docs/deploy.md, "Images"):
#
#   REGISTRY/gpt2serve:0.1.0        torch from PyPI: CUDA 13.0, Turing..Blackwell (sm_75-sm_120),
#                                   NVIDIA driver >= 580
#   REGISTRY/gpt2serve:0.1.0-cu126  --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
#                                   --build-arg REQUIRE_CUDA_ARCH=sm_70
#                                   CUDA 12.6: Maxwell..Hopper incl. V100 (sm_50-sm_90), driver >= 525
#   REGISTRY/gpt2serve:0.1.0-cpu    --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
#
# The base is plain Debian Python, not nvidia/cuda: the torch wheels bring their own CUDA
# libraries (nvidia-* wheels), and the NVIDIA container runtime mounts the driver at run time.
ARG PYTHON_IMAGE=python:3.12-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG TORCH_INDEX_URL=https://pypi.org/simple
ARG TORCH_VERSION=2.13.0
# Fail the build when the wheel lacks this GPU architecture (torch.cuda.get_arch_list() reads
# the compiled list; it needs no GPU).
ARG REQUIRE_CUDA_ARCH=

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN python3 -m venv /opt/venv

RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && python3 -c "import sys, torch; archs = torch.cuda.get_arch_list(); \
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'arch list', archs); \
sys.exit('${REQUIRE_CUDA_ARCH}' not in archs and bool('${REQUIRE_CUDA_ARCH}'))"

WORKDIR /app
COPY pyproject.toml README.md constraints-cpu.txt ./
COPY setup.py ./
COPY src ./src
# The constraints pin kserve and friends to the versions CI tests; torch==2.13.0 in them also
# matches the +cu126 / +cpu builds installed above, so nothing is replaced. gcc builds our C
# kernels (setup.py) and leaves with its headers; libgomp1, their OpenMP runtime's soname,
# stays (torch's own copy is what they use once torch is loaded). The import check fails the
# build if the kernels were skipped. Not pinned: bookworm's security updates replace the exact
# versions, and the compiler leaves the image anyway.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev libgomp1 \
    && pip install -c constraints-cpu.txt . \
    && python3 -c "import torch, gpt2serve._kernels" \
    && apt-get purge -y --auto-remove gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* /app/src

RUN useradd --uid 1000 --create-home --shell /usr/sbin/nologin gpt2serve
USER 1000

EXPOSE 8080
# Kubernetes uses the probes in deploy/kserve/; this is for plain `docker run`.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/v2/health/ready', timeout=2)"]

ENTRYPOINT ["gpt2serve", "serve"]
CMD ["--model_dir", "/mnt/models", "--model_name", "aitextgen", "--http_port", "8080"]
