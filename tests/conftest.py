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
    # No spare worker (app/spare_worker.py) each time a test shows New finetune: seconds of CPU for nothing.
    # tests/test_app_spare_worker.py turns it back on.
    from app import settings
    settings.PREPARE_WORKER.set(s, False)
    yield s
    s.close()


@pytest.fixture(scope="session")
def built_windows_setup():
    """The Windows installer built once per session (MODRON_FAST_BUILD: zlib, the release's solid LZMA only
    makes it slower here); tests/test_installer_windows.py checks it, tests/test_installer_wine.py runs a copy."""
    import os
    import subprocess
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([str(root / "installer" / "build-windows.sh")], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, MODRON_FAST_BUILD="1"))
    assert out.returncode == 0, out.stderr
    return Path(out.stdout.strip().splitlines()[-1])
