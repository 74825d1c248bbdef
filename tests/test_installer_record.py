"""The install record: written by installer/write_record.py, read by app/install_info.py, shown in Settings
with a working "Repair install"."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from app import install_info
from app.store import Store

ROOT = Path(__file__).resolve().parents[1]


def _write_record(monkeypatch, install: Path, repair: list) -> Path:
    spec = importlib.util.spec_from_file_location("write_record", ROOT / "installer" / "write_record.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    choice = install / "choice.json"
    choice.write_text(json.dumps({
        "build": "cu126", "torch": "2.13.0", "index_url": "https://download.pytorch.org/whl/cu126",
        "needs_bytes": 1, "reasons": ["found Tesla M40 24GB (compute capability 5.2) on driver 580.95.05"],
        "gpus": [{"name": "Tesla M40 24GB", "compute_cap": "5.2"}], "driver": "580.95.05", "amd": []}))
    monkeypatch.setattr(sys, "prefix", str(install / "venv"))
    assert mod.main(["--choice", str(choice), "--version", "0.1.0", "--previous", "0.0.9",
                     "--menu-entry", "m", "--autostart-entry", "a", "--uninstaller", "u",
                     "--log", str(install / "install.log"), "--", *repair]) == 0
    return install / "install.json"


@pytest.fixture
def record(monkeypatch, tmp_path):
    install = tmp_path / "modron" / "install"
    (install / "venv").mkdir(parents=True)
    marker = tmp_path / "repaired"
    repair = [sys.executable, "-c", "import pathlib, sys; pathlib.Path(sys.argv[1]).write_text(' '.join(sys.argv[2:]))",
              str(marker), "--repair"]
    path = _write_record(monkeypatch, install, repair)
    monkeypatch.setattr(install_info, "record_path", lambda: path)
    return path, marker


def test_the_record_round_trips_and_reads_in_plain_words(record):
    path, _ = record
    data = json.loads(path.read_text())
    assert data["version"] == "0.1.0" and data["upgraded_from"] == "0.0.9"
    assert data["paths"]["venv"].endswith("venv") and data["paths"]["install"] == str(path.parent)
    rows = dict(install_info.load().rows())
    assert rows["PyTorch"] == "2.13.0, cu126 build"
    assert rows["GPU"] == "Tesla M40 24GB (compute capability 5.2)"
    assert rows["NVIDIA driver"] == "580.95.05" and "upgraded from 0.0.9" in rows["Modron"]
    assert rows["Python"].startswith(f"{sys.version_info.major}.{sys.version_info.minor}.")


def test_no_record_means_a_development_checkout_and_a_broken_one_is_named(monkeypatch, tmp_path):
    monkeypatch.setattr(install_info, "record_path", lambda: tmp_path / "install.json")
    assert install_info.load() is None
    (tmp_path / "install.json").write_text("{not json")
    info = install_info.load()
    assert "cannot be read" in dict(info.rows())["Record"] and info.repair_command == []


def test_settings_shows_the_installation_and_repair_runs_the_recorded_command(qtbot, record, monkeypatch):
    from app.views.settings_view import SettingsView
    import app.main
    monkeypatch.setattr(app.main, "_home", None)
    _, marker = record
    store = Store.open_default()
    view = SettingsView(store, None)
    qtbot.addWidget(view)
    text = view.install_label.text()
    assert "PyTorch: 2.13.0, cu126 build" in text and "GPU: Tesla M40 24GB" in text
    assert view.repair_button.isEnabled()
    view.repair_button.click()
    qtbot.waitUntil(marker.exists, timeout=15000)
    assert marker.read_text() == "--repair"
    assert "The repair is running" in view.repair_status.text() and not view.repair_button.isEnabled()


def test_settings_in_a_development_checkout(qtbot, monkeypatch, tmp_path):
    from app.views.settings_view import SettingsView
    import app.main
    monkeypatch.setattr(app.main, "_home", None)
    monkeypatch.setattr(install_info, "record_path", lambda: tmp_path / "none.json")
    view = SettingsView(Store.open_default(), None)
    qtbot.addWidget(view)
    assert view.install_label.text() == install_info.NOT_INSTALLED
    assert not view.repair_button.isEnabled()


def test_a_repair_command_that_cannot_start_is_reported(record, monkeypatch, tmp_path):
    info = install_info.load()
    info.record["repair_command"] = [str(tmp_path / "gone" / "install.sh")]
    with pytest.raises(install_info.UserError, match="cannot be started"):
        install_info.start_repair(info)


def test_the_record_says_where_torch_and_the_libraries_came_from(monkeypatch, tmp_path):
    install = tmp_path / "modron" / "install"
    (install / "venv").mkdir(parents=True)
    lock = tmp_path / "torch-2.13.0.txt"
    lock.write_text("numpy==2.0 \\\n    --hash=sha256:00\n")
    spec = importlib.util.spec_from_file_location("write_record", ROOT / "installer" / "write_record.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    choice = install / "choice.json"
    choice.write_text(json.dumps({"build": "cpu", "torch": "2.13.0", "index_url": "https://download.pytorch.org/whl/cpu",
                                  "needs_bytes": 1, "reasons": ["no GPU"], "gpus": [], "driver": None, "amd": []}))
    monkeypatch.setattr(sys, "prefix", str(install / "venv"))
    assert mod.main(["--choice", str(choice), "--version", "0.1.0", "--menu-entry", "m", "--autostart-entry", "a",
                     "--uninstaller", "u", "--log", "l", "--torch-source", "the wheels in /w and PyPI", "--torch-url", "",
                     "--lock", str(lock), "--libraries-source", "PyPI", "--installed-bytes", str(3 * 2 ** 29),
                     "--environment", "kept", "--", "repair"]) == 0
    data = json.loads((install / "install.json").read_text())
    assert data["torch"]["index_url"] is None and data["torch"]["source"] == "the wheels in /w and PyPI"
    assert data["libraries"]["lock"] == "torch-2.13.0.txt" and data["environment"] == "kept"
    monkeypatch.setattr(install_info, "record_path", lambda: install / "install.json")
    rows = dict(install_info.load().rows())
    assert rows["PyTorch from"] == "the wheels in /w and PyPI" and rows["Size"] == "1.5 GB"
    assert rows["Libraries"] == "the versions locked for this release (torch-2.13.0.txt), from PyPI"
