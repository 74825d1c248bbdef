"""The app shell: tray, main window, dashboard, settings, autostart, entry point, no torch in the GUI."""
import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import json
import shlex
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from PySide6.QtCore import QObject, QTimer, Signal
from PySide6.QtWidgets import QApplication, QSystemTrayIcon

from app import settings
from app.store import Store

ROOT = Path(__file__).resolve().parents[1]
GB = 2 ** 30


class FakeQueue(QObject):
    """JobQueue's signals and the calls the shell makes, recorded; running_job is set by the test."""

    job_changed = Signal(int)
    job_event = Signal(int, dict)
    queue_changed = Signal()

    def __init__(self, store):
        super().__init__()
        self.store = store
        self.calls = []
        self.running_id = None
        self._paused_all = False

    @property
    def paused_all(self):
        return self._paused_all

    def running_job(self):
        return self.store.get_job(self.running_id) if self.running_id is not None else None

    def pause_all(self):
        self.calls.append("pause_all")
        self._paused_all = True
        self.queue_changed.emit()

    def resume_all(self):
        self.calls.append("resume_all")
        self._paused_all = False
        self.queue_changed.emit()

    def shutdown(self, timeout_ms=30000):
        self.calls.append("shutdown")

    def expect_job(self):
        self.calls.append("expect_job")

    def submit(self, spec, name):
        self.calls.append(("submit", name))
        return self.store.add_job(spec, name).id


class FakePoller(QObject):
    updated = Signal(dict)

    def __init__(self):
        super().__init__()
        self.active = False

    def start(self):
        self.active = True

    def stop(self):
        self.active = False


@pytest.fixture
def store():
    # Not closed here: views are torn down after this fixture and may still read it meanwhile.
    s = Store.open_default()
    settings.PREPARE_WORKER.set(s, False)   # no spare worker each time New finetune shows (conftest's store)
    return s


@pytest.fixture
def shell(qtbot, store):
    """A window and a tray on a fake queue."""
    from app.main_window import MainWindow
    from app.tray import Tray
    queue = FakeQueue(store)
    window = MainWindow(store, queue, poller=FakePoller())
    qtbot.addWidget(window)
    tray = Tray(store, queue, window)
    messages = []
    tray.icon.showMessage = lambda title, text, *rest: messages.append((title, text))
    return window, tray, queue, messages


def _spec():
    return {"model": "scratch:tiny", "data": ["stories.txt"], "steps": 10}


def menu_texts(tray):
    return [a.text() for a in tray.menu.actions() if not a.isSeparator()]


# --- tray ----------------------------------------------------------------------------------------

def test_tray_menu_items_and_persisted_toggles(shell, store):
    window, tray, queue, _ = shell
    assert menu_texts(tray) == ["No job running", "Contribute while idle", "Pause everything", "Snooze 1 h",
                                "Open Modron", "Quit"]
    assert not tray.status_action.isEnabled()

    tray.contribute_action.trigger()
    assert store.get_setting("contribute_while_idle") is True
    before = time.time()
    tray.snooze_action.trigger()
    assert before + 3590 < store.get_setting("snooze_until") < time.time() + 3610
    assert "snoozed until" in tray.snooze_action.text()

    # A new tray (the next start) shows the stored choice; so does the menu after the Settings view changed it.
    from app.tray import Tray
    again = Tray(store, queue, window)
    assert again.contribute_action.isChecked()
    store.set_setting("contribute_while_idle", False)
    again.menu.aboutToShow.emit()
    assert not again.contribute_action.isChecked()


def test_pause_everything_and_quit_call_the_queue(shell, monkeypatch):
    window, tray, queue, _ = shell
    tray.pause_action.trigger()
    assert queue.calls == ["pause_all"] and tray.pause_action.isChecked()
    assert tray.state == "paused"
    tray.pause_action.trigger()
    assert queue.calls == ["pause_all", "resume_all"] and tray.state == "idle"

    quits = []
    monkeypatch.setattr(QApplication, "quit", staticmethod(lambda: quits.append(True)))
    tray.quit_action.trigger()
    assert queue.calls[-1] == "shutdown" and quits == [True]


def test_tray_state_progress_and_notifications_follow_the_queue(shell, store):
    from app.icons import state_icon
    window, tray, queue, messages = shell
    assert tray.state == "idle"

    job = store.add_job(_spec(), "Stories")
    store.update_job(job.id, state="running", summary={"step": 40, "total_steps": 160, "eta_s": 65})
    queue.running_id = job.id
    queue.job_changed.emit(job.id)
    assert tray.state == "training"
    assert tray.icon.icon().cacheKey() == state_icon("training").cacheKey()
    assert tray.status_action.text() == "Training: Stories, step 40 of 160 (25 %), 1 min 5 s left"
    # Step events update the progress line without a store round trip.
    queue.job_event.emit(job.id, {"type": "step", "step": 80, "total_steps": 160, "eta_s": 30})
    assert tray.status_action.text() == "Training: Stories, step 80 of 160 (50 %), 30 s left"
    assert messages == []

    store.update_job(job.id, state="paused")
    queue.job_changed.emit(job.id)
    assert tray.state == "paused" and tray.status_action.text().startswith("Paused: Stories")

    store.update_job(job.id, state="failed", error="stories.txt: no such file")
    queue.running_id = None
    queue.job_changed.emit(job.id)
    assert tray.state == "error"
    assert tray.icon.icon().cacheKey() == state_icon("error").cacheKey()
    assert messages == [("Stories failed", "stories.txt: no such file")]
    queue.job_changed.emit(job.id)            # the same state again: no second notification
    assert len(messages) == 1

    tray.open_action.trigger()                # seeing the window clears the error
    assert tray.state == "idle" and window.isVisible()

    second = store.add_job(_spec(), "Poems")
    store.update_job(second.id, state="finished", summary={"eval_loss": 2.5, "elapsed_s": 125})
    queue.job_changed.emit(second.id)
    assert messages[-1] == ("Poems finished", "Done: eval loss 2.500, took 2 min 5 s.")
    tray.set_contributing(True)
    assert tray.state == "contributing"


def test_tray_with_the_real_job_queue(qtbot, store):
    from app.job_queue import JobQueue
    from app.main_window import MainWindow
    from app.tray import Tray
    queue = JobQueue(store, autostart=False)
    window = MainWindow(store, queue, poller=FakePoller())
    qtbot.addWidget(window)
    tray = Tray(store, queue, window)
    assert tray.state == "idle"
    tray.pause_action.trigger()
    assert queue.paused_all and store.get_setting("paused_all") is True and tray.state == "paused"
    tray.pause_action.trigger()
    assert not queue.paused_all and tray.state == "idle"


# --- main window ---------------------------------------------------------------------------------

def test_window_views_and_the_demo_button(qtbot, store):
    from app.job_queue import JobQueue
    from app.main_window import VIEW_NAMES, MainWindow
    queue = JobQueue(store, autostart=False)
    window = MainWindow(store, queue, poller=FakePoller())
    qtbot.addWidget(window)
    window.show()
    assert window.current_view() == "dashboard"
    assert window.views["dashboard"].welcome.isVisible()         # first run
    expected = {"dashboard": "DashboardView", "new": "NewFinetuneView", "queue": "QueueView", "run": "RunView",
                "history": "HistoryView", "swarm": "SwarmView", "contribution": "ContributionSettingsView",
                "settings": "SettingsView", "playground": "PlaygroundView"}
    for name in VIEW_NAMES:
        view = window.show_view(name)
        assert type(view).__name__ == expected[name]
        assert window.stack.currentWidget() is view and window.sidebar.currentRow() == VIEW_NAMES.index(name)
    window.sidebar.setCurrentRow(VIEW_NAMES.index("queue"))
    assert window.current_view() == "queue"

    window.show_view("dashboard")
    window.views["dashboard"].demo_button.click()
    assert window.current_view() == "run"
    (job,) = store.list_jobs()
    assert job.name == "Demo" and job.state == "queued"
    assert job.spec["model"] == "scratch:tiny" and Path(job.run_dir).parent == store.runs_dir
    assert not window.views["dashboard"].welcome.isVisible()

    window.show_banner("No tray here.")
    assert window.banner.isVisible() and window.banner.text() == "No tray here."


# --- dashboard ------------------------------------------------------------------------------------

FAKE_HARDWARE = {
    "gpus": [
        {"index": 0, "name": "NVIDIA GeForce RTX 3090", "vram_total": 24 * GB, "vram_used": 7 * GB,
         "temperature_c": 61, "utilization_pct": 87, "power_w": 280.5,
         "processes": [{"pid": 4242, "name": "firefox", "vram_used": 400 * 2 ** 20},
                       {"pid": 77, "name": "python", "vram_used": 6 * GB}]},
        {"index": 1, "name": "NVIDIA GeForce GTX 1080 Ti", "vram_total": 11 * GB, "vram_used": 0,
         "temperature_c": None, "utilization_pct": None, "power_w": None, "processes": []},
    ],
    "cpu_model": "AMD Ryzen 9 5900X", "cpu_cores_physical": 12, "cpu_cores_logical": 24, "cpu_percent": 23.0,
    "ram_total": 64 * GB, "ram_available": 40 * GB, "ram_used": 24 * GB, "own_pids": [77],
    "messages": ["GPU 0 (NVIDIA GeForce RTX 3090): other programs use 400.0 MB of its memory (firefox)."],
}


def test_dashboard_renders_gpu_cpu_and_ram_cards(qtbot, store):
    from app.views.dashboard import DashboardView
    poller = FakePoller()
    queue = FakeQueue(store)
    view = DashboardView(store, queue, poller=poller)
    qtbot.addWidget(view)
    view.show()
    assert poller.active                        # polls only while on screen
    assert queue.calls == ["expect_job"]        # first run: a spare worker for "Try the demo"
    poller.updated.emit(FAKE_HARDWARE)

    assert len(view.gpu_cards) == 2
    first, second = (card.text() for card in view.gpu_cards)
    assert "GPU 0: NVIDIA GeForce RTX 3090" in first and "7.0 GB of 24.0 GB used" in first
    assert "61 °C · 87 % busy · 280.5 W" in first
    assert "firefox (pid 4242, 400 MB)" in first
    assert "Modron training: 6.0 GB" in first and "python (pid 77" not in first   # our worker is not "other"
    assert view.gpu_cards[0].bar.value() == int(1000 * 7 / 24)
    assert "GPU 1: NVIDIA GeForce GTX 1080 Ti" in second and "No other programs on it." in second
    assert "not reported" in second
    assert "AMD Ryzen 9 5900X" in view.cpu_card.text() and "23 % busy" in view.cpu_card.text()
    assert "12 cores, 24 threads" in view.cpu_card.text()
    assert "24.0 GB of 64.0 GB used" in view.ram_card.text() and "40.0 GB available" in view.ram_card.text()
    assert "firefox" in view.messages.text()

    one_gpu = dict(FAKE_HARDWARE, gpus=FAKE_HARDWARE["gpus"][1:], messages=[])
    poller.updated.emit(one_gpu)
    assert len(view.gpu_cards) == 1 and "GTX 1080 Ti" in view.gpu_cards[0].text()
    view.hide()
    assert not poller.active


def test_sysinfo_poller_reads_in_its_own_thread(qtbot):
    from app.sysinfo import SysInfoPoller, probe
    threads = []

    def fake_probe():
        threads.append(threading.current_thread())
        return {"gpus": [], "cpu_percent": 5.0}

    poller = SysInfoPoller(interval_ms=50, probe_fn=fake_probe)
    with qtbot.waitSignal(poller.updated, timeout=5000) as blocker:
        poller.start()
    assert blocker.args[0]["cpu_percent"] == 5.0
    qtbot.waitUntil(lambda: len(threads) >= 3, timeout=5000)   # it keeps polling
    poller.stop()
    assert threads and all(t is not threading.main_thread() for t in threads)
    assert not poller.active
    count = len(threads)
    qtbot.wait(200)
    assert len(threads) <= count + 1
    with qtbot.waitSignal(poller.updated, timeout=5000):      # and starts again
        poller.start()
    poller.shutdown()
    assert not poller._thread.isRunning()

    # The real probe: no torch, CPU and RAM figures present.
    info = probe()
    assert info["torch"] is None and info["ram_total"] > 0 and "cpu_percent" in info and "own_pids" in info


# --- settings and autostart ----------------------------------------------------------------------

def test_settings_view_writes_settings(qtbot, store, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    import app.main
    from app.views.settings_view import SettingsView
    monkeypatch.setattr(app.main, "_home", None)
    view = SettingsView(store, FakeQueue(store))
    qtbot.addWidget(view)
    view.show()

    assert view.checkpoint_spin.value() == 10
    view.checkpoint_spin.setValue(25)
    assert store.get_setting("checkpoint_minutes") == 25
    view.contribute_box.setChecked(True)
    assert store.get_setting("contribute_while_idle") is True

    view.autostart_box.setChecked(True)
    desktop = tmp_path / "config" / "autostart" / "modron.desktop"
    assert desktop.is_file() and not view.autostart_error.isVisible()
    view.autostart_box.setChecked(False)
    assert not desktop.exists()

    # The data folder changes at the next start: main reads the choice before opening the store.
    other = tmp_path / "elsewhere"
    view.set_next_data_dir(other)
    assert store.get_setting("data_dir_next") == str(other.resolve())
    assert view.next_dir_label.isVisible() and str(other) in view.next_dir_label.text()
    home = os.environ["MODRON_DATA_DIR"]
    assert app.main.apply_data_dir_choice() is None
    assert os.environ["MODRON_DATA_DIR"] == str(other.resolve()) and other.is_dir()
    assert app.main.home_data_dir() == Path(home)

    # Seen from the other folder, "use the default" writes to the home folder's store.
    other_store = Store.open_default()
    try:
        moved = SettingsView(other_store, FakeQueue(other_store))
        qtbot.addWidget(moved)
        assert moved.data_dir_label.text() == f"Now: {other.resolve()}"
        moved.default_dir_button.click()
    finally:
        other_store.close()
    assert store.get_setting("data_dir_next") is None


def test_autostart_desktop_entry(tmp_path, monkeypatch):
    from app import autostart
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    assert not autostart.is_enabled()
    autostart.set_enabled(True)
    path = tmp_path / "cfg" / "autostart" / "modron.desktop"
    assert autostart.desktop_file_path() == path and autostart.is_enabled()
    text = path.read_text(encoding="utf-8")
    assert text.startswith("[Desktop Entry]\n") and "Type=Application\n" in text and "Name=Modron\n" in text
    exec_line = next(line for line in text.splitlines() if line.startswith("Exec="))
    assert exec_line.endswith(" --background")
    argv = shlex.split(exec_line[5:].replace("\\\\", "\\"))   # undo the string escape, then the quoting
    assert Path(argv[0]).exists() and argv == autostart.launch_command()

    # Arguments with spaces, quotes, $ and % are quoted and escaped as the spec asks.
    odd = tmp_path / "odd.desktop"
    odd.write_text(autostart.desktop_entry(['/opt/my apps/py"th$on', "-m", "app.main", "50%"], "/opt/my apps"),
                   encoding="utf-8")
    assert 'Exec="/opt/my apps/py\\\\"th\\\\$on" -m app.main 50%%\n' in odd.read_text(encoding="utf-8")
    validator = shutil.which("desktop-file-validate")
    if validator:   # desktop-file-utils in CI
        for f in (path, odd):
            out = subprocess.run([validator, str(f)], capture_output=True, text=True)
            assert out.returncode == 0 and "error" not in out.stdout.lower(), out.stdout

    autostart.set_enabled(False)
    assert not path.exists() and not autostart.is_enabled()
    autostart.set_enabled(False)   # removing twice is fine


def test_autostart_windows_run_key_with_a_fake_registry():
    from app import autostart

    class Key:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class FakeReg:
        HKEY_CURRENT_USER, REG_SZ, KEY_SET_VALUE = object(), 1, 2

        def __init__(self):
            self.values = {}

        def CreateKey(self, root, sub):
            assert sub == autostart.RUN_KEY
            return Key()

        OpenKey = lambda self, root, sub, *a: Key()  # noqa: E731

        def SetValueEx(self, key, name, _reserved, kind, value):
            self.values[name] = value

        def QueryValueEx(self, key, name):
            if name not in self.values:
                raise FileNotFoundError(name)
            return self.values[name], 1

        def DeleteValue(self, key, name):
            if name not in self.values:
                raise FileNotFoundError(name)
            del self.values[name]

    reg = FakeReg()
    assert not autostart._windows_enabled(reg)
    autostart._windows_enable(reg)
    assert autostart._windows_enabled(reg) and reg.values["Modron"].endswith("--background")
    autostart._windows_disable(reg)
    autostart._windows_disable(reg)
    assert not autostart._windows_enabled(reg)


# --- entry point -----------------------------------------------------------------------------------

def _run_main(monkeypatch, tmp_path, argv, tray_available, inspect):
    """main() in this process with the tray's availability faked; `inspect(window)` runs once it is up."""
    import app.main
    from app.main_window import MainWindow
    monkeypatch.setattr(app.main, "_home", None)
    monkeypatch.setenv("MODRON_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(QSystemTrayIcon, "isSystemTrayAvailable", staticmethod(lambda: tray_available))
    app_ = QApplication.instance()
    quit_on_close = app_.quitOnLastWindowClosed()
    seen = {}
    # The widgets themselves, not their id()s: a transient wrapper (a combo box's popup, ...) freed after
    # the look would lend its id to the new window's wrapper, which was then never found.
    before = QApplication.topLevelWidgets()

    def check():
        try:
            windows = [w for w in QApplication.topLevelWidgets()
                       if isinstance(w, MainWindow) and not any(w is b for b in before)]
            seen["window"] = windows[-1]
            inspect(windows[-1])
        except BaseException as exc:   # re-raised after the loop ends
            seen["error"] = exc
        finally:
            app_.exit(0)   # always: a failed look must fail the test, not hang it in the app's loop
    QTimer.singleShot(300, check)
    try:
        code = app.main.main(argv + ["--data-dir", str(tmp_path / "data")])
        # Closing the last window while quitOnLastWindowClosed holds (no tray: main() sets it) posts a quit,
        # and the next test's first event loop (a qtbot.waitSignal) would end at once on it.
        app_.setQuitOnLastWindowClosed(False)
        if "window" in seen:
            seen["window"].close()
            seen["window"].deleteLater()
        app_.processEvents()
    finally:
        app_.setQuitOnLastWindowClosed(quit_on_close)
    if "error" in seen:
        raise seen["error"]
    return code


def test_main_without_a_tray_shows_the_window_with_a_banner(qapp, tmp_path, monkeypatch):
    def inspect(window):
        assert window.isVisible()
        assert window.banner.isVisible() and "no system tray" in window.banner.text()
        assert "AppIndicator" in window.banner.text()
        assert window.current_view() == "dashboard" and window.views["dashboard"].welcome.isVisible()
        assert QApplication.instance().quitOnLastWindowClosed()   # closing the window quits
    assert _run_main(monkeypatch, tmp_path, [], False, inspect) == 0


def test_main_with_a_tray_starts_in_the_background_after_the_first_run(qapp, tmp_path, monkeypatch):
    def first(window):   # first run: the window opens even with --background
        assert window.isVisible() and not window.banner.isVisible()
        assert not QApplication.instance().quitOnLastWindowClosed()
    assert _run_main(monkeypatch, tmp_path, ["--background"], True, first) == 0

    (tmp_path / "data").mkdir(exist_ok=True)
    monkeypatch.setenv("MODRON_DATA_DIR", str(tmp_path / "data"))
    store = Store.open_default()
    job = store.add_job(_spec(), "Old")
    store.update_job(job.id, state="finished")
    store.close()
    assert _run_main(monkeypatch, tmp_path, ["--background"], True,
                     lambda window: not window.isVisible() or pytest.fail("window shown")) == 0


def test_watch_job_exit_codes(qtbot, store):
    from app.main import watch_job
    queue = FakeQueue(store)
    codes = []
    ok, bad = store.add_job(_spec(), "ok"), store.add_job(_spec(), "bad")
    watch_job(queue, store, ok.id, codes.append)
    watch_job(queue, store, bad.id, codes.append)
    queue.job_changed.emit(ok.id)
    assert codes == []                                   # still queued
    store.update_job(bad.id, state="failed", error="bad.txt: empty")
    queue.job_changed.emit(bad.id)
    store.update_job(ok.id, state="finished")
    queue.job_changed.emit(ok.id)
    assert codes == [1, 0]


def _env(tmp_path):
    return {**os.environ, "QT_QPA_PLATFORM": "offscreen", "MODRON_DATA_DIR": str(tmp_path / "data"),
            "XDG_RUNTIME_DIR": str(tmp_path)}


def test_main_help_and_a_second_instance(tmp_path):
    out = subprocess.run([sys.executable, "-m", "app.main", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "--data-dir" in out.stdout and "--quit-after-demo" in out.stdout

    # Another app holds the data folder: a second `modron` says so and leaves it alone.
    from PySide6.QtCore import QLockFile
    (tmp_path / "data").mkdir()
    lock = QLockFile(str(tmp_path / "data" / "modron.lock"))
    assert lock.tryLock(0)
    try:
        out = subprocess.run([sys.executable, "-m", "app.main", "--no-tray"], cwd=ROOT, capture_output=True,
                             text=True, timeout=60, env=_env(tmp_path))
    finally:
        lock.unlock()
    assert out.returncode == 0 and "already running" in out.stdout


NO_TORCH_SCRIPT = textwrap.dedent("""
    import json, sys
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication
    app = QApplication([])
    from app.job_queue import JobQueue
    from app.main_window import MainWindow
    from app.store import Store
    from app.sysinfo import SysInfoPoller
    from app.tray import Tray
    store = Store.open_default()
    queue = JobQueue(store, autostart=False)
    queue.recover()
    from app.contribution import Contributor
    contributor = Contributor(store, queue, tick_ms=200)
    window = MainWindow(store, queue, poller=SysInfoPoller(interval_ms=200), contributor=contributor)
    tray = Tray(store, queue, window)
    tray.attach_contributor(contributor)
    tray.show()
    window.show()
    for name in window.views:
        window.show_view(name)
    window.show_view("dashboard")
    QTimer.singleShot(1000, app.quit)
    app.exec()
    window.views["dashboard"].poller.shutdown()
    heavy = sorted(m for m in ("torch", "transformers", "peft", "safetensors", "hivemind") if m in sys.modules)
    print(json.dumps({"heavy": heavy, "views": sorted(type(v).__name__ for v in window.views.built().values()),
                      "polled": window.views["dashboard"].poller.latest is not None}))
""")


def test_the_gui_never_imports_the_training_stack(tmp_path):
    out = subprocess.run([sys.executable, "-c", NO_TORCH_SCRIPT], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env=_env(tmp_path))
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["views"] == ["ContributionSettingsView", "DashboardView", "HistoryView", "NewFinetuneView",
                               "PlaygroundView", "QueueView", "RunView", "SettingsView", "SwarmView"]
    assert result["polled"]          # the dashboard's hardware thread ran
    assert result["heavy"] == []


def test_quitting_ends_a_playground_generation(qapp, tmp_path, monkeypatch):
    """main() shuts the Playground down after its loop, like the queue and the contribution (a running
    generation would otherwise outlive the window until Qt tears its process down)."""
    from app.views.playground import PlaygroundView
    ended = []
    monkeypatch.setattr(PlaygroundView, "shutdown", lambda self: ended.append(self))
    assert _run_main(monkeypatch, tmp_path, [], False, lambda window: window.views["playground"]) == 0
    assert len(ended) == 1


def test_the_dashboard_prepares_a_worker_for_the_demo_on_a_first_run_only(qtbot, store):
    from app.views.dashboard import DashboardView
    store.add_job({"model": "scratch:tiny"}, "earlier")
    queue = FakeQueue(store)
    view = DashboardView(store, queue, poller=FakePoller())
    qtbot.addWidget(view)
    view.show()
    assert not view.welcome.isVisible() and queue.calls == []
