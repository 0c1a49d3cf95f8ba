# syntax=docker/dockerfile:1
# Two images from one build of the wheels:
#   docker build --target proxy    -t llmgw-proxy .     the data plane the operator deploys (the default target)
#   docker build --target operator -t llmgw-operator .  the Kubernetes operator
# Each installs one distribution (and thereby llm-gateway-common, the `llmgw` command): the proxy image
# llm-gateway-proxy, the operator image llm-gateway-operator; neither holds the other's code or dependencies,
# nor llm-gateway-dev. Both run as uid/gid 10001 with `llmgw` as the entry point; no compiler and no wheel
# files are left in either image. tests/test_dockerfile.py lints this file, runs its RUN steps outside
# Docker and checks what each image holds.

# The base image, pinned by its full tag: Python's patch release and Debian's release. To pin its digest as well,
# append what `docker buildx imagetools inspect <it>` prints as Digest: `...-slim-trixie@sha256:<digest>`.
ARG BASE_IMAGE=docker.io/library/python:3.11.14-slim-trixie
# The project's version (every distribution's pyproject.toml): the wheels the final stages install, and a label.
ARG VERSION=0.1.0

FROM ${BASE_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# Wheels in /wheels: llm-gateway-common, llm-gateway-proxy and llm-gateway-operator (each folder its own
# pyproject.toml) and every dependency of theirs. The proxy and the operator require llm-gateway-common==0.1.0,
# which pip takes from ./common. dev/ (llm-gateway-dev) is not in the build context.
FROM base AS builder
WORKDIR /src
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --upgrade pip==26.3 grpcio-tools==1.85.1
COPY proto ./proto
COPY hack/gen_proto.py ./hack/
COPY common ./common
COPY proxy_image ./proxy_image
COPY operator ./operator
# The protobuf code is generated here (.dockerignore keeps the committed copy out of the context), so the
# image never depends on what was committed.
RUN --mount=type=cache,target=/root/.cache/pip \
    python hack/gen_proto.py proxy_image \
    && pip wheel --wheel-dir /wheels ./common ./proxy_image ./operator

# What both images share: the labels and the unprivileged user (uid/gid 10001, no home, no shell).
FROM base AS runtime
ARG BASE_IMAGE
ARG VERSION
LABEL org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
RUN groupadd --gid 10001 llmgw \
    && useradd --uid 10001 --gid 10001 --no-log-init --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin llmgw

# The operator: llm-gateway-operator (kopf, lightkube) and llm-gateway-common. kopf's liveness endpoint
# listens on :8080 (/healthz).
FROM runtime AS operator
ARG VERSION
LABEL org.opencontainers.image.title="llmgw-operator" \
      org.opencontainers.image.description="Kubernetes operator for gRPC+Protobuf LLM gateways"
# The wheels are mounted from the builder, never copied into a layer; the venv is made without pip, and the
# base image's pip installs into it from /wheels alone.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv --without-pip /opt/llmgw \
    && python -m pip --python /opt/llmgw/bin/python install --no-cache-dir --no-index \
       --find-links /wheels "llm-gateway-operator==${VERSION}"
ENV VIRTUAL_ENV=/opt/llmgw \
    PATH=/opt/llmgw/bin:$PATH \
    LLMGW_HEALTH_LISTEN=0.0.0.0:8080
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["llmgw"]
CMD ["operator"]

# The proxy: llm-gateway-proxy and llm-gateway-common. Listens for gRPC on 50051, REST on 8080 and the
# admin endpoints (/metrics, /healthz, /readyz) on 9090 unless its configuration says otherwise.
FROM runtime AS proxy
ARG VERSION
LABEL org.opencontainers.image.title="llmgw-proxy" \
      org.opencontainers.image.description="gRPC+Protobuf and OpenAI-compatible REST proxy for LLM providers"
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv --without-pip /opt/llmgw \
    && python -m pip --python /opt/llmgw/bin/python install --no-cache-dir --no-index \
       --find-links /wheels "llm-gateway-proxy==${VERSION}"
ENV VIRTUAL_ENV=/opt/llmgw \
    PATH=/opt/llmgw/bin:$PATH
USER 10001:10001
EXPOSE 50051 8080 9090
ENTRYPOINT ["llmgw"]
CMD ["proxy", "--config", "/etc/llmgw/config.yaml"]
