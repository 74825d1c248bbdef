"""Per-user folders (platformdirs), overridable for tests and portable installs."""
from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP = "modron"


def data_dir() -> Path:
    """Queue, history, settings, runs. MODRON_DATA_DIR overrides."""
    p = Path(os.environ.get("MODRON_DATA_DIR") or platformdirs.user_data_dir(APP, appauthor=False))
    p.mkdir(parents=True, exist_ok=True)
    return p


def cache_dir() -> Path:
    """Token caches and other things that can be rebuilt. MODRON_CACHE_DIR overrides."""
    p = Path(os.environ.get("MODRON_CACHE_DIR") or platformdirs.user_cache_dir(APP, appauthor=False))
    p.mkdir(parents=True, exist_ok=True)
    return p


def runs_dir() -> Path:
    p = data_dir() / "runs"
    p.mkdir(parents=True, exist_ok=True)
    return p
