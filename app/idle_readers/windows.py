"""Windows idle time: GetLastInputInfo against GetTickCount64, via ctypes.

`user32`/`kernel32` can be handed in (tests pass fakes: there is no Windows here).
"""
from __future__ import annotations

import ctypes

from . import IdleUnavailable


class LASTINPUTINFO(ctypes.Structure):
    _fields_ = [("cbSize", ctypes.c_uint), ("dwTime", ctypes.c_uint32)]


class WindowsIdleReader:
    def __init__(self, user32=None, kernel32=None):
        if user32 is None or kernel32 is None:
            windll = getattr(ctypes, "windll", None)
            if windll is None:
                raise IdleUnavailable("not a Windows session")
            user32, kernel32 = user32 or windll.user32, kernel32 or windll.kernel32
        user32.GetLastInputInfo.argtypes = [ctypes.POINTER(LASTINPUTINFO)]
        user32.GetLastInputInfo.restype = ctypes.c_int
        kernel32.GetTickCount64.argtypes = []
        kernel32.GetTickCount64.restype = ctypes.c_uint64
        self._user32, self._kernel32 = user32, kernel32

    def read(self) -> float:
        info = LASTINPUTINFO()
        info.cbSize = ctypes.sizeof(LASTINPUTINFO)
        if not self._user32.GetLastInputInfo(ctypes.pointer(info)):
            raise IdleUnavailable("Windows did not report the last input")
        # dwTime is a 32-bit tick count that wraps every 49.7 days: subtract modulo 2**32.
        now = int(self._kernel32.GetTickCount64()) & 0xFFFFFFFF
        return ((now - info.dwTime) & 0xFFFFFFFF) / 1000.0

    def close(self) -> None:
        pass
