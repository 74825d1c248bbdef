"""The Windows installer run for real under Wine (64-bit, apt: wine wine64), as far as Wine allows.

In a throwaway WINEPREFIX with no network (every proxy and uv's Python mirror point at a closed local port),
`Modron-Setup-<version>.exe /S` unpacks, writes the uninstaller and the Apps & features entry, runs the bundled
uv.exe, whose own error lands in install.log, and fails at the Python download with exit status 1 and the
cause; the entry's QuietUninstallString then removes everything. Past step 1 nothing can run here: the
torch choice, the venv and the install record need the Windows CPython that uv downloads from GitHub
(python-build-standalone), and neither PyPI nor apt carries one (see installer/README.md).
About 55 s on 2 busy cores: the build (MODRON_FAST_BUILD), wineboot, two installer runs, the uninstaller."""
import os
import re
import shutil
import socket
import struct
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNINST_KEY = r"HKCU\Software\Microsoft\Windows\CurrentVersion\Uninstall\Modron"


def _wine() -> str:
    # Debian's `wine` package gives /usr/bin/wine, which starts 64-bit programs with wine64.
    for name in ("wine", "wine64"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.fail("wine is missing: CI must install the Debian packages wine and wine64 (scripts/system-packages.txt)")


def _closed_port() -> int:
    with socket.socket() as s:   # bound then closed: connecting to it is refused at once
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def forwarder_dll(name: str, exports: dict[str, str]) -> bytes:
    """A PE32+ DLL with no code whose exports forward to other DLLs' functions ({"F": "dll.G"}).

    uv.exe (Rust's standard library) imports ProcessPrng from bcryptprimitives.dll, which Debian 12's Wine 8.0
    lacks (later Wine releases have it): uv does not start (status 0xC0000135). Windows 10 and 11 have it, so
    this is Wine's gap, not the installer's: the test gives Wine the function as RtlGenRandom (advapi32's
    SystemFunction036, same arguments; Rust ignores ProcessPrng's result, which is always TRUE). Where Wine has
    its own bcryptprimitives.dll, that builtin is loaded instead of this one."""
    rva, names = 0x1000, sorted(exports)
    n = len(names)
    funcs_at = rva + 40   # after the export directory
    names_at = funcs_at + 4 * n
    ords_at = names_at + 4 * n
    strings = bytearray()

    def string(s: str) -> int:
        at = ords_at + 2 * n + len(strings)
        strings.extend(s.encode() + b"\0")
        return at

    dll_name = string(name)
    name_rvas = [string(x) for x in names]
    target_rvas = [string(exports[x]) for x in names]   # inside the export directory: a forwarder
    body = struct.pack("<IIHHIIIIIII", 0, 0, 0, 0, dll_name, 1, n, n, funcs_at, names_at, ords_at)
    body += b"".join(struct.pack("<I", r) for r in target_rvas + name_rvas)
    body += b"".join(struct.pack("<H", i) for i in range(n)) + bytes(strings)
    raw = (len(body) + 0x1FF) & ~0x1FF
    dos = b"MZ" + bytes(0x3A) + struct.pack("<I", 0x40)
    coff = struct.pack("<HHIIIHH", 0x8664, 1, 0, 0, 0, 240, 0x2022)   # x86-64; executable, large-address, DLL
    opt = struct.pack("<HBBIIIII", 0x20B, 14, 0, 0, raw, 0, 0, rva)   # PE32+, no entry point
    opt += struct.pack("<QII", 0x180000000, 0x1000, 0x200)
    opt += struct.pack("<HHHHHHI", 6, 0, 0, 0, 6, 0, 0)
    opt += struct.pack("<IIIHH", rva + ((len(body) + 0xFFF) & ~0xFFF), 0x200, 0, 3, 0x100)
    opt += struct.pack("<QQQQII", 0x100000, 0x1000, 0x100000, 0x1000, 0, 16)
    opt += struct.pack("<II", rva, len(body)) + bytes(8 * 15)   # data directory 0: the exports
    section = struct.pack("<8sIIIIIIHHI", b".rdata", len(body), rva, raw, 0x200, 0, 0, 0, 0, 0x40000040)
    return (dos + b"PE\0\0" + coff + opt + section).ljust(0x200, b"\0") + body.ljust(raw, b"\0")


class Prefix:
    def __init__(self, path: Path):
        self.path = path
        port = _closed_port()
        dead = f"http://127.0.0.1:{port}"
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("UV_", "WINE", "DISPLAY", "WAYLAND")) and k.lower() not in ("no_proxy",)}
        self.env.update(WINEPREFIX=str(path), WINEDEBUG="-all", WINEDLLOVERRIDES="mscoree,mshtml=",  # no Mono/Gecko
                        HTTP_PROXY=dead, HTTPS_PROXY=dead, ALL_PROXY=dead, http_proxy=dead, https_proxy=dead,
                        all_proxy=dead, UV_PYTHON_INSTALL_MIRROR=f"{dead}/python")   # no network, even with GitHub
        self.wine = _wine()

    def run(self, *args: str, timeout: int = 180, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([self.wine, *args], env={**self.env, **env}, capture_output=True, text=True,
                              timeout=timeout)

    def wait(self) -> None:   # every process of the prefix ended (the uninstaller reruns itself from %TEMP%)
        subprocess.run([shutil.which("wineserver") or "wineserver", "-w"], env=self.env, timeout=120)

    def reg(self, key: str) -> dict[str, str] | None:
        out = self.run("reg", "query", key)
        if out.returncode != 0:
            return None
        return {m[1]: m[3] for m in re.finditer(r"^\s+(\S+)\s+(REG_\w+)\s+(.*?)\s*$", out.stdout, re.M)}

    @property
    def profile(self) -> Path:
        (user,) = [p for p in (self.path / "drive_c" / "users").iterdir() if p.name != "Public"]
        return user

    def files(self) -> set[str]:
        # The user's profile, less %TEMP% (Wine's users\NAME\Temp, Windows' AppData\Local\Temp): the
        # uninstaller runs from a copy there, which Windows deletes at the next restart.
        base = self.profile
        temp = ("Temp", os.path.join("AppData", "Local", "Temp"))
        return {str(p.relative_to(base)) for p in base.rglob("*")
                if not str(p.relative_to(base)).startswith(temp)}


@pytest.fixture(scope="module")
def wine_runs(tmp_path_factory, built_windows_setup):
    """The runs, in order; each test checks one part of what they left."""
    prefix = Prefix(tmp_path_factory.mktemp("wine") / "prefix")
    exe = prefix.path.parent / "Modron-Setup-0.1.0.exe"   # a copy: other tests rebuild the one in dist/
    shutil.copy(built_windows_setup, exe)
    try:
        boot = prefix.run("wineboot", "--init")
        assert boot.returncode == 0, boot.stderr
        prefix.wait()
        system32 = prefix.path / "drive_c" / "windows" / "system32"
        (system32 / "bcryptprimitives.dll").write_bytes(
            forwarder_dll("bcryptprimitives.dll", {"ProcessPrng": "advapi32.SystemFunction036"}))
        runs = {"before": prefix.files()}
        # 1. uv.exe cannot start (its DLL disabled, as an antivirus or a broken system would): a first install.
        runs["no_start"] = prefix.run(str(exe), "/S",
                                      WINEDLLOVERRIDES="mscoree,mshtml=;bcryptprimitives=d")
        install = prefix.profile / "AppData" / "Local" / "modron" / "install"
        runs["no_start_log"] = (install / "install.log").read_text(encoding="utf-8", errors="replace")
        runs["entry_after_fail"] = prefix.reg(UNINST_KEY)
        # 2. The same again with uv running: the rerun of a failed install, no network.
        (install / "install.log").unlink()
        runs["offline"] = prefix.run(str(exe), "/S")
        runs["offline_log"] = (install / "install.log").read_text(encoding="utf-8", errors="replace")
        runs["unpacked"] = {str(p.relative_to(install)) for p in install.rglob("*")}
        runs["entry"] = prefix.reg(UNINST_KEY)
        # 3. What Apps & features runs for a silent uninstall.
        quiet = runs["entry"]["QuietUninstallString"]
        uninstaller = re.match(r'"([^"]+)"', quiet)[1]
        runs["uninstall"] = prefix.run(uninstaller, *quiet[len(uninstaller) + 2:].split())
        prefix.wait()
        runs["entry_after_uninstall"] = prefix.reg(UNINST_KEY)
        runs["after"] = prefix.files()
        yield runs
    finally:
        subprocess.run([shutil.which("wineserver") or "wineserver", "-k"], env=prefix.env, capture_output=True)
        shutil.rmtree(prefix.path, ignore_errors=True)   # a prefix is ~700 MB


@pytest.mark.slow
def test_unpacks_and_writes_the_uninstaller_and_apps_entry_before_any_download(wine_runs):
    assert wine_runs["offline"].returncode == 1
    for name in ("Uninstall.exe", "modron.ico", "Modron-Setup.exe", "install.log", os.path.join("installer", "uv.exe"),
                 os.path.join("installer", "modron-0.1.0-py3-none-any.whl"), os.path.join("installer", "torch_select.py"),
                 os.path.join("installer", "write_record.py"), os.path.join("installer", "locks", "torch-2.13.0.txt")):
        assert name in wine_runs["unpacked"], name
    entry = wine_runs["entry"]
    install = entry["InstallLocation"]
    assert entry["DisplayName"] == "Modron" and re.fullmatch(r"C:\\users\\[^\\]+\\AppData\\Local\\modron\\install", install)
    assert entry["UninstallString"] == f'"{install}\\Uninstall.exe"'
    assert entry["QuietUninstallString"] == f'"{install}\\Uninstall.exe" /S'
    assert entry["DisplayIcon"] == f"{install}\\modron.ico"


@pytest.mark.slow
def test_a_failed_install_claims_no_version(wine_runs):
    """Nothing is installed until step 6: no DisplayVersion, and the rerun does not log one as 'before'."""
    assert "DisplayVersion" not in wine_runs["entry_after_fail"]
    assert "DisplayVersion" not in wine_runs["entry"]
    assert wine_runs["offline_log"].splitlines()[0] == "===== Modron 0.1.0 installer (before: ) /S"


@pytest.mark.slow
def test_no_network_uvs_own_error_is_in_the_log_and_the_failure_names_it(wine_runs):
    log = wine_runs["offline_log"].splitlines()
    assert wine_runs["offline"].returncode == 1
    assert log[2].endswith("uv.exe\" python install --no-bin --no-registry 3.11")   # nothing outside install/
    assert log[3].startswith("error: Failed to install cpython-3.11")   # uv's own output, through cmd's >>
    assert any("Failed to download" in line for line in log[4:])
    cause = log[-2].strip().removeprefix("cause: ")
    assert log[-1] == (f"FAILED: Python 3.11 could not be downloaded ({cause}). Check the internet connection "
                       "and run the installer again.")
    assert "refused" in cause.lower()


@pytest.mark.slow
def test_a_program_that_cannot_start_is_named_by_its_status_not_by_its_command(wine_runs):
    log = wine_runs["no_start_log"].splitlines()
    assert wine_runs["no_start"].returncode == 1
    assert log[-1] == ("FAILED: Python 3.11 could not be downloaded (it printed nothing and exited with status "
                       "0xC0000135). Check the internet connection and run the installer again.")


@pytest.mark.slow
def test_the_quiet_uninstaller_removes_everything_the_failed_install_left(wine_runs):
    assert wine_runs["uninstall"].returncode == 0
    assert wine_runs["entry_after_uninstall"] is None
    assert not any(p.startswith(os.path.join("AppData", "Local", "modron")) for p in wine_runs["after"])
    assert wine_runs["after"] == wine_runs["before"]   # nothing else in the profile either (uv's own folders)
