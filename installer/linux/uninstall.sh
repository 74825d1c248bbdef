#!/usr/bin/env bash
# Removes Modron as installed by its Linux installer: the program (this folder: Python, environment, uv,
# installer copy, log), the menu entry and the start-at-login entry. Your data (queue, history, runs and
# checkpoints, settings) is kept unless you say otherwise:
#   uninstall               asks (keeps it when there is no terminal to ask on)
#   uninstall --keep-data   keeps it            uninstall --purge   deletes it too
set -euo pipefail

main() {
  local mode=ask
  case "${1:-}" in
    --purge) mode=purge ;;
    --keep-data) mode=keep ;;
    "") ;;
    -h|--help) sed -n '2,7p' "$0" | cut -c3-; return 0 ;;
    *) echo "uninstall: unknown option $1 (use --purge or --keep-data)" >&2; return 2 ;;
  esac
  local install root data_home config_home cache
  install=$(cd "$(dirname "$0")" && pwd)
  root=$(dirname "$install")
  data_home=${XDG_DATA_HOME:-$HOME/.local/share}
  config_home=${XDG_CONFIG_HOME:-$HOME/.config}
  cache=${XDG_CACHE_HOME:-$HOME/.cache}/modron
  [ -f "$install/install.json" ] || [ -d "$install/venv" ] || {
    echo "uninstall: $install does not look like a Modron install; nothing removed" >&2; return 1; }

  if [ "$mode" = ask ]; then
    mode=keep
    if [ -t 0 ]; then
      local answer
      read -r -p "Also delete your Modron data (queue, history, runs and checkpoints, settings) in $root? [y/N] " answer || true
      case "$answer" in y|Y|yes|Yes) mode=purge ;; esac
    fi
  fi

  # Stop a running Modron from this install first, so nothing writes into what we delete.
  if command -v pkill >/dev/null 2>&1; then
    local pattern
    pattern=$(printf '%s' "$install/venv/bin/" | sed 's/[][\.*^$+?(){}|]/\\&/g')   # the path, literally
    pkill -TERM -f -- "$pattern" 2>/dev/null || true
  fi
  rm -f "$data_home/applications/modron.desktop" "$config_home/autostart/modron.desktop"
  command -v update-desktop-database >/dev/null 2>&1 && update-desktop-database "$data_home/applications" 2>/dev/null || true
  rm -rf "$install"
  if [ "$mode" = purge ] && [ "$(basename "$root")" = modron ]; then   # never a folder we did not make
    rm -rf "$root" "$cache"
    echo "Modron and your Modron data are removed."
  else
    rmdir "$root" 2>/dev/null || true   # only when nothing of the user's is in it
    echo "Modron is removed. Your data is kept in $root (delete that folder to remove it too)."
  fi
}

main "$@"
exit $?
