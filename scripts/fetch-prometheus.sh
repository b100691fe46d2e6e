#!/usr/bin/env bash
# Puts Debian's prometheus and promtool binaries under .cache/prometheus/ (no
# service is installed or started: the package is only unpacked).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.cache/prometheus
if [ -x "$dest/prometheus" ] && [ -x "$dest/promtool" ]; then exit 0; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if command -v apt-get >/dev/null 2>&1; then
  (cd "$tmp" && { apt-get download prometheus >/dev/null 2>&1 || { apt-get update -qq >/dev/null && apt-get download prometheus >/dev/null; }; })
  dpkg -x "$tmp"/prometheus_*.deb "$tmp/x"
  mkdir -p "$dest"
  cp "$tmp/x/usr/bin/prometheus" "$tmp/x/usr/bin/promtool" "$dest/"
elif command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
  mkdir -p "$dest"
  ln -sf "$(command -v prometheus)" "$dest/prometheus"
  ln -sf "$(command -v promtool)" "$dest/promtool"
else
  echo "cannot install prometheus here: no apt-get and none on PATH" >&2
  exit 1
fi
"$dest/promtool" --version | head -1
