"""Which PyTorch build to install on this computer: the installers' GPU -> torch choice.

Standard library only: the installers run it with the Python they just installed, before anything else
exists. `python torch_select.py --json` prints the choice; `--torch BUILD` overrides it.

The rule: among the builds below, take the first (newest torch, then newest CUDA) whose wheels carry
kernels for every NVIDIA GPU present and whose CUDA runs on the installed driver. When no build covers
every GPU, cover the oldest one (it is the one an old build exists for) and say which cards are left out.
AMD GPUs with ROCm on Linux get the ROCm build; everything else, and anything unsupported, the CPU build,
with the reason in plain words.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

INDEX_BASE = "https://download.pytorch.org/whl"
TORCH_VERSION = "2.13.0"   # the version Modron is tested with (scripts/dev pins the same)
GB = 1024 ** 3


@dataclass(frozen=True)
class Build:
    name: str
    torch: str                       # the torch release to pin with this build
    min_driver: dict                 # platform -> the oldest NVIDIA driver its CUDA runs on
    sm: tuple = ()                   # compute capabilities the wheels ship kernels (cubins) for
    ptx: dict = field(default_factory=dict)   # platform -> the capability PTX is shipped for (JIT to newer)
    needs_bytes: int = 0             # disk the install needs (download, cache and unpacked venv)


# Facts (PyTorch RELEASE.md support matrices, pytorch/pytorch#157517, #172352, #190355; NVIDIA's CUDA
# release notes, minor-version compatibility): CUDA 11.x runs on drivers >= 450.80.02 (Linux) /
# 452.39 (Windows), 12.x on >= 525.60.13 / 528.33, 13.x on >= 580.65.06 / 580.88.
# - cu130 with torch 2.13: Turing 7.5 .. Blackwell 12.0 (+PTX on Linux only); no Maxwell/Pascal/Volta.
# - cu126 with torch 2.13 (kept as the legacy build): Maxwell 5.0, Pascal 6.0, Volta 7.0 .. Hopper 9.0;
#   no Blackwell.
# - cu128 ended with torch 2.11 (7.5 .. 12.0 there): the only way to Blackwell on a 570-579 driver.
# - cu118 ended with torch 2.7.1 (5.0 .. 9.0): Maxwell/Pascal cards on drivers older than 525.
# A cubin for X.Y also runs on X.Z with Z > Y (an M40, 5.2, runs sm_50 code; an RTX 4090, 8.9, sm_86).
_CUDA12 = {"linux": "525.60.13", "windows": "528.33"}
BUILDS: tuple[Build, ...] = (
    Build("cu130", TORCH_VERSION, {"linux": "580.65.06", "windows": "580.88"},
          ("7.5", "8.0", "8.6", "9.0", "10.0", "12.0"), {"linux": "12.0"}, 9 * GB),
    Build("cu126", TORCH_VERSION, _CUDA12, ("5.0", "6.0", "7.0", "7.5", "8.0", "8.6", "9.0"), {}, 9 * GB),
    Build("cu128", "2.11.0", _CUDA12, ("7.5", "8.0", "8.6", "9.0", "10.0", "12.0"), {}, 9 * GB),
    Build("cu118", "2.7.1", {"linux": "450.80.02", "windows": "452.39"},
          ("5.0", "6.0", "7.0", "7.5", "8.0", "8.6", "9.0"), {}, 8 * GB),
)
ROCM = Build("rocm7.2", TORCH_VERSION, {}, (), {}, 18 * GB)   # torch 2.13's ROCm build; Linux only
CPU = Build("cpu", TORCH_VERSION, {}, (), {}, 3 * GB)
ALL = {b.name: b for b in (*BUILDS, ROCM, CPU)}


@dataclass
class Gpu:
    name: str
    compute_cap: str   # "8.6"


@dataclass
class Choice:
    build: str
    torch: str
    index_url: str
    needs_bytes: int
    reasons: list[str]
    gpus: list[dict]
    driver: str | None
    amd: list[str]

    @property
    def requirement(self) -> str:
        # With the local label: a PyPI torch of the same version (another build) must never match.
        return f"torch=={self.torch}+{self.build}"

    def to_dict(self) -> dict:
        # needs_mb: NSIS counts in 32-bit integers, too small for bytes.
        return {**asdict(self), "requirement": self.requirement, "needs_mb": self.needs_bytes // 2 ** 20}


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.strip().split(".") if p.isdigit())


def runs_on(build: Build, cap: str, platform: str) -> bool:
    """Whether `build` ships code a GPU of compute capability `cap` can run."""
    major, minor = _version(cap)[:2]
    for sm in build.sm:
        s_major, s_minor = _version(sm)[:2]
        if s_major == major and s_minor <= minor:
            return True
    ptx = build.ptx.get(platform)
    return bool(ptx) and _version(ptx) <= (major, minor)


def parse_nvidia_smi(text: str) -> tuple[list[Gpu], str | None]:
    """`nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader` -> GPUs, driver."""
    gpus, driver = [], None
    for line in text.splitlines():
        parts = [p.strip() for p in line.rsplit(",", 2)]
        if len(parts) != 3 or not _version(parts[1]):
            continue
        gpus.append(Gpu(parts[0], parts[1]))
        driver = driver or parts[2]
    return gpus, driver


def choose(gpus: list[Gpu], driver: str | None, platform: str, amd: list[str] | tuple = (),
           override: str | None = None) -> Choice:
    """The build for these GPUs on this driver and platform ("linux" or "windows")."""
    def made(build: Build, reasons: list[str]) -> Choice:
        return Choice(build.name, build.torch, f"{INDEX_BASE}/{build.name}", build.needs_bytes, reasons,
                      [asdict(g) for g in gpus], driver, list(amd))

    if override:
        if override not in ALL:
            raise ValueError(f"unknown torch build {override!r}; choose one of {', '.join(ALL)}")
        build = ALL[override]
        reasons = [f"{override} was chosen by you (--torch {override})"]
        left_out = [g for g in gpus if build in BUILDS and not runs_on(build, g.compute_cap, platform)]
        if left_out:
            reasons.append("it has no kernels for " + ", ".join(f"{g.name} ({g.compute_cap})" for g in left_out))
        return made(build, reasons)

    if gpus:
        if not driver:
            return made(CPU, ["an NVIDIA GPU was found but not its driver version, so the CPU build is "
                              "installed; install the NVIDIA driver and repair the install"])
        oldest = min(gpus, key=lambda g: _version(g.compute_cap))
        on_driver = [b for b in BUILDS if _version(driver) >= _version(b.min_driver[platform])]
        names = ", ".join(f"{g.name} (compute capability {g.compute_cap})" for g in gpus)
        for build in on_driver:
            if all(runs_on(build, g.compute_cap, platform) for g in gpus):
                return made(build, [f"found {names} on driver {driver}",
                                    f"{build.name} (torch {build.torch}) is the newest build with kernels for "
                                    f"{'every GPU here' if len(gpus) > 1 else 'it'} that runs on this driver"])
        for build in on_driver:
            if runs_on(build, oldest.compute_cap, platform):
                left = [g for g in gpus if not runs_on(build, g.compute_cap, platform)]
                return made(build, [f"found {names} on driver {driver}",
                                    "no single PyTorch build has kernels for all of them",
                                    f"{build.name} (torch {build.torch}) covers the oldest, {oldest.name}; "
                                    f"{', '.join(g.name for g in left)} will not be used (install with "
                                    f"--torch cu130 to use the newer card instead)"])
        fitting = [b for b in BUILDS if runs_on(b, oldest.compute_cap, platform)]
        if fitting:
            need = min(fitting, key=lambda b: _version(b.min_driver[platform]))
            return made(CPU, [f"found {names} on driver {driver}",
                              f"the oldest PyTorch build for {oldest.name} ({need.name}) needs driver "
                              f"{need.min_driver[platform]} or newer, so the CPU build is installed; update "
                              f"the NVIDIA driver, then repair the install"])
        return made(CPU, [f"found {names}",
                          f"no PyTorch build still ships kernels for compute capability {oldest.compute_cap}, "
                          f"so the CPU build is installed"])

    if amd:
        if platform == "linux":
            return made(ROCM, [f"found AMD GPU(s) {', '.join(amd)} with ROCm",
                               f"{ROCM.name} (torch {ROCM.torch}) is PyTorch's ROCm build"])
        return made(CPU, [f"found AMD GPU(s) {', '.join(amd)}; PyTorch has no ROCm build for Windows, so the "
                          "CPU build is installed"])
    return made(CPU, ["no NVIDIA GPU (nvidia-smi) or ROCm found: the CPU build is installed"])


# --- detection (what runs on the user's computer) --------------------------------------------------

def detect_nvidia() -> tuple[list[Gpu], str | None, str | None]:
    """GPUs, driver, and a problem line when nvidia-smi exists but fails. MODRON_FAKE_NVIDIA_SMI (the
    query's output) stands in for nvidia-smi in tests."""
    fake = os.environ.get("MODRON_FAKE_NVIDIA_SMI")
    if fake is not None:
        return (*parse_nvidia_smi(fake.replace(";", "\n")), None)
    smi = shutil.which("nvidia-smi")
    if smi is None and sys.platform == "win32":
        candidate = Path(os.environ.get("SystemRoot", r"C:\Windows")) / "System32" / "nvidia-smi.exe"
        smi = str(candidate) if candidate.is_file() else None
    if smi is None:
        return [], None, None
    try:
        out = subprocess.run([smi, "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [], None, f"nvidia-smi did not run ({exc})"
    if out.returncode != 0:
        return [], None, f"nvidia-smi failed: {(out.stderr or out.stdout).strip()[:200]}"
    return (*parse_nvidia_smi(out.stdout), None)


def detect_amd() -> list[str]:
    """gfx targets rocminfo reports (Linux with ROCm); MODRON_FAKE_ROCM stands in for it in tests."""
    fake = os.environ.get("MODRON_FAKE_ROCM")
    if fake is not None:
        return [t for t in fake.split(",") if t]
    if not sys.platform.startswith("linux"):
        return []
    rocminfo = shutil.which("rocminfo") or ("/opt/rocm/bin/rocminfo" if Path("/opt/rocm/bin/rocminfo").exists()
                                            else None)
    if rocminfo is None:
        return []
    try:
        out = subprocess.run([rocminfo], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    targets = {w for line in out.splitlines() for w in line.split() if w.startswith("gfx") and w != "gfx000"}
    return sorted(targets)


def detect_and_choose(override: str | None = None, platform: str | None = None) -> Choice:
    platform = platform or ("windows" if sys.platform == "win32" else "linux")
    gpus, driver, problem = detect_nvidia()
    choice = choose(gpus, driver, platform, detect_amd(), override)
    if problem and not gpus:
        choice.reasons.insert(0, problem)
    return choice


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="torch_select.py", description="Pick the PyTorch build for this computer.")
    p.add_argument("--torch", metavar="BUILD", help=f"use this build: {', '.join(ALL)}")
    p.add_argument("--platform", choices=["linux", "windows"])
    p.add_argument("--json", action="store_true", help="print the choice as JSON")
    p.add_argument("--out", metavar="FILE", help="also write the choice as JSON to FILE")
    p.add_argument("--field", metavar="NAME", help="print only this field of the choice (for NSIS)")
    p.add_argument("--from", dest="saved", metavar="FILE", help="read a choice written by --out instead of detecting")
    args = p.parse_args(argv)
    if args.saved:
        data = json.loads(Path(args.saved).read_text(encoding="utf-8"))
        choice = Choice(**{k: v for k, v in data.items() if k not in ("requirement", "needs_mb")})
    else:
        try:
            choice = detect_and_choose(args.torch, args.platform)
        except ValueError as exc:
            sys.stderr.write(f"torch_select.py: {exc}\n")
            return 2
    data = choice.to_dict()
    if args.out:
        Path(args.out).write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    if args.field:
        value = data[args.field]
        print("\n".join(value) if isinstance(value, list) else value)
    elif args.json:
        print(json.dumps(choice.to_dict(), ensure_ascii=False))
    else:
        print(f"PyTorch build: {choice.build} (torch {choice.torch}) from {choice.index_url}")
        for reason in choice.reasons:
            print(f"  - {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
