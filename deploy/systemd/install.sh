#!/usr/bin/env bash
# Install hypeman-ingress as a systemd service (run as root from a checkout of this repository):
#   sudo deploy/systemd/install.sh           # user, dirs, venv, unit, env file; then enable it yourself
#   sudo systemctl enable --now hypeman-ingress
# Idempotent: an existing env file is never overwritten (the new template lands next to it as .new).
# DESTDIR=/some/root installs into a staging root (packaging, tests) and skips useradd/systemctl there.
set -euo pipefail

repo="$(cd "$(dirname "$0")/../.." && pwd)"
DESTDIR="${DESTDIR:-}"
PREFIX="${PREFIX:-/opt/hypeman-ingress}"
USER_NAME="${USER_NAME:-hypeman-ingress}"
PYTHON="${PYTHON:-python3}"
unit_dir="$DESTDIR/etc/systemd/system"
conf_dir="$DESTDIR/etc/hypeman-ingress"
data_dir="$DESTDIR/var/lib/hypeman"

if [ -z "$DESTDIR" ] && [ "$(id -u)" != 0 ]; then
  echo "install.sh: run as root (or set DESTDIR to stage the files)" >&2
  exit 1
fi

if [ -z "$DESTDIR" ] && ! id "$USER_NAME" >/dev/null 2>&1; then
  useradd --system --home-dir /var/lib/hypeman --no-create-home --shell /usr/sbin/nologin "$USER_NAME"
  echo "created system user $USER_NAME"
fi

install -d -m 0755 "$unit_dir" "$DESTDIR$PREFIX"
install -d -m 0750 "$conf_dir" "$data_dir"
if [ -z "$DESTDIR" ]; then
  chown "root:$USER_NAME" "$conf_dir"
  chown "$USER_NAME:$USER_NAME" "$data_dir"
fi

if [ "${SKIP_VENV:-0}" != 1 ]; then
  "$PYTHON" -m venv "$DESTDIR$PREFIX/venv"
  "$DESTDIR$PREFIX/venv/bin/python" -m pip install --quiet --upgrade pip
  "$DESTDIR$PREFIX/venv/bin/python" -m pip install --quiet "$repo"
  echo "installed hypeman-ingress into $PREFIX/venv"
fi

sed "s#/opt/hypeman-ingress#$PREFIX#g; s#^User=hypeman-ingress#User=$USER_NAME#; s#^Group=hypeman-ingress#Group=$USER_NAME#" \
  "$repo/deploy/systemd/hypeman-ingress.service" > "$unit_dir/hypeman-ingress.service"
chmod 0644 "$unit_dir/hypeman-ingress.service"

env_file="$conf_dir/hypeman-ingress.env"
if [ -e "$env_file" ]; then
  install -m 0640 "$repo/deploy/systemd/hypeman-ingress.env" "$env_file.new"
  echo "kept $env_file (the current template is $env_file.new)"
else
  install -m 0640 "$repo/deploy/systemd/hypeman-ingress.env" "$env_file"
fi
if [ -z "$DESTDIR" ]; then
  chown "root:$USER_NAME" "$env_file"
  systemctl daemon-reload || true
  echo "next: edit $env_file, then: systemctl enable --now hypeman-ingress"
fi
