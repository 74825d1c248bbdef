"""Start Modron with the desktop: an XDG autostart entry on Linux, a Run key value on Windows.

Both start Modron with `--background` (tray only, no window) so logging in does not pop a window.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from training_core.errors import UserError

import resources

ENTRY_NAME = "modron.desktop"
RUN_KEY = r"Software\Microsoft\Windows\CurrentVersion\Run"
RUN_VALUE = "Modron"
# The Exec key's reserved characters (Desktop Entry spec): an argument holding any of them is quoted.
_RESERVED = set(" \t\n\"'\\><~|&;$*?#()`")


def supported() -> bool:
    return sys.platform.startswith("linux") or sys.platform == "win32"


def project_root() -> Path:
    """The folder that holds the `app` package (needed as the working folder for `python -m app.main`)."""
    return Path(__file__).resolve().parents[1]


def launch_command() -> list[str]:
    """The command that starts Modron in the background, absolute so it works from a login session."""
    bindir = Path(sys.executable).parent
    script = bindir / ("modron.exe" if sys.platform == "win32" else "modron")
    if script.is_file():
        return [str(script), "--background"]
    python = sys.executable
    if sys.platform == "win32" and (bindir / "pythonw.exe").is_file():
        python = str(bindir / "pythonw.exe")   # no console window at login
    return [python, "-m", "app.main", "--background"]


# --- Linux (XDG autostart) -----------------------------------------------------------------

def desktop_file_path() -> Path:
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "autostart" / ENTRY_NAME


def _exec_arg(arg: str) -> str:
    if any(c in _RESERVED for c in arg):
        arg = '"' + "".join("\\" + c if c in '"`$\\' else c for c in arg) + '"'
    # '%' starts a field code; then the whole value is a string, whose own escape is the backslash.
    return arg.replace("%", "%%").replace("\\", "\\\\")


def desktop_entry(command: list[str], workdir: str | None = None) -> str:
    lines = [
        "[Desktop Entry]",
        "Type=Application",
        "Name=Modron",
        "Comment=Finetune language models on your own GPU",
        "Exec=" + " ".join(_exec_arg(a) for a in command),
        f"Icon={resources.path('icons', 'modron.svg')}",
        "Terminal=false",
        "X-GNOME-Autostart-enabled=true",
    ]
    if workdir:
        lines.insert(5, f"Path={workdir}")
    return "\n".join(lines) + "\n"


def _linux_enable() -> Path:
    from training_core.fsutil import atomic_write_text
    command = launch_command()
    path = desktop_file_path()
    # `python -m app.main` needs the project folder as its working folder; the console script does not.
    workdir = str(project_root()) if command[1:3] == ["-m", "app.main"] else None
    atomic_write_text(path, desktop_entry(command, workdir))
    return path


# --- Windows (HKCU Run key) ----------------------------------------------------------------

def _winreg():
    import winreg
    return winreg


def _windows_enable(reg=None) -> None:
    import subprocess
    reg = reg or _winreg()
    with reg.CreateKey(reg.HKEY_CURRENT_USER, RUN_KEY) as key:
        reg.SetValueEx(key, RUN_VALUE, 0, reg.REG_SZ, subprocess.list2cmdline(launch_command()))


def _windows_disable(reg=None) -> None:
    reg = reg or _winreg()
    try:
        with reg.OpenKey(reg.HKEY_CURRENT_USER, RUN_KEY, 0, reg.KEY_SET_VALUE) as key:
            reg.DeleteValue(key, RUN_VALUE)
    except FileNotFoundError:
        pass


def _windows_enabled(reg=None) -> bool:
    reg = reg or _winreg()
    try:
        with reg.OpenKey(reg.HKEY_CURRENT_USER, RUN_KEY) as key:
            reg.QueryValueEx(key, RUN_VALUE)
        return True
    except FileNotFoundError:
        return False


# --- the API the settings view uses ----------------------------------------------------------

def is_enabled() -> bool:
    if sys.platform == "win32":
        return _windows_enabled()
    return desktop_file_path().is_file()


def set_enabled(on: bool) -> None:
    """Create or remove the autostart entry; raises UserError with one plain line on failure."""
    where = "Start with the desktop"
    if not supported():
        raise UserError(where, "is not available on this system yet")
    try:
        if sys.platform == "win32":
            _windows_enable() if on else _windows_disable()
        elif on:
            _linux_enable()
        else:
            desktop_file_path().unlink(missing_ok=True)
    except OSError as exc:
        target = RUN_KEY if sys.platform == "win32" else desktop_file_path()
        raise UserError(where, f"could not {'write' if on else 'remove'} {target} "
                               f"({exc.strerror or exc})") from None
