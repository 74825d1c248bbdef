"""`scripts/dev test` sets up the system packages the suite needs (scripts/system-packages.txt): nothing to do
when they are there, apt-get for the missing ones as root, else one command to run and exit 2 at once.
dpkg-query, apt-get and id are stand-ins here (a PATH in front), so nothing is installed."""
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = [line.strip() for line in (ROOT / "scripts" / "system-packages.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def _fake_bin(tmp_path: Path, uid: int, missing: set) -> Path:
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    fakes = {
        "id": f'echo {uid}',
        # dpkg-query -W -f=FORMAT PKG: 'ii ' when installed, nothing (exit 1) when not
        "dpkg-query": 'pkg=${@: -1}; case " ' + " ".join(sorted(missing)) + ' " in *" $pkg "*) exit 1 ;; esac; echo "ii "',
        "apt-get": f'echo "$*" >> "{tmp_path}/apt-get.log"',
    }
    for name, body in fakes.items():
        (bin_ / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_ / name).chmod(0o755)
    return bin_


def _run(tmp_path, uid, missing):
    env = dict(os.environ, PATH=f"{_fake_bin(tmp_path, uid, missing)}:{os.environ['PATH']}")
    return subprocess.run([str(ROOT / "scripts" / "dev"), "system"], env=env, capture_output=True, text=True,
                          timeout=60)


def test_the_list_holds_what_the_suite_uses():
    assert {"xvfb", "trayer", "desktop-file-utils", "makeself", "nsis", "p7zip-full", "libxcb-cursor0"} <= set(PACKAGES)
    assert "scripts/dev test" in (ROOT / ".ci" / "run").read_text()


def test_nothing_missing_calls_no_apt_get(tmp_path):
    proc = _run(tmp_path, 0, set())
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "apt-get.log").exists() and proc.stderr == ""


def test_root_installs_only_the_missing_ones(tmp_path):
    proc = _run(tmp_path, 0, {"xvfb", "nsis"})
    assert proc.returncode == 0, proc.stderr
    calls = (tmp_path / "apt-get.log").read_text().splitlines()
    assert calls[0] == "update -qq" and calls[1].split()[-2:] == ["xvfb", "nsis"]


def test_without_root_it_stops_with_the_command_to_run(tmp_path):
    proc = _run(tmp_path, 1000, {"xvfb", "trayer"})
    assert proc.returncode == 2
    assert "sudo apt-get install -y xvfb trayer" in proc.stderr
    assert not (tmp_path / "apt-get.log").exists()
