"""Writes install.json, the record of what an installer chose, which Settings shows (app/install_info.py).

Run by both installers with the freshly installed environment's Python (sys.prefix is that venv):
  python write_record.py --choice CHOICE.json --version V [--previous V] --menu-entry P --autostart-entry P
                         --uninstaller P --log P [--torch-source TEXT --torch-url URL] [--lock LOCK.txt
                         --libraries-source TEXT] [--installed-bytes N] [--environment built|kept]
                         -- REPAIR COMMAND...
--torch-source/--torch-url say where torch really came from (an empty URL: no PyTorch index was used, e.g.
--torch-index none); without them the build's index is recorded.
The record goes beside the venv (sys.prefix/../install.json), where the app looks for it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path


def _libraries(args: argparse.Namespace) -> dict | None:
    """The lock the libraries were installed from (installer/lock.py) and where they came from."""
    if not args.lock:
        return None
    lock = Path(args.lock)
    return {"lock": lock.name, "lock_sha256": hashlib.sha256(lock.read_bytes()).hexdigest(),
            "source": args.libraries_source}


def record(args: argparse.Namespace) -> dict:
    choice = json.loads(Path(args.choice).read_text(encoding="utf-8"))
    install = Path(sys.prefix).parent
    return {
        "version": args.version,
        "upgraded_from": args.previous or None,
        "installed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "platform": f"{platform.system()} {platform.machine()}",
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation(),
                   "base": sys.base_prefix},
        "torch": {"build": choice["build"], "version": choice["torch"],
                  "index_url": choice["index_url"] if args.torch_url is None else (args.torch_url or None),
                  "source": args.torch_source or choice["index_url"], "reasons": choice["reasons"]},
        "libraries": _libraries(args),
        "environment": args.environment,
        "installed_bytes": args.installed_bytes,
        "gpus": choice["gpus"], "driver": choice["driver"], "amd": choice["amd"],
        "paths": {"root": str(install.parent), "install": str(install), "venv": sys.prefix, "log": args.log,
                  "uninstaller": args.uninstaller, "menu_entry": args.menu_entry,
                  "autostart_entry": args.autostart_entry},
        "repair_command": args.repair,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="write_record.py")
    p.add_argument("--choice", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--previous", default="")
    p.add_argument("--menu-entry", required=True)
    p.add_argument("--autostart-entry", required=True)
    p.add_argument("--uninstaller", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--torch-source", default="")
    p.add_argument("--torch-url", default=None)
    p.add_argument("--lock", default="")
    p.add_argument("--libraries-source", default="PyPI")
    p.add_argument("--installed-bytes", type=int, default=None)
    p.add_argument("--environment", choices=["built", "kept"], default="built")
    p.add_argument("repair", nargs="+", help="the command that reruns the installer")
    args = p.parse_args(argv)
    path = Path(sys.prefix).parent / "install.json"
    tmp = path.with_name(f".install.json.{os.getpid()}")
    tmp.write_text(json.dumps(record(args), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)   # a killed installer leaves the old record or the new one, never half of one
    return 0


if __name__ == "__main__":
    sys.exit(main())
