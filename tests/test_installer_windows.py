"""The Windows installer, as far as Linux can check it: it builds with makensis (apt: nsis) with warnings as
errors, the result is a PE executable, and it carries uv.exe and the app's wheel (listed with 7z, apt:
p7zip-full)."""
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NSI = ROOT / "installer" / "windows" / "modron.nsi"


def _need(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is missing: CI must install the Debian package {package}")


def _is_pe(data: bytes) -> bool:
    if data[:2] != b"MZ" or len(data) < 0x40:
        return False
    offset = int.from_bytes(data[0x3C:0x40], "little")
    return data[offset:offset + 4] == b"PE\0\0"


def _machine(data: bytes) -> int:
    """The PE header's Machine field: 0x8664 for x86-64, 0x14c for 32-bit x86."""
    offset = int.from_bytes(data[0x3C:0x40], "little")
    return int.from_bytes(data[offset + 4:offset + 6], "little")


@pytest.fixture(scope="module")
def setup_exe():
    _need("makensis", "nsis")
    env = dict(os.environ, MODRON_FAST_BUILD="1")   # zlib: the release's solid LZMA only makes it slower here
    out = subprocess.run([str(ROOT / "installer" / "build-windows.sh")], capture_output=True, text=True, timeout=300,
                         env=env)
    assert out.returncode == 0, out.stderr
    path = Path(out.stdout.strip().splitlines()[-1])
    assert path == ROOT / "dist" / "Modron-Setup-0.1.0.exe"
    return path


@pytest.mark.slow
def test_setup_is_a_pe_file_carrying_uv_and_the_wheel(setup_exe, tmp_path):
    assert _is_pe(setup_exe.read_bytes()[:1 << 16])
    assert _machine(setup_exe.read_bytes()[:1 << 16]) == 0x8664   # 64-bit: a 64-bit-only Wine starts it
    _need("7z", "p7zip-full")
    listing = subprocess.run(["7z", "l", str(setup_exe)], capture_output=True, text=True, check=True).stdout
    for name in ("installer/uv.exe", "installer/modron-0.1.0-py3-none-any.whl", "installer/torch_select.py",
                 "installer/write_record.py", "installer/locks/torch-2.13.0.txt", "installer/locks/torch-2.7.1.txt",
                 "modron.ico", "Uninstall.exe"):
        assert name in listing, listing
    subprocess.run(["7z", "x", "-y", f"-o{tmp_path}", str(setup_exe), "installer/uv.exe",
                    "installer/modron-0.1.0-py3-none-any.whl"], capture_output=True, check=True)
    assert _is_pe((tmp_path / "installer" / "uv.exe").read_bytes()[:1 << 16])
    with zipfile.ZipFile(tmp_path / "installer" / "modron-0.1.0-py3-none-any.whl") as wheel:
        names = wheel.namelist()
    assert "app/main.py" in names and "training_core/cli.py" in names and "resources/icons/modron.svg" in names


def _makensis(script: Path, stage: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["makensis", "-WX", "-V2", "-INPUTCHARSET", "UTF8", "-DVERSION=0.1.0", f"-DSTAGE={stage}",
                           "-DWHEEL=modron-0.1.0-py3-none-any.whl", f"-DOUTFILE={out}", str(script)],
                          capture_output=True, text=True, timeout=120)


def test_the_script_passes_makensis_with_warnings_as_errors(tmp_path):
    _need("makensis", "nsis")
    stage = tmp_path / "stage"
    stage.mkdir()
    for name in ("uv.exe", "torch_select.py", "write_record.py", "modron-0.1.0-py3-none-any.whl"):
        (stage / name).write_bytes(b"placeholder")
    (stage / "locks").mkdir()
    (stage / "locks" / "torch-2.13.0.txt").write_bytes(b"placeholder")
    ok = _makensis(NSI, stage, tmp_path / "ok.exe")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert _is_pe((tmp_path / "ok.exe").read_bytes()[:1 << 16])
    # -WX is live: one unused variable (a warning) fails the build.
    warned = tmp_path / "warned.nsi"
    shutil.copy(NSI.with_name("modron.ico"), tmp_path)   # makensis reads the icon beside the script
    warned.write_text(NSI.read_text().replace("Var ARGS ", "Var NEVER_USED\nVar ARGS ", 1))
    bad = _makensis(warned, stage, tmp_path / "bad.exe")
    assert bad.returncode != 0 and "NEVER_USED" in bad.stdout + bad.stderr



def test_uninstaller_and_apps_entry_come_before_any_download():
    """A failed or cancelled install can be removed in one click: the uninstaller and the Apps & features entry
    are written before Python is downloaded; the entry's version moves only once the new environment is in."""
    text = NSI.read_text()
    main = text[text.index('Section "Modron" SecMain'):text.index("SectionEnd")]
    first_download = main.index("python install")
    assert main.index('WriteUninstaller "$INSTDIR\\Uninstall.exe"') < first_download
    assert main.index('"UninstallString"') < first_download
    assert main.rindex('"DisplayVersion" "${VERSION}"') > main.index('Rename "$INSTDIR\\venv.new" "$INSTDIR\\venv"')
    assert "SectionSetSize ${SecMain} $NEEDS_KB" in text   # "Space required" is the PyTorch build's, not the file's
