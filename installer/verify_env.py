"""Checks that an installed environment's files are the ones that were installed: run with the environment's
own Python, it compares every file listed in each package's RECORD (size and sha256) with the disk.

  VENV/bin/python verify_env.py      exit 0 and one summary line when all match; 1 and the first few problems

The Linux installer runs it when a repair finds an environment that is already right (same Python, torch
build, lock and Modron): instead of a rebuild, a few seconds of hashing show nothing was deleted or damaged,
and a mismatch makes the installer build the environment anew. Standard library only.
"""
from __future__ import annotations

import base64
import csv
import hashlib
import sys
import sysconfig
from pathlib import Path


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode()


def problems(limit: int = 5) -> tuple[int, int, list[str]]:
    """(packages, files checked, the first `limit` problems)."""
    found: list[str] = []
    packages = files = 0
    roots = {Path(sysconfig.get_path("purelib")), Path(sysconfig.get_path("platlib"))}
    for site in roots:
        for record in sorted(site.glob("*.dist-info/RECORD")):
            packages += 1
            with open(record, newline="", encoding="utf-8") as f:
                for row in csv.reader(f):
                    if len(row) < 3 or not row[1].startswith("sha256="):
                        continue   # RECORD itself and files written at install time carry no hash
                    path = (site / row[0]).resolve()
                    files += 1
                    if not path.is_file():
                        found.append(f"{record.parent.name}: {row[0]} is missing")
                    elif row[2] and path.stat().st_size != int(row[2]):
                        found.append(f"{record.parent.name}: {row[0]} has changed (size)")
                    elif _digest(path) != row[1][len("sha256="):]:
                        found.append(f"{record.parent.name}: {row[0]} has changed")
                    if len(found) >= limit:
                        return packages, files, found
    return packages, files, found


def main() -> int:
    packages, files, found = problems()
    if found:
        print("the environment differs from what was installed:", *found, sep="\n  ")
        return 1
    if packages == 0:
        print("no installed packages found in this environment")
        return 1
    print(f"{packages} packages, {files} files: all as installed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
