"""Live hardware figures for the dashboard, read off the GUI thread.

NVML calls can take tens of milliseconds per GPU (and hang on a sick driver), so they run in a
QThread; the dashboard only ever receives finished dicts through the `updated` signal.
"""
from __future__ import annotations

import os
import time
from functools import partial
from typing import Callable

from PySide6.QtCore import QObject, QThread, QTimer, Signal, Slot

from training_core.hardware import detect


def _end_thread(thread: QThread, *_args) -> None:
    try:
        thread.quit()
        thread.wait(10_000)
    except RuntimeError:   # its C++ side is gone already (interpreter shutdown)
        pass


def _own_pids() -> list[int]:
    # Our workers and CLI helpers are children of this process: the dashboard shows them as
    # Modron's own use of the GPU, not as "other programs".
    try:
        import psutil
        return [p.pid for p in psutil.Process(os.getpid()).children(recursive=True)]
    except Exception:
        return []


_last_cpu_call = 0.0


def _cpu_percent() -> float | None:
    """Whole-machine CPU use since the previous call; None when that was too recent to mean anything."""
    global _last_cpu_call
    try:
        import psutil
        value = float(psutil.cpu_percent(interval=None))
    except Exception:
        return None
    now = time.monotonic()
    recent, _last_cpu_call = now - _last_cpu_call < 0.2, now
    return None if recent else value


def probe() -> dict:
    """One reading: training_core.hardware.detect(include_torch=False) plus live CPU/RAM figures."""
    info = detect(include_torch=False).to_dict()
    cpu_percent = _cpu_percent()
    info["cpu_percent"] = cpu_percent
    info["ram_used"] = max(info["ram_total"] - info["ram_available"], 0)
    info["own_pids"] = _own_pids()
    info["time"] = time.time()
    return info


class _Probe(QObject):
    """Lives in the poller's thread; runs the probe when asked."""

    done = Signal(dict)

    def __init__(self, fn: Callable[[], dict]):
        super().__init__()
        self._fn = fn

    @Slot()
    def run(self) -> None:
        try:
            self.done.emit(self._fn())
        except Exception as exc:   # a probe must never take the thread down
            self.done.emit({"error": f"{type(exc).__name__}: {exc}", "gpus": [], "time": time.time()})


class SysInfoPoller(QObject):
    """Polls the hardware every `interval_ms` while started; `updated(dict)` carries each reading.

    Polling runs only between start() and stop(), so a hidden dashboard costs nothing.
    """

    updated = Signal(dict)
    _request = Signal()

    def __init__(self, interval_ms: int = 2000, probe_fn: Callable[[], dict] | None = None, parent=None):
        super().__init__(parent)
        self.latest: dict | None = None
        self._busy = False
        self._thread = QThread()
        self._thread.setObjectName("modron-sysinfo")
        self._probe = _Probe(probe_fn or probe)
        self._probe.moveToThread(self._thread)
        self._request.connect(self._probe.run)          # queued: runs in the poller thread
        self._probe.done.connect(self._on_done)         # queued back to this (GUI) thread
        self._timer = QTimer(self)
        self._timer.setInterval(interval_ms)
        self._timer.timeout.connect(self.poll_now)
        _cpu_percent()   # psutil's first reading has no baseline: take it now, not at the first tick
        # If this object is deleted without stop(), end the thread first: Qt aborts the process
        # when a running QThread is destroyed.
        self.destroyed.connect(partial(_end_thread, self._thread))

    @property
    def active(self) -> bool:
        return self._timer.isActive()

    def start(self) -> None:
        if not self._thread.isRunning():
            self._thread.start(QThread.Priority.LowPriority)
        if not self._timer.isActive():
            self._timer.start()
            self.poll_now()

    def stop(self) -> None:
        """Stop polling; the idle thread stays for the next start() (it costs nothing while idle)."""
        self._timer.stop()

    def shutdown(self) -> None:
        """Stop polling and end the thread (waits for a reading in progress). For app exit."""
        self._timer.stop()
        _end_thread(self._thread)
        self._busy = False

    def poll_now(self) -> None:
        # Skip a tick while the previous reading is still running rather than queue them up.
        if self._busy or not self._thread.isRunning():
            return
        self._busy = True
        self._request.emit()

    def _on_done(self, info: dict) -> None:
        self._busy = False
        self.latest = info
        self.updated.emit(info)
