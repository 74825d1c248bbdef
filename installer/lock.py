"""Modron's dependency locks: the app's libraries resolved once per release, pinned with hashes.

  python installer/lock.py            re-resolve the locks from pyproject.toml (keeps the versions already
                                      locked where they still fit; --upgrade takes the newest); needs PyPI
  python installer/lock.py --check    check every lock against pyproject.toml (no network; CI runs it)

One file per torch release the installers can pick (installer/torch_select.py): installer/locks/torch-X.txt,
resolved together with torch==X for every platform and Python at once (uv's universal resolution: entries
carry markers), plus installer/locks/dev.txt (torch 2.13.0 and the dev extra) for scripts/dev and CI.
torch itself, and what only torch needs (triton, the nvidia-* CUDA libraries, sympy, ...), is left out:
those come with the torch build picked for the GPU, from its own index. Everything else is installed from
the lock with `--require-hashes --no-deps`, so two users of one release get the same libraries.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCKS = ROOT / "installer" / "locks"
DEV_TORCH = "2.13.0"   # scripts/dev's pin (MODRON_TORCH_PIN)
ENTRY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$")
HEADER = """\
# Modron's dependency lock{what}: made by installer/lock.py from pyproject.toml; do not edit.
# All platforms and Pythons at once (markers). torch and what only torch needs come with the torch build.
# Install: uv pip install --require-hashes --no-deps -r {name}
"""


def _torch_versions() -> list[str]:
    spec = importlib.util.spec_from_file_location("torch_select", ROOT / "installer" / "torch_select.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod   # its dataclasses look themselves up there
    spec.loader.exec_module(mod)
    return sorted({b.torch for b in mod.ALL.values()}, key=lambda v: tuple(map(int, v.split("."))))


def lock_files(locks: Path = LOCKS) -> dict[Path, tuple[str, list[str], int]]:
    """Each lock -> (its torch version, pyproject extras it includes, the oldest Python 3.x it serves)."""
    files = {locks / f"torch-{v}.txt": (v, [], 10) for v in _torch_versions()}
    files[locks / "dev.txt"] = (DEV_TORCH, ["dev"], 11)   # import-linter 2.17 needs Python 3.11
    return files


def _blocks(text: str) -> list[list[str]]:
    """The compiled file's entries, each its lines (requirement, hashes, '# via' annotations)."""
    blocks: list[list[str]] = []
    for line in text.splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            blocks.append([line])
        elif blocks:
            blocks[-1].append(line)
    return blocks


def _via(block: list[str]) -> set[str]:
    names, inside = set(), False
    for line in block[1:]:
        s = line.strip()
        if s.startswith("# via "):
            names.add(s[6:].strip())
        elif s == "# via":
            inside = True
        elif inside and s.startswith("#   "):
            names.add(s[4:].strip())
    return {n.split(" ")[0].lower() for n in names}


def strip_torch(text: str) -> str:
    """Drops torch and every entry that only torch (or what only torch needs) requires."""
    blocks = _blocks(text)
    names = [ENTRY.match(b[0].strip()).group(1).lower() for b in blocks]
    gone = {"torch"}
    while True:
        more = {n for n, b in zip(names, blocks) if n not in gone and _via(b) and _via(b) <= gone}
        if not more:
            break
        gone |= more
    return "".join("\n".join(b) + "\n" for n, b in zip(names, blocks) if n not in gone)


def find_uv() -> str:
    if os.environ.get("UV"):
        return os.environ["UV"]
    out = subprocess.run([str(ROOT / "installer" / "build-tools.sh"), "uv"], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"lock.py: could not get uv: {out.stderr.strip()}")
    return out.stdout.strip().splitlines()[-1]


def make(upgrade: bool) -> None:
    uv = find_uv()
    LOCKS.mkdir(exist_ok=True)
    for path, (torch, extras, minor) in lock_files().items():
        with tempfile.TemporaryDirectory() as tmp:
            pin, out = Path(tmp) / "torch.in", Path(tmp) / "out.txt"
            pin.write_text(f"torch=={torch}\n")
            if path.exists() and not upgrade:   # uv keeps the versions of the file it writes where they fit
                shutil.copy(path, out)
            cmd = [uv, "pip", "compile", str(ROOT / "pyproject.toml"), str(pin), "--universal",
                   "--python-version", f"3.{minor}", "--generate-hashes", "--no-header", "--quiet", "-o", str(out)]
            cmd += [a for e in extras for a in ("--extra", e)]
            subprocess.run(cmd, check=True, env=dict(os.environ, UV_NO_CONFIG="1"), cwd=ROOT)
            body = strip_torch(out.read_text())
        what = f" for torch {torch}" + (f" with the {', '.join(extras)} extra" if extras else "")
        path.write_text(HEADER.format(what=what, name=path.relative_to(ROOT)) + body)
        print(f"{path.relative_to(ROOT)}: {len(_blocks(body))} packages")


def entries(text: str) -> list[tuple[str, str, str | None]]:
    """(name, version, marker) of each entry of a lock."""
    out = []
    for block in _blocks(text):
        m = ENTRY.match(block[0].strip())
        if not m:
            raise ValueError(f"not a pinned entry: {block[0]}")
        out.append((m.group(1), m.group(2), m.group(3)))
    return out


# The environments the check evaluates markers in: the platforms the installers serve, each Python they accept.
ENVIRONMENTS = [
    {"sys_platform": plat, "platform_system": system, "os_name": osn, "platform_machine": machine,
     "python_version": f"3.{minor}", "python_full_version": f"3.{minor}.0",
     "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    for plat, system, osn, machine in (("linux", "Linux", "posix", "x86_64"), ("win32", "Windows", "nt", "AMD64"))
    for minor in (10, 11, 12, 13)
]


def check(pyproject: Path = ROOT / "pyproject.toml", locks: Path = LOCKS) -> list[str]:
    """What disagrees between pyproject.toml and the locks (empty: they agree)."""
    from packaging.markers import Marker
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    try:
        import tomllib
    except ModuleNotFoundError:   # Python 3.10
        import tomli as tomllib
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    problems = []
    for path, (torch, extras, minor) in lock_files(locks).items():
        name = path.name
        if not path.exists():
            problems.append(f"{name} is missing: run python installer/lock.py")
            continue
        try:
            locked = [(canonicalize_name(n), v, Marker(m) if m else None) for n, v, m in entries(path.read_text())]
        except ValueError as e:
            problems.append(f"{name}: {e}")
            continue
        wanted = list(project["dependencies"]) + [d for e in extras for d in project["optional-dependencies"][e]]
        for dep in map(Requirement, wanted):
            dep_name = canonicalize_name(dep.name)
            if dep_name == "torch":   # the torch build comes from torch_select; check the lock was made for it
                if torch not in dep.specifier:
                    problems.append(f"{name}: torch {torch} is not allowed by pyproject's {dep}")
                continue
            for env in ENVIRONMENTS:
                if int(env["python_version"].split(".")[1]) < minor or dep.marker and not dep.marker.evaluate(env):
                    continue
                here = [v for n, v, m in locked if n == dep_name and (m is None or m.evaluate(env))]
                if not here:
                    problems.append(f"{name}: {dep} is not locked (for {env['sys_platform']}, Python "
                                    f"{env['python_version']}): run python installer/lock.py")
                    break
                bad = [v for v in here if not dep.specifier.contains(v, prereleases=True)]
                if bad:
                    problems.append(f"{name}: {dep_name}=={bad[0]} is locked but pyproject wants {dep}: "
                                    f"run python installer/lock.py")
                    break
        for n, v, _ in locked:
            if n in ("torch", "triton") or n.startswith("nvidia-cu"):
                problems.append(f"{name}: {n} belongs to the torch build, not the lock")
    return problems


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lock.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="check the locks against pyproject.toml (no network)")
    p.add_argument("--upgrade", action="store_true", help="re-resolve to the newest versions allowed")
    args = p.parse_args(argv)
    if args.check:
        problems = check()
        for problem in problems:
            print(problem, file=sys.stderr)
        if not problems:
            print(f"the locks agree with pyproject.toml: {', '.join(p.name for p in lock_files())}")
        return 1 if problems else 0
    make(args.upgrade)
    return 0


if __name__ == "__main__":
    sys.exit(main())
