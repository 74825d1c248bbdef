"""What keeps the app's memory down (bench/gui_footprint.py measures it)."""
import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import linecache
import sys

import PySide6.QtCore  # noqa: F401  (loads PySide6's import hook)

from app.main import read_sources_uncached


def test_pyside_import_hook_reads_sources_without_keeping_them(tmp_path, monkeypatch):
    assert read_sources_uncached() is True
    assert read_sources_uncached() is True          # installing twice changes nothing
    feature = sys.modules["shibokensupport.feature"]
    (tmp_path / "modron_uses_qt.py").write_text("import PySide6.QtCore\nX = 1\n")
    (tmp_path / "modron_plain.py").write_text("Y = 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    __import__("modron_uses_qt")     # through builtins.__import__, which PySide6 hooks
    __import__("modron_plain")
    for name in ("modron_uses_qt", "modron_plain"):
        assert str(tmp_path / f"{name}.py") not in linecache.cache
    # the same answers as PySide6's own check: 0 for a module that uses PySide6, -1 for one that doesn't
    assert feature.pyside_feature_dict["modron_uses_qt"] == 0
    assert feature.pyside_feature_dict["modron_plain"] == -1
