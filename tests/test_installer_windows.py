"""The Windows installer, as far as Linux can check it: it builds with makensis (apt: nsis) with warnings as
errors, the result is a PE executable, and it carries uv.exe and the app's wheel (listed with 7z, apt:
p7zip-full)."""
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NSI = ROOT / "installer" / "windows" / "modron.nsi"
# Modron's images (installer/windows/make_images.py): file -> (width, height), each a 24-bit BMP
IMAGES = {"wizard.bmp": (164, 314), "header.bmp": (150, 57)}


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


def _bmp(data: bytes) -> tuple[int, int, int, int]:
    """A BMP's width, height, bits per pixel and compression (BITMAPFILEHEADER + BITMAPINFOHEADER)."""
    magic, _size, _r1, _r2, _pixels_at = struct.unpack_from("<2sIHHI", data, 0)
    assert magic == b"BM"
    header_size, width, height, planes, bits, compression = struct.unpack_from("<IiiHHI", data, 14)
    assert header_size >= 40 and planes == 1
    return width, abs(height), bits, compression


@pytest.fixture(scope="module")
def setup_exe(built_windows_setup):
    _need("makensis", "nsis")
    assert built_windows_setup == ROOT / "dist" / "Modron-Setup-0.1.0.exe"
    return built_windows_setup


@pytest.mark.slow
def test_setup_is_a_pe_file_carrying_uv_and_the_wheel(setup_exe, tmp_path):
    assert _is_pe(setup_exe.read_bytes()[:1 << 16])
    assert _machine(setup_exe.read_bytes()[:1 << 16]) == 0x8664   # 64-bit: a 64-bit-only Wine starts it
    _need("7z", "p7zip-full")
    listing = subprocess.run(["7z", "l", str(setup_exe)], capture_output=True, text=True, check=True).stdout
    for name in ("installer/uv.exe", "installer/modron-0.1.0-py3-none-any.whl", "installer/torch_select.py",
                 "installer/write_record.py", "installer/locks/torch-2.13.0.txt", "installer/locks/torch-2.7.1.txt",
                 "modron.ico", "Uninstall.exe", "$PLUGINSDIR/modern-wizard.bmp", "$PLUGINSDIR/modern-header.bmp"):
        assert name in listing, listing
    # MUI carries the Welcome/Finish bitmap and the header image under those names: they are Modron's, byte for byte
    subprocess.run(["7z", "x", "-y", f"-o{tmp_path}", str(setup_exe), "$PLUGINSDIR/modern-wizard.bmp",
                    "$PLUGINSDIR/modern-header.bmp"], capture_output=True, check=True)
    for inside, ours in (("modern-wizard.bmp", "wizard.bmp"), ("modern-header.bmp", "header.bmp")):
        assert (tmp_path / "$PLUGINSDIR" / inside).read_bytes() == NSI.with_name(ours).read_bytes(), inside
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
    for name in ("modron.ico", *IMAGES):   # makensis reads the icon and the images beside the script
        shutil.copy(NSI.with_name(name), tmp_path)
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


def test_the_images_are_24_bit_bmps_of_the_sizes_mui_draws():
    """The committed images (a build needs no Qt): the Welcome/Finish bitmap 164x314 and the header 150x57,
    uncompressed 24-bit BMPs as NSIS's Modern UI expects."""
    for name, size in IMAGES.items():
        assert _bmp(NSI.with_name(name).read_bytes()) == (*size, 24, 0), name


def test_the_script_uses_modrons_images_not_nsis_defaults():
    text = NSI.read_text()
    defines = ('!define MUI_WELCOMEFINISHPAGE_BITMAP "wizard.bmp"', '!define MUI_UNWELCOMEFINISHPAGE_BITMAP "wizard.bmp"',
               "!define MUI_HEADERIMAGE\n", '!define MUI_HEADERIMAGE_BITMAP "header.bmp"',
               '!define MUI_HEADERIMAGE_UNBITMAP "header.bmp"')
    first_page = text.index("!insertmacro MUI_PAGE_")   # MUI reads the defines when the first page is inserted
    for define in defines:
        assert define in text, define
        assert text.index(define) < first_page, f"{define} must come before the MUI pages"


def test_make_images_remakes_them(tmp_path):
    """installer/windows/make_images.py (Qt, offscreen) writes the images and the icon; here into tmp_path."""
    out = subprocess.run([sys.executable, str(NSI.with_name("make_images.py")), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, QT_QPA_PLATFORM="offscreen"))
    assert out.returncode == 0, out.stdout + out.stderr
    for name, size in IMAGES.items():
        assert _bmp((tmp_path / name).read_bytes()) == (*size, 24, 0), name
    icon = (tmp_path / "modron.ico").read_bytes()
    assert icon[:6] == b"\0\0\1\0\1\0" and icon[6:8] == b"\x30\x30"   # ICONDIR: an icon, one image, 48x48
