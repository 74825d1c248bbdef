"""The installer builds on a fresh machine: installer/build-tools.sh (shared by build-linux.sh and
build-windows.sh) needs only a stock python3's standard library: uv comes from PyPI (sha256 checked) and builds
Modron's wheel in its own build environment, so a python3 without pip, setuptools or wheel will do
(before: "error: invalid command 'bdist_wheel'")."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _base_python() -> str:
    v = sys.version_info
    exe = Path(sys.base_prefix) / "bin" / f"python{v.major}.{v.minor}"
    return str(exe) if exe.is_file() else "python3"


def _clean_env() -> dict:   # the machine's (proxy, certificates), not the test venv's
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("VIRTUAL_ENV", "UV_", "PYTHON", "MODRON_")) and k != "PIP_REQUIRE_VIRTUALENV"}


def test_the_wheel_builds_with_a_bare_python(tmp_path):
    bare = tmp_path / "bare"
    subprocess.run([_base_python(), "-m", "venv", "--without-pip", str(bare)], check=True)
    py = bare / "bin" / "python"
    lacks = subprocess.run([str(py), "-c", "import wheel"], capture_output=True)
    assert lacks.returncode != 0   # a python3 without wheel (nor pip, nor setuptools)
    out = subprocess.run([str(ROOT / "installer" / "build-tools.sh"), "wheel", str(tmp_path / "out")],
                         env=dict(_clean_env(), PYTHON=str(py),
                                  MODRON_BUILD_CACHE=str(tmp_path / "cache")),   # uv fetched afresh too
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    wheel = Path(out.stdout.strip().splitlines()[-1])
    assert wheel.parent == tmp_path / "out" and wheel.name.startswith("modron-")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    assert "app/main.py" in names and "training_core/cli.py" in names and "installer/torch_select.py" not in names
    # Only files of the work tree: nothing from a stale build/ folder (a module deleted since, once shipped).
    assert [n for n in names if ".dist-info/" not in n and not (ROOT / n).is_file()] == []
    assert (tmp_path / "cache" / "uv-0.13.9-manylinux_2_17_x86_64" / "uv").is_file()
