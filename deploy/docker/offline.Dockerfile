# Offline CPU trainer image (tests, CI, machines without a registry). Built by
# `autoresearch image build --offline` (sandbox/images.py): BASE_IMAGE is a debootstrap'ed Debian
# bookworm minbase with python3, `docker import`ed; wheels/ holds torch (CPU) and its dependencies,
# downloaded on the host, so this build needs no network at all. pip compiles bytecode here on purpose:
# the root fs is read-only at run time, so without .pyc files every stage would recompile torch on import.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
COPY wheels /wheels
RUN pip install --no-index --find-links /wheels --break-system-packages --no-cache-dir \
        torch==2.13.0 numpy tiktoken \
    && rm -rf /wheels \
    && useradd --uid 1000 --create-home --shell /usr/sbin/nologin trainer \
    && mkdir -p /opt/autoresearch/trainer /candidate /data /checkpoint /out \
    && chown 1000:1000 /out
ENV PYTHONPATH=/opt/autoresearch \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    OMP_NUM_THREADS=1
USER 1000
WORKDIR /out
