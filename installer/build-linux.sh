#!/usr/bin/env bash
# Builds the Linux installer: dist/modron-<version>-linux-x86_64.run, one self-extracting file (makeself)
# holding uv, Modron's wheel, the dependency locks, the GPU -> torch picker and the install/uninstall scripts.
#   installer/build-linux.sh            (needs: makeself (apt install makeself) and python3 3.10+; nothing else)
# Downloads (uv from PyPI) are cached in dist/cache/; installer/build-tools.sh has the shared steps.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
source installer/build-tools.sh   # UV_VERSION, PYTHON, CACHE, uv_bin, app_wheel

command -v makeself >/dev/null 2>&1 || { echo "build-linux.sh: makeself is missing (apt install makeself)" >&2; exit 2; }
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n 1)
OUT=$ROOT/dist/modron-$VERSION-linux-x86_64.run
mkdir -p "$CACHE"

STAGE=$(mktemp -d "${TMPDIR:-/tmp}/modron-build.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
cp "$(uv_bin manylinux_2_17_x86_64 uv)" "$STAGE/uv"
app_wheel "$STAGE" >/dev/null
cp installer/torch_select.py installer/write_record.py installer/verify_env.py installer/linux/install.sh installer/linux/uninstall.sh "$STAGE/"
cp resources/icons/modron.svg "$STAGE/"
cp -r installer/locks "$STAGE/locks"   # the release's dependency locks (installer/lock.py), one per torch
echo "$VERSION" > "$STAGE/VERSION"
chmod +x "$STAGE/install.sh" "$STAGE/uninstall.sh" "$STAGE/uv"

rm -f "$OUT"
makeself --quiet --sha256 --tar-quietly --noprogress "$STAGE" "$OUT" "Modron $VERSION installer" ./install.sh
echo "$OUT"
