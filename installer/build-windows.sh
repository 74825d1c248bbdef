#!/usr/bin/env bash
# Builds the Windows installer on Linux: dist/Modron-Setup-<version>.exe, with makensis (apt install nsis)
# from installer/windows/modron.nsi, warnings treated as errors. It carries uv.exe, Modron's wheel, the
# dependency locks and the GPU -> torch picker; Python and PyTorch are downloaded on the user's machine.
#   installer/build-windows.sh
# Downloads (uv from PyPI) are cached in dist/cache/; installer/build-tools.sh has the shared steps.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
source installer/build-tools.sh   # UV_VERSION, PYTHON, CACHE, uv_bin, app_wheel

command -v makensis >/dev/null 2>&1 || { echo "build-windows.sh: makensis is missing (apt install nsis)" >&2; exit 2; }
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n 1)
OUT=$ROOT/dist/Modron-Setup-$VERSION.exe
mkdir -p "$CACHE"

STAGE=$(mktemp -d "${TMPDIR:-/tmp}/modron-build-win.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
WHEEL=$(basename "$(app_wheel "$STAGE")")
cp "$(uv_bin win_amd64 uv.exe)" installer/torch_select.py installer/write_record.py "$STAGE/"
cp -r installer/locks "$STAGE/locks"   # the release's dependency locks (installer/lock.py), one per torch

# MODRON_FAST_BUILD=1 (the tests): zlib instead of solid LZMA, a bigger file in a quarter of the time.
FAST=()
[ -n "${MODRON_FAST_BUILD:-}" ] && FAST=(-DCOMPRESSOR=zlib)
rm -f "$OUT"
makensis -WX -V2 -INPUTCHARSET UTF8 "${FAST[@]}" -DVERSION="$VERSION" -DSTAGE="$STAGE" -DWHEEL="$WHEEL" \
  -DOUTFILE="$OUT" installer/windows/modron.nsi >&2
echo "$OUT"
