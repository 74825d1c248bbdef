#!/usr/bin/env bash
# Modron's Linux installer, run from the self-extracting .run (or, for "Repair install", from its copy in
# ~/.local/share/modron/install/installer/). Per user, no root. Installs into
#   ${XDG_DATA_HOME:-~/.local/share}/modron/install/   uv, python/ (uv-managed), venv/, install.json, install.log,
#                                                      uninstall, installer/ (this script and its payload)
# and leaves the user's data (modron.db, runs/, swarm/) in the folder above untouched.
# A re-run upgrades or repairs in place: the new environment is built beside the old one and swapped
# in only when complete, so a killed install never leaves a half-built one in its place.
set -euo pipefail
umask 022

HERE=$(cd "$(dirname "$0")" && pwd)
VERSION=$(cat "$HERE/VERSION")
PYTHON_PIN=3.11   # the Python uv installs (this uv release pins the patch level)
STEPS=8

usage() {
  cat <<EOF
Modron $VERSION installer. Installs Modron for you (no root needed) into
  ${XDG_DATA_HOME:-$HOME/.local/share}/modron/install

Options:
  --python PATH        use this Python (3.10 or newer) instead of downloading Python $PYTHON_PIN
  --torch BUILD        install this PyTorch build instead of the one picked for your GPU
                       (cpu, cu118, cu126, cu128, cu130, rocm7.2)
  --torch-index URL    where PyTorch comes from (default: https://download.pytorch.org/whl/BUILD);
                       'none': from --find-links and PyPI only
  --cpu-index URL      where the CPU build comes from when falling back (default: the PyTorch CPU index;
                       'none': --find-links and PyPI)
  --find-links DIR     also look for wheels in DIR (offline installs)
  --cpu-fallback       if PyTorch for your GPU cannot be downloaded, install the CPU build instead
                       (without this flag you are asked; a script without a terminal gets an error)
  --autostart          start Modron when you log in;  --no-autostart: don't (default: leave as it is)
  --yes                ask nothing (for scripts)
  --repair             repair the install (the same as running the installer again): an environment
                       that is already right (same Python, PyTorch build, lock and Modron) is kept
  --rebuild            build the environment anew even if it looks right
  -h, --help           this help
EOF
}

PYTHON_ARG="" TORCH_ARG="" TORCH_INDEX="" CPU_INDEX="" FIND_LINKS="" CPU_FALLBACK="" AUTOSTART="" YES="" REBUILD=""
ORIG_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PYTHON_ARG=$2; ORIG_ARGS+=("$1" "$2"); shift ;;
    --torch) TORCH_ARG=$2; ORIG_ARGS+=("$1" "$2"); shift ;;
    --torch-index) TORCH_INDEX=$2; ORIG_ARGS+=("$1" "$2"); shift ;;
    --cpu-index) CPU_INDEX=$2; ORIG_ARGS+=("$1" "$2"); shift ;;
    --find-links) FIND_LINKS=$(cd "$2" && pwd); ORIG_ARGS+=("$1" "$FIND_LINKS"); shift ;;
    --cpu-fallback) CPU_FALLBACK=1 ;;
    --autostart) AUTOSTART=on ;;
    --no-autostart) AUTOSTART=off ;;
    --yes|-y) YES=1 ;;
    --repair) ;;
    --rebuild) REBUILD=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "Modron installer: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

DATA_HOME=${XDG_DATA_HOME:-$HOME/.local/share}
ROOT=$DATA_HOME/modron
INSTALL=$ROOT/install
VENV=$INSTALL/venv
NEW=$INSTALL/venv.new
LOG=$INSTALL/install.log
APPS=$DATA_HOME/applications
export UV_CACHE_DIR=${MODRON_UV_CACHE_DIR:-$INSTALL/cache}
export UV_PYTHON_INSTALL_DIR=$INSTALL/python
export UV_NO_CONFIG=1 UV_NO_PROGRESS=1
unset VIRTUAL_ENV CONDA_PREFIX PYTHONPATH PYTHONHOME

mkdir -p "$INSTALL"
N=0
say()  { printf '%s\n' "$*"; printf '%s  %s\n' "$(date '+%F %T')" "$*" >>"$LOG"; }
step() { N=$((N + 1)); say "[$N/$STEPS] $*"; }
fail() {
  printf '\nModron installer: %s\n' "$*" >&2
  printf '%s  FAILED: %s\n' "$(date '+%F %T')" "$*" >>"$LOG"
  printf 'Everything it did is in the log: %s\n' "$LOG" >&2
  rm -rf "${NEW:?}" "$INSTALL/.torch-choice.json"   # a half-built environment is of no use; the old one stays
  exit 1
}
logged() { printf '$ %s\n' "$*" >>"$LOG"; "$@" >>"$LOG" 2>&1; }
last_error() { { grep -v '^\$ ' "$LOG" | grep -iE 'error|failed|could not|connect' | tail -n 1 | cut -c1-300; } || true; }
ask() {   # ask "question" -> 0 for yes; never asks with --yes or without a terminal
  [ -z "$YES" ] && [ -t 0 ] || return 1
  local answer
  read -r -p "$1 [y/N] " answer || return 1
  case "$answer" in y|Y|yes|Yes) return 0 ;; *) return 1 ;; esac
}

printf '\n===== %s  Modron %s installer, %s %s\n' "$(date '+%F %T')" "$VERSION" "$0" "${ORIG_ARGS[*]:-}" >>"$LOG"
exec 9>"$INSTALL/.installer.lock"
flock -n 9 || fail "another Modron installer is running; wait for it to finish."

UV=$HERE/uv
PREVIOUS=""
[ -f "$INSTALL/install.json" ] && PREVIOUS=$(sed -n 's/^  "version": *"\([^"]*\)".*/\1/p' "$INSTALL/install.json" | head -n 1)
if [ -n "$PREVIOUS" ]; then
  say "Modron $VERSION: upgrading or repairing the install of Modron $PREVIOUS in $INSTALL"
else
  say "Modron $VERSION: installing into $INSTALL"
fi
# What a killed earlier run left behind (killed mid-swap: the old environment goes back in place first).
if [ ! -d "$VENV" ] && [ -d "$INSTALL/venv.old" ]; then mv "$INSTALL/venv.old" "$VENV"; fi
rm -rf "$NEW" "$INSTALL/venv.old" "$INSTALL/installer.new" "$INSTALL/uv.new"

# --- 1. Python ---------------------------------------------------------------------------------------
if [ -n "$PYTHON_ARG" ]; then
  step "Using the Python you gave: $PYTHON_ARG"
  PY=$(command -v "$PYTHON_ARG" || true)
  [ -n "$PY" ] || fail "--python $PYTHON_ARG: no such program."
  "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>>"$LOG" \
    || fail "--python $PYTHON_ARG is not Python 3.10 or newer."
else
  step "Getting Python $PYTHON_PIN (managed by uv, in $UV_PYTHON_INSTALL_DIR)"
  logged "$UV" python install "$PYTHON_PIN" \
    || fail "could not download Python $PYTHON_PIN ($(last_error)). Check the internet connection and run the installer again, or give an installed Python with --python /usr/bin/python3."
  PY=$("$UV" python find --managed-python "$PYTHON_PIN" 2>>"$LOG") || fail "uv installed Python $PYTHON_PIN but cannot find it."
fi
say "      Python $("$PY" -c 'import platform; print(platform.python_version())')"

# --- 2. GPU -> PyTorch build --------------------------------------------------------------------------
step "Looking at the GPUs to pick the PyTorch build"
CHOICE=$INSTALL/.torch-choice.json
# Its summary line names the build's index, which may not be used (--torch-index): only errors go to the log.
"$PY" "$HERE/torch_select.py" --out "$CHOICE" ${TORCH_ARG:+--torch "$TORCH_ARG"} >/dev/null 2>>"$LOG" \
  || fail "could not pick a PyTorch build ($(tail -n 1 "$LOG"))."
field() { "$PY" "$HERE/torch_select.py" --from "$CHOICE" --field "$1"; }
BUILD=$(field build) TORCH_VER=$(field torch) INDEX_URL=$(field index_url) NEEDS=$(field needs_bytes)
REQ=$(field requirement)
say "      PyTorch build: $BUILD (torch $TORCH_VER)"
while IFS= read -r reason; do say "        - $reason"; done < <(field reasons)

# --- reuse: a repair with nothing to change keeps the environment ----------------------------------------
# What the environment is made of: the Python, the torch build, the lock and Modron's wheel. The key is stored
# in the venv when it is built (after which it passed the self-test). The same key, a clean `uv pip check` and
# every installed file as installed (verify_env.py: sizes and hashes of the packages' RECORDs, a few seconds)
# mean there is nothing to rebuild; anything else, or --rebuild, builds it anew.
LOCK=$HERE/locks/torch-$TORCH_VER.txt
env_key() {
  { "$PY" -c 'import sys; print(sys.version, sys.executable)'; echo "$REQ"; cat "$LOCK" "$HERE"/modron-*.whl; } \
    | sha256sum | cut -c1-32
}
REUSE=""
if [ -z "$REBUILD" ] && [ -f "$LOCK" ] && [ -f "$VENV/.modron-env" ] && [ "$(cat "$VENV/.modron-env")" = "$(env_key)" ] \
   && logged "$UV" pip check --python "$VENV/bin/python"; then
  if VERIFIED=$("$VENV/bin/python" "$HERE/verify_env.py" 2>&1); then
    REUSE=1
    printf '%s\n' "$VERIFIED" >>"$LOG"
  else
    say "      building the environment anew: ${VERIFIED//$'\n'/ }"
  fi
fi

gb() { awk -v b="$1" 'BEGIN {printf "%.1f GB", b / 1073741824}'; }

# --- 3. disk --------------------------------------------------------------------------------------------
step "Checking free disk space"
if [ -n "$REUSE" ]; then
  say "      nothing to download: the environment is already right"
else
FREE=${MODRON_INSTALL_FAKE_FREE_BYTES:-$(( $(df -Pk "$INSTALL" | awk 'NR == 2 {print $4}') * 1024 ))}
if [ "$FREE" -lt "$NEEDS" ]; then
  hint=""
  [ "$BUILD" != cpu ] && hint=" (or install the CPU build with --torch cpu, which needs about $(gb 3221225472))"
  fail "not enough disk space: the $BUILD build of PyTorch needs about $(gb "$NEEDS") in $INSTALL and only $(gb "$FREE") is free. Free some space$hint and run the installer again."
fi
say "      $(gb "$FREE") free, about $(gb "$NEEDS") needed"
fi

if [ -n "$REUSE" ]; then
  step "Keeping the environment: it already has Python $("$PY" -c 'import platform; print(platform.python_version())'), PyTorch $TORCH_VER ($BUILD), the libraries of $(basename "$LOCK") and Modron $VERSION (--rebuild builds it anew)"
  N=6
  # Where torch came from is what the last build recorded.
  { read -r TORCH_URL; read -r TORCH_SOURCE; } < <("$PY" -c 'import json, sys
t = json.load(open(sys.argv[1], encoding="utf-8")).get("torch", {})
print(t.get("index_url") or ""); print(t.get("source") or t.get("index_url") or "")' "$INSTALL/install.json" 2>/dev/null \
    || printf '\n\n')
else
# --- 4. environment --------------------------------------------------------------------------------------
step "Creating a fresh environment"
logged "$UV" venv --relocatable --python "$PY" "$NEW" || fail "could not create the environment in $NEW ($(last_error))."

# --- 5. PyTorch --------------------------------------------------------------------------------------------
index_args() {   # index_args URL|none|"" default-URL
  local url=${1:-$2}
  if [ "$url" != none ]; then printf '%s\n' --index-url "$url"; fi
  if [ -n "$FIND_LINKS" ]; then printf '%s\n' --find-links "$FIND_LINKS"; fi
}
install_torch() {   # install_torch REQUIREMENT INDEX-ARGS...
  local req=$1; shift
  logged "$UV" pip install --python "$NEW/bin/python" "$@" "$req"
}
step "Installing PyTorch $TORCH_VER ($BUILD); the GPU builds are a few GB, this can take a while"
USED_INDEX=$TORCH_INDEX
mapfile -t ARGS < <(index_args "$TORCH_INDEX" "$INDEX_URL")
if ! install_torch "$REQ" "${ARGS[@]}"; then
  where=$([ "$TORCH_INDEX" = none ] && echo "${FIND_LINKS:-PyPI} and PyPI" || echo "${TORCH_INDEX:-$INDEX_URL}")
  problem="could not download PyTorch $TORCH_VER ($BUILD build) from $where: $(last_error)"
  if [ "$BUILD" = cpu ]; then
    fail "$problem. Check the internet connection, then run the installer again."
  fi
  say "      $problem"
  if [ -n "$CPU_FALLBACK" ] || ask "Install the CPU build of PyTorch instead (training will be much slower; run the installer again later to get the $BUILD build)?"; then
    say "      falling back to the CPU build, as you agreed"
    "$PY" "$HERE/torch_select.py" --out "$CHOICE" --torch cpu >/dev/null 2>>"$LOG"
    "$PY" - "$CHOICE" "$BUILD" "$problem" <<'EOF'
import json, sys
path, build, problem = sys.argv[1:]
data = json.load(open(path))
data["reasons"] = [f"the {build} build could not be downloaded ({problem}); you agreed to the CPU build instead"]
json.dump(data, open(path, "w"))
EOF
    BUILD=cpu REQ=$(field requirement) INDEX_URL=$(field index_url) TORCH_VER=$(field torch)
    USED_INDEX=$CPU_INDEX
    mapfile -t ARGS < <(index_args "$CPU_INDEX" "$INDEX_URL")
    install_torch "$REQ" "${ARGS[@]}" \
      || fail "could not download the CPU build of PyTorch either ($(last_error)). Check the internet connection, then run the installer again."
  else
    fail "$problem. Check the internet connection (or the URL), then run the installer again; to install the CPU build instead, run it with --cpu-fallback."
  fi
fi

# Where torch really came from (the record and the log say this, not the build's default index).
torch_source() {   # torch_source URL|none|"" default-URL
  local url=${1:-$2}
  if [ "$url" = none ]; then echo "${FIND_LINKS:+the wheels in $FIND_LINKS and }PyPI"
  else echo "$url${FIND_LINKS:+ (and the wheels in $FIND_LINKS)}"; fi
}
TORCH_SOURCE=$(torch_source "$USED_INDEX" "$INDEX_URL")
TORCH_URL=${USED_INDEX:-$INDEX_URL}
[ "$TORCH_URL" = none ] && TORCH_URL=""
say "      PyTorch $TORCH_VER ($BUILD) came from $TORCH_SOURCE"

# --- 6. Modron -------------------------------------------------------------------------------------------------
# The libraries come from the release's lock (installer/lock.py): the versions resolved and tested for this
# release and this torch, each file checked against its hash; --no-deps: nothing unlocked comes in.
LOCK=$HERE/locks/torch-$TORCH_VER.txt   # again: a fallback to the CPU build may change the torch release
step "Installing Modron $VERSION and the libraries it uses (the versions locked for this release, from PyPI)"
[ -f "$LOCK" ] || fail "this installer has no lock for torch $TORCH_VER ($LOCK); use another --torch build."
mapfile -t ARGS < <([ -n "$FIND_LINKS" ] && printf '%s\n' --find-links "$FIND_LINKS")
logged "$UV" pip install --python "$NEW/bin/python" --require-hashes --no-deps "${ARGS[@]}" -r "$LOCK" \
  || fail "could not download the libraries Modron needs from PyPI ($(last_error)). Check the internet connection, then run the installer again."
logged "$UV" pip install --python "$NEW/bin/python" --no-deps "$HERE"/modron-*.whl \
  || fail "could not install Modron's own package ($(last_error))."
logged "$UV" pip check --python "$NEW/bin/python" \
  || fail "the installed libraries do not fit together ($(last_error)); run the installer again, or report it with the log."
env_key > "$NEW/.modron-env"   # what a later repair compares with
fi

# --- 7. swap in, menu entry, record, uninstaller --------------------------------------------------------------
step "Putting it in place: menu entry, record, uninstaller"
if [ -z "$REUSE" ]; then
  [ -d "$VENV" ] && mv "$VENV" "$INSTALL/venv.old"
  mv "$NEW" "$VENV"
  rm -rf "$INSTALL/venv.old"
fi
# The download cache is of no use once the environment is built (installed files do not point into it); a
# repair that needs downloads fetches them again. (MODRON_UV_CACHE_DIR elsewhere: a developer's, kept.)
if [ -d "$INSTALL/cache" ]; then
  say "      removing the download cache ($(du -sh "$INSTALL/cache" 2>/dev/null | cut -f1))"
  rm -rf "$INSTALL/cache"
fi
if [ "$HERE" != "$INSTALL/installer" ]; then   # uv, and a copy of the installer for "Repair install"
  cp "$HERE/uv" "$INSTALL/uv.new" && mv -f "$INSTALL/uv.new" "$INSTALL/uv"
  rm -rf "$INSTALL/installer.new" && mkdir "$INSTALL/installer.new"
  find "$HERE" -mindepth 1 -maxdepth 1 ! -name uv -exec cp -r {} "$INSTALL/installer.new/" \;
  ln -s ../uv "$INSTALL/installer.new/uv"
  rm -rf "$INSTALL/installer"
  mv "$INSTALL/installer.new" "$INSTALL/installer"
fi
cp "$HERE/modron.svg" "$INSTALL/modron.svg"
cp "$HERE/uninstall.sh" "$INSTALL/uninstall"
chmod +x "$INSTALL/uninstall" "$INSTALL/uv" "$INSTALL/installer/install.sh"
mkdir -p "$APPS"
logged "$VENV/bin/python" - "$APPS/modron.desktop" "$VENV/bin/modron" "$INSTALL/modron.svg" <<'EOF' || fail "could not write the menu entry."
import sys
from pathlib import Path
from app.autostart import desktop_entry
from training_core.fsutil import atomic_write_text
path, modron, icon = sys.argv[1:]
lines = [l for l in desktop_entry([modron]).splitlines() if not l.startswith(("X-GNOME-Autostart", "Icon="))]
lines += [f"Icon={icon}", "Categories=Development;", "Keywords=AI;LLM;finetune;training;", "StartupWMClass=modron"]
atomic_write_text(Path(path), "\n".join(lines) + "\n")
EOF
command -v update-desktop-database >/dev/null 2>&1 && logged update-desktop-database "$APPS" || true
if [ -n "$AUTOSTART" ]; then
  logged "$VENV/bin/python" -c "import sys; from app import autostart; autostart.set_enabled(sys.argv[1] == 'on')" "$AUTOSTART" \
    || fail "could not change the start-at-login entry."
fi
AUTOSTART_ENTRY=${XDG_CONFIG_HOME:-$HOME/.config}/autostart/modron.desktop
SIZE=$(du -sk "$INSTALL" | cut -f1)
logged "$VENV/bin/python" "$HERE/write_record.py" --choice "$CHOICE" --version "$VERSION" --previous "$PREVIOUS" \
    --torch-source "$TORCH_SOURCE" --torch-url "${TORCH_URL:-}" --lock "$LOCK" \
    --libraries-source "PyPI${FIND_LINKS:+ and the wheels in $FIND_LINKS}" --installed-bytes $((SIZE * 1024)) \
    --environment "$([ -n "$REUSE" ] && echo kept || echo built)" \
    --menu-entry "$APPS/modron.desktop" --autostart-entry "$AUTOSTART_ENTRY" --uninstaller "$INSTALL/uninstall" \
    --log "$LOG" -- "$INSTALL/installer/install.sh" "${ORIG_ARGS[@]}" --repair \
  || fail "could not write the install record."
rm -f "$CHOICE"

# --- 8. self-test ----------------------------------------------------------------------------------------------
if [ -n "$REUSE" ]; then   # it passed the self-test when it was built, and its files are those it had then
  step "Checking the install: the kept environment's files are as installed ($VERIFIED)"
  say "      (its self-test passed when it was built; run the installer with --rebuild for a fresh one and a new self-test)"
else
step "Checking the install (modron --self-test: a few training steps)"
if ! "$VENV/bin/modron" --self-test >>"$LOG" 2>&1; then
  fail "Modron is installed, but its self-test failed (the log has its report). Run the installer again to repair it."
fi
grep -E '^  (app modules|engine):' "$LOG" | tail -n 2 | sed 's/^/    /'
fi
say "      installed size: $(gb $((SIZE * 1024))) in $INSTALL"
say ""
say "Modron $VERSION is installed. Start it from your applications menu (\"Modron\") or run:"
say "  \"$VENV/bin/modron\""
say "To remove it: \"$INSTALL/uninstall\""
