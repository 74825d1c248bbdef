"""What this machine has: NVIDIA GPUs (through NVML), PyTorch's view, CPU and RAM.

Never imports torch at module level: the GUI's dashboard imports this module and must
stay light. `detect()` never raises; every NVML call is guarded on its own, because old
GPUs and odd drivers answer "not supported" to some calls and not to others.
"""
from __future__ import annotations

import dataclasses
import os
import platform
from dataclasses import dataclass, field
from typing import Any, Callable

from .preflight import format_bytes

NO_NVML = "no NVIDIA driver/NVML found"
CPU_MESSAGE = "No NVIDIA GPU found: training runs on the CPU (slow, fine for the demo)."


@dataclass
class GpuInfo:
    index: int
    name: str
    uuid: str | None
    vram_total: int            # bytes
    vram_used: int
    vram_free: int
    compute_capability: tuple[int, int] | None
    bf16: bool
    fp16_fast: bool
    temperature_c: int | None
    utilization_pct: int | None
    power_w: float | None
    processes: list[dict] = field(default_factory=list)   # other programs: {"pid", "name", "vram_used"}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["compute_capability"] = list(self.compute_capability) if self.compute_capability else None
        return d


@dataclass
class HardwareReport:
    gpus: list[GpuInfo]
    driver_version: str | None
    cuda_driver_version: str | None   # highest CUDA version the driver supports, e.g. "12.4"
    nvml: str                         # "ok" | NO_NVML | "NVML error: ..."
    torch: dict | None
    cpu_model: str
    cpu_cores_physical: int | None
    cpu_cores_logical: int
    ram_total: int
    ram_available: int
    messages: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["gpus"] = [g.to_dict() for g in self.gpus]
        return d

    def best_gpu(self) -> GpuInfo | None:
        """The GPU to train on: among those with at least 90 % of the most free memory, the newest."""
        if not self.gpus:
            return None
        most_free = max(g.vram_free for g in self.gpus)
        close = [g for g in self.gpus if g.vram_free >= 0.9 * most_free]
        return max(close, key=lambda g: (g.compute_capability or (0, 0), g.vram_free, -g.index))


# --- precision ---------------------------------------------------------------------------

def _has_bf16(cc: tuple[int, int] | None) -> bool:
    return cc is not None and cc >= (8, 0)


def _has_fast_fp16(cc: tuple[int, int] | None) -> bool:
    # Volta and newer have tensor cores; the P100 (6.0) has full-rate fp16. Consumer Pascal
    # (6.1) runs fp16 at 1/64 rate and Maxwell (5.x) has no fast fp16 at all.
    return cc is not None and (cc >= (7, 0) or cc == (6, 0))


def choose_precision(gpu: GpuInfo | None, requested: str = "auto") -> str:
    """'bf16' | 'fp16' | 'fp32'. Explicit requests are honoured except bf16 on a GPU without it."""
    if requested not in ("auto", "fp32", "fp16", "bf16"):
        raise ValueError(f"unknown precision {requested!r}")
    if gpu is None:
        return "fp32"   # half precision is for GPUs; on the CPU it is slow or unsupported
    if requested == "fp32":
        return "fp32"
    if requested == "fp16":
        return "fp16"
    if requested == "bf16" and gpu.bf16:
        return "bf16"
    # auto, or bf16 that this GPU cannot do: fall back by the rule.
    if gpu.bf16 and requested == "auto":
        return "bf16"
    return "fp16" if gpu.fp16_fast else "fp32"


def _cc_text(gpu: GpuInfo) -> str:
    cc = gpu.compute_capability
    return f"compute capability {cc[0]}.{cc[1]}" if cc else "unknown compute capability"


def precision_note(gpu: GpuInfo | None, requested: str, chosen: str) -> str | None:
    """A plain-word warning when what runs differs from what was asked, or is a poor choice."""
    if gpu is None:
        if requested in ("fp16", "bf16"):
            return f"{requested} needs a GPU; training on the CPU uses fp32."
        return None
    where = f"GPU {gpu.index} ({gpu.name}, {_cc_text(gpu)})"
    if requested == "bf16" and chosen != "bf16":
        return (f"{where} has no bf16 (it needs compute capability 8.0 or newer): "
                f"using {chosen} instead.")
    if requested == "fp16" and chosen == "fp16" and not gpu.fp16_fast:
        return (f"{where} has no fast fp16: it saves memory but may train slower than fp32 "
                f"and can be less stable.")
    return None


# --- NVML --------------------------------------------------------------------------------

def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _try(fn: Callable[..., Any], *args: Any) -> Any:
    """One NVML call; None if it fails (unsupported on this GPU, driver hiccup, missing symbol)."""
    try:
        return fn(*args)
    except Exception:
        return None


def _process_name(nv: Any, pid: int) -> str:
    try:
        import psutil
        return psutil.Process(pid).name()
    except Exception:
        pass
    name = _try(nv.nvmlSystemGetProcessName, pid) if hasattr(nv, "nvmlSystemGetProcessName") else None
    # In a container NVML reports host pids that we cannot see.
    return os.path.basename(_text(name)) if name else "unknown program"


def _gpu_processes(nv: Any, handle: Any, exclude_pids: set[int]) -> list[dict]:
    seen: dict[int, dict] = {}
    for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        fn = getattr(nv, getter, None)
        procs = _try(fn, handle) if fn else None
        for p in procs or []:
            pid = getattr(p, "pid", None)
            if pid is None or pid in exclude_pids:
                continue
            used = getattr(p, "usedGpuMemory", None)   # None on Windows (WDDM) and some drivers
            entry = seen.setdefault(pid, {"pid": pid, "name": _process_name(nv, pid), "vram_used": None})
            if used is not None:
                entry["vram_used"] = max(entry["vram_used"] or 0, int(used))
    return sorted(seen.values(), key=lambda e: -(e["vram_used"] or 0))


def gpu_processes(index: int = 0, exclude_pids: set[int] | None = None) -> list[dict]:
    """Other programs on GPU `index` (for a live dashboard); [] if NVML cannot tell."""
    try:
        import pynvml as nv
        nv.nvmlInit()
    except Exception:
        return []
    try:
        handle = nv.nvmlDeviceGetHandleByIndex(index)
        return _gpu_processes(nv, handle, {os.getpid()} | set(exclude_pids or ()))
    except Exception:
        return []
    finally:
        _try(nv.nvmlShutdown)


def _read_gpu(nv: Any, index: int, exclude: set[int]) -> GpuInfo:
    handle = nv.nvmlDeviceGetHandleByIndex(index)   # a failure here skips the GPU (caller catches)
    name = _try(nv.nvmlDeviceGetName, handle)
    uuid = _try(nv.nvmlDeviceGetUUID, handle)
    mem = _try(nv.nvmlDeviceGetMemoryInfo, handle)
    cc_raw = _try(nv.nvmlDeviceGetCudaComputeCapability, handle)
    cc = (int(cc_raw[0]), int(cc_raw[1])) if cc_raw else None
    temp = _try(nv.nvmlDeviceGetTemperature, handle, getattr(nv, "NVML_TEMPERATURE_GPU", 0))
    util = _try(nv.nvmlDeviceGetUtilizationRates, handle)
    power_mw = _try(nv.nvmlDeviceGetPowerUsage, handle)
    return GpuInfo(
        index=index,
        name=_text(name) if name else f"NVIDIA GPU {index}",
        uuid=_text(uuid) if uuid else None,
        vram_total=int(mem.total) if mem else 0,
        vram_used=int(mem.used) if mem else 0,
        vram_free=int(mem.free) if mem else 0,
        compute_capability=cc,
        bf16=_has_bf16(cc),
        fp16_fast=_has_fast_fp16(cc),
        temperature_c=int(temp) if temp is not None else None,
        utilization_pct=int(util.gpu) if util is not None else None,
        power_w=round(power_mw / 1000.0, 1) if power_mw is not None else None,
        processes=_gpu_processes(nv, handle, exclude),
    )


def _cuda_version_text(v: Any) -> str | None:
    # NVML gives 12040 for CUDA 12.4.
    try:
        v = int(v)
    except (TypeError, ValueError):
        return None
    return f"{v // 1000}.{(v % 1000) // 10}" if v > 0 else None


def _init_failure(nv: Any, exc: Exception) -> str:
    missing = {getattr(nv, "NVML_ERROR_LIBRARY_NOT_FOUND", 12), getattr(nv, "NVML_ERROR_DRIVER_NOT_LOADED", 9)}
    if getattr(exc, "value", None) in missing or isinstance(exc, OSError):
        return NO_NVML
    return f"NVML error: {exc or type(exc).__name__}"


def _read_nvml(exclude: set[int]) -> tuple[list[GpuInfo], str | None, str | None, str, list[str]]:
    notes: list[str] = []
    try:
        import pynvml as nv
    except Exception:
        return [], None, None, NO_NVML, ["The nvidia-ml-py package is missing, so GPUs cannot be listed."]
    try:
        nv.nvmlInit()
    except Exception as exc:
        return [], None, None, _init_failure(nv, exc), notes
    gpus: list[GpuInfo] = []
    try:
        driver = _try(nv.nvmlSystemGetDriverVersion)
        cuda = _cuda_version_text(_try(nv.nvmlSystemGetCudaDriverVersion))
        count = _try(nv.nvmlDeviceGetCount)
        if count is None:
            return [], _text(driver) if driver else None, cuda, "NVML error: could not count the GPUs", notes
        for i in range(int(count)):
            try:
                gpus.append(_read_gpu(nv, i, exclude))
            except Exception as exc:
                notes.append(f"GPU {i} could not be read ({exc or type(exc).__name__}); it is left out.")
        return gpus, _text(driver) if driver else None, cuda, "ok", notes
    finally:
        _try(nv.nvmlShutdown)


# --- torch, CPU, RAM -------------------------------------------------------------------------

def _torch_info() -> tuple[dict | None, list[str]]:
    try:
        import torch
    except Exception:
        return None, []
    info: dict[str, Any] = {"version": str(torch.__version__), "cuda_available": False,
                            "cuda_version": getattr(torch.version, "cuda", None), "device_count": 0,
                            "mps_available": False}
    arch: list[str] = []
    try:
        info["cuda_available"] = bool(torch.cuda.is_available())
        if info["cuda_available"]:
            info["device_count"] = int(torch.cuda.device_count())
            arch = list(torch.cuda.get_arch_list())
    except Exception:
        pass
    try:
        mps = getattr(torch.backends, "mps", None)
        info["mps_available"] = bool(mps is not None and mps.is_available())
    except Exception:
        pass
    return info, arch


def _arch_supports(arch: list[str], cc: tuple[int, int]) -> bool:
    """Does a torch build for these archs run on a GPU of compute capability `cc`?"""
    for a in arch:
        kind, _, num = a.partition("_")
        num = num.rstrip("abcdefghijklmnopqrstuvwxyz")      # "sm_90a" -> "90"
        if len(num) < 2 or not num.isdigit():
            continue
        major, minor = int(num[:-1]), int(num[-1])   # "sm_86" -> (8, 6), "sm_120" -> (12, 0)
        if kind == "sm" and major == cc[0] and minor <= cc[1]:
            return True        # machine code runs on the same major, same or newer minor
        if kind == "compute" and (major, minor) <= cc:
            return True        # PTX can be compiled for newer GPUs by the driver
    return False


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Hardware", "Model", "cpu model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _cpu_and_ram() -> tuple[str, int | None, int, int, int]:
    model = _cpu_model()
    logical = os.cpu_count() or 1
    physical = None
    total = available = 0
    try:
        import psutil
        physical = psutil.cpu_count(logical=False)
        vm = psutil.virtual_memory()
        total, available = int(vm.total), int(vm.available)
    except Exception:
        pass
    return model, physical, logical, total, available


# --- the report ------------------------------------------------------------------------------

def detect(include_torch: bool = True, exclude_pids: set[int] | None = None) -> HardwareReport:
    """Everything we can learn about this machine. Never raises."""
    exclude = {os.getpid()} | set(exclude_pids or ())
    messages: list[str] = []
    try:
        gpus, driver, cuda, nvml, notes = _read_nvml(exclude)
    except Exception as exc:   # belt and braces: a fake or broken pynvml must not crash the app
        gpus, driver, cuda, nvml, notes = [], None, None, f"NVML error: {exc}", []
    messages += notes
    torch_info, arch = (None, [])
    if include_torch:
        try:
            torch_info, arch = _torch_info()
        except Exception:
            torch_info, arch = None, []
    try:
        cpu_model, physical, logical, ram_total, ram_avail = _cpu_and_ram()
    except Exception:
        cpu_model, physical, logical, ram_total, ram_avail = "unknown CPU", None, os.cpu_count() or 1, 0, 0

    if not gpus:
        if nvml.startswith("NVML error"):
            messages.append(f"The NVIDIA driver did not answer ({nvml}): training runs on the CPU. "
                            "Reinstalling or updating the NVIDIA driver usually fixes this.")
        else:
            messages.append(CPU_MESSAGE)
    for g in gpus:
        label = f"GPU {g.index} ({g.name})"
        if g.compute_capability and not g.fp16_fast:
            messages.append(f"{label} has no fast half precision ({_cc_text(g)}): training uses fp32, "
                            "which is slower and needs more memory.")
        others = sum(p["vram_used"] or 0 for p in g.processes)
        if g.processes:
            names = ", ".join(sorted({p["name"] for p in g.processes}))
            used = f"{format_bytes(others)} of its memory" if others else "some of its memory"
            messages.append(f"{label}: other programs use {used} ({names}).")
        if torch_info and torch_info["cuda_available"] and arch and g.compute_capability \
                and not _arch_supports(arch, g.compute_capability):
            messages.append(f"{label} ({_cc_text(g)}) is not supported by this PyTorch build "
                            f"(torch {torch_info['version']}): install a PyTorch build that still supports it.")
    if gpus and torch_info is not None and not torch_info["cuda_available"]:
        messages.append(f"An NVIDIA GPU is present but this PyTorch (torch {torch_info['version']}) cannot use "
                        "CUDA: training would run on the CPU. Install a CUDA build of PyTorch.")
    if torch_info and torch_info.get("cuda_version") and cuda:
        built, drv = _version_tuple(torch_info["cuda_version"]), _version_tuple(cuda)
        if built and drv and drv[0] < built[0]:
            messages.append(f"The NVIDIA driver supports CUDA {cuda} but PyTorch was built for CUDA "
                            f"{torch_info['cuda_version']}: update the NVIDIA driver.")
    return HardwareReport(gpus=gpus, driver_version=driver, cuda_driver_version=cuda, nvml=nvml,
                          torch=torch_info, cpu_model=cpu_model, cpu_cores_physical=physical,
                          cpu_cores_logical=logical, ram_total=ram_total, ram_available=ram_avail,
                          messages=messages)


def gpu_for_torch_device(report: HardwareReport, torch_index: int) -> GpuInfo | None:
    """The NVML GpuInfo of torch's device `cuda:torch_index`, matched by UUID.

    NVML numbers GPUs by PCI bus, CUDA by speed and after CUDA_VISIBLE_DEVICES, so the two
    indexes can differ. Falls back to the index only when nothing could re-number them.
    Imports torch: call it from the engine, not the GUI.
    """
    try:
        import torch
        uuid = getattr(torch.cuda.get_device_properties(torch_index), "uuid", None)
    except Exception:
        uuid = None
    if uuid is not None:
        want = str(uuid).lower().removeprefix("gpu-")
        for g in report.gpus:
            if g.uuid and g.uuid.lower().removeprefix("gpu-") == want:
                return g
    if os.environ.get("CUDA_VISIBLE_DEVICES") is None:
        if len(report.gpus) == 1 and torch_index == 0:
            return report.gpus[0]
        if os.environ.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID":
            return next((g for g in report.gpus if g.index == torch_index), None)
    return None


def _version_tuple(text: str) -> tuple[int, ...] | None:
    try:
        return tuple(int(p) for p in str(text).split(".")[:2])
    except ValueError:
        return None


def format_report(report: HardwareReport) -> str:
    """Readable text for `modron-train hardware`."""
    lines: list[str] = []
    if report.gpus:
        for g in report.gpus:
            cc = f", compute capability {g.compute_capability[0]}.{g.compute_capability[1]}" \
                if g.compute_capability else ""
            lines.append(f"GPU {g.index}: {g.name}{cc}")
            lines.append(f"  memory: {format_bytes(g.vram_total)} total, {format_bytes(g.vram_free)} free, "
                         f"{format_bytes(g.vram_used)} used")
            lines.append(f"  precision: {choose_precision(g)} "
                         f"(bf16 {'yes' if g.bf16 else 'no'}, fast fp16 {'yes' if g.fp16_fast else 'no'})")
            live = [f"{g.temperature_c} °C" if g.temperature_c is not None else None,
                    f"{g.utilization_pct} % busy" if g.utilization_pct is not None else None,
                    f"{g.power_w:g} W" if g.power_w is not None else None]
            if any(live):
                lines.append("  now: " + ", ".join(x for x in live if x))
            for p in g.processes:
                used = format_bytes(p["vram_used"]) if p["vram_used"] is not None else "memory unknown"
                lines.append(f"  other program: {p['name']} (pid {p['pid']}, {used})")
    else:
        lines.append("GPU: none found")
    driver = f"NVIDIA driver {report.driver_version}" if report.driver_version else "NVIDIA driver: not found"
    if report.cuda_driver_version:
        driver += f" (supports CUDA {report.cuda_driver_version})"
    lines.append(f"{driver}; NVML: {report.nvml}")
    t = report.torch
    if t:
        cuda = f"built for CUDA {t['cuda_version']}" if t.get("cuda_version") else "CPU-only build"
        lines.append(f"PyTorch {t['version']}, {cuda}; CUDA usable: {'yes' if t['cuda_available'] else 'no'}"
                     f" ({t['device_count']} device(s)); Apple MPS: {'yes' if t['mps_available'] else 'no'}")
    else:
        lines.append("PyTorch: not checked")
    cores = f"{report.cpu_cores_physical} cores, " if report.cpu_cores_physical else ""
    lines.append(f"CPU: {report.cpu_model} ({cores}{report.cpu_cores_logical} threads)")
    lines.append(f"RAM: {format_bytes(report.ram_total)} total, {format_bytes(report.ram_available)} available")
    if report.messages:
        lines.append("Notes:")
        lines += [f"  - {m}" for m in report.messages]
    return "\n".join(lines)
