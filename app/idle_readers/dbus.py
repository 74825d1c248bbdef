"""Idle time over the D-Bus session bus, for Wayland desktops (and X11 ones without libXss).

gnome:       org.gnome.Mutter.IdleMonitor /org/gnome/Mutter/IdleMonitor/Core GetIdletime -> ms
freedesktop: org.freedesktop.ScreenSaver GetSessionIdleTime -> seconds, or ms on KDE
Uses PySide6.QtDBus (already a dependency; no Qt event loop needed for blocking calls). Each call
is capped at `timeout_ms` so a hung desktop service can't freeze the GUI thread for long.
"""
from __future__ import annotations

import itertools

from PySide6.QtDBus import QDBus, QDBusConnection, QDBusMessage

from . import IdleUnavailable

_SERVICES = {
    "gnome": ("org.gnome.Mutter.IdleMonitor", ["/org/gnome/Mutter/IdleMonitor/Core"],
              "org.gnome.Mutter.IdleMonitor", "GetIdletime"),
    "freedesktop": ("org.freedesktop.ScreenSaver", ["/org/freedesktop/ScreenSaver", "/ScreenSaver"],
                    "org.freedesktop.ScreenSaver", "GetSessionIdleTime"),
}
_names = itertools.count()


class DBusIdleReader:
    def __init__(self, kind: str, address: str | None = None, milliseconds: bool = False,
                 timeout_ms: int = 200):
        self.kind = kind
        self._service, self._paths, self._interface, self._method = _SERVICES[kind]
        self._scale = 0.001 if milliseconds else 1.0
        self._timeout_ms = timeout_ms
        # A private, named connection: it follows `address` (tests point it at their own bus) and
        # can be closed again, unlike Qt's process-wide sessionBus().
        self._name = f"modron-idle-{kind}-{next(_names)}"
        if address:
            self._conn = QDBusConnection.connectToBus(address, self._name)
        else:
            self._conn = QDBusConnection.connectToBus(QDBusConnection.BusType.SessionBus, self._name)
        if not self._conn.isConnected():
            why = self._conn.lastError().message() or "no session bus"
            self.close()
            raise IdleUnavailable(f"the desktop's message bus is unreachable ({why})")

    def read(self) -> float:
        error = "no answer"
        for path in list(self._paths):
            msg = QDBusMessage.createMethodCall(self._service, path, self._interface, self._method)
            reply = self._conn.call(msg, QDBus.CallMode.Block, self._timeout_ms)
            if reply.type() == QDBusMessage.MessageType.ReplyMessage and reply.arguments():
                value = reply.arguments()[0]
                if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
                    self._paths = [path]          # remember the path that answered
                    return float(value) * self._scale
                error = f"unexpected answer {value!r}"
            else:
                error = reply.errorMessage() or reply.errorName() or "no answer"
        raise IdleUnavailable(f"{self._service} did not answer ({error})")

    def close(self) -> None:
        if getattr(self, "_conn", None) is not None:
            self._conn = None
            QDBusConnection.disconnectFromBus(self._name)
