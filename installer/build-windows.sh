#!/usr/bin/env bash
# Builds the Windows installer on Linux: dist/Modron-Setup-<version>.exe, with makensis (apt install nsis)
# from installer/windows/modron.nsi, warnings treated as errors. It carries uv.exe, Modron's wheel and the
# GPU -> torch picker; Python and PyTorch are downloaded on the user's machine.
#   installer/build-windows.sh
# Downloads (the uv wheel from PyPI) are cached in dist/cache/.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
UV_VERSION=0.13.9   # the same uv as build-linux.sh
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}

command -v makensis >/dev/null 2>&1 || { echo "build-windows.sh: makensis is missing (apt install nsis)" >&2; exit 2; }
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n 1)
OUT=$ROOT/dist/Modron-Setup-$VERSION.exe
CACHE=$ROOT/dist/cache
mkdir -p "$CACHE"

UVDIR=$CACHE/uv-$UV_VERSION-win_amd64
if [ ! -f "$UVDIR/uv.exe" ]; then
  rm -rf "$UVDIR.tmp" && mkdir -p "$UVDIR.tmp"
  "$PYTHON" -m pip download -q "uv==$UV_VERSION" --only-binary :all: --no-deps --platform win_amd64 -d "$UVDIR.tmp"
  "$PYTHON" - "$UVDIR.tmp" <<'PY'
import sys, zipfile
from pathlib import Path
folder = Path(sys.argv[1])
with zipfile.ZipFile(next(folder.glob("uv-*.whl"))) as z:
    member = next(m for m in z.namelist() if m.endswith(".data/scripts/uv.exe"))
    (folder / "uv.exe").write_bytes(z.read(member))
PY
  rm -rf "$UVDIR" && mv "$UVDIR.tmp" "$UVDIR"
fi

STAGE=$(mktemp -d "${TMPDIR:-/tmp}/modron-build-win.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
"$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$STAGE" .
WHEEL=$(cd "$STAGE" && ls modron-"$VERSION"-*.whl)
cp "$UVDIR/uv.exe" installer/torch_select.py installer/write_record.py "$STAGE/"

# MODRON_FAST_BUILD=1 (the tests): zlib instead of solid LZMA, a bigger file in a quarter of the time.
FAST=()
[ -n "${MODRON_FAST_BUILD:-}" ] && FAST=(-DCOMPRESSOR=zlib)
rm -f "$OUT"
makensis -WX -V2 -INPUTCHARSET UTF8 "${FAST[@]}" -DVERSION="$VERSION" -DSTAGE="$STAGE" -DWHEEL="$WHEEL" \
  -DOUTFILE="$OUT" installer/windows/modron.nsi >&2
echo "$OUT"
