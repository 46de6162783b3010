# syntax=docker/dockerfile:1
# The online ranker: `python -m ranker serve` against an external Triton (RANKER_TRITON_URL).
# Build from the repository root:  docker build -f deploy/docker/ranker.Dockerfile -t ranker:TAG .
# The release is not in the image; the pod copies it in from the release image (docs/deploy.md).

# Exact tag: the same Python minor as the tests (3.11) on the same Debian as the dev machines.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
COPY deploy/docker/requirements-ranker.txt /tmp/requirements.txt
# The file is the service's whole dependency closure pinned as in requirements.lock
# (scripts/runtime_requirements.py), so --no-deps installs exactly that set; wheels only, no compiler.
RUN /opt/venv/bin/pip install --no-deps --only-binary=:all: -r /tmp/requirements.txt

FROM ${PYTHON_IMAGE}
# A fixed numeric uid: Kubernetes' runAsNonRoot can only verify a numeric USER.
RUN groupadd --system --gid 10001 ranker \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin ranker
COPY --from=build /opt/venv /opt/venv
# Only the online package: offline/ (torch) and tests stay out of the image.
COPY ranker /app/ranker
WORKDIR /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RANKER_HEALTH_PORT=50052
USER 10001:10001
# 50051: gRPC (RANKER_PORT); 50052: grpc.health.v1 alone, plaintext even when 50051 takes TLS
# (RANKER_HEALTH_PORT); 9464: Prometheus metrics (RANKER_METRICS_PORT).
EXPOSE 50051 50052 9464
# Start-up loads the release and waits up to RANKER_TRITON_STARTUP_WAIT_S (120 s) for Triton.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-m", "ranker", "health", "--target", "localhost:50052"]
ENTRYPOINT ["python", "-m", "ranker", "serve"]
