# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target operator -t ghcr.io/rlops/operator:0.1.0 .   (slim: no torch)
#   docker build --target trainer  -t ghcr.io/rlops/trainer:0.1.0 .    (CUDA PyTorch; CPU fallback)
# Not built in this project's CI: the dev machines have no container engine (see docs/architecture.md).

FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN useradd --uid 1000 --create-home rlops

FROM base AS operator-build
COPY operator/ /src/operator/
RUN pip wheel --wheel-dir /wheels /src/operator

FROM base AS operator
COPY --from=operator-build /wheels /wheels
RUN pip install /wheels/*.whl && rm -rf /wheels
USER 1000
ENTRYPOINT ["python", "-m", "rl_operator"]

FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 AS trainer
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv && useradd --uid 1000 --create-home rlops
ENV PATH=/opt/venv/bin:$PATH
COPY rl_engine/ /src/rl_engine/
RUN pip install /src/rl_engine && rm -rf /src
USER 1000
WORKDIR /home/rlops
# The operator sets the command (python -m rl_engine.train) and the run config in the Job.
CMD ["python", "-m", "rl_engine.train", "--help"]
