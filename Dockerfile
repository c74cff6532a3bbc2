# syntax=docker/dockerfile:1
# gtaseg's job image: every job of the Kubernetes deployments in prefect.yaml (a training cell on
# 1..N GPUs, the sweep) runs it as shipped. Runtime dependencies only: requirements/torch.txt and
# requirements/runtime.txt, the lock's runtime subset (scripts/runtime_requirements.py; no test
# tools). The code and project files sit in /app, the job's writable working folder.
#   export GTASEG_IMAGE=registry.example.com/gtaseg/train:$(git rev-parse --short HEAD)
#   docker build --build-arg GIT_COMMIT="$(git rev-parse HEAD)" -t "$GTASEG_IMAGE" .
#   docker run --rm --gpus all --shm-size 8g "$GTASEG_IMAGE" python -c \
#     "import torch; print(torch.cuda.is_available())"
FROM python:3.11-slim-bookworm

# The wheel index torch and torchvision come from, with the CUDA runtime, cuDNN and NCCL that
# build pins: pick the CUDA version your nodes' NVIDIA driver supports (cu130: R580 or newer;
# cu128: R570 or newer; https://download.pytorch.org/whl/cpu for CPU-only nodes).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
# The commit the image is built from: MLflow runs record it (the image holds no .git).
ARG GIT_COMMIT=unknown

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    MPLBACKEND=Agg \
    GIT_PYTHON_REFRESH=quiet \
    GTASEG_GIT_COMMIT=$GIT_COMMIT \
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=180 \
    MALLOC_MMAP_THRESHOLD_=33554432 \
    MALLOC_TRIM_THRESHOLD_=268435456 \
    MALLOC_TOP_PAD_=67108864

# tini as PID 1 reaps children and, with -g, sends each signal to the whole process group: a
# SIGTERM (pre-emption, a cancelled flow run) reaches torchrun's training workers, not only the
# flow-run process, so they checkpoint before the grace period ends. The job's user (uid 1000,
# the Kubernetes template's runAsUser) owns /app: the jobs write their data, splits and run
# folders there.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && python -m venv "$VIRTUAL_ENV" \
    && useradd --create-home --uid 1000 --user-group --shell /usr/sbin/nologin gtaseg \
    && install -d -o gtaseg -g gtaseg /app

WORKDIR /app
# The requirements alone first: this layer (torch and CUDA, several GB) is rebuilt only when they
# change.
COPY requirements/torch.txt requirements/runtime.txt requirements/
RUN pip install --index-url "$TORCH_INDEX_URL" -r requirements/torch.txt \
    && pip install -r requirements/runtime.txt

COPY --chown=gtaseg:gtaseg . .
RUN pip install --no-deps . && rm -rf build ./*.egg-info

USER gtaseg
# Any command runs as given: `gtaseg ...`, `torchrun ...`, or Prefect's `prefect flow-run execute`.
ENTRYPOINT ["/usr/bin/tini", "-g", "--"]
CMD ["gtaseg", "--help"]
