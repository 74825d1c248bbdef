"""Launching the swarm peer: locally, or inside WSL on Windows (with fakes: no WSL here)."""
import subprocess
import sys

import pytest

from app.swarm_runner import (JOIN, WSL_MISSING, LocalRunner, WslRunner, _wsl_distros, pick_runner,
                              to_wsl_path)


def which_from(found: dict):
    return lambda name: found.get(name)


def test_local_runner_runs_the_join_cli_with_this_python():
    r = pick_runner(platform="linux", which=which_from({}))
    assert isinstance(r, LocalRunner) and r.available() == (True, "")
    program, argv = r.command(["--invite-file", "/data/swarm/i.txt", "--json"])
    assert program == sys.executable
    assert argv == [*JOIN, "--invite-file", "/data/swarm/i.txt", "--json"]
    assert argv[:4] == ["-m", "training_core.cli", "swarm", "join"]
    assert isinstance(pick_runner(platform="darwin"), LocalRunner)


def test_wsl_runner_translates_paths_and_uses_the_modron_distribution():
    r = pick_runner(platform="win32", which=which_from({"wsl.exe": r"C:\Windows\System32\wsl.exe"}),
                    list_distros=lambda wsl: ["Ubuntu", "Modron"])
    assert isinstance(r, WslRunner) and r.available() == (True, "")
    program, argv = r.command(["--invite-file", r"C:\Users\Ann Lee\AppData\Local\Modron\swarm\i.txt",
                               "--vram-fraction", "0.9"])
    assert program == r"C:\Windows\System32\wsl.exe"
    assert argv == ["-d", "Modron", "--", "~/modron/venv/bin/python", *JOIN, "--invite-file",
                    "/mnt/c/Users/Ann Lee/AppData/Local/Modron/swarm/i.txt", "--vram-fraction", "0.9"]
    assert r.path(r"D:/data/x") == "/mnt/d/data/x"


@pytest.mark.parametrize("text, expected", [(r"C:\x", "/mnt/c/x"), ("c:/a/b", "/mnt/c/a/b"),
                                            ("/already/posix", "/already/posix"), ("0.9", "0.9"),
                                            ("--json", "--json"), (r"E:\\", "/mnt/e//")])
def test_to_wsl_path(text, expected):
    assert to_wsl_path(text) == expected


def test_wsl_missing_or_without_the_distribution_says_what_to_do():
    no_wsl = pick_runner(platform="win32", which=which_from({}), list_distros=lambda wsl: ["Modron"])
    ok, message = no_wsl.available()
    assert not ok and message.startswith(WSL_MISSING) and "not installed" in message
    assert "Repair install" in message and "Set up swarm contribution" in message

    no_distro = pick_runner(platform="win32", which=which_from({"wsl.exe": "wsl.exe"}),
                            list_distros=lambda wsl: ["Ubuntu-22.04"])
    ok, message = no_distro.available()
    assert not ok and message.startswith(WSL_MISSING) and "'Modron' distribution is missing" in message

    def broken(wsl):
        raise subprocess.TimeoutExpired(wsl, 10)
    ok, message = pick_runner(platform="win32", which=which_from({"wsl.exe": "wsl.exe"}),
                              list_distros=broken).available()
    assert not ok and "did not answer" in message


def test_wsl_distro_listing_reads_utf16(monkeypatch):
    class Done:
        stdout = "Ubuntu\r\nModron\r\n".encode("utf-16-le")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: Done())
    assert _wsl_distros("wsl.exe") == ["Ubuntu", "Modron"]
    Done.stdout = b"Modron\n"
    assert _wsl_distros("wsl.exe") == ["Modron"]
