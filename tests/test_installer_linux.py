"""The Linux installer end to end: build the .run, install into a throwaway HOME (a space and a non-ASCII
character in its path) from the local wheelhouse, self-test, repair after a kill, upgrade keeping the
user's data, refusals (no network, no disk), uninstall.

Needs makeself (apt: makeself) and desktop-file-validate (apt: desktop-file-utils); PyPI for the app's
libraries (cached in ~/.cache/modron-test-uv, so a second run is fast) and the CPU torch wheel in
/opt/wheels (MODRON_TEST_WHEELS overrides).
"""
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
WHEELS = os.environ.get("MODRON_TEST_WHEELS", "/opt/wheels")
UNREACHABLE = "http://127.0.0.1:9/simple"   # the discard port: nothing listens, the connection is refused
FAKE_GPU = "NVIDIA GeForce RTX 3090, 8.6, 580.95.05"


def _need(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is missing: CI must install the Debian package {package}")


@pytest.fixture(scope="module")
def run_file():
    _need("makeself", "makeself")
    out = subprocess.run([str(ROOT / "installer" / "build-linux.sh")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    path = Path(out.stdout.strip().splitlines()[-1])
    assert path.name == "modron-0.1.0-linux-x86_64.run" and os.access(path, os.X_OK)
    return path


def _env(home: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MODRON_", "XDG_", "VIRTUAL_ENV", "UV_")) and k not in ("DISPLAY", "PYTHONPATH")}
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    env.update(HOME=str(home), TMPDIR=str(home / "tmp"), MODRON_FAKE_NVIDIA_SMI="", MODRON_FAKE_ROCM="",
               MODRON_UV_CACHE_DIR=str(Path.home() / ".cache" / "modron-test-uv"))
    env.update(extra)
    return env


def _base_python() -> str:
    """The interpreter the test venv was made from: the torch wheel on disk is built for its version."""
    v = sys.version_info
    exe = Path(sys.base_prefix) / "bin" / f"python{v.major}.{v.minor}"
    return str(exe) if exe.is_file() else shutil.which(f"python{v.major}.{v.minor}") or shutil.which("python3")


def _args(*more) -> list:
    python = _base_python()
    return ["--nox11", "--", "--python", python, "--find-links", WHEELS, "--yes", *more]


def _install(run_file, home, *more, env_extra=None, timeout=600):
    return subprocess.run([str(run_file), *_args("--torch-index", "none", *more)], env=_env(home, **(env_extra or {})),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(run_file, tmp_path_factory):
    home = tmp_path_factory.mktemp("inst") / "Ünïcode home"
    home.mkdir()
    proc = _install(run_file, home, "--autostart")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return home, proc


def _install_dir(home: Path) -> Path:
    return home / ".local" / "share" / "modron" / "install"


def test_install_end_to_end(installed):
    home, proc = installed
    inst = _install_dir(home)
    for n in range(1, 9):
        assert f"[{n}/8]" in proc.stdout
    assert "engine:       ok" in proc.stdout and "Modron 0.1.0 is installed" in proc.stdout
    # The record the app shows in Settings.
    record = json.loads((inst / "install.json").read_text())
    assert record["version"] == "0.1.0" and record["torch"]["build"] == "cpu" and record["gpus"] == []
    assert record["python"]["version"].startswith("3.")
    assert record["repair_command"][0] == str(inst / "installer" / "install.sh")
    assert record["repair_command"][-1] == "--repair"
    log = (inst / "install.log").read_text()
    assert "[8/8]" in log and "uv pip install" in log and "PASSED" in log
    # Where each part came from, truthfully: no PyTorch index was used (--torch-index none), the libraries
    # came from the lock with their hashes checked.
    assert record["torch"]["index_url"] is None and record["torch"]["source"] == f"the wheels in {WHEELS} and PyPI"
    assert "download.pytorch.org" not in log and f"came from the wheels in {WHEELS} and PyPI" in proc.stdout
    assert "--require-hashes --no-deps" in log and "/locks/torch-2.13.0.txt" in log
    assert record["libraries"]["lock"] == "torch-2.13.0.txt" and len(record["libraries"]["lock_sha256"]) == 64
    assert record["environment"] == "built" and 0 < record["installed_bytes"] <= 1.6 * 2 ** 30
    assert "installed size: " in proc.stdout
    # The copy that "Repair install" runs is complete (its uv is the installed one) and starts. With nothing to
    # change it keeps the environment (checked file by file) in seconds, even with no disk space left, and
    # removes a download cache left in the install.
    uv = subprocess.run([str(inst / "installer" / "uv"), "--version"], capture_output=True, text=True)
    assert uv.returncode == 0 and uv.stdout.startswith("uv 0.13.9")
    (inst / "cache" / "archive-v0").mkdir(parents=True)
    start = time.monotonic()
    repair = subprocess.run(record["repair_command"], env=_env(home, MODRON_INSTALL_FAKE_FREE_BYTES="1"),
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - start
    assert repair.returncode == 0, repair.stdout + repair.stderr
    assert "upgrading or repairing the install of Modron 0.1.0" in repair.stdout
    assert "Keeping the environment" in repair.stdout and "files: all as installed" in repair.stdout
    assert not (inst / "cache").exists()
    kept = json.loads((inst / "install.json").read_text())
    assert kept["environment"] == "kept" and kept["torch"]["source"] == record["torch"]["source"]
    assert took < 60, took   # about 10 s here (bench/installer_times.py); slack for a loaded CI machine
    # A damaged environment is not kept: the repair goes on to rebuild it, and the fake disk check stops it
    # before it changes anything.
    v = sys.version_info
    victim = inst / "venv" / "lib" / f"python{v.major}.{v.minor}" / "site-packages" / "peft" / "__init__.py"
    victim.rename(victim.with_name("moved"))
    try:
        repair = subprocess.run(record["repair_command"], env=_env(home, MODRON_INSTALL_FAKE_FREE_BYTES="1"),
                                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    finally:
        victim.with_name("moved").rename(victim)
    assert repair.returncode == 1
    assert "building the environment anew" in repair.stdout and "peft/__init__.py is missing" in repair.stdout
    assert "not enough disk space" in repair.stderr
    # The installer ran the installed app's self-test from the swapped-in environment (step 8).
    assert f"Modron self-test (Python {record['python']['version']}, {inst}/venv)" in log
    # Menu and autostart entries.
    _need("desktop-file-validate", "desktop-file-utils")
    menu = home / ".local" / "share" / "applications" / "modron.desktop"
    autostart = home / ".config" / "autostart" / "modron.desktop"
    for entry in (menu, autostart):
        check = subprocess.run(["desktop-file-validate", str(entry)], capture_output=True, text=True)
        assert check.returncode == 0 and not check.stdout.strip(), check.stdout
    assert f'Exec="{inst}/venv/bin/modron"' in menu.read_text()
    assert f"Icon={inst}/modron.svg" in menu.read_text() and (inst / "modron.svg").is_file()
    assert "--background" in autostart.read_text()


def test_refuses_up_front_without_enough_disk(run_file, tmp_path):
    proc = _install(run_file, tmp_path, env_extra={"MODRON_INSTALL_FAKE_FREE_BYTES": str(10 ** 9)})
    assert proc.returncode != 0
    assert "not enough disk space: the cpu build of PyTorch needs about 3.0 GB" in proc.stderr
    assert "only 0.9 GB is free" in proc.stderr
    inst = _install_dir(tmp_path)
    assert not (inst / "venv").exists() and not (inst / "venv.new").exists()


def test_unreachable_index_names_what_failed_and_keeps_the_install(run_file, installed):
    home, _ = installed
    inst = _install_dir(home)
    before = (inst / "install.json").read_text()
    proc = subprocess.run([str(run_file), *_args("--torch-index", UNREACHABLE)], capture_output=True, text=True,
                          env=_env(home, MODRON_FAKE_NVIDIA_SMI=FAKE_GPU), stdin=subprocess.DEVNULL, timeout=300)
    assert proc.returncode != 0
    assert f"could not download PyTorch 2.13.0 (cu130 build) from {UNREACHABLE}" in proc.stderr
    assert "run it with --cpu-fallback" in proc.stderr and "run the installer again" in proc.stderr
    # No consent, no CPU torch; the working install is left as it was.
    assert (inst / "install.json").read_text() == before
    assert (inst / "venv" / "bin" / "modron").is_file() and not (inst / "venv.new").exists()


def test_killed_install_is_repaired_by_a_rerun_and_an_upgrade_keeps_user_data(run_file, installed):
    home, _ = installed
    inst = _install_dir(home)
    data = inst.parent
    # The user's data from an "older" Modron: the queue database, a run folder, settings.
    db = sqlite3.connect(data / "modron.db")
    db.execute("CREATE TABLE IF NOT EXISTS probe (x)")
    db.execute("INSERT INTO probe VALUES ('kept')")
    db.commit()
    db.close()
    (data / "runs" / "demo-1" / "checkpoint-75").mkdir(parents=True)
    (data / "runs" / "demo-1" / "checkpoint-75" / "state.json").write_text("{}")
    record = json.loads((inst / "install.json").read_text())
    record["version"] = "0.0.9"
    (inst / "install.json").write_text(json.dumps(record, indent=2))

    # Kill the installer (the whole process group, as a closed terminal would) while it installs packages.
    # (--rebuild: the same .run would otherwise keep the environment, which is already right.)
    env = _env(home)
    proc = subprocess.Popen([str(run_file), *_args("--torch-index", "none", "--rebuild")], env=env,
                            stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    log = inst / "install.log"
    start = log.stat().st_size
    deadline = time.monotonic() + 240
    while "[5/8]" not in log.read_bytes()[start:].decode(errors="replace"):
        assert proc.poll() is None and time.monotonic() < deadline, "the installer ended before step 5"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (inst / "venv.new").exists()                       # it was killed halfway
    assert (inst / "venv" / "bin" / "modron").is_file()       # and the old environment is still in place

    # The fake GPU's index is unreachable; with consent the installer falls back to the CPU build.
    proc = subprocess.run([str(run_file), *_args("--torch-index", UNREACHABLE, "--cpu-index", "none",
                                                  "--cpu-fallback")],
                          env=_env(home, MODRON_FAKE_NVIDIA_SMI=FAKE_GPU), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "upgrading or repairing the install of Modron 0.0.9" in proc.stdout
    assert "falling back to the CPU build, as you agreed" in proc.stdout
    assert not (inst / "venv.new").exists() and not (inst / "venv.old").exists()
    record = json.loads((inst / "install.json").read_text())
    assert record["version"] == "0.1.0" and record["upgraded_from"] == "0.0.9"
    assert record["torch"]["build"] == "cpu" and "you agreed" in record["torch"]["reasons"][0]
    assert record["torch"]["index_url"] is None and WHEELS in record["torch"]["source"]   # --cpu-index none
    assert record["gpus"] == [{"name": "NVIDIA GeForce RTX 3090", "compute_cap": "8.6"}]
    db = sqlite3.connect(data / "modron.db")
    assert db.execute("SELECT x FROM probe").fetchall() == [("kept",)]
    db.close()
    assert (data / "runs" / "demo-1" / "checkpoint-75" / "state.json").is_file()


def test_uninstaller_removes_the_install_and_keeps_or_purges_data(installed, tmp_path):
    home, _ = installed
    inst = _install_dir(home)
    (inst.parent / "modron.db").touch()
    proc = subprocess.run([str(inst / "uninstall"), "--keep-data"], env=_env(home), capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert not inst.exists()
    assert not (home / ".local" / "share" / "applications" / "modron.desktop").exists()
    assert not (home / ".config" / "autostart" / "modron.desktop").exists()
    assert {p.name for p in inst.parent.iterdir()} <= {"modron.db", "runs", "modron.db-wal", "modron.db-shm"}
    assert (inst.parent / "modron.db").is_file()

    # --purge: everything goes, the data folder and the cache too. (A second, small install layout.)
    other = tmp_path / "purge home"
    data = other / ".local" / "share" / "modron"
    (data / "install" / "venv").mkdir(parents=True)
    (data / "install" / "install.json").write_text("{}")
    shutil.copy(ROOT / "installer" / "linux" / "uninstall.sh", data / "install" / "uninstall")
    (data / "runs").mkdir()
    (other / ".cache" / "modron").mkdir(parents=True)
    (other / ".local" / "share" / "applications").mkdir(parents=True)
    (other / ".local" / "share" / "applications" / "modron.desktop").write_text("[Desktop Entry]\n")
    proc = subprocess.run(["bash", str(data / "install" / "uninstall"), "--purge"], env=_env(other),
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert not data.exists() and not (other / ".cache" / "modron").exists()
    assert not (other / ".local" / "share" / "applications" / "modron.desktop").exists()
