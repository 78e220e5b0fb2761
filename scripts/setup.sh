#!/usr/bin/env bash
# Idempotent set-up for `make test` / `make demo` on a fresh machine. Each step says what it does and
# skips itself when already done. Steps: venv | services (docker engine, prometheus, chromium, postgres).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
say() { printf '[setup] %s\n' "$*"; }

apt_install() {
  if [ -z "${_APT_UPDATED:-}" ]; then say "apt-get update"; apt-get update -qq; _APT_UPDATED=1; fi
  say "apt-get install -y $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

step_venv() {
  local stamp="$VENV/.installed" want
  want=$(sha256sum pyproject.toml | cut -c1-16)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then say "virtualenv $VENV up to date"; return; fi
  if [ ! -x "$VENV/bin/python" ]; then say "creating virtualenv $VENV"; python3 -m venv "$VENV"; fi
  say "installing torch==2.13.0 (the CPU wheel on disk) first, so no CUDA build is downloaded"
  "$VENV/bin/pip" install -q --disable-pip-version-check torch==2.13.0
  say "installing the project and its dev tools (editable)"
  "$VENV/bin/pip" install -q --disable-pip-version-check -e '.[dev]'
  echo "$want" > "$stamp"
}

step_docker() {
  if docker info >/dev/null 2>&1; then say "docker engine answers"; return; fi
  command -v dockerd >/dev/null 2>&1 || apt_install docker.io
  say "starting dockerd in the background (log: /var/log/dockerd.log)"
  nohup dockerd >/var/log/dockerd.log 2>&1 &
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && { say "docker engine up"; return; }; sleep 1; done
  say "dockerd did not answer within 60 s; see /var/log/dockerd.log"; return 1
}

step_prometheus() {
  if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then say "prometheus present"; return; fi
  apt_install prometheus
  # Debian's package starts a system prometheus on :9090; tests run their own on free ports.
  (systemctl stop prometheus || pkill -x prometheus || true) >/dev/null 2>&1
}

step_chromium() {
  if command -v chromium >/dev/null 2>&1; then say "chromium present"; return; fi
  apt_install chromium
}

step_debootstrap() {
  if command -v debootstrap >/dev/null 2>&1; then say "debootstrap present"; return; fi
  apt_install debootstrap
}

step_postgres() {
  if pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then say "postgres answers on 127.0.0.1:5432"; return; fi
  say "starting postgres"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start
}

for step in "$@"; do
  case "$step" in
    venv) step_venv ;;
    services) step_docker; step_prometheus; step_chromium; step_debootstrap; step_postgres ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
