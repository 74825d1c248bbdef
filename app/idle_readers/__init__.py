"""Ways to ask the desktop how long the user has been idle, and which one fits this session.

Each reader is a small class with `read() -> float` (idle seconds) and `close()`; it raises
`IdleUnavailable` when it can't answer (from its constructor or read()); str(exc) is the
reason in plain words, e.g. "the Xss library (libXss.so.1) is missing".
Readers are imported lazily by `make_reader`, so a Windows box never loads Xlib and vice versa.
"""
from __future__ import annotations

import sys
from typing import Mapping, Protocol

SOURCES = ("x11", "gnome", "freedesktop", "windows")
_GNOME_LIKE = {"gnome", "gnome-classic", "gnome-flashback", "ubuntu", "pop", "unity", "budgie"}


class IdleUnavailable(Exception):
    """This reader can't tell the idle time here; str(exc) says why in plain words."""


class IdleReader(Protocol):
    def read(self) -> float: ...
    def close(self) -> None: ...


def _desktops(env: Mapping[str, str]) -> set[str]:
    return {d.strip().lower() for d in env.get("XDG_CURRENT_DESKTOP", "").split(":") if d.strip()}


def is_kde(env: Mapping[str, str]) -> bool:
    return "kde" in _desktops(env)


def choose_sources(env: Mapping[str, str], platform: str | None = None) -> tuple[list[str], str]:
    """The readers to try for this session, best first, and what to tell the user if none works."""
    platform = sys.platform if platform is None else platform
    if platform.startswith("win"):
        return ["windows"], "idle time can't be read on this Windows session"
    if platform == "darwin":
        return [], "idle time isn't read on macOS yet"
    session = env.get("XDG_SESSION_TYPE", "").strip().lower()
    wayland = session == "wayland" or (bool(env.get("WAYLAND_DISPLAY")) and session != "x11")
    desktops = _desktops(env)
    dbus = ["gnome", "freedesktop"] if desktops & _GNOME_LIKE or not is_kde(env) else ["freedesktop", "gnome"]
    if wayland:
        # XWayland's XScreenSaver only sees input sent to X11 windows, so on Wayland it would
        # report the user idle while they type in a native app: never use it there.
        return dbus, "idle time can't be read on this Wayland desktop"
    if session == "x11" or env.get("DISPLAY"):
        return ["x11"] + dbus, "idle time can't be read on this X11 desktop"
    return [], "no graphical session found, so idle time can't be read"


def make_reader(source: str, env: Mapping[str, str]) -> IdleReader:
    """Open one reader; raises IdleUnavailable when it can't work here."""
    if source == "x11":
        from .x11 import X11IdleReader
        return X11IdleReader(env.get("DISPLAY") or None)
    if source in ("gnome", "freedesktop"):
        from .dbus import DBusIdleReader
        # KDE's org.freedesktop.ScreenSaver answers in milliseconds (KIdleTime), others in seconds.
        return DBusIdleReader(source, address=env.get("DBUS_SESSION_BUS_ADDRESS") or None,
                              milliseconds=source == "gnome" or is_kde(env))
    if source == "windows":
        from .windows import WindowsIdleReader
        return WindowsIdleReader()
    raise ValueError(f"unknown idle source {source!r}")
