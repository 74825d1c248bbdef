"""Idle sensors: the X11 reader under a private Xvfb, the D-Bus readers against fake desktop
services on a private bus, the Windows reader through a fake ctypes layer, and the throttled,
cached slow parts (battery, processes, NVML) with fakes."""
import datetime as dt
import os
import shutil
import subprocess
import sys
import textwrap
import time
import types

import pytest

from app import idle_sensors
from app.idle_policy import Sensors
from app.idle_readers import IdleUnavailable, choose_sources, make_reader
from app.idle_sensors import GpuReading, SensorReader, read_sensors

pytestmark = pytest.mark.timeout(40)


def _read_line(proc, what):
    line = proc.stdout.readline()
    if not line:
        raise AssertionError(f"{what} did not start: {proc.stderr.read() if proc.stderr else ''}")
    return line.strip()


def _stop(proc):
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


# --- choosing a source ------------------------------------------------------------------------

@pytest.mark.parametrize("env, platform, want", [
    ({"XDG_SESSION_TYPE": "wayland", "WAYLAND_DISPLAY": "wayland-0", "DISPLAY": ":0",
      "XDG_CURRENT_DESKTOP": "ubuntu:GNOME"}, "linux", ["gnome", "freedesktop"]),
    ({"XDG_SESSION_TYPE": "wayland", "WAYLAND_DISPLAY": "wayland-0", "DISPLAY": ":1",
      "XDG_CURRENT_DESKTOP": "KDE"}, "linux", ["freedesktop", "gnome"]),
    ({"WAYLAND_DISPLAY": "wayland-1", "DISPLAY": ":0", "XDG_CURRENT_DESKTOP": "sway"}, "linux",
     ["gnome", "freedesktop"]),
    ({"XDG_SESSION_TYPE": "x11", "DISPLAY": ":0", "XDG_CURRENT_DESKTOP": "KDE"}, "linux",
     ["x11", "freedesktop", "gnome"]),
    ({"DISPLAY": ":0", "XDG_CURRENT_DESKTOP": "XFCE"}, "linux", ["x11", "gnome", "freedesktop"]),
    ({}, "linux", []),
    ({"DISPLAY": ":0"}, "win32", ["windows"]),
    ({}, "darwin", []),
])
def test_sources_follow_the_session(env, platform, want):
    sources, note = choose_sources(env, platform)
    assert sources == want
    assert note and "idle" in note
    if env.get("XDG_SESSION_TYPE") == "wayland" or "WAYLAND_DISPLAY" in env:
        assert "x11" not in sources        # XWayland does not see native Wayland input
        assert "Wayland" in note


def test_kde_screensaver_answers_in_milliseconds(monkeypatch):
    made = []

    class FakeDBus:
        def __init__(self, kind, address=None, milliseconds=False, timeout_ms=200):
            made.append((kind, address, milliseconds))

    monkeypatch.setattr("app.idle_readers.dbus.DBusIdleReader", FakeDBus)
    make_reader("freedesktop", {"XDG_CURRENT_DESKTOP": "KDE", "DBUS_SESSION_BUS_ADDRESS": "unix:path=/x"})
    make_reader("freedesktop", {"XDG_CURRENT_DESKTOP": "LXQt"})
    make_reader("gnome", {"XDG_CURRENT_DESKTOP": "GNOME"})
    assert made == [("freedesktop", "unix:path=/x", True), ("freedesktop", None, False), ("gnome", None, True)]


def test_nothing_readable_gives_none_and_a_note():
    reader = SensorReader(env={}, platform="linux", programs=lambda: [], battery=lambda: None,
                          gpus=lambda: GpuReading(available=False), run_in_background=lambda fn: fn())
    s, notes = reader.read()
    assert s.idle_seconds is None
    assert notes == {"idle_source": None, "idle_note": "no graphical session found, so idle time can't be read"}


class FakeReader:
    def __init__(self, values):
        self.values, self.closed = list(values), False

    def read(self):
        v = self.values.pop(0)
        if isinstance(v, Exception):
            raise v
        return v

    def close(self):
        self.closed = True


def _reader(env, opened, clock, **kw):
    def open_reader(source, _env):
        opened.append(source)
        factory = kw.pop(source, None) if source in kw else None
        if factory is None:
            raise IdleUnavailable(f"{source} is not here")
        return factory
    return SensorReader(env=env, platform="linux", open_reader=open_reader, clock=clock,
                        programs=lambda: [], battery=lambda: None, gpus=lambda: GpuReading(available=False),
                        run_in_background=lambda fn: fn(), retry_idle_every=30)


def test_falls_back_retries_later_and_reopens_after_a_failure():
    t = [0.0]
    opened = []
    freedesktop = FakeReader([5.0, 6.0, IdleUnavailable("org.freedesktop.ScreenSaver did not answer (gone)")])
    reader = _reader({"XDG_SESSION_TYPE": "wayland", "XDG_CURRENT_DESKTOP": "GNOME"}, opened, lambda: t[0],
                     freedesktop=freedesktop)
    s, notes = reader.read()
    assert (s.idle_seconds, notes["idle_source"], notes["idle_note"]) == (5.0, "freedesktop", None)
    assert opened == ["gnome", "freedesktop"]
    assert reader.read()[0].idle_seconds == 6.0 and opened == ["gnome", "freedesktop"]   # kept open
    s, notes = reader.read()            # the service went away
    assert s.idle_seconds is None and freedesktop.closed
    assert notes["idle_source"] is None and "did not answer" in notes["idle_note"]
    t[0] = 1.0
    s, notes = reader.read()            # looked again at once, found nothing: waits 30 s now
    assert opened == ["gnome", "freedesktop"] * 2
    assert notes["idle_note"] == "idle time can't be read on this Wayland desktop"
    t[0] = 20.0
    reader.read()
    assert len(opened) == 4
    t[0] = 31.5
    reader.read()
    assert len(opened) == 6


def test_x11_failure_reason_is_shown():
    opened = []
    reader = _reader({"XDG_SESSION_TYPE": "x11", "DISPLAY": ":0"}, opened, lambda: 0.0)
    s, notes = reader.read()
    assert opened == ["x11", "gnome", "freedesktop"] and s.idle_seconds is None
    assert notes["idle_note"] == "idle time can't be read on this X11 desktop (x11 is not here)"


# --- X11 under a private Xvfb -------------------------------------------------------------------

@pytest.fixture
def xvfb():
    if not shutil.which("Xvfb"):
        pytest.fail("Xvfb is needed (apt-get install xvfb)")
    r, w = os.pipe()
    # -displayfd: the server picks a free display number and writes it to us.
    proc = subprocess.Popen(["Xvfb", "-displayfd", str(w), "-nolisten", "tcp", "-screen", "0", "320x240x24"],
                            pass_fds=[w], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        number = pipe.readline().strip().decode()
    assert number.isdigit(), "Xvfb did not report its display"
    yield f":{number}"
    _stop(proc)


def test_x11_idle_grows_and_drops_after_input(xvfb):
    from app.idle_readers.x11 import X11IdleReader

    def xdotool(*args):
        subprocess.run(["xdotool", *args], env={**os.environ, "DISPLAY": xvfb}, check=True, timeout=10)

    reader = X11IdleReader(xvfb)
    try:
        xdotool("mousemove", "10", "10")
        first = reader.read()
        time.sleep(0.8)
        later = reader.read()
        assert later >= first + 0.7
        xdotool("mousemove", "100", "120")
        assert reader.read() < 0.5 < later
        time.sleep(0.5)
        xdotool("key", "a")
        assert reader.read() < 0.5
    finally:
        reader.close()       # before Xvfb goes: Xlib exits the process when its server vanishes


def test_x11_session_reads_through_sensor_reader(xvfb):
    reader = SensorReader(env={"XDG_SESSION_TYPE": "x11", "DISPLAY": xvfb}, platform="linux",
                          programs=lambda: [], battery=lambda: None, gpus=lambda: GpuReading(available=False),
                          run_in_background=lambda fn: fn())
    try:
        s, notes = reader.read()
        assert notes == {"idle_source": "x11", "idle_note": None}
        assert 0 <= s.idle_seconds < 60
    finally:
        reader.close()


def test_x11_bad_display_says_so():
    from app.idle_readers.x11 import X11IdleReader
    with pytest.raises(IdleUnavailable, match="did not open"):
        X11IdleReader(":9999")


# --- D-Bus against fake desktop services ----------------------------------------------------------

FAKE_SERVICES = textwrap.dedent("""
    import sys, time
    from PySide6.QtCore import ClassInfo, QCoreApplication, QObject, Slot
    from PySide6.QtDBus import QDBusConnection

    mode, mutter_ms, screensaver = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

    @ClassInfo({"D-Bus Interface": "org.gnome.Mutter.IdleMonitor"})
    class Mutter(QObject):
        @Slot(result="qulonglong")
        def GetIdletime(self):
            return mutter_ms

    @ClassInfo({"D-Bus Interface": "org.freedesktop.ScreenSaver"})
    class ScreenSaver(QObject):
        @Slot(result="uint")
        def GetSessionIdleTime(self):
            if mode == "hang":
                time.sleep(3)
            return screensaver

    app = QCoreApplication([])
    bus = QDBusConnection.sessionBus()
    export = QDBusConnection.RegisterOption.ExportAllSlots
    mutter, saver = Mutter(), ScreenSaver()
    ok = (bus.registerObject("/org/gnome/Mutter/IdleMonitor/Core", mutter, export)
          and bus.registerService("org.gnome.Mutter.IdleMonitor")
          and bus.registerObject("/ScreenSaver", saver, export)      # KDE's older path
          and bus.registerService("org.freedesktop.ScreenSaver"))
    print("ready" if ok else "failed", flush=True)
    app.exec()
""")


@pytest.fixture
def session_bus(monkeypatch):
    """A private session bus; its address is also in DBUS_SESSION_BUS_ADDRESS for the test."""
    if not shutil.which("dbus-daemon"):
        pytest.fail("dbus-daemon is needed (apt-get install dbus-daemon)")
    proc = subprocess.Popen(["dbus-daemon", "--session", "--nofork", "--nopidfile", "--print-address=1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    address = _read_line(proc, "dbus-daemon")
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", address)
    yield address
    _stop(proc)


@pytest.fixture
def fake_desktop(session_bus):
    started = []

    def start(mode="answer", mutter_ms=123_456, screensaver=42):
        proc = subprocess.Popen([sys.executable, "-c", FAKE_SERVICES, mode, str(mutter_ms), str(screensaver)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "QT_QPA_PLATFORM": "offscreen"})
        started.append(proc)
        assert _read_line(proc, "fake desktop services") == "ready"
        return proc

    yield start
    for proc in started:
        _stop(proc)


def test_gnome_and_freedesktop_readers_read_the_fake_services(fake_desktop, session_bus):
    from app.idle_readers.dbus import DBusIdleReader
    fake_desktop(mutter_ms=123_456, screensaver=42)
    gnome = DBusIdleReader("gnome", address=session_bus, milliseconds=True)
    lxqt = DBusIdleReader("freedesktop", address=session_bus)
    kde = DBusIdleReader("freedesktop", address=session_bus, milliseconds=True)
    try:
        assert gnome.read() == pytest.approx(123.456)
        assert lxqt.read() == 42.0        # found on /ScreenSaver after /org/freedesktop/ScreenSaver failed
        assert kde.read() == pytest.approx(0.042)
    finally:
        for r in (gnome, lxqt, kde):
            r.close()


@pytest.mark.parametrize("desktop, source, idle", [("GNOME", "gnome", 7.5), ("KDE", "freedesktop", 9.0)])
def test_wayland_session_reads_idle_over_dbus(fake_desktop, session_bus, desktop, source, idle):
    fake_desktop(mutter_ms=7_500, screensaver=9_000)
    env = {"XDG_SESSION_TYPE": "wayland", "WAYLAND_DISPLAY": "wayland-0", "DISPLAY": ":99",
           "XDG_CURRENT_DESKTOP": desktop, "DBUS_SESSION_BUS_ADDRESS": session_bus}
    reader = SensorReader(env=env, platform="linux", programs=lambda: [], battery=lambda: None,
                          gpus=lambda: GpuReading(available=False), run_in_background=lambda fn: fn())
    try:
        s, notes = reader.read()
        assert notes == {"idle_source": source, "idle_note": None}
        assert s.idle_seconds == pytest.approx(idle)
    finally:
        reader.close()


def test_no_idle_service_gives_none_and_a_note_quickly(session_bus):
    env = {"XDG_SESSION_TYPE": "wayland", "WAYLAND_DISPLAY": "wayland-0", "XDG_CURRENT_DESKTOP": "GNOME",
           "DBUS_SESSION_BUS_ADDRESS": session_bus}
    reader = SensorReader(env=env, platform="linux", programs=lambda: [], battery=lambda: None,
                          gpus=lambda: GpuReading(available=False), run_in_background=lambda fn: fn())
    start = time.perf_counter()
    s, notes = reader.read()
    took = time.perf_counter() - start
    assert s.idle_seconds is None and notes["idle_source"] is None
    assert notes["idle_note"].startswith("idle time can't be read on this Wayland desktop")
    assert took < 1.0


def test_unreachable_bus_says_so():
    from app.idle_readers.dbus import DBusIdleReader
    with pytest.raises(IdleUnavailable, match="message bus is unreachable"):
        DBusIdleReader("gnome", address="unix:path=/nonexistent/modron-test-bus")


def test_a_hung_service_costs_at_most_the_timeout(fake_desktop, session_bus):
    from app.idle_readers.dbus import DBusIdleReader
    fake_desktop(mode="hang")
    reader = DBusIdleReader("freedesktop", address=session_bus, timeout_ms=200)
    try:
        start = time.perf_counter()
        with pytest.raises(IdleUnavailable, match="did not answer"):
            reader.read()
        # Two paths are tried, each capped at 200 ms; the service itself sleeps 3 s.
        assert time.perf_counter() - start < 1.0
    finally:
        reader.close()


# --- Windows through a fake ctypes layer ----------------------------------------------------------

def _fake_windows(last_input_ms, now_ms, ok=True):
    def GetLastInputInfo(pointer):
        info = pointer.contents
        assert info.cbSize == 8          # the caller must fill in the struct size
        info.dwTime = last_input_ms
        return 1 if ok else 0

    return (types.SimpleNamespace(GetLastInputInfo=GetLastInputInfo),
            types.SimpleNamespace(GetTickCount64=lambda: now_ms))


def test_windows_idle_from_last_input():
    from app.idle_readers.windows import WindowsIdleReader
    assert WindowsIdleReader(*_fake_windows(10_000, 75_500)).read() == 65.5
    # The 32-bit last-input tick wrapped past 2**32 ms (49.7 days) while GetTickCount64 did not.
    assert WindowsIdleReader(*_fake_windows(2**32 - 1_000, 2**32 + 2_000)).read() == 3.0
    with pytest.raises(IdleUnavailable):
        WindowsIdleReader(*_fake_windows(0, 0, ok=False)).read()


def test_windows_session_uses_the_windows_reader(monkeypatch):
    from app.idle_readers import windows
    monkeypatch.setattr(windows.ctypes, "windll", types.SimpleNamespace(
        user32=_fake_windows(1_000, 31_000)[0], kernel32=_fake_windows(1_000, 31_000)[1]), raising=False)
    reader = SensorReader(env={}, platform="win32", programs=lambda: ["Steam.exe"], battery=lambda: False,
                          gpus=lambda: GpuReading(available=False), run_in_background=lambda fn: fn())
    s, notes = reader.read()
    assert (s.idle_seconds, notes["idle_source"]) == (30.0, "windows")
    assert s.running_programs == {"steam.exe"} and s.on_battery is False


# --- battery, programs, GPUs: cached and throttled -----------------------------------------------

def test_slow_parts_are_throttled_and_filtered():
    t = [100.0]
    calls = {"programs": 0, "gpus": 0, "battery": 0}

    def programs():
        calls["programs"] += 1
        return ["Firefox", "steam", f"tick{calls['programs']}"]

    def gpus():
        calls["gpus"] += 1
        return GpuReading(processes=[(111, "worker"), (222, "game"), (223, "game"), (os.getpid(), "me")],
                          hottest_c=71 + calls["gpus"])

    def battery():
        calls["battery"] += 1
        return True

    reader = SensorReader(env={}, platform="linux", clock=lambda: t[0], programs=programs, gpus=gpus,
                          battery=battery, run_in_background=lambda fn: fn(), slow_every=5.0)
    now = dt.datetime(2024, 1, 5, 12, 0)
    s, _ = reader.read(exclude_pids={111}, now=now)
    assert isinstance(s, Sensors) and s.now == now
    assert s.running_programs == {"firefox", "steam", "tick1"}
    assert s.other_gpu_processes == ["game"]          # own pid and excluded pids left out, names once
    assert (s.gpu_temp_c, s.on_battery) == (72, True)
    for step in (1, 2, 4.9):
        t[0] = 100.0 + step
        s, _ = reader.read(exclude_pids=set())
        assert s.other_gpu_processes == ["worker", "game"]   # exclusions apply to the cached list too
    assert calls == {"programs": 1, "gpus": 1, "battery": 1}
    t[0] = 105.5
    s, _ = reader.read()
    assert calls == {"programs": 2, "gpus": 2, "battery": 2}
    assert "tick2" in s.running_programs and s.gpu_temp_c == 73


def test_without_nvml_gpus_are_asked_again_only_now_and_then():
    t = [0.0]
    asked = []

    def gpus():
        asked.append(t[0])
        return GpuReading(available=False)

    reader = SensorReader(env={}, platform="linux", clock=lambda: t[0], programs=lambda: [],
                          battery=lambda: None, gpus=gpus, run_in_background=lambda fn: fn(),
                          slow_every=5.0, nvml_retry_every=60.0)
    for second in range(0, 130, 5):
        t[0] = float(second)
        s, _ = reader.read()
        assert s.other_gpu_processes == [] and s.gpu_temp_c is None
    assert asked == [0.0, 60.0, 120.0]


def test_failing_sensors_give_unknowns_not_exceptions():
    def boom():
        raise RuntimeError("driver hiccup")

    reader = SensorReader(env={}, platform="linux", programs=boom, battery=boom, gpus=boom,
                          run_in_background=lambda fn: fn())
    s, _ = reader.read()
    assert (s.on_battery, s.running_programs, s.other_gpu_processes, s.gpu_temp_c) == (None, set(), [], None)


def test_real_psutil_battery_and_processes_through_fakes(monkeypatch):
    import psutil
    monkeypatch.setattr(psutil, "sensors_battery", lambda: types.SimpleNamespace(power_plugged=False, percent=50))
    assert idle_sensors.read_battery() is True
    monkeypatch.setattr(psutil, "sensors_battery", lambda: types.SimpleNamespace(power_plugged=True, percent=50))
    assert idle_sensors.read_battery() is False
    monkeypatch.setattr(psutil, "sensors_battery", lambda: None)
    assert idle_sensors.read_battery() is None
    procs = [types.SimpleNamespace(info={"name": n}) for n in ("Steam.exe", "bash", None, "")]
    monkeypatch.setattr(psutil, "process_iter", lambda attrs=None: iter(procs))
    assert idle_sensors.read_programs() == {"steam.exe", "bash"}


def test_gpu_reading_from_the_hardware_report(monkeypatch):
    from training_core import hardware

    def gpu(index, temp, procs):
        return hardware.GpuInfo(index=index, name="GPU", uuid=None, vram_total=1, vram_used=0, vram_free=1,
                                compute_capability=(8, 6), bf16=True, fp16_fast=True, temperature_c=temp,
                                utilization_pct=None, power_w=None, processes=procs)

    report = hardware.HardwareReport(
        gpus=[gpu(0, 65, [{"pid": 5, "name": "blender", "vram_used": 10}]),
              gpu(1, 80, [{"pid": 6, "name": "game", "vram_used": None}]), gpu(2, None, [])],
        driver_version="550", cuda_driver_version="12.4", nvml="ok", torch=None, cpu_model="cpu",
        cpu_cores_physical=1, cpu_cores_logical=1, ram_total=1, ram_available=1)
    monkeypatch.setattr(idle_sensors, "detect", lambda include_torch: report)
    assert idle_sensors.read_gpus() == GpuReading(processes=[(5, "blender"), (6, "game")], hottest_c=80)
    report.gpus, report.nvml = [], hardware.NO_NVML
    assert idle_sensors.read_gpus() == GpuReading(available=False)


# --- the real thing on this machine ---------------------------------------------------------------

def test_read_sensors_for_real_is_cheap(monkeypatch):
    monkeypatch.setattr(idle_sensors, "_default", None)
    first, _ = read_sensors()
    start = time.perf_counter()
    s, notes = read_sensors(exclude_pids={os.getpid()})
    took = time.perf_counter() - start
    assert isinstance(s, Sensors) and isinstance(first, Sensors)
    assert set(notes) == {"idle_source", "idle_note"}
    assert (s.idle_seconds is None) == (notes["idle_note"] is not None)
    assert s.running_programs, "the process list should at least hold this test's python"
    assert took < 0.05
    idle_sensors._default.close()
