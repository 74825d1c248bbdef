"""How the app launches a contributing swarm peer: one interface, two ways.

hivemind has no native Windows build (uvloop, p2pd over unix sockets, fork), so on Windows the peer
runs inside the WSL2 distribution "Modron" that the installer sets up; everywhere else it is a plain
child process. Both speak the same protocol on the same pipes (wsl.exe relays stdin/stdout), so the
rest of the app sees no difference. No Qt here: `command()` only says what to start; app/engine_client.py's
EngineRun starts it.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence

from training_core.protocol import ENTRY_MODULE

JOIN = ("-m", ENTRY_MODULE, "swarm", "join")   # the engine's one entry point, as app/engine_client.py starts it
WSL_DISTRO = "Modron"
WSL_PYTHON = "~/modron/venv/bin/python"   # where the installer puts Modron's venv inside the distribution
WSL_MISSING = ("Swarm contribution on Windows needs WSL2: run Repair install and tick "
               "'Set up swarm contribution'")

_WIN_PATH = re.compile(r"^([A-Za-z]):[\\/](.*)$")


class Runner:
    """What every runner offers."""
    name = "runner"

    def command(self, args: Sequence[str]) -> tuple[str, list[str]]:
        """(program, argv) for `swarm join` with `args` (already in this runner's path form)."""
        raise NotImplementedError

    def available(self) -> tuple[bool, str]:
        """(True, "") or (False, a plain sentence saying what to do)."""
        raise NotImplementedError

    def path(self, p) -> str:
        """A path of ours as the peer will see it."""
        return str(p)


class LocalRunner(Runner):
    name = "local"

    def __init__(self, python: str | None = None):
        self.python = python or sys.executable

    def command(self, args: Sequence[str]) -> tuple[str, list[str]]:
        return self.python, [*JOIN, *args]

    def available(self) -> tuple[bool, str]:
        return True, ""


def to_wsl_path(p) -> str:
    """C:\\Users\\me\\x -> /mnt/c/Users/me/x (WSL's default automount); other text unchanged."""
    text = str(p)
    m = _WIN_PATH.match(text)
    if not m:
        return text
    rest = m.group(2).replace("\\", "/")
    return f"/mnt/{m.group(1).lower()}/{rest}"


def _wsl_distros(wsl: str) -> list[str]:
    """Installed distribution names. `wsl.exe -l -q` writes UTF-16LE (with NULs) on most builds."""
    out = subprocess.run([wsl, "-l", "-q"], capture_output=True, timeout=10).stdout
    text = out.decode("utf-16-le", errors="ignore") if b"\x00" in out else out.decode("utf-8", errors="ignore")
    return [line.strip().strip("\x00") for line in text.splitlines() if line.strip().strip("\x00")]


class WslRunner(Runner):
    name = "wsl"

    def __init__(self, which: Callable[[str], str | None] = shutil.which,
                 list_distros: Callable[[str], list[str]] = _wsl_distros,
                 distro: str = WSL_DISTRO, python: str = WSL_PYTHON):
        self.which, self.list_distros = which, list_distros
        self.distro, self.python = distro, python

    def _wsl(self) -> str | None:
        return self.which("wsl.exe") or self.which("wsl")

    def command(self, args: Sequence[str]) -> tuple[str, list[str]]:
        wsl = self._wsl() or "wsl.exe"
        return wsl, ["-d", self.distro, "--", self.python, *JOIN, *(to_wsl_path(a) for a in args)]

    def path(self, p) -> str:
        return to_wsl_path(p)

    def available(self) -> tuple[bool, str]:
        wsl = self._wsl()
        if wsl is None:
            return False, WSL_MISSING + " (WSL is not installed)."
        try:
            names = self.list_distros(wsl)
        except (OSError, subprocess.SubprocessError) as exc:
            return False, WSL_MISSING + f" (WSL did not answer: {exc})."
        if self.distro.lower() not in {n.lower() for n in names}:
            return False, WSL_MISSING + f" (the '{self.distro}' distribution is missing)."
        return True, ""


def pick_runner(platform: str = sys.platform, which: Callable[[str], str | None] = shutil.which,
                list_distros: Callable[[str], list[str]] = _wsl_distros) -> Runner:
    if platform.startswith("win"):
        return WslRunner(which=which, list_distros=list_distros)
    return LocalRunner()
