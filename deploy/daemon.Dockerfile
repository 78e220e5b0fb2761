# The daemon as a container, for deploy/compose.yaml. The image holds only the dependencies; the code is
# the host's checkout, mounted at the same path (AUTORESEARCH_SRC): the sandbox containers the daemon
# starts bind-mount the trainer package and the workspace by *host* path, so both must match.
# Build from the repository root: docker compose -f deploy/compose.yaml build daemon
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*
# The daemon never trains: no torch at all (the trainer image has it; the package's `local` extra is not
# installed here).
COPY pyproject.toml /tmp/build/pyproject.toml
COPY daemon /tmp/build/daemon
COPY sandbox /tmp/build/sandbox
COPY trainer /tmp/build/trainer
# Install to get the dependencies, then drop the copy: the mounted checkout is what runs.
RUN pip install --no-cache-dir /tmp/build && pip uninstall -y autoresearch-daemon && rm -rf /tmp/build
ENTRYPOINT ["python", "-m", "daemon"]
