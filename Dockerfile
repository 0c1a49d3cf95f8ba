# syntax=docker/dockerfile:1
# Multi-stage build of the llm-gateway image. Target `proxy` is the data plane the operator deploys.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS builder
WORKDIR /src
RUN pip install --no-cache-dir --upgrade pip==25.3 build==1.3.0 grpcio-tools==1.85.1
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY hack ./hack
COPY proxy_image ./proxy_image
COPY operator ./operator
# Generate the protobuf code in the build, so the image never depends on what was committed.
RUN python hack/gen_proto.py proxy_image && pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:${PYTHON_VERSION}-slim AS proxy
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin llmgw
COPY --from=builder /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 10001
EXPOSE 50051 8080 9090
ENTRYPOINT ["llmgw", "proxy"]
CMD ["--config", "/etc/llmgw/config.yaml"]
