"""Hardware detection: the real no-GPU path of this machine, and NVML through a fake `pynvml`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import psutil
import pytest

from training_core import hardware
from training_core.hardware import NO_NVML, GpuInfo, choose_precision, detect, format_report, precision_note

ROOT = Path(__file__).resolve().parents[1]
GB = 1024 ** 3
NOT_SUPPORTED = 3
MISSING_PID = 4_000_000   # above Linux's pid_max: no such process


class FakeNVMLError(Exception):
    def __init__(self, value):
        super().__init__(value)
        self.value = value

    def __str__(self):
        return {NOT_SUPPORTED: "Not Supported", 999: "Unknown Error", 12: "NVML Shared Library Not Found"}.get(
            self.value, f"error {self.value}")


def fake_pynvml(gpus, *, init_error=None, count_error=False):
    """A stand-in for nvidia-ml-py's module. `gpus`: list of dicts describing each device."""
    nv = types.ModuleType("pynvml")
    nv.NVMLError = FakeNVMLError
    nv.NVML_ERROR_LIBRARY_NOT_FOUND = 12
    nv.NVML_ERROR_DRIVER_NOT_LOADED = 9
    nv.NVML_TEMPERATURE_GPU = 0
    nv.calls = {"init": 0, "shutdown": 0}

    def init():
        nv.calls["init"] += 1
        if init_error is not None:
            raise FakeNVMLError(init_error)

    def shutdown():
        nv.calls["shutdown"] += 1

    def field(name):
        def get(handle, *args):
            value = gpus[handle][name]
            if isinstance(value, Exception):
                raise value
            return value
        return get

    def handle_by_index(i):
        if gpus[i].get("broken"):
            raise FakeNVMLError(999)
        return i

    def count():
        if count_error:
            raise FakeNVMLError(999)
        return len(gpus)

    def procs(kind):
        def get(handle):
            return [types.SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in gpus[handle].get(kind, [])]
        return get

    nv.nvmlInit, nv.nvmlShutdown = init, shutdown
    nv.nvmlDeviceGetCount = count
    nv.nvmlDeviceGetHandleByIndex = handle_by_index
    nv.nvmlDeviceGetName = field("name")
    nv.nvmlDeviceGetUUID = field("uuid")
    nv.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(**gpus[h]["mem"])
    nv.nvmlDeviceGetCudaComputeCapability = field("cc")
    nv.nvmlDeviceGetTemperature = field("temp")
    nv.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=gpus[h]["util"], memory=0)
    nv.nvmlDeviceGetPowerUsage = field("power_mw")
    nv.nvmlDeviceGetComputeRunningProcesses = procs("compute")
    nv.nvmlDeviceGetGraphicsRunningProcesses = procs("graphics")
    nv.nvmlSystemGetProcessName = lambda pid: b"/usr/lib/xorg/Xorg"
    nv.nvmlSystemGetDriverVersion = lambda: "550.54.14"
    nv.nvmlSystemGetCudaDriverVersion = lambda: 12040
    return nv


def gpu(name, cc, *, total=24, used=1, temp=40, **extra):
    label = name.decode() if isinstance(name, bytes) else name
    return {"name": name, "uuid": f"GPU-{label.replace(' ', '-')}", "cc": cc, "temp": temp, "util": 5,
            "power_mw": 61500, "mem": {"total": total * GB, "used": used * GB, "free": (total - used) * GB},
            **extra}


M40 = gpu(b"Tesla M40 24GB", (5, 2), temp=FakeNVMLError(NOT_SUPPORTED), power_mw=FakeNVMLError(NOT_SUPPORTED))


def rtx3090(other_pid):
    return gpu("NVIDIA GeForce RTX 3090", (8, 6), used=3,
               compute=[(other_pid, 2 * GB), (os.getpid(), 512 * 1024 ** 2)],
               graphics=[(MISSING_PID, None)])


@pytest.fixture
def install(monkeypatch):
    def _install(nv):
        monkeypatch.setitem(sys.modules, "pynvml", nv)
        return nv
    return _install


def test_real_machine_without_nvml_or_with_it():
    """This machine's own answer, checked against what NVML itself says here."""
    import pynvml
    try:
        pynvml.nvmlInit()
        expected = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
    except pynvml.NVMLError_LibraryNotFound:
        expected = None
    report = detect(include_torch=False)
    if expected is None:          # the CPU-only machines this project's CI runs on
        assert report.nvml == NO_NVML
        assert report.gpus == [] and report.best_gpu() is None
        assert report.driver_version is None and report.cuda_driver_version is None
        assert hardware.CPU_MESSAGE in report.messages
        assert "GPU: none found" in format_report(report)
    else:
        assert report.nvml == "ok" and len(report.gpus) == expected
    assert report.torch is None
    assert report.cpu_model and report.cpu_model != "unknown CPU"
    assert report.cpu_cores_logical == os.cpu_count()
    assert report.cpu_cores_physical == psutil.cpu_count(logical=False)
    assert 0 < report.ram_available <= report.ram_total == psutil.virtual_memory().total
    json.dumps(report.to_dict())


def test_fake_nvml_two_gpus(install):
    other = os.getppid()
    nv = install(fake_pynvml([M40, rtx3090(other)]))
    report = detect(include_torch=False, exclude_pids={12345})
    assert nv.calls == {"init": 1, "shutdown": 1}
    assert report.nvml == "ok"
    assert report.driver_version == "550.54.14" and report.cuda_driver_version == "12.4"
    m40, ampere = report.gpus
    assert m40.name == "Tesla M40 24GB"                  # bytes from old bindings are decoded
    assert m40.compute_capability == (5, 2) and not m40.bf16 and not m40.fp16_fast
    assert m40.temperature_c is None and m40.power_w is None   # unsupported calls degrade to None
    assert m40.vram_total == 24 * GB and m40.vram_free == 23 * GB and m40.utilization_pct == 5
    assert ampere.compute_capability == (8, 6) and ampere.bf16 and ampere.fp16_fast
    assert ampere.temperature_c == 40 and ampere.power_w == 61.5
    assert ampere.uuid == "GPU-NVIDIA-GeForce-RTX-3090"
    # Our own process is left out; another program is named through psutil; a pid we cannot
    # see (a container's host pid) is named through NVML.
    pids = {p["pid"]: p for p in ampere.processes}
    assert os.getpid() not in pids
    assert pids[other] == {"pid": other, "name": psutil.Process(other).name(), "vram_used": 2 * GB}
    assert pids[MISSING_PID] == {"pid": MISSING_PID, "name": "Xorg", "vram_used": None}
    assert any("GPU 0 (Tesla M40 24GB) has no fast half precision" in m for m in report.messages)
    assert any("other programs use 2.0 GB" in m for m in report.messages)
    assert hardware.CPU_MESSAGE not in report.messages
    assert json.loads(json.dumps(report.to_dict()))["gpus"][1]["compute_capability"] == [8, 6]

    text = format_report(report)
    for part in ("GPU 0: Tesla M40 24GB, compute capability 5.2", "precision: fp32",
                 "GPU 1: NVIDIA GeForce RTX 3090, compute capability 8.6", "precision: bf16",
                 "NVIDIA driver 550.54.14 (supports CUDA 12.4)", "24.0 GB total", "61.5 W",
                 f"other program: Xorg (pid {MISSING_PID}, memory unknown)"):
        assert part in text, part
    assert "°C" not in text.split("GPU 1")[0]        # no temperature line for the M40


def test_exclude_pids_and_gpu_processes_helper(install):
    other = os.getppid()
    install(fake_pynvml([rtx3090(other)]))
    report = detect(include_torch=False, exclude_pids={other})
    assert [p["pid"] for p in report.gpus[0].processes] == [MISSING_PID]
    assert [p["pid"] for p in hardware.gpu_processes(0)] == [other, MISSING_PID]   # most memory first
    assert hardware.gpu_processes(0, exclude_pids={other, MISSING_PID}) == []


def test_best_gpu_prefers_newer_when_memory_is_close(install):
    install(fake_pynvml([M40, rtx3090(os.getppid())]))
    assert detect(include_torch=False).best_gpu().name == "NVIDIA GeForce RTX 3090"
    busy = gpu("NVIDIA GeForce RTX 3090", (8, 6), used=14)
    install(fake_pynvml([M40, busy]))
    assert detect(include_torch=False).best_gpu().name == "Tesla M40 24GB"


def test_broken_driver(install):
    nv = install(fake_pynvml([M40], init_error=999))
    report = detect(include_torch=False)
    assert report.nvml == "NVML error: Unknown Error"
    assert report.gpus == [] and report.driver_version is None
    assert any("driver did not answer" in m for m in report.messages)
    assert nv.calls["shutdown"] == 0
    assert report.cpu_cores_logical >= 1


def test_library_missing_and_package_missing(install, monkeypatch):
    install(fake_pynvml([M40], init_error=12))
    assert detect(include_torch=False).nvml == NO_NVML
    monkeypatch.setitem(sys.modules, "pynvml", None)      # `import pynvml` raises ImportError
    report = detect(include_torch=False)
    assert report.nvml == NO_NVML and any("nvidia-ml-py" in m for m in report.messages)


def test_one_unreadable_gpu_and_count_failure(install):
    nv = install(fake_pynvml([dict(M40, broken=True), rtx3090(os.getppid())]))
    report = detect(include_torch=False)
    assert [g.index for g in report.gpus] == [1]
    assert any("GPU 0 could not be read" in m for m in report.messages)
    assert nv.calls["shutdown"] == 1
    install(fake_pynvml([M40], count_error=True))
    report = detect(include_torch=False)
    assert report.nvml.startswith("NVML error") and report.gpus == []


def test_gpu_without_torch_cuda_is_reported(install):
    install(fake_pynvml([rtx3090(os.getppid())]))
    report = detect(include_torch=True)
    import torch
    assert report.torch["version"] == str(torch.__version__)
    assert report.torch["cuda_available"] is torch.cuda.is_available()
    assert set(report.torch) == {"version", "cuda_available", "cuda_version", "device_count", "mps_available"}
    if not torch.cuda.is_available():
        assert any("cannot use CUDA" in m for m in report.messages)


CARDS = [("Tesla M40", (5, 2), "fp32"), ("Tesla P100", (6, 0), "fp16"), ("GTX 1080", (6, 1), "fp32"),
         ("Tesla T4", (7, 5), "fp16"), ("A100", (8, 0), "bf16"), ("RTX 4090", (8, 9), "bf16")]


def test_precision_table(install):
    install(fake_pynvml([gpu(name, cc) for name, cc, _ in CARDS]))
    found = detect(include_torch=False).gpus
    for info, (name, cc, expected) in zip(found, CARDS):
        assert info.compute_capability == cc
        assert choose_precision(info) == expected, name
        assert choose_precision(info, "fp32") == "fp32"
    assert choose_precision(None) == "fp32"
    by_name = {g.name: g for g in found}
    t4, m40, a100 = by_name["Tesla T4"], by_name["Tesla M40"], by_name["A100"]
    # bf16 asked on a GPU without it: fall back by the rule, and say why.
    assert choose_precision(t4, "bf16") == "fp16"
    assert "no bf16" in precision_note(t4, "bf16", "fp16")
    assert choose_precision(m40, "bf16") == "fp32"
    assert "using fp32" in precision_note(m40, "bf16", "fp32")
    # Explicit fp16 is honoured even where it is slow, with a note.
    assert choose_precision(m40, "fp16") == "fp16"
    assert "no fast fp16" in precision_note(m40, "fp16", "fp16")
    assert choose_precision(a100, "fp16") == "fp16" and precision_note(a100, "fp16", "fp16") is None
    assert precision_note(a100, "auto", "bf16") is None
    assert choose_precision(None, "bf16") == "fp32" and "CPU" in precision_note(None, "bf16", "fp32")
    unknown_cc = GpuInfo(0, "Odd GPU", None, GB, 0, GB, None, False, False, None, None, None, [])
    assert choose_precision(unknown_cc) == "fp32"
    with pytest.raises(ValueError):
        choose_precision(a100, "fp8")


def test_gpu_for_torch_device_matches_by_uuid(install, monkeypatch):
    import torch
    install(fake_pynvml([M40, rtx3090(os.getppid())]))
    report = detect(include_torch=False)
    # torch's UUID has no "GPU-" prefix; CUDA's order may differ from NVML's.
    props = {0: types.SimpleNamespace(uuid="gpu-nvidia-geforce-rtx-3090"), 1: types.SimpleNamespace(uuid=None)}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props[i])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    assert hardware.gpu_for_torch_device(report, 0).name == "NVIDIA GeForce RTX 3090"
    assert hardware.gpu_for_torch_device(report, 1) is None          # no UUID, two GPUs: cannot tell
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    assert hardware.gpu_for_torch_device(report, 1).name == "NVIDIA GeForce RTX 3090"


def test_arch_list_check():
    arch = ["sm_75", "sm_80", "sm_86", "sm_90"]
    assert hardware._arch_supports(arch, (8, 9))          # sm_86 code runs on 8.9
    assert not hardware._arch_supports(arch, (5, 2))
    assert not hardware._arch_supports(arch, (12, 0))
    assert hardware._arch_supports(arch + ["compute_90"], (12, 0))   # PTX is compiled by the driver


def test_importing_hardware_does_not_import_torch():
    code = ("import sys; import training_core.hardware as h; r = h.detect(include_torch=False); "
            "h.format_report(r); print('torch' in sys.modules, r.torch)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "None"]
