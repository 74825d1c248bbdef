"""The app's SVG icons (resources/icons): the app icon and one tray icon per state."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from PySide6.QtGui import QIcon

import resources

STATES = ("idle", "training", "contributing", "paused", "error")


def icon_path(name: str) -> Path:
    """Path of resources/icons/NAME.svg."""
    return resources.path("icons", f"{name}.svg")


@lru_cache(maxsize=None)
def _icon(name: str) -> QIcon:
    # QIcon renders SVG through the QtSvg icon engine at whatever size the tray asks for.
    return QIcon(str(icon_path(name)))


def app_icon() -> QIcon:
    return _icon("modron")


def state_icon(state: str) -> QIcon:
    if state not in STATES:
        raise ValueError(f"unknown tray state {state!r}")
    return _icon(f"tray-{state}")
