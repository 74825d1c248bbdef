"""One `Sensors` reading for the idle policy, cheap enough to take every second on the GUI thread.

Idle time is asked of the desktop on every call (microseconds on X11, under a millisecond over
D-Bus, at most ~200 ms if a desktop service hangs). The slow parts - the process list, battery
and NVML (which can stall on a sick driver) - are refreshed every few seconds in a background
thread; a call only copies the latest of them.
"""
from __future__ import annotations

import datetime as dt
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

from app.idle_policy import Sensors
from app.idle_readers import IdleReader, IdleUnavailable, choose_sources, make_reader
from training_core.hardware import NO_NVML, detect


@dataclass(frozen=True)
class GpuReading:
    processes: list[tuple[int, str]] = field(default_factory=list)   # (pid, name), not this app's
    hottest_c: int | None = None
    available: bool = True           # False: no NVML here; try again only now and then


def read_battery() -> bool | None:
    """On battery? None when there is no battery or it can't be told."""
    try:
        import psutil
        battery = psutil.sensors_battery()
    except Exception:
        return None
    if battery is None or battery.power_plugged is None:
        return None
    return not battery.power_plugged


def read_programs() -> set[str]:
    """Lower-case names of the running processes."""
    import psutil
    names = set()
    for proc in psutil.process_iter(["name"]):
        name = proc.info.get("name")
        if name:
            names.add(name.lower())
    return names


_nvml_held = False


def read_gpus() -> GpuReading:
    """Other programs on any GPU and the hottest GPU's temperature, through training_core.hardware."""
    global _nvml_held
    if not _nvml_held:
        # Hold one NVML reference for the life of the app so that detect()'s own init/shutdown
        # pair is a cheap refcount change, not a driver load every few seconds.
        try:
            import pynvml
            pynvml.nvmlInit()
            _nvml_held = True
        except Exception:
            pass
    report = detect(include_torch=False)          # excludes this process's own pid
    if not report.gpus:
        return GpuReading(available=report.nvml != NO_NVML)
    temps = [g.temperature_c for g in report.gpus if g.temperature_c is not None]
    procs = [(int(p["pid"]), str(p["name"])) for g in report.gpus for p in g.processes]
    return GpuReading(processes=procs, hottest_c=max(temps) if temps else None)


def _in_thread(fn: Callable[[], None]) -> None:
    threading.Thread(target=fn, name="modron-idle-sensors", daemon=True).start()


@dataclass
class _Slow:
    at: float
    on_battery: bool | None
    programs: frozenset[str]
    gpu: GpuReading


class SensorReader:
    """Keeps the idle reader open and the slow readings cached between calls.

    Everything that touches the outside world can be swapped for a fake in tests.
    """

    def __init__(self, env: Mapping[str, str] | None = None, platform: str | None = None, *,
                 slow_every: float = 5.0, retry_idle_every: float = 30.0, nvml_retry_every: float = 60.0,
                 first_wait: float = 0.5,
                 open_reader: Callable[[str, Mapping[str, str]], IdleReader] = make_reader,
                 battery: Callable[[], bool | None] = read_battery,
                 programs: Callable[[], Iterable[str]] = read_programs,
                 gpus: Callable[[], GpuReading] = read_gpus,
                 run_in_background: Callable[[Callable[[], None]], None] = _in_thread,
                 clock: Callable[[], float] = time.monotonic):
        self._env = dict(os.environ if env is None else env)
        self._sources, self._none_note = choose_sources(self._env, platform)
        self._slow_every, self._retry_idle_every = slow_every, retry_idle_every
        self._nvml_retry_every, self._first_wait = nvml_retry_every, first_wait
        self._open_reader, self._battery, self._programs, self._gpus = open_reader, battery, programs, gpus
        self._run_in_background, self._clock = run_in_background, clock
        self._reader: IdleReader | None = None
        self._source: str | None = None
        self._note: str | None = None
        self._next_idle_try = float("-inf")
        self._lock = threading.Lock()
        self._slow: _Slow | None = None
        self._refreshing = False
        self._first_done = threading.Event()
        self._next_gpu_try = float("-inf")
        self._last_gpu = GpuReading(available=False)

    # --- idle ---------------------------------------------------------------------------------

    def _open_idle(self) -> float | None:
        """Try the sources for this session in order; keep the first that answers, return its answer."""
        first_failure = None
        for source in self._sources:
            reader = None
            try:
                reader = self._open_reader(source, self._env)
                idle = reader.read()
            except IdleUnavailable as exc:
                if source == self._sources[0] and source in ("x11", "windows"):
                    first_failure = str(exc)
                if reader is not None:
                    reader.close()
                continue
            self._reader, self._source, self._note = reader, source, None
            return max(0.0, idle)
        # Say why the preferred local source failed when it's something to fix ("libXss is missing");
        # D-Bus errors mean nothing to users, the desktop's name is enough.
        self._note = f"{self._none_note} ({first_failure})" if first_failure else self._none_note
        self._next_idle_try = self._clock() + self._retry_idle_every
        return None

    def _idle(self) -> float | None:
        if self._reader is None:
            return self._open_idle() if self._clock() >= self._next_idle_try else None
        try:
            return max(0.0, self._reader.read())
        except IdleUnavailable as exc:
            # Drop it and look again at the next call: the desktop may have restarted its service.
            self._reader.close()
            self._reader, self._source, self._note = None, None, f"idle time can't be read: {exc}"
            self._next_idle_try = self._clock()
            return None

    # --- the slow part --------------------------------------------------------------------------

    def _refresh_slow(self) -> None:
        try:
            try:
                on_battery = self._battery()
            except Exception:
                on_battery = None
            try:
                programs = frozenset(p.lower() for p in self._programs())
            except Exception:
                programs = frozenset()
            gpu = self._last_gpu
            if self._clock() >= self._next_gpu_try:
                try:
                    gpu = self._gpus()
                except Exception:
                    gpu = GpuReading(available=False)
                if not gpu.available:
                    self._next_gpu_try = self._clock() + self._nvml_retry_every
                self._last_gpu = gpu
            with self._lock:
                self._slow = _Slow(self._clock(), on_battery, programs, gpu)
        finally:
            with self._lock:
                self._refreshing = False
            self._first_done.set()

    def _slow_reading(self) -> _Slow | None:
        with self._lock:
            slow = self._slow
            due = slow is None or self._clock() - slow.at >= self._slow_every
            start = due and not self._refreshing
            if start:
                self._refreshing = True
        if start:
            self._run_in_background(self._refresh_slow)
        if slow is None:
            # The very first reading: wait a little for it rather than report "nothing running".
            self._first_done.wait(self._first_wait)
        with self._lock:
            return self._slow

    # --- the reading ----------------------------------------------------------------------------

    def read(self, exclude_pids: Iterable[int] = frozenset(), now: dt.datetime | None = None
             ) -> tuple[Sensors, dict]:
        idle = self._idle()
        slow = self._slow_reading()
        skip = set(exclude_pids) | {os.getpid()}
        sensors = Sensors(now=now or dt.datetime.now(), idle_seconds=idle)
        if slow is not None:
            others: list[str] = []
            for pid, name in slow.gpu.processes:
                if pid not in skip and name not in others:
                    others.append(name)
            sensors.on_battery = slow.on_battery
            sensors.running_programs = set(slow.programs)
            sensors.other_gpu_processes = others
            sensors.gpu_temp_c = slow.gpu.hottest_c
        notes = {"idle_source": self._source if idle is not None else None,
                 "idle_note": None if idle is not None else self._note}
        return sensors, notes

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


_default: SensorReader | None = None


def read_sensors(exclude_pids: Iterable[int] = frozenset(), now: dt.datetime | None = None
                 ) -> tuple[Sensors, dict]:
    """Sensors for app.idle_policy plus notes {"idle_source", "idle_note"}; call from the GUI thread.

    exclude_pids: our own workers, whose GPU use is not "another program on the GPU".
    """
    global _default
    if _default is None:
        _default = SensorReader()
    return _default.read(exclude_pids, now)
