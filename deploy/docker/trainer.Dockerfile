# The trainer image: ONE recipe for CPU and CUDA, with or without a registry. Built by
# `autoresearch image build` (sandbox/images.py), which downloads every wheel on the host into wheels/
# (the build itself needs no network) and passes:
#   BASE_IMAGE  a debootstrap'ed Debian bookworm minbase with python3, python3-dev and gcc/g++,
#               `docker import`ed (no registry), or python:3.11-slim-bookworm where a registry exists
#   TORCH_VERSION, TORCH_CUDA ("none" for the CPU build), VARIANT (cpu|cuda), IMAGE_BASE, INPUTS (hash), EXTRAS
# torch's CUDA build carries the CUDA runtime (nvidia-* wheels); the host gives only the driver, through
# the NVIDIA container toolkit. gcc/g++ and Python.h are there for Triton and Inductor (torch.compile).
# The packages go to /opt/pylib in a first stage, so the final image holds them once (not the wheels too);
# a .pth file puts it on sys.path whatever PYTHONPATH a run sets.
# pip compiles bytecode here on purpose: the root fs is read-only at run time.
# The val pools of the embedded `stdlib` data source (STDLIB_VAL_POOLS in trainer/prepare.py; a test checks the
# list below against it) leave every Python in the image, whatever the base, with their bytecode, so that no val
# document is readable in a train container; the build fails if python3 still finds one, or lacks the C _decimal
# (decimal's fallback _pydecimal is in the list). None of them is imported by torch or the trainer.
ARG BASE_IMAGE
FROM ${BASE_IMAGE} AS install
ARG TORCH_VERSION
ARG EXTRAS
COPY wheels /wheels
RUN python3 -m pip install --no-index --find-links /wheels --no-cache-dir --disable-pip-version-check \
        --break-system-packages --target /opt/pylib "torch==${TORCH_VERSION}" ${EXTRAS}

FROM ${BASE_IMAGE}
ARG TORCH_VERSION
ARG TORCH_CUDA=none
ARG VARIANT
ARG IMAGE_BASE
ARG INPUTS
LABEL org.autoresearch.torch="${TORCH_VERSION}" \
      org.autoresearch.torch_cuda="${TORCH_CUDA}" \
      org.autoresearch.variant="${VARIANT}" \
      org.autoresearch.base="${IMAGE_BASE}" \
      org.autoresearch.inputs="${INPUTS}"
COPY --from=install /opt/pylib /opt/pylib
RUN (command -v gcc && command -v g++ && test -n "$(find / -name Python.h -path '*python3.11*' -print -quit)") \
        >/dev/null 2>&1 || (apt-get update && apt-get install -y --no-install-recommends gcc g++ libc6-dev \
        && rm -rf /var/lib/apt/lists/*) \
    && purelib="$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    && mkdir -p "$purelib" && echo /opt/pylib > "$purelib/autoresearch.pth" \
    && useradd --uid 1000 --create-home --shell /usr/sbin/nologin trainer \
    && mkdir -p /opt/autoresearch/trainer /candidate /data /checkpoint /out \
    && chown 1000:1000 /out \
    && val_pools="idlelib tkinter turtledemo test pydoc_data turtle.py _pydecimal.py aifc.py asynchat.py asyncore.py \
        cgi.py cgitb.py chunk.py crypt.py imghdr.py imp.py mailcap.py nntplib.py pipes.py smtpd.py sndhdr.py sunau.py \
        telnetlib.py uu.py xdrlib.py" \
    && stdlibs="$(find / -xdev -type d -regex '.*/lib/python3\.[0-9]+' -print)" && test -n "$stdlibs" \
    && for stdlib in $stdlibs; do for part in $val_pools; do \
           rm -rf "$stdlib/$part" "$stdlib/__pycache__/${part%.py}".*.pyc; done; done \
    && python3 -c 'import sys, _decimal, importlib.util as u; \
left = [p for p in sys.argv[1:] if u.find_spec(p.removesuffix(".py"))]; \
sys.exit(f"the stdlib val pool parts {left} are still in the image" if left else 0)' $val_pools
ENV PYTHONPATH=/opt/autoresearch \
    PATH=/opt/pylib/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    OMP_NUM_THREADS=1 \
    TRITON_CACHE_DIR=/tmp/triton \
    TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
USER 1000
WORKDIR /out
