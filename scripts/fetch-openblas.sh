#!/usr/bin/env bash
# Unpacks Debian's OpenBLAS (libopenblas0-pthread) and the Fortran runtime it
# needs into VENV/lib/krserve-blas/, where the worker loads it before mlx
# (worker-py/krserve_worker/blas.py): the mlx[cpu] wheel for Linux bundles the
# reference BLAS, ~70x slower for float32 matmuls. Nothing is installed
# system-wide. Linux only; elsewhere (or without apt-get) it says so and
# exits 0: the server still works, on the bundled BLAS.
#   scripts/fetch-openblas.sh [VENV]        (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv}
dest=$venv/lib/krserve-blas
if [ -f "$dest/libopenblas.so.0" ]; then exit 0; fi
if [ "$(uname -s)" != Linux ]; then exit 0; fi
if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg >/dev/null 2>&1; then
  echo "fetch-openblas: no apt-get/dpkg here; mlx will use its bundled reference BLAS (slow float32 matmuls)." >&2
  echo "fetch-openblas: to fix, put libopenblas.so.0 (and libgfortran.so.5) in $dest or set KRSERVE_WORKER_BLAS=DIR." >&2
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pkgs=(libopenblas0-pthread libgfortran5)
# libquadmath exists only on some architectures (x86-64 among them).
if apt-cache show libquadmath0 >/dev/null 2>&1; then pkgs+=(libquadmath0); fi
(cd "$tmp" && { apt-get download "${pkgs[@]}" >/dev/null 2>&1 || { apt-get update -qq >/dev/null && apt-get download "${pkgs[@]}" >/dev/null; }; })
for d in "$tmp"/*.deb; do dpkg -x "$d" "$tmp/x"; done
mkdir -p "$dest.tmp"
find_one() { find "$tmp/x" -name "$1" \( -type f -o -type l \) | grep -v '/openblas-serial/' | head -n 1; }
for lib in libopenblas.so.0 libgfortran.so.5 libquadmath.so.0; do
  src=$(find_one "$lib")
  if [ -n "$src" ]; then cp -L "$src" "$dest.tmp/$lib"; fi
done
test -f "$dest.tmp/libopenblas.so.0" || { echo "fetch-openblas: libopenblas.so.0 not found in the packages" >&2; exit 1; }
rm -rf "$dest" && mv "$dest.tmp" "$dest"
echo "fetch-openblas: $(ls "$dest" | tr '\n' ' ')in $dest" >&2
