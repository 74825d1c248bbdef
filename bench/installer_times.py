"""How long the Linux installer takes, and how big the install is: a warm install, a repair with nothing to
change, and the installed size, against the targets of issue 14 (repair < 30 s, warm install < 90 s on 2
cores, size <= 1.6 GiB, what `du -h` calls 1.6G).

  .venv/bin/python bench/installer_times.py [--wheels DIR]      # about 2-3 min on 2 cores

Prints one JSON line, then readable lines; exit 1 when a target is missed.

Builds the .run (installer/build-linux.sh), then installs into a throwaway HOME the way the tests do: the
CPU torch wheel from --wheels (MODRON_TEST_WHEELS, else /opt/wheels; `--torch-index none`), the locked
libraries from PyPI through the tests' uv cache (~/.cache/modron-test-uv). "Warm" means that cache already
holds every file: a first run fills it (reported as the warm-up), the measured install comes after. The
repair is the recorded repair command (`install.sh ... --repair`), which keeps an environment that is
already right. The installed size is `du` of ~/.local/share/modron/install (the cache is elsewhere).
The locked libraries come from the cache, but uv may still ask PyPI for its index pages.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"warm_install_s": 90, "repair_no_change_s": 30, "installed_gib": 1.6}   # GiB: what du -h says


def _python() -> str:
    """The interpreter the CPU torch wheel on disk is built for (the one this venv was made from)."""
    v = sys.version_info
    exe = Path(sys.base_prefix) / "bin" / f"python{v.major}.{v.minor}"
    return str(exe) if exe.is_file() else shutil.which("python3")


def _env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MODRON_", "XDG_", "VIRTUAL_ENV", "UV_")) and k not in ("DISPLAY", "PYTHONPATH")}
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    env.update(HOME=str(home), TMPDIR=str(home / "tmp"), MODRON_FAKE_NVIDIA_SMI="", MODRON_FAKE_ROCM="",
               MODRON_UV_CACHE_DIR=str(Path.home() / ".cache" / "modron-test-uv"))
    return env


def _timed(cmd: list, env: dict) -> float:
    start = time.monotonic()
    proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900)
    took = time.monotonic() - start
    if proc.returncode != 0:
        sys.exit(f"installer_times.py: {' '.join(map(str, cmd[:3]))}... failed:\n{proc.stdout}\n{proc.stderr}")
    return took


def _du(path: Path) -> int:
    return int(subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=True).stdout.split()[0]) * 1024


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wheels", default=os.environ.get("MODRON_TEST_WHEELS", "/opt/wheels"))
    args = p.parse_args(argv)
    build = subprocess.run([str(ROOT / "installer" / "build-linux.sh")], capture_output=True, text=True, check=True)
    run_file = build.stdout.strip().splitlines()[-1]
    install = [run_file, "--nox11", "--", "--python", _python(), "--find-links", args.wheels, "--yes",
               "--torch-index", "none"]
    figures = {"cores": os.cpu_count(), "load_before": round(os.getloadavg()[0], 1)}   # others' work slows it
    with tempfile.TemporaryDirectory(prefix="modron-bench-") as tmp:
        warm_up = Path(tmp) / "warm-up"
        figures["warm_up_install_s"] = round(_timed(install, _env(warm_up)), 1)   # fills the uv cache if cold
        home = Path(tmp) / "home"
        figures["warm_install_s"] = round(_timed(install, _env(home)), 1)
        inst = home / ".local" / "share" / "modron" / "install"
        record = json.loads((inst / "install.json").read_text())
        figures["repair_no_change_s"] = round(_timed(record["repair_command"], _env(home)), 1)
        after = json.loads((inst / "install.json").read_text())
        figures["repair_kept_environment"] = after.get("environment") == "kept"
        figures["installed_gib"] = round(_du(inst) / 2 ** 30, 2)
        figures["venv_gib"] = round(_du(inst / "venv") / 2 ** 30, 2)
        figures["recorded_installed_gib"] = round((after.get("installed_bytes") or 0) / 2 ** 30, 2)
    figures["targets_met"] = (figures["warm_install_s"] < TARGETS["warm_install_s"]
                              and figures["repair_no_change_s"] < TARGETS["repair_no_change_s"]
                              and figures["installed_gib"] <= TARGETS["installed_gib"])
    print(json.dumps(figures))
    for key, value in figures.items():
        target = f"   (target: {'<=' if key == 'installed_gib' else '<'} {TARGETS[key]})" if key in TARGETS else ""
        print(f"{key:26} {value}{target}")
    return 0 if figures["targets_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
