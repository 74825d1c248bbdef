#!/usr/bin/env bash
# Builds the Linux installer: dist/modron-<version>-linux-x86_64.run, one self-extracting file (makeself)
# holding uv, Modron's wheel, the GPU -> torch picker and the install/uninstall scripts.
#   installer/build-linux.sh            (needs: makeself, python3 with pip; apt install makeself)
# Downloads (the uv wheel from PyPI) are cached in dist/cache/.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
UV_VERSION=0.13.9   # the uv bundled in both installers (build-windows.sh pins the same)
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}

command -v makeself >/dev/null 2>&1 || { echo "build-linux.sh: makeself is missing (apt install makeself)" >&2; exit 2; }
VERSION=$("$PYTHON" -c 'import tomllib, sys; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])' 2>/dev/null \
          || sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n 1)
OUT=$ROOT/dist/modron-$VERSION-linux-x86_64.run
CACHE=$ROOT/dist/cache
mkdir -p "$CACHE"

# uv from PyPI's manylinux wheel: the binary sits in the wheel's *.data/scripts/.
uv_bin() {   # uv_bin PLATFORM NAME -> path of the cached binary
  local platform=$1 name=$2 dir=$CACHE/uv-$UV_VERSION-$1
  if [ ! -f "$dir/$name" ]; then
    rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
    "$PYTHON" -m pip download -q "uv==$UV_VERSION" --only-binary :all: --no-deps --platform "$platform" \
      -d "$dir.tmp" >&2
    "$PYTHON" - "$dir.tmp" "$name" <<'EOF'
import sys, zipfile
from pathlib import Path
folder, name = Path(sys.argv[1]), sys.argv[2]
wheel = next(folder.glob("uv-*.whl"))
with zipfile.ZipFile(wheel) as z:
    member = next(m for m in z.namelist() if m.endswith(f".data/scripts/{name}"))
    (folder / name).write_bytes(z.read(member))
EOF
    chmod +x "$dir.tmp/$name"
    rm -rf "$dir" && mv "$dir.tmp" "$dir"
  fi
  echo "$dir/$name"
}

app_wheel() {   # the app's wheel, built once per version and source state -> its path
  local dir=$CACHE/wheel
  rm -rf "$dir" && mkdir -p "$dir"
  "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$dir" . >&2
  ls "$dir"/modron-"$VERSION"-*.whl
}

STAGE=$(mktemp -d "${TMPDIR:-/tmp}/modron-build.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
cp "$(uv_bin manylinux_2_17_x86_64 uv)" "$STAGE/uv"
cp "$(app_wheel)" "$STAGE/"
cp installer/torch_select.py installer/write_record.py installer/linux/install.sh installer/linux/uninstall.sh "$STAGE/"
cp resources/icons/modron.svg "$STAGE/"
echo "$VERSION" > "$STAGE/VERSION"
chmod +x "$STAGE/install.sh" "$STAGE/uninstall.sh" "$STAGE/uv"

rm -f "$OUT"
makeself --quiet --sha256 --tar-quietly --noprogress "$STAGE" "$OUT" "Modron $VERSION installer" ./install.sh
echo "$OUT"
