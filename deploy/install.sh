#!/usr/bin/env bash
# Install or upgrade the autoresearch daemon as a systemd service. Idempotent: every step checks
# first and says "ok" when there is nothing to do, so re-running it is how you upgrade.
#
#   sudo deploy/install.sh                 install/upgrade from this source tree, enable the unit
#   deploy/install.sh --dry-run            print what would be done, change nothing
#   sudo deploy/install.sh --root /srv/img install into another root (image building, tests)
#   sudo deploy/install.sh --package autoresearch_daemon-0.2.0-py3-none-any.whl
#   sudo deploy/install.sh --rollback      back to the version before the last upgrade
#
# An upgrade never changes the code under a running daemon: the new version is installed into a fresh
# venv beside the old one, then the service is stopped (the running experiment finishes within the grace),
# the venvs are swapped, and the service is started; the new daemon backs the database up and migrates it
# under its lock at start-up. The old venv stays as venv.previous for --rollback (which first migrates the
# database back down to the old version's schema with the new code, then swaps back).
# Steps: system user `autoresearch` (in the docker group), directories, default config, virtualenv
# /opt/autoresearch/venv, systemd unit (+ a drop-in when no API key is installed), enable.
set -euo pipefail

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOT=/
DRY_RUN=0
PACKAGE=$SRC
PYTHON=python3
SERVICE_USER=autoresearch
ROLLBACK=0

usage() {
  sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  cat <<EOF
Options:
  --dry-run         print the actions, change nothing (needs no root)
  --root DIR        install below DIR instead of / (users via useradd --prefix; no systemctl start)
  --package SPEC    what pip installs into the venv: a source folder, a wheel, or a requirement
                    (default: $SRC)
  --python PATH     interpreter for the venv (Python >= 3.10; default: python3)
  --rollback        stop, migrate the database down to the previous version's schema, swap back to
                    the previous venv, start (only after an upgrade by this script)
EOF
}

die() { printf 'install: error: %s\n' "$1" >&2; [ -n "${2:-}" ] && printf '  what to do: %s\n' "$2" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --root) [ $# -ge 2 ] || die "--root needs a folder"; ROOT=$2; shift ;;
    --root=*) ROOT=${1#--root=} ;;
    --package) [ $# -ge 2 ] || die "--package needs a value"; PACKAGE=$2; shift ;;
    --package=*) PACKAGE=${1#--package=} ;;
    --python) [ $# -ge 2 ] || die "--python needs a path"; PYTHON=$2; shift ;;
    --python=*) PYTHON=${1#--python=} ;;
    --rollback) ROLLBACK=1 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown option '$1'" "see the options above" ;;
  esac
  shift
done

[ -d "$ROOT" ] || die "--root '$ROOT' is not a folder" "create it first"
ROOT=$(cd "$ROOT" && pwd)
# P prefixes every target path; empty for the real root so messages show the paths systemd uses.
if [ "$ROOT" = / ]; then P=""; else P=$ROOT; fi

ETC=$P/etc/autoresearch
CREDENTIALS=$ETC/credentials
STATE=$P/var/lib/autoresearch
OPT=$P/opt/autoresearch
VENV=$OPT/venv
UNIT_DIR=$P/etc/systemd/system
UNIT=$UNIT_DIR/autoresearch.service
DROPIN_DIR=$UNIT_DIR/autoresearch.service.d
NO_KEY_DROPIN=$DROPIN_DIR/10-no-api-key.conf

say() { printf '[install] %s\n' "$*"; }
ok() { say "ok: $*"; }
# Every change goes through `act`: printed always, executed unless --dry-run.
act() {
  local shown
  shown=$(printf ' %q' "$@")
  if [ "$DRY_RUN" = 1 ]; then say "would run:$shown"; else say "run:$shown"; "$@"; fi
}
write_file() {  # write_file PATH MODE < content
  local path=$1 mode=$2 content
  content=$(cat)
  if [ "$DRY_RUN" = 1 ]; then printf '[install] would write %s (mode %s)\n' "$path" "$mode"; return; fi
  say "write $path"
  printf '%s\n' "$content" > "$path"
  chmod "$mode" "$path"
}

if [ "$DRY_RUN" = 0 ] && [ "$(id -u)" != 0 ]; then
  die "installing needs root" "run it with sudo, or add --dry-run to see what it would do"
fi

# --- prerequisites -------------------------------------------------------------------------------
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null \
  || die "'$PYTHON' is not Python >= 3.10" "install python3 (and python3-venv), or pass --python PATH"
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null \
  || die "'$PYTHON' cannot create virtualenvs" "apt-get install python3-venv"

group_line() { if [ -z "$P" ]; then getent group "$1" || true; else grep "^$1:" "$P/etc/group" || true; fi; }
user_exists() { if [ -z "$P" ]; then getent passwd "$1" >/dev/null; else grep -q "^$1:" "$P/etc/passwd"; fi; }
service_id() {  # service_id u|g: the service user's uid/gid in the target root (its name in a dry run before it exists)
  if ! user_exists "$SERVICE_USER"; then echo "$SERVICE_USER"
  elif [ -z "$P" ]; then id "-$1" "$SERVICE_USER"
  else awk -F: -v u="$SERVICE_USER" -v f="$([ "$1" = u ] && echo 3 || echo 4)" '$1 == u { print $f }' "$P/etc/passwd"; fi
}
prefix_args=()
[ -n "$P" ] && prefix_args=(--prefix "$P")

[ -n "$(group_line docker)" ] \
  || die "there is no 'docker' group${P:+ in $P/etc/group}" "install Docker first (deploy/README.md, step 2)"

# --- user -----------------------------------------------------------------------------------------
if user_exists "$SERVICE_USER"; then
  ok "user $SERVICE_USER exists"
else
  act useradd "${prefix_args[@]}" --system --user-group --home-dir /var/lib/autoresearch \
    --no-create-home --shell /usr/sbin/nologin --comment "autoresearch daemon" "$SERVICE_USER"
fi
if group_line docker | cut -d: -f4 | tr ',' '\n' | grep -qx "$SERVICE_USER"; then
  ok "$SERVICE_USER is in the docker group"
else
  act usermod "${prefix_args[@]}" --append --groups docker "$SERVICE_USER"
fi

# --- directories ----------------------------------------------------------------------------------
ensure_dir() {  # ensure_dir PATH MODE OWNER(user|root) GROUP(user|root)
  local path=$1 mode=$2 uid=0 gid=0 want have
  if [ "$3" = user ]; then uid=$(service_id u); fi
  if [ "$4" = user ]; then gid=$(service_id g); fi
  want="$mode $uid $gid"
  have=$(stat -c '%a %u %g' "$path" 2>/dev/null || true)
  if [ "$have" = "$want" ]; then ok "$path"; return; fi
  act install -d -m "$mode" -o "$uid" -g "$gid" "$path"
}
ensure_dir "$ETC" 750 root user
ensure_dir "$CREDENTIALS" 700 root root
ensure_dir "$STATE" 750 user user
ensure_dir "$OPT" 755 root root
ensure_dir "$UNIT_DIR" 755 root root

# --- configuration (never overwritten: it is the admin's) ---------------------------------------
if [ -e "$ETC/autoresearch.toml" ]; then
  ok "$ETC/autoresearch.toml kept as it is"
else
  act install -m 0640 -o 0 -g "$(service_id g)" \
    "$SRC/deploy/autoresearch.toml.example" "$ETC/autoresearch.toml"
fi

# --- virtualenv -----------------------------------------------------------------------------------
package_digest() {  # changes whenever the package to install changes, so upgrades reinstall
  if [ -d "$PACKAGE" ]; then
    (cd "$PACKAGE" && find pyproject.toml daemon sandbox trainer -type f ! -path '*/__pycache__/*' -print0 \
      | sort -z | xargs -0 sha256sum) | sha256sum | cut -c1-16
  elif [ -f "$PACKAGE" ]; then
    sha256sum "$PACKAGE" | cut -c1-16
  else
    printf '%s' "$PACKAGE" | sha256sum | cut -c1-16
  fi
}
# $VENV is a link to one versioned venv ($OPT/venv-<digest>); the unit runs $VENV/bin/autoresearch. An
# upgrade installs the next version into its own folder while the daemon runs, and moves the link only
# once the daemon has stopped; `previous` records the folder to go back to.
STAMP_NAME=.autoresearch-installed
PREVIOUS_FILE=$OPT/previous
schema_head() {  # schema_head VENV: the head revision of that version's migrations (read, not imported)
  "$1/bin/python" - "$1" <<'PY'
import ast, glob, sys
revisions, downs = set(), set()
for path in glob.glob(f"{sys.argv[1]}/lib/python*/site-packages/daemon/store/migrations/versions/*.py"):
    for node in ast.parse(open(path, encoding="utf-8").read()).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            names = {t.id for t in node.targets if isinstance(t, ast.Name)}
            (revisions if "revision" in names else downs if "down_revision" in names else set()).add(node.value.value)
heads = sorted(revisions - downs)
sys.exit(1) if len(heads) != 1 else print(heads[0])
PY
}
service_active() { [ -z "$P" ] && systemctl is-active --quiet autoresearch.service 2>/dev/null; }
point_venv_at() {  # point_venv_at FOLDER: swap the link atomically (a new link renamed over the old one)
  act ln -sfn "$(basename "$1")" "$OPT/venv.link-new"
  act mv -T "$OPT/venv.link-new" "$VENV"
}

if [ "$ROLLBACK" = 1 ]; then
  PREVIOUS=$(cat "$PREVIOUS_FILE" 2>/dev/null || true)
  [ -n "$PREVIOUS" ] && [ -x "$OPT/$PREVIOUS/bin/python" ] \
    || die "no previous version recorded in $PREVIOUS_FILE" "a rollback follows an upgrade by this script"
  OLD_HEAD=$(schema_head "$OPT/$PREVIOUS") || die "cannot read the schema revision of $PREVIOUS" "reinstall it"
  was_active=0; service_active && was_active=1
  if [ "$was_active" = 1 ]; then act systemctl stop autoresearch.service; fi
  # The new code knows how to go down; the old code would refuse the newer schema. With the daemon's own
  # config and environment file, as its user (its files keep their owner).
  say "migrating the database down to $OLD_HEAD (the previous version's schema), after a backup"
  as_service=(); [ -z "$P" ] && as_service=(runuser -u "$SERVICE_USER" --)
  act "${as_service[@]}" bash -c 'set -a; [ -f "$1" ] && . "$1"; set +a; AUTORESEARCH_CONFIG=$2 exec "$3" db downgrade --to "$4"' \
    _ "$ETC/autoresearch.env" "$ETC/autoresearch.toml" "$VENV/bin/autoresearch" "$OLD_HEAD"
  point_venv_at "$OPT/$PREVIOUS"
  act rm -f "$PREVIOUS_FILE"
  if [ "$was_active" = 1 ]; then act systemctl start autoresearch.service; fi
  say "rolled back to $PREVIOUS (schema $OLD_HEAD)"
  exit 0
fi

WANT_DIGEST=$(package_digest)
TARGET=$OPT/venv-$WANT_DIGEST
CURRENT=""
if [ -L "$VENV" ]; then CURRENT=$(readlink "$VENV"); fi
if [ -d "$VENV" ] && [ ! -L "$VENV" ]; then  # the layout before versioned venvs: adopt it as a version
  legacy=venv-$(cat "$VENV/$STAMP_NAME" 2>/dev/null || echo legacy)
  act mv -T "$VENV" "$OPT/$legacy"
  [ "$DRY_RUN" = 1 ] || grep -rlI --null "$VENV/" "$OPT/$legacy/bin" 2>/dev/null \
    | xargs -0 -r sed -i "s#$VENV/#$OPT/$legacy/#g"  # its scripts named the old path
  point_venv_at "$OPT/$legacy"
  CURRENT=$legacy
fi
if [ "$CURRENT" = "venv-$WANT_DIGEST" ] && [ "$(cat "$TARGET/$STAMP_NAME" 2>/dev/null || true)" = "$WANT_DIGEST" ]; then
  ok "package already installed ($WANT_DIGEST)"
else
  if [ "$(cat "$TARGET/$STAMP_NAME" 2>/dev/null || true)" != "$WANT_DIGEST" ]; then
    act rm -rf "$TARGET"
    act "$PYTHON" -m venv "$TARGET"
    say "installing $PACKAGE into $TARGET${CURRENT:+ (beside the running version $CURRENT)}"
    act "$TARGET/bin/pip" install --disable-pip-version-check "$PACKAGE"
    [ "$DRY_RUN" = 1 ] || printf '%s\n' "$WANT_DIGEST" > "$TARGET/$STAMP_NAME"
  fi
  was_active=0; service_active && was_active=1
  if [ "$was_active" = 1 ]; then
    say "stopping the daemon (the running experiment finishes within scheduler.grace_s)"
    act systemctl stop autoresearch.service
  fi
  point_venv_at "$TARGET"
  if [ -n "$CURRENT" ]; then
    if [ "$DRY_RUN" = 1 ]; then say "would record $CURRENT in $PREVIOUS_FILE"; else printf '%s\n' "$CURRENT" > "$PREVIOUS_FILE"; fi
  fi
  if [ "$was_active" = 1 ]; then
    say "starting the new version: it backs the database up and migrates it under its lock"
    act systemctl start autoresearch.service
  fi
  [ -z "$CURRENT" ] || say "upgraded from $CURRENT ('install.sh --rollback' goes back)"
  # Versions older than the previous one are no longer needed.
  for old in "$OPT"/venv-*; do
    name=$(basename "$old")
    [ -d "$old" ] && [ "$name" != "venv-$WANT_DIGEST" ] && [ "$name" != "$CURRENT" ] && act rm -rf "$old"
  done
fi
if cmp -s "$SRC/deploy/README.md" "$OPT/README.md"; then
  ok "$OPT/README.md up to date"
else
  act install -m 0644 "$SRC/deploy/README.md" "$OPT/README.md"
fi

# --- systemd unit ---------------------------------------------------------------------------------
units_changed=0
if cmp -s "$SRC/deploy/systemd/autoresearch.service" "$UNIT"; then
  ok "$UNIT up to date"
else
  act install -m 0644 "$SRC/deploy/systemd/autoresearch.service" "$UNIT"
  units_changed=1
fi
# LoadCredential fails the start when its file is missing; without a key the daemon runs the
# offline agent, so the drop-in switches the credential off until a key is installed.
if [ -e "$CREDENTIALS/anthropic_api_key" ]; then
  if [ -e "$NO_KEY_DROPIN" ]; then act rm -f "$NO_KEY_DROPIN"; units_changed=1
  else ok "API key present at $CREDENTIALS/anthropic_api_key"; fi
elif [ -e "$NO_KEY_DROPIN" ]; then
  ok "no API key: offline agent (drop-in $NO_KEY_DROPIN)"
else
  ensure_dir "$DROPIN_DIR" 755 root root
  write_file "$NO_KEY_DROPIN" 0644 <<EOF
# Written by deploy/install.sh: /etc/autoresearch/credentials/anthropic_api_key does not exist, so
# the daemon runs the offline agent. To use Claude: put the key in that file (mode 0600, root),
# re-run install.sh (it removes this drop-in), then restart the service.
[Service]
LoadCredential=
UnsetEnvironment=AUTORESEARCH_AGENT__API_KEY_FILE
EOF
  units_changed=1
fi

if [ -z "$P" ]; then
  if [ "$units_changed" = 1 ]; then act systemctl daemon-reload; fi
  if systemctl is-enabled --quiet autoresearch.service 2>/dev/null; then ok "autoresearch.service enabled"
  else act systemctl enable autoresearch.service; fi
else
  if systemctl --root="$P" is-enabled --quiet autoresearch.service 2>/dev/null; then ok "autoresearch.service enabled"
  else act systemctl --root="$P" --quiet enable autoresearch.service; fi
fi

if [ "$DRY_RUN" = 1 ]; then say "dry run: nothing was changed"; exit 0; fi
say "done. Next (deploy/README.md): database, '$SERVICE_USER' workspace init + prepare, image build, then"
say "  systemctl start autoresearch && journalctl -fu autoresearch"
