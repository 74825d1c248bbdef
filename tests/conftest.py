import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path_factory, monkeypatch):
    """Every test gets its own data and cache folders and no network to a model hub."""
    base = tmp_path_factory.mktemp("modron-home")
    monkeypatch.setenv("MODRON_DATA_DIR", str(base / "data"))
    monkeypatch.setenv("MODRON_CACHE_DIR", str(base / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(base / "hf"))
    yield


@pytest.fixture
def queues():
    """JobQueues a test made; each is shut down (its worker stopped) afterwards."""
    made = []
    yield made
    for q in made:
        q.shutdown(timeout_ms=5000)


@pytest.fixture
def store(tmp_path):
    """The app's SQLite store in a fresh folder (imported here, so tests without the app need not)."""
    from app.store import Store
    s = Store(tmp_path / "modron.sqlite3")
    yield s
    s.close()
