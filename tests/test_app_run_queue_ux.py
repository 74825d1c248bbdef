"""Queue, Run view, tray and window UX (issue 13, point 4) on the real widgets and the real JobQueue.

The queue's worker is a scripted stand-in (no torch, no process): each test says which events the
engine sends and when, so pauses, cancels and failures happen exactly where the test needs them.
"""
import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest
from PySide6.QtCore import QObject, QTimer, Signal
from PySide6.QtWidgets import QApplication, QMessageBox

from app.job_queue import JobQueue
from app.views.queue_view import CANCELLING, QueueView, confirm_cancel
from app.views.run_view import RunView
from helpers import tiny_job

GIB = 1024 ** 3


class ScriptedWorker(QObject):
    """Stands in for EngineRun: records what the queue sends; the test emits the events."""

    event = Signal(dict)
    exited = Signal(int, str)
    made: list["ScriptedWorker"] = []

    def __init__(self, args=(), run_dir=None, parent=None, **_kw):
        super().__init__(parent)
        resume = "--resume" in args
        self.resume, self.last_failed, self.sent, self.started = resume, None, [], False
        ScriptedWorker.made.append(self)

    pid = None

    def start(self):
        self.started = True

    def send(self, kind):
        self.sent.append(kind)

    def retire(self):
        self.blockSignals(True)

    def wait(self, _ms):
        return True

    def kill(self):
        pass

    def running(self):
        return self.started

    # what the engine would say
    def say(self, kind, **fields):
        self.event.emit({"type": kind, "time": 1.0, **fields})

    def step(self, step, elapsed, total=100, **fields):
        """A step event of a run doing 128 tokens a step; the engine's own figures unless given."""
        ev = {"step": step, "total_steps": total, "loss": 2.0, "elapsed_s": float(elapsed),
              "tokens_seen": step * 128, "tokens_per_s": 128.0, "eta_s": 1.0, "vram_used": 0,
              "vram_reserved": 0, "ram_used": 2 * GIB}
        self.say("step", **{**ev, **fields})


@pytest.fixture
def scripted(monkeypatch):
    ScriptedWorker.made = []
    monkeypatch.setattr("app.job_queue.EngineRun", ScriptedWorker)
    return ScriptedWorker.made


def start_worker(qtbot, queue, scripted, job_id, total=100, device="cpu"):
    """Wait for the queue to start job_id's worker; it says `started`."""
    qtbot.waitUntil(lambda: queue.running_job() is not None and queue.running_job().id == job_id, timeout=2000)
    w = scripted[-1]
    w.say("started", total_steps=total, device=device, precision="fp32", method="full", model="scratch:tiny",
          params_total=1000, params_trainable=1000, resumed_from=None)
    return w


def stop_worker(w, step, code=0):
    w.say("stopped", step=step, checkpoint=None)
    w.exited.emit(code, "")


def click_in_message_box(text):
    """Click the button named `text` of the message box that is about to open (exec() blocks)."""
    clicked = []

    def poll(tries=300):
        box = QApplication.activeModalWidget()
        if isinstance(box, QMessageBox):
            for b in box.buttons():
                if b.text() == text:
                    clicked.append(box.text())
                    b.click()
                    return
        if tries:
            QTimer.singleShot(10, lambda: poll(tries - 1))

    QTimer.singleShot(0, poll)
    return clicked


def queue_and_view(qtbot, store, queues, view_class):
    """A JobQueue on `store` (stopped at teardown through `queues`) and one view of it."""
    queue = JobQueue(store)
    queues.append(queue)
    view = view_class(store, queue)
    qtbot.addWidget(view)
    return queue, view


# ---- (a) cancel ---------------------------------------------------------------------------------
def test_cancel_asks_and_acts_on_the_chosen_job_shows_cancelling_and_keeps_no_selection(
        qtbot, tmp_path, store, scripted, queues):
    queue, view = queue_and_view(qtbot, store, queues, QueueView)
    a, b, c = (queue.submit(tiny_job(tmp_path), name) for name in ("a", "b", "c"))
    w = start_worker(qtbot, queue, scripted, a)
    view.refresh()

    # The real box: "Keep it" changes nothing.
    view.select_job(a)
    seen = click_in_message_box("Keep it")
    view.cancel_btn.click()
    assert seen == ["Cancel \u201ca\u201d?"] and w.sent == [] and view.state_of(a) == "running"

    # While the question is open the list moves on (here: the selection goes to c); the cancel
    # still goes to the job selected at the click.
    asked = []

    def confirm(parent, job):
        asked.append(job.id)
        view.select_job(c)
        return True

    view.confirm_cancel = confirm
    view.select_job(a)
    view.cancel_btn.click()
    assert asked == [a] and w.sent == ["stop"]
    assert view.state_of(a) == CANCELLING                        # at once, before the worker has saved
    assert view.selected_job_id() == c
    assert store.get_job(c).state == "queued" and store.get_job(b).state == "queued"
    view.select_job(a)                                          # nothing more to do to a job on its way out
    assert not view.cancel_btn.isEnabled() and not view.pause_btn.isEnabled()

    # The worker saves and stops: the row leaves, and the selection does not jump to b, so a second
    # click cannot cancel it.
    stop_worker(w, step=0)
    assert store.get_job(a).state == "cancelled"
    view.refresh()
    assert a not in view.job_ids and view.selected_job_id() is None and not view.cancel_btn.isEnabled()
    view.cancel_btn.click()
    qtbot.waitUntil(lambda: queue.running_job() is not None, timeout=2000)   # b starts, untouched
    assert store.get_job(b).state == "running" and len(asked) == 1

    # A queued job, through the real box's "Cancel the job".
    view.confirm_cancel = confirm_cancel           # the default: the real question
    view.refresh()
    view.select_job(c)
    seen = click_in_message_box("Cancel the job")
    view.cancel_btn.click()
    assert seen == ["Cancel \u201cc\u201d?"] and store.get_job(c).state == "cancelled"
    assert view.selected_job_id() is None


def test_run_view_cancel_asks_and_keeps_to_the_job_it_showed(qtbot, tmp_path, store, scripted, queues):
    queue, view = queue_and_view(qtbot, store, queues, RunView)
    a = queue.submit(tiny_job(tmp_path), "a")
    other = queue.submit(tiny_job(tmp_path), "other")
    w = start_worker(qtbot, queue, scripted, a)
    assert view.job_id == a

    view.confirm_cancel = lambda parent, job: False
    view.cancel_btn.click()
    assert w.sent == []

    def confirm(parent, job):
        view.show_job(other)            # the view moved on while the question was open
        return True

    view.confirm_cancel = confirm
    view.show_job(a)
    view.cancel_btn.click()
    assert w.sent == ["stop"] and store.get_job(other).state == "queued"
    view.show_job(a)
    assert view.state_label.text() == f"· {CANCELLING}" and not view.cancel_btn.isEnabled()


# ---- (b) pause and speed -----------------------------------------------------------------------
def test_paused_time_is_left_out_of_speed_and_eta(qtbot, tmp_path, store, scripted, queues):
    queue = JobQueue(store)
    queues.append(queue)
    run, qview = RunView(store, queue), QueueView(store, queue)
    qtbot.addWidget(run)
    qtbot.addWidget(qview)
    job = queue.submit(tiny_job(tmp_path), "long")
    w = start_worker(qtbot, queue, scripted, job, total=100)
    w.step(10, elapsed=10, time=10.0)
    w.step(20, elapsed=20, time=20.0)
    queue.pause(job)
    assert w.sent == ["pause"]
    w.say("paused", step=20, vram_used=0, checkpoint=None)
    queue.resume(job)
    w.say("resumed", step=20)
    # 10 minutes later by the wall clock (the events' `time`). The engine measures speed and ETA on its
    # pause-free clock (tests/test_engine.py), so these figures leave the pause out; the app shows them
    # as sent, and nothing of its own (the wall clock, the time since the last event) creeps back in.
    w.step(30, elapsed=30, time=630.0, tokens_per_s=128.0, eta_s=70.0)

    assert "128 tokens/s" in run.figures.text(), run.figures.text()
    assert "ETA 1 min 10 s" in run.progress.format()            # 70 steps at 1 s each
    summary = store.get_job(job).summary
    assert summary["tokens_per_s"] == 128.0 and summary["eta_s"] == 70.0
    assert store.metrics(job)["tokens_per_s"][-1] == 128.0
    run.charts.speed_chart.redraw()
    assert run.charts.speed_chart.data("tokens_per_s")[1][-1] == 128.0
    qview.refresh()
    assert qview.table.item(0, 6).text() == "1 min 10 s"


# ---- (c) why a job waits -----------------------------------------------------------------------
def test_the_queue_says_why_each_job_waits(qtbot, tmp_path, store, scripted, queues):
    lent = {"on": False}
    queue = JobQueue(store)
    queue.gate = lambda job: not lent["on"]
    queues.append(queue)
    view = QueueView(store, queue)
    qtbot.addWidget(view)
    a, b, c = (queue.submit(tiny_job(tmp_path), name) for name in ("a", "b", "c"))
    w = start_worker(qtbot, queue, scripted, a)
    view.refresh()
    assert view.reason_of(a) == "" and view.reason_of(b) == "waiting: another job is running"

    queue.pause(a)
    w.say("paused", step=3, vram_used=0, checkpoint=None)
    view.refresh()
    assert view.reason_of(a) == "paused by you"
    assert view.reason_of(b) == "waiting: another job is paused (resume or cancel it)"
    queue.resume(a)
    w.say("resumed", step=3)

    view.select_job(b)
    view.pause_btn.click()
    assert view.state_of(b) == "paused" and view.reason_of(b) == "paused by you"
    view.pause_all_btn.click()
    assert view.reason_of(c) == "waiting: everything is paused"
    w.say("paused", step=4, vram_used=0, checkpoint=None)
    view.refresh()
    assert view.reason_of(a) == "paused: everything is paused"
    view.pause_all_btn.click()
    w.say("resumed", step=4)

    # The swarm holds the GPU when a finishes: the next job says so, and starts once it is back.
    lent["on"] = True
    w.say("finished", step=100, final_loss=1.0)
    w.exited.emit(0, "")
    qtbot.waitUntil(lambda: view.reason_of(c) == "waiting: GPU lent to the swarm", timeout=2000)
    assert queue.running_job() is None
    lent["on"] = False
    queue.reconsider()
    qtbot.waitUntil(lambda: queue.running_job() is not None, timeout=2000)
    view.refresh()
    assert view.state_of(c) == "running" and view.reason_of(c) == ""


# ---- (d) run view: clean start, legends, no VRAM without a GPU ----------------------------------
def test_run_view_starts_clean_keeps_legends_off_the_plot_and_hides_vram_without_a_gpu(
        qtbot, tmp_path, store, scripted, queues):
    queue, view = queue_and_view(qtbot, store, queues, RunView)
    view.resize(1000, 800)
    view.show()

    gpu = queue.submit(tiny_job(tmp_path), "on the GPU")
    w = start_worker(qtbot, queue, scripted, gpu, total=1000, device="cuda:0")
    for s in range(50, 1001, 50):
        w.step(s, elapsed=s, total=1000, loss=5.0 + s, vram_used=3 * GIB, vram_reserved=4 * GIB)
    w.say("finished", step=1000, final_loss=1.0)
    w.exited.emit(0, "")
    loss, memory = view.charts.loss_chart, view.charts.memory_chart
    loss.redraw()
    loss.plot.setXRange(200, 400)                 # the user zoomed in
    assert memory.series_visible("vram_used") and memory.series_visible("ram_used")
    assert memory.legend_labels() == ["VRAM used", "VRAM reserved", "RAM (worker)"]

    # Legends are a line above the plot, never an item on it: nothing can cover a line.
    qtbot.wait(10)
    for chart in view.charts.charts:
        assert chart.plot.legend is None
        if chart.legend.isVisible():
            legend, plot = chart.legend.geometry(), chart.plot_widget.geometry()
            assert not legend.intersects(plot) and legend.bottom() < plot.top()
    assert loss.legend_labels() == ["train loss", "eval loss"]
    assert not view.charts.speed_chart.legend.isVisible()      # one line: its title says what it is

    # The next run starts with empty charts and fresh axes, not the last run's range or zoom.
    cpu = queue.submit(tiny_job(tmp_path), "on the CPU")
    w = start_worker(qtbot, queue, scripted, cpu, total=10, device="cpu")
    assert view.job_id == cpu and loss.count("loss") == 0
    (x0, x1), _ = loss.plot.vb.viewRange()
    assert (x0, x1) == pytest.approx((0, 1)) and all(loss.plot.vb.autoRangeEnabled())
    for s in range(1, 11):
        w.step(s, elapsed=s, total=10)
    loss.redraw()
    loss.plot.vb.updateAutoRange()
    (x0, x1), _ = loss.plot.vb.viewRange()
    assert 0 <= x0 <= 1 and 10 <= x1 < 20

    # No GPU (device cpu, VRAM 0): no VRAM lines and no legend for them; RAM alone is drawn.
    memory.redraw()
    assert memory.count("vram_used") == 10 and not memory.series_visible("vram_used")
    assert not memory.series_visible("vram_reserved") and memory.series_visible("ram_used")
    assert memory.legend_labels() == ["RAM (worker)"]
    memory.plot.vb.updateAutoRange()
    _, (y0, y1) = memory.plot.vb.viewRange()
    assert y0 > 1                                 # fitted to RAM (2 GiB), not stretched down to VRAM's zeros

    # Reloaded from the store (another app start, or History), each run keeps its own choice.
    view.show_job(gpu)
    assert memory.series_visible("vram_used") and loss.count("loss") == 20
    view.show_job(cpu)
    assert not memory.series_visible("vram_used")


# ---- (e) tray error until seen ------------------------------------------------------------------
class _Poller(QObject):
    updated = Signal(dict)

    def start(self):
        pass

    def stop(self):
        pass


def test_tray_keeps_the_error_until_the_user_has_seen_it(qtbot, tmp_path, store, scripted, queues):
    from app.icons import state_icon
    from app.main_window import MainWindow
    from app.tray import Tray
    queue = JobQueue(store)
    queues.append(queue)
    window = MainWindow(store, queue, poller=_Poller())
    qtbot.addWidget(window)
    tray = Tray(store, queue, window)
    notices = []
    tray.icon.showMessage = lambda title, text, *rest: notices.append(title)

    bad = queue.submit(tiny_job(tmp_path), "bad")
    later = queue.submit(tiny_job(tmp_path), "later")
    w = start_worker(qtbot, queue, scripted, bad)
    assert tray.state == "training"
    w.say("failed", code="data", message="stories.txt: no text")
    w.exited.emit(1, "stories.txt: no text")
    assert store.get_job(bad).state == "failed" and tray.state == "error"
    assert tray.icon.icon().cacheKey() == state_icon("error").cacheKey()

    # The next job trains and finishes: the failure is still unseen, the icon still says so.
    w = start_worker(qtbot, queue, scripted, later)
    assert tray.state == "error" and "an earlier job failed" in tray.status_action.text()
    w.say("finished", step=100, final_loss=1.0)
    w.exited.emit(0, "")
    assert notices == ["bad failed", "later finished"]
    assert tray.state == "error" and tray.icon.icon().cacheKey() == state_icon("error").cacheKey()

    # An app restart keeps it.
    again = Tray(store, queue, window)
    assert again.state == "error"
    again.icon.hide()

    # Opening the failed job (the notice, or the Run view) is seeing it.
    tray._notice_job = bad
    tray.icon.messageClicked.emit()
    assert window.current_view() == "run" and window.views["run"].job_id == bad
    assert tray.state == "idle" and tray.icon.icon().cacheKey() == state_icon("idle").cacheKey()
    assert Tray(store, queue, window).state == "idle"

    # A failure the user dealt with (Retry) is no error either.
    store.update_job(later, state="failed", error="x")
    queue.job_changed.emit(later)
    assert tray.state == "error"
    queue.retry(later)
    assert tray.state != "error"


# ---- (f) titles ---------------------------------------------------------------------------------
def test_every_view_has_a_title(qtbot, store):
    from app.main_window import VIEW_LABELS, VIEW_NAMES, MainWindow, title_of
    queue = JobQueue(store, autostart=False)
    window = MainWindow(store, queue, poller=_Poller())
    qtbot.addWidget(window)
    window.show()
    for name in VIEW_NAMES:
        view = window.show_view(name)
        assert title_of(view) == VIEW_LABELS[name], name
        label = view.layout().itemAt(0).widget()
        assert label.isVisible() and "bold" in label.styleSheet(), name
