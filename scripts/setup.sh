#!/usr/bin/env bash
# Idempotent set-up for `make test` / `make demo`. Each step says what it does and skips itself when done.
# Steps: venv | services (docker engine, prometheus + alertmanager binaries, chromium, debootstrap,
# postgres server binaries, slurm-wlm + munge binaries).
#
# A shared lab server: set-up installs only what is missing (apt, --no-install-recommends, with no service
# started by the package and none left enabled), and it never stops, kills or restarts anything it did not
# start (never by name). It never starts or restarts the host's Postgres: the test suite runs its own
# cluster (tests/pgcluster.py) and its own Prometheus/Alertmanager on free ports.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
POLICY_RC=${POLICY_RC:-/usr/sbin/policy-rc.d}
say() { printf '[setup] %s\n' "$*"; }

have_systemd() { [ -d /run/systemd/system ]; }

# Install packages without recommends, with a policy-rc.d that forbids starting services for the duration
# (an existing policy-rc.d is left alone), then disable the units the new packages enabled (the units of
# packages that were already installed are not touched).
apt_install() {
  local pkg new=() placed=""
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || new+=("$pkg"); done
  [ ${#new[@]} -gt 0 ] || return 0
  if [ -z "${_APT_UPDATED:-}" ]; then say "apt-get update"; apt-get update -qq; _APT_UPDATED=1; fi
  if [ ! -e "$POLICY_RC" ]; then
    printf '#!/bin/sh\n# autoresearch set-up: no service starts during this install\nexit 101\n' > "$POLICY_RC"
    chmod 755 "$POLICY_RC"; placed=1
  fi
  say "apt-get install --no-install-recommends ${new[*]} (services of these packages are not started)"
  local rc=0
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${new[@]}" >/dev/null || rc=$?
  [ -z "$placed" ] || rm -f "$POLICY_RC"
  [ "$rc" -eq 0 ] || return "$rc"
  if have_systemd; then
    local unit
    for pkg in "${new[@]}"; do
      for unit in $(dpkg -L "$pkg" 2>/dev/null | grep -E '^/(usr/)?lib/systemd/system/[^/]+\.(service|socket|timer)$' \
                    | xargs -r -n1 basename); do
        if systemctl is-enabled --quiet "$unit" 2>/dev/null; then
          say "disabling $unit (enabled by the package just installed; not started)"
          systemctl disable --quiet "$unit" || true
        fi
      done
    done
  fi
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

# A dockerd is running when its pidfile names a live process (then it is never restarted, even if it does
# not answer: that engine belongs to whoever started it).
dockerd_running() {
  local pidfile=${DOCKERD_PIDFILE:-/var/run/docker.pid} pid
  [ -f "$pidfile" ] || return 1
  pid=$(cat "$pidfile" 2>/dev/null) || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

step_docker() {
  if docker info >/dev/null 2>&1; then say "docker engine answers"; return; fi
  if dockerd_running; then
    say "a dockerd is running (pid $(cat "${DOCKERD_PIDFILE:-/var/run/docker.pid}")) but \`docker info\` fails;" \
        "not touching it: check your access to /var/run/docker.sock"
    return 1
  fi
  command -v dockerd >/dev/null 2>&1 || apt_install docker.io
  if have_systemd; then
    say "no dockerd is running: starting docker.service (systemctl start; nothing else is changed)"
    systemctl start docker
  else
    say "no dockerd is running and no systemd: starting dockerd in the background (log: /var/log/dockerd.log)"
    nohup dockerd >/var/log/dockerd.log 2>&1 &
  fi
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && { say "docker engine up"; return; }; sleep 1; done
  say "dockerd did not answer within 60 s; see /var/log/dockerd.log or journalctl -u docker"; return 1
}

# Only the binaries: the tests run their own Prometheus and Alertmanager on free ports. Without recommends,
# Debian's prometheus does not pull prometheus-node-exporter (which would listen on every interface).
step_prometheus() {
  local missing=()
  command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
  command -v prometheus-alertmanager >/dev/null 2>&1 || command -v alertmanager >/dev/null 2>&1 \
    || missing+=(prometheus-alertmanager)
  if [ ${#missing[@]} -eq 0 ]; then say "prometheus, promtool and alertmanager present"; return; fi
  apt_install "${missing[@]}"
}

step_chromium() {
  if command -v chromium >/dev/null 2>&1; then say "chromium present"; return; fi
  apt_install chromium
}

step_debootstrap() {
  if command -v debootstrap >/dev/null 2>&1; then say "debootstrap present"; return; fi
  apt_install debootstrap
}

# The server binaries only (initdb, pg_ctl, postgres): the suite initdb's a cluster of its own in a temp dir
# on a free port. The host's Postgres (if any) is neither started nor restarted.
step_postgres() {
  if compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || command -v initdb >/dev/null 2>&1; then
    say "postgres server binaries present (the suite runs its own cluster; the host's is left alone)"; return
  fi
  apt_install postgresql-15
}

# The Slurm tests start a private single-node cluster (tests/slurmcluster.py: its own munge key, socket,
# ports and state dirs); only the binaries are installed here, no slurmctld/slurmd/munged is started.
step_slurm() {
  local missing=()
  command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 && command -v sbatch >/dev/null 2>&1 \
    || missing+=(slurm-wlm)
  command -v munged >/dev/null 2>&1 || missing+=(munge)
  if [ ${#missing[@]} -eq 0 ]; then say "slurm-wlm and munge present (the suite runs its own cluster)"; return; fi
  apt_install "${missing[@]}"
}

for step in "$@"; do
  case "$step" in
    venv) step_venv ;;
    docker) step_docker ;;
    services) step_docker; step_prometheus; step_chromium; step_debootstrap; step_postgres; step_slurm ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
