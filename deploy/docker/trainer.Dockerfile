# Production trainer image: CUDA PyTorch base + tiktoken, the trusted trainer package baked in.
# Build with `autoresearch image build` (sandbox.images.build_production_image: the build context is
# this file plus trainer/). The daemon also bind-mounts the host's trainer/ read-only over
# /opt/autoresearch/trainer, so the baked copy is only a fallback for manual runs.
FROM pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime
RUN pip install --no-cache-dir "tiktoken>=0.8" "numpy>=1.26" \
    && useradd --uid 1000 --create-home --shell /usr/sbin/nologin trainer \
    && mkdir -p /candidate /data /checkpoint /out \
    && chown 1000:1000 /out
COPY trainer /opt/autoresearch/trainer
ENV PYTHONPATH=/opt/autoresearch \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    TRITON_CACHE_DIR=/tmp/triton \
    TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
USER 1000
WORKDIR /out
