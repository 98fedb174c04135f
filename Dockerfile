# syntax=docker/dockerfile:1
# Two images from one file, both non-root (uid 1000) and able to run with a read-only root
# filesystem:
#   operator  the controller, webhook and receivers (no torch, ~150 MB)
#   engine    the trainer (python -m rl_engine.train) and Ray Serve (ray start), with PyTorch
#
# With a registry (Docker, Podman, BuildKit), the default base is used unchanged:
#   docker build --target operator -t rlops/operator:0.1.0 .
#   docker build --target engine   -t rlops/engine:0.1.0 .
# Without one, `make images` builds a Debian bookworm base with mmdebstrap (Python 3.11 from
# Debian) and passes it as BASE (hack/images.sh).
ARG BASE=python:3.11-slim

FROM ${BASE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN python3 -m venv /opt/venv \
    && useradd --uid 1000 --user-group --create-home --home-dir /home/rlops rlops
# Each image installs its dependencies in a layer of their own, from pyproject.toml alone, and its
# code in the next one: a change of the code reuses the dependency layer (PyTorch with its CUDA
# libraries is ~6 GB of the engine), so a new commit adds megabytes, not gigabytes, to the build
# cache and to a node's image store. `requirements PYPROJECT [EXTRA...]` prints the dependencies.
RUN printf '%s\n' '#!/opt/venv/bin/python' 'import sys, tomllib' \
      'project = tomllib.load(open(sys.argv[1], "rb"))["project"]' \
      'extras = [r for e in sys.argv[2:] for r in project["optional-dependencies"][e]]' \
      'print(*project["dependencies"], *extras, sep="\n")' >/usr/local/bin/requirements \
    && chmod 755 /usr/local/bin/requirements

FROM base AS operator
COPY operator/pyproject.toml /tmp/operator.toml
RUN --mount=type=cache,target=/root/.cache/pip \
    requirements /tmp/operator.toml >/tmp/requirements.txt \
    && pip install --disable-pip-version-check -r /tmp/requirements.txt && rm /tmp/requirements.txt /tmp/*.toml
COPY operator/ /src/operator/
# rl_engine without its dependencies (no torch, no ray): the operator imports only
# rl_engine.serving.contract from it (standard library only), the names that it shares with the
# serving application (router, version entries, metric names).
COPY rl_engine/ /src/rl_engine/
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --disable-pip-version-check --no-deps /src/operator && pip check \
    && pip install --disable-pip-version-check --no-deps /src/rl_engine && rm -rf /src
USER 1000:1000
WORKDIR /home/rlops
ENTRYPOINT ["python", "-m", "rl_operator"]

FROM base AS engine
COPY rl_engine/pyproject.toml /tmp/engine.toml
# PyPI's torch wheel for Linux carries its CUDA libraries (the image runs on GPU nodes and, more
# slowly, on CPU-only ones).
RUN --mount=type=cache,target=/root/.cache/pip \
    requirements /tmp/engine.toml s3 >/tmp/requirements.txt \
    && pip install --disable-pip-version-check -r /tmp/requirements.txt && rm /tmp/requirements.txt /tmp/*.toml
COPY rl_engine/ /src/rl_engine/
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --disable-pip-version-check --no-deps /src/rl_engine && rm -rf /src && pip check
USER 1000:1000
WORKDIR /home/rlops
# The operator sets the command (python -m rl_engine.train) and the run config in the Job.
CMD ["python", "-m", "rl_engine.train", "--help"]
