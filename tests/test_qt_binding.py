"""Guards against a PySide6 build that drops references (6.12.0 on Python 3.11 aborts the app)."""
import os
import sys

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtCore import QObject, Signal  # noqa: E402


class Emitter(QObject):
    fired = Signal(dict)


def test_signal_emit_and_void_calls_keep_true_and_none_alive(qapp):
    e = Emitter()
    t, n = sys.getrefcount(True), sys.getrefcount(None)
    for _ in range(200):
        e.fired.emit({"value": None})
        e.setObjectName("x")
    # A few references may come and go elsewhere; a leak loses one per call (200+).
    assert sys.getrefcount(True) - t > -20
    assert sys.getrefcount(None) - n > -20
