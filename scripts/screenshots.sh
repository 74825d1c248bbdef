#!/usr/bin/env bash
# PNG of each view with a run in progress, taken on a real X server (Xvfb) with a system tray (trayer).
#   scripts/screenshots.sh [OUT_DIR]      (default docs/screenshots)
# Needs Debian's xvfb, trayer, imagemagick (for the whole-screen shot), libxcb-cursor0, libxkbcommon-x11-0.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DISPLAY_NUM=${SCREENSHOT_DISPLAY:-:97}
Xvfb "$DISPLAY_NUM" -screen 0 1400x900x24 -nolisten tcp >/dev/null 2>&1 &
XVFB=$!
trap 'kill $TRAYER $XVFB 2>/dev/null || true' EXIT
TRAYER=
for _ in $(seq 50); do DISPLAY=$DISPLAY_NUM xdpyinfo >/dev/null 2>&1 && break; sleep 0.1; done
DISPLAY=$DISPLAY_NUM trayer --edge top --align right --widthtype request --height 24 >/dev/null 2>&1 &
TRAYER=$!
sleep 1
DISPLAY=$DISPLAY_NUM QT_QPA_PLATFORM=xcb "$PY" scripts/screenshots.py "${1:-docs/screenshots}"
