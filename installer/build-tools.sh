#!/usr/bin/env bash
# What both installer builds need, with nothing but a stock python3 (3.10+, standard library only): no pip,
# no `wheel`, no venv module. Sourced by build-linux.sh and build-windows.sh; also runs on its own:
#   installer/build-tools.sh wheel OUTDIR    # -> Modron's wheel in OUTDIR (prints its path)
#   installer/build-tools.sh uv              # -> this machine's cached uv (prints its path)
# uv is taken from PyPI's uv wheels (checked against PyPI's sha256) and cached in dist/cache/; the app's
# wheel is built by that uv in its own throwaway build environment (pyproject's build-system.requires), so
# the python3 in use needs neither setuptools nor wheel ("invalid command 'bdist_wheel'" on a fresh machine).
set -euo pipefail
shopt -s inherit_errexit   # a failed download inside $(...) stops the build

UV_VERSION=0.13.9   # the uv bundled in both installers, and the one that builds the wheel and the locks
BT_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${MODRON_BUILD_CACHE:-$BT_ROOT/dist/cache}
# Any Python 3.10+ will do: only its standard library is used.
PYTHON=${PYTHON:-$( [ -x "$BT_ROOT/.venv/bin/python" ] && echo "$BT_ROOT/.venv/bin/python" || echo python3 )}

uv_bin() {   # uv_bin PLATFORM-TAG NAME -> path of the cached binary (uv or uv.exe)
  local dir=$CACHE/uv-$UV_VERSION-$1
  if [ ! -f "$dir/$2" ]; then
    rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
    "$PYTHON" - "$UV_VERSION" "$1" "$2" "$dir.tmp" <<'EOF' >&2
import hashlib, io, json, sys, urllib.request, zipfile
from pathlib import Path
version, platform, name, out = sys.argv[1:]
# PyPI's simple index in JSON (PEP 691): every file with its sha256.
req = urllib.request.Request("https://pypi.org/simple/uv/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
files = json.load(urllib.request.urlopen(req, timeout=60))["files"]
wheel = next(f for f in files if f["filename"].startswith(f"uv-{version}-") and platform in f["filename"]
             and f["filename"].endswith(".whl"))
data = urllib.request.urlopen(wheel["url"], timeout=300).read()
if hashlib.sha256(data).hexdigest() != wheel["hashes"]["sha256"]:
    sys.exit(f"build-tools.sh: {wheel['filename']} does not match PyPI's sha256")
with zipfile.ZipFile(io.BytesIO(data)) as z:   # the binary sits in the wheel's *.data/scripts/
    member = next(m for m in z.namelist() if m.endswith(f".data/scripts/{name}"))
    (Path(out) / name).write_bytes(z.read(member))
EOF
    chmod +x "$dir.tmp/$2"
    rm -rf "$dir" && mv "$dir.tmp" "$dir"
  fi
  echo "$dir/$2"
}

host_uv() { uv_bin manylinux_2_17_x86_64 uv; }   # the builds run on x86-64 Linux

app_wheel() {   # app_wheel OUTDIR -> path of Modron's wheel, built from the work tree
  local out=$1 uv src
  uv=$(host_uv)
  mkdir -p "$out"
  rm -f "$out"/modron-*.whl
  # From a clean copy of the files git knows (committed or not, ignored ones left out): setuptools reuses a
  # build/ folder in the tree, which keeps modules deleted since and would put them in the wheel.
  src=$(mktemp -d "${TMPDIR:-/tmp}/modron-src.XXXXXX")
  if git -C "$BT_ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$BT_ROOT" && git ls-files -z -co --exclude-standard \
       | tar --null -T - --ignore-failed-read -cf - 2>/dev/null) | tar -xf - -C "$src"   # (deleted files: skipped)
  else
    cp -r "$BT_ROOT/." "$src" && rm -rf "$src/build" "$src"/*.egg-info
  fi
  # uv builds in an isolated environment with setuptools and wheel from PyPI; --python: this Python, not
  # one uv would download. UV_NO_CONFIG: a developer's uv.toml does not change the build.
  UV_NO_CONFIG=1 "$uv" build --quiet --wheel --no-create-gitignore --python "$PYTHON" --out-dir "$out" "$src" >&2 \
    || { rm -rf "$src"; return 1; }
  rm -rf "$src"
  ls "$out"/modron-*.whl
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  case "${1:-}" in
    wheel) [ -n "${2:-}" ] || { echo "usage: $0 wheel OUTDIR" >&2; exit 2; }; app_wheel "$2" ;;
    uv) host_uv ;;
    *) echo "usage: $0 wheel OUTDIR | uv" >&2; exit 2 ;;
  esac
fi
