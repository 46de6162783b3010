# syntax=docker/dockerfile:1
# Triton for the release's models. Build from the repository root:
#   docker build -f deploy/docker/triton.Dockerfile -t ranker-triton:TAG .
# The GPU configs (config.pbtxt) use the image's onnxruntime backend and need nothing added; the CPU
# configs (configs/cpu.pbtxt, --model-config-name=cpu) run triton_models/onnx_runner.py in the python
# backend, which imports numpy and onnxruntime from the image's system Python.

# 24.10 is Triton 2.51, the server version the nvidia-pytriton wheel ships and the integration
# tests run against.
FROM nvcr.io/nvidia/tritonserver:24.10-py3

COPY deploy/docker/requirements-triton.txt /tmp/requirements-triton.txt
# The python backend stub uses the system interpreter, so the packages go there. Newer Ubuntu
# marks it externally managed (PEP 668); older pips ignore the unknown variable.
RUN PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-cache-dir --no-deps --only-binary=:all: \
        -r /tmp/requirements-triton.txt \
 && rm /tmp/requirements-triton.txt

# triton-server (uid/gid 1000) is created by the base image; numeric for runAsNonRoot.
USER 1000:1000
# 8000 HTTP (health, repository API), 8001 gRPC (the ranker), 8002 Prometheus metrics.
EXPOSE 8000 8001 8002
# python3 rather than curl: the python backend needs it, so it is in the image.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://localhost:8000/v2/health/ready', timeout=3)"]
# The base image's NVIDIA entrypoint stays (it sets up CUDA compatibility); run it with the
# command, e.g. `docker run IMAGE tritonserver --model-repository=...` (deploy/base/triton.yaml).
