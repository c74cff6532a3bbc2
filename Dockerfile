# syntax=docker/dockerfile:1
# gtaseg training image, CUDA-capable. torch 2.14.1's Linux wheels bundle the CUDA 13 runtime, cuDNN
# and NCCL (the nvidia-* packages of the lock), so a plain Python base is enough: the host needs only
# an NVIDIA driver recent enough for CUDA 13 and the NVIDIA container toolkit.
#   docker build -t gtaseg-train:0.1.0 .
#   docker run --rm --gpus all --shm-size 8g gtaseg-train:0.1.0 gtaseg --help
#   docker run --rm --gpus all --shm-size 8g gtaseg-train:0.1.0 \
#     torchrun --standalone --nproc_per_node 2 -m gtaseg.cli train --config params.yaml --out runs/x
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    MPLBACKEND=Agg \
    GIT_PYTHON_REFRESH=quiet \
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=180

# tini as PID 1 forwards signals and reaps children, so cancelling a flow run stops every torchrun
# worker; the uid matches the Kubernetes template's runAsUser.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && python -m venv "$VIRTUAL_ENV" \
    && useradd --create-home --uid 1000 --user-group --shell /usr/sbin/nologin gtaseg

WORKDIR /app
# The lock alone first: this layer (torch and CUDA, several GB) is rebuilt only when the lock changes.
COPY requirements/lock.txt requirements/lock.txt
RUN pip install -r requirements/lock.txt

COPY --chown=gtaseg:gtaseg . .
RUN pip install --no-deps . && rm -rf build ./*.egg-info

USER gtaseg
# Any command runs as given: `gtaseg ...`, `torchrun ...`, or Prefect's `prefect flow-run execute`.
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["gtaseg", "--help"]
