"""X11 idle time through the XScreenSaver extension (libXss), via ctypes: no extra Python package.

The display is opened once and kept. Caveat: Xlib exits the process if the X server dies under
an open display; the GUI would be gone with that server anyway.
"""
from __future__ import annotations

import ctypes
import ctypes.util

from . import IdleUnavailable


class _XScreenSaverInfo(ctypes.Structure):
    _fields_ = [("window", ctypes.c_ulong), ("state", ctypes.c_int), ("kind", ctypes.c_int),
                ("til_or_since", ctypes.c_ulong), ("idle", ctypes.c_ulong), ("eventMask", ctypes.c_ulong)]


def _load(soname: str, short: str) -> ctypes.CDLL:
    # The exact soname first: find_library runs ldconfig/gcc, which is slow.
    for name in (soname, ctypes.util.find_library(short)):
        if name:
            try:
                return ctypes.CDLL(name)
            except OSError:
                pass
    raise IdleUnavailable(f"the {short} library ({soname}) is missing")


class X11IdleReader:
    def __init__(self, display: str | None = None):
        x11 = _load("libX11.so.6", "X11")
        xss = _load("libXss.so.1", "Xss")
        x11.XOpenDisplay.restype = ctypes.c_void_p
        x11.XOpenDisplay.argtypes = [ctypes.c_char_p]
        x11.XDefaultRootWindow.restype = ctypes.c_ulong
        x11.XDefaultRootWindow.argtypes = [ctypes.c_void_p]
        x11.XCloseDisplay.argtypes = [ctypes.c_void_p]
        x11.XFree.argtypes = [ctypes.c_void_p]
        xss.XScreenSaverQueryExtension.restype = ctypes.c_int
        xss.XScreenSaverQueryExtension.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int),
                                                   ctypes.POINTER(ctypes.c_int)]
        xss.XScreenSaverAllocInfo.restype = ctypes.POINTER(_XScreenSaverInfo)
        xss.XScreenSaverQueryInfo.restype = ctypes.c_int
        xss.XScreenSaverQueryInfo.argtypes = [ctypes.c_void_p, ctypes.c_ulong,
                                              ctypes.POINTER(_XScreenSaverInfo)]
        self._x11, self._xss = x11, xss
        self._display = x11.XOpenDisplay(display.encode() if display else None)
        if not self._display:
            raise IdleUnavailable(f"X display {display or '(default)'} did not open")
        event_base, error_base = ctypes.c_int(), ctypes.c_int()
        if not xss.XScreenSaverQueryExtension(self._display, ctypes.byref(event_base), ctypes.byref(error_base)):
            self.close()
            raise IdleUnavailable("this X server has no XScreenSaver extension")
        self._root = x11.XDefaultRootWindow(self._display)
        self._info = xss.XScreenSaverAllocInfo()
        if not self._info:
            self.close()
            raise IdleUnavailable("out of memory in libXss")

    def read(self) -> float:
        if not self._display:
            raise IdleUnavailable("the X display is closed")
        if not self._xss.XScreenSaverQueryInfo(self._display, self._root, self._info):
            raise IdleUnavailable("the X server did not answer")
        return self._info.contents.idle / 1000.0

    def close(self) -> None:
        info, self._info = getattr(self, "_info", None), None
        if info:
            self._x11.XFree(info)
        display, self._display = getattr(self, "_display", None), None
        if display:
            self._x11.XCloseDisplay(display)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
