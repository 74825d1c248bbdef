"""What the installer chose (install.json beside the app's environment), for Settings, and "Repair install".

The installers put the environment in <data folder>/install/venv and the record in
<data folder>/install/install.json (written by installer/write_record.py), so the record is found from
sys.prefix alone. A source checkout has no record.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from training_core.errors import UserError

NOT_INSTALLED = "Not installed by the Modron installer (development checkout)."


def record_path() -> Path:
    return Path(sys.prefix).parent / "install.json"


@dataclass
class InstallInfo:
    path: Path
    record: dict = field(default_factory=dict)
    problem: str = ""   # the record exists but cannot be read

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) lines for Settings."""
        r = self.record
        if self.problem:
            return [("Record", self.problem)]
        torch = r.get("torch") or {}
        python = r.get("python") or {}
        gpus = r.get("gpus") or []
        gpu_text = ", ".join(f"{g.get('name')} (compute capability {g.get('compute_cap')})" for g in gpus)
        if r.get("amd"):
            gpu_text = ", ".join(filter(None, [gpu_text, "AMD " + ", ".join(r["amd"])]))
        rows = [
            ("Modron", f"{r.get('version', '?')}, installed {r.get('installed_at', '?')}"
                       + (f" (upgraded from {r['upgraded_from']})" if r.get("upgraded_from") else "")),
            ("Python", f"{python.get('version', '?')} ({python.get('base', '?')})"),
            ("PyTorch", f"{torch.get('version', '?')}, {torch.get('build', '?')} build"),
            ("Why", "; ".join(torch.get("reasons") or []) or "?"),
            ("GPU", gpu_text or "none found"),
        ]
        if torch.get("source"):   # where it really came from: an index, or local wheels
            rows.insert(3, ("PyTorch from", str(torch["source"])))
        libraries = r.get("libraries") or {}
        if libraries.get("lock"):
            rows.append(("Libraries", f"the versions locked for this release ({libraries['lock']}), "
                                      f"from {libraries.get('source') or '?'}"))
        if isinstance(r.get("installed_bytes"), int):
            rows.append(("Size", f"{r['installed_bytes'] / 2 ** 30:.1f} GB"))
        if r.get("driver"):
            rows.append(("NVIDIA driver", str(r["driver"])))
        rows.append(("Folder", str((r.get("paths") or {}).get("install", self.path.parent))))
        return rows

    @property
    def repair_command(self) -> list[str]:
        cmd = self.record.get("repair_command")
        return [str(c) for c in cmd] if isinstance(cmd, list) and cmd else []

    @property
    def log_path(self) -> str:
        return str((self.record.get("paths") or {}).get("log") or self.path.with_name("install.log"))


def load() -> InstallInfo | None:
    """The install record, or None for a development checkout."""
    path = record_path()
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return InstallInfo(path, problem=f"{path} cannot be read ({exc}); Repair install rewrites it")
    if not isinstance(record, dict):
        return InstallInfo(path, problem=f"{path} is not an install record; Repair install rewrites it")
    return InstallInfo(path, record)


def start_repair(info: InstallInfo) -> int:
    """Start the recorded repair command on its own (it outlives the app); its process id."""
    cmd = info.repair_command
    if not cmd:
        raise UserError(info.path, "records no repair command; download the installer and run it again")
    kwargs: dict = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL,
                    "close_fds": True, "cwd": str(info.path.parent)}
    if sys.platform == "win32":
        kwargs["creationflags"] = subprocess.DETACHED_PROCESS | subprocess.CREATE_NEW_PROCESS_GROUP
    else:
        kwargs["start_new_session"] = True   # not killed with the app, nor by a Ctrl-C meant for it
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    try:
        return subprocess.Popen(cmd, env=env, **kwargs).pid
    except OSError as exc:
        raise UserError(cmd[0], f"cannot be started ({exc.strerror or exc}); download the installer and run it "
                                f"again") from None
