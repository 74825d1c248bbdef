"""The app's views (charts, drop zone, new finetune, queue, run, history) with real subprocesses."""
import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import json
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PySide6.QtCore import QMimeData, QPointF, Qt, QUrl
from PySide6.QtGui import QDragEnterEvent, QDropEvent
from PySide6.QtWidgets import QApplication, QMessageBox

from app.charts import TimeSeriesChart, keep_last_per_x
from app.job_queue import JobQueue
from app.store import Store
from app.views.drop_zone import DatasetPanel
from app.views.history import HistoryView
from app.views.new_finetune import NewFinetuneView
from app.views.queue_view import QueueView
from app.views.run_view import RunView
from tests.helpers import write_text_dataset

CLI_TIMEOUT_MS = 60_000


# ---- helpers ---------------------------------------------------------------------------------
def drag_and_drop(widget, mime: QMimeData) -> bool:
    """Send a real drag-enter and, if the widget accepts it, the drop. Returns whether the enter was accepted."""
    pos = widget.rect().center()
    with warnings.catch_warnings():   # PySide6 flags the only QDragEnterEvent constructor it binds as deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        enter = QDragEnterEvent(pos, Qt.CopyAction, mime, Qt.LeftButton, Qt.NoModifier)
    enter.ignore()   # only the widget's own acceptProposedAction() may accept it
    QApplication.sendEvent(widget, enter)
    if not enter.isAccepted():
        return False
    drop = QDropEvent(QPointF(pos), Qt.CopyAction, mime, Qt.LeftButton, Qt.NoModifier)
    drop.ignore()
    QApplication.sendEvent(widget, drop)
    assert drop.isAccepted()
    return True


def url_mime(*paths) -> QMimeData:
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(p)) for p in paths])
    return mime


def tiny_spec(data, **extra) -> dict:
    spec = {"model": "scratch:tiny", "data": [str(data)], "steps": 15, "seq_len": 32, "batch_size": 4,
            "checkpoint_every": 5, "eval_every": 5, "tokenizer": "bytes", "threads": 1}
    spec.update(extra)
    return spec


def wait_until(qapp, predicate, timeout_s: float, what: str) -> None:
    # For module fixtures, where pytest-qt's function-scoped qtbot is not available.
    end = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        qapp.processEvents()
        time.sleep(0.02)


# ---- charts ----------------------------------------------------------------------------------
def _columns_of(x, lo, hi, columns):
    """Each x's pixel column of [lo, hi]: at or past an edge is the next column. In float64 with the
    edges laid out once: the same sum in float32 puts points near an edge in either column, by width
    (the test then failed at 188 of the widths 600-800)."""
    edges = np.linspace(float(lo), float(hi), columns + 1)[1:-1]
    return np.searchsorted(edges, np.asarray(x, dtype=np.float64), side="right")


def _column_extremes(x, y, lo, hi, columns):
    """Independent reference: the lowest and highest y of each pixel column of [lo, hi]."""
    col = _columns_of(x, lo, hi, columns)
    lows, highs = np.full(columns, np.inf), np.full(columns, -np.inf)
    np.minimum.at(lows, col, y)
    np.maximum.at(highs, col, y)
    return col, lows, highs


def test_chart_holds_500k_points_decimated_per_pixel_column_and_clipped(qtbot):
    chart = TimeSeriesChart("Loss", "loss")
    qtbot.addWidget(chart)
    chart.resize(800, 300)
    chart.show()
    chart.add_series("loss")
    chart.add_series("eval_loss")
    chunk = 5_000
    n = 500_000
    for i in range(100):
        xs = np.arange(i * chunk, (i + 1) * chunk, dtype=float)
        ys = np.sin(xs / 5000.0) + 2.0
        if i == 24:
            ys[3457 - 2] = 50.0         # a spike at step 123_455...
            ys[3457] = -10.0            # ...and a dip two steps later, in the same pixel column
        if i == 99:
            ys[-3] = 30.0               # a spike among the newest points (pyqtgraph's peak mode drops those)
            ys[-1] = 7.0
        chart.append("loss", xs, ys, t=xs * 0.5)
    chart.append("eval_loss", 10, 1.5)
    chart.append("eval_loss", [20, 30], [1.4, float("nan")])    # non-finite points are dropped
    assert chart.count("loss") == n
    assert chart.count("eval_loss") == 2
    x, y = chart.data("loss")
    assert x[0] == 0 and x[-1] == n - 1 and np.all(np.diff(x) == 1)
    assert y[12_345] == pytest.approx(np.sin(12_345 / 5000.0) + 2.0)
    # amortised growth: capacity doubled, never resized per append; float32: 12 bytes a point
    assert chart._buffers["loss"]._data.shape[1] < 2 * n + 1024
    assert chart._buffers["loss"]._data.dtype == np.float32

    start = time.perf_counter()
    chart.redraw()
    qtbot.wait(10)
    curve = chart.curves["loss"]
    assert curve.opts["autoDownsample"] is False and curve.opts["clipToView"] is False   # decimated here
    columns = chart._columns()
    assert 600 <= columns <= 800
    sx, sy = curve.getData()                        # what pyqtgraph draws
    assert len(sx) <= 4 * columns                   # about four points per pixel column, not 500 k
    assert sx[0] == 0 and sx[-1] == n - 1 and sy[-1] == 7.0     # the first and the newest point
    assert sy.max() == 50.0 and sy.min() == -10.0 and 30.0 in sy
    assert np.all(np.diff(sx) >= 0)
    # every pixel column shows exactly the lowest and highest value of the full data in it
    col, lows, highs = _column_extremes(x, y, x[0], x[-1], columns)
    scol = _columns_of(sx, x[0], x[-1], columns)
    s_lows, s_highs = np.full(columns, np.inf), np.full(columns, -np.inf)
    np.minimum.at(s_lows, scol, sy)
    np.maximum.at(s_highs, scol, sy)
    assert np.array_equal(s_lows, lows) and np.array_equal(s_highs, highs)
    # the shown range holds all of it
    (x0, x1), (y0, y1) = chart.plot.viewRange()
    assert x0 <= 0 and x1 >= n - 1 and y0 <= -10 and y1 >= 50

    # a live point past the end: drawn, and the range follows it
    chart.append("loss", n, 60.0, t=n * 0.5)
    chart.redraw()
    qtbot.wait(10)
    sx, sy = curve.getData()
    assert sx[-1] == n and sy[-1] == 60.0
    (x0, x1), (y0, y1) = chart.plot.viewRange()
    assert x1 >= n and y1 >= 60

    # zoomed in, only the visible range (and one point beyond each edge) is handed over, undecimated
    chart.plot.setXRange(1000, 2000, padding=0)
    qtbot.wait(10)
    sx, sy = curve.getData()
    assert sx[0] == 999 and sx[-1] == 2001 and len(sx) == 1003
    # zoomed on the spike: still there
    chart.plot.setXRange(100_000, 200_000, padding=0)
    qtbot.wait(10)
    sx, sy = curve.getData()
    # The y axis's labels change width with the range, and the plot's width with them: the chart has
    # decimated anew for the width it has now (the columns measured before the zoom may be off by ~10).
    columns = chart._columns()
    assert chart._drawn_columns == columns
    assert len(sx) <= 4 * columns and sx[0] <= 100_000 and sx[-1] >= 200_000 and sx[-1] <= 200_001
    assert sy.max() == 50.0 and sy.min() == -10.0
    # back to auto-range: everything again
    chart.plot.enableAutoRange()
    qtbot.wait(10)
    sx, sy = curve.getData()
    assert sx[0] == 0 and sx[-1] == n and sy.max() == 60.0
    assert chart.plot.viewRange()[0][1] >= n
    assert time.perf_counter() - start < 5

    chart.set_x_mode("time")
    tx, _ = chart.data("loss")
    assert tx[-1] == pytest.approx(n * 0.5)
    sx, sy = curve.getData()
    assert sx[-1] == pytest.approx(n * 0.5) and sy.max() == 60.0 and sy.min() == -10.0


def test_decimate_keeps_each_columns_extremes_and_both_ends():
    from app.charts import decimate
    rng = np.random.default_rng(3)
    x = np.sort(rng.uniform(0, 1000, 100_000))      # uneven spacing, as elapsed seconds are
    y = rng.normal(0, 1, len(x))
    y[[5, 50_000, len(x) - 2]] = [9.0, -9.0, 8.0]
    dx, dy = decimate(x, y, 300)
    assert len(dx) <= 4 * 300 and dx[0] == x[0] and dx[-1] == x[-1] and dy[-1] == y[-1]
    _, lows, highs = _column_extremes(x, y, x[0], x[-1], 300)
    _, d_lows, d_highs = _column_extremes(dx, dy, x[0], x[-1], 300)
    assert np.array_equal(d_lows, lows) and np.array_equal(d_highs, highs)
    # few points per column: handed back as they are (views)
    small_x, small_y = decimate(x[:1000], y[:1000], 300)
    assert small_x.base is not None and len(small_x) == 1000
    # x that goes back somewhere (not sorted): equal runs of points, extremes and ends still kept
    ux = x.copy()
    ux[70_000:] -= 500
    dx, dy = decimate(ux, y, 300, x_sorted=False)
    assert len(dx) <= 4 * 300 and dx[-1] == ux[-1] and dy[-1] == y[-1]
    assert dy.max() == 9.0 and dy.min() == -9.0 and 8.0 in dy
    assert decimate(x[:0], y[:0], 300)[0].size == 0


def test_chart_resumed_run_replaces_repeated_steps(qtbot):
    chart = TimeSeriesChart()
    qtbot.addWidget(chart)
    chart.append("loss", np.arange(1, 11), np.arange(1, 11) * 1.0)
    chart.append("loss", [7, 8], [70.0, 80.0])          # resumed from the step-6 checkpoint
    x, y = chart.data("loss")
    assert list(x) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert list(y[-2:]) == [70.0, 80.0]
    chart.set_series("loss", [1, 2, 3, 2, 3, 4], [1, 2, 3, 20, 30, 40])   # the same, as stored
    x, y = chart.data("loss")
    assert list(x) == [1, 2, 3, 4] and list(y) == [1, 20, 30, 40]
    assert list(keep_last_per_x(np.array([5.0, 1, 2, 3]))) == [False, True, True, True]
    chart.append("loss", [5, 6, 2], [5, 6, 200])          # a chunk that itself goes back
    x, y = chart.data("loss")
    assert list(x) == [1, 2] and list(y) == [1, 200]


# ---- drop zone -------------------------------------------------------------------------------
def test_drop_zone_takes_files_and_folders_and_validates(qtbot, tmp_path):
    good = tmp_path / "pairs.jsonl"
    good.write_text('{"instruction": "Say hi", "output": "hi"}\n{"instruction": "Count", "output": "1 2 3"}\n',
                    encoding="utf-8")
    folder = tmp_path / "stories"
    folder.mkdir()
    (folder / "a.txt").write_text("Once upon a time there was a fox.", encoding="utf-8")
    (folder / "b.md").write_text("# The crow\nThe crow sang.", encoding="utf-8")
    panel = DatasetPanel()
    qtbot.addWidget(panel)
    panel.show()
    zone = panel.drop_zone

    # a drag of plain text (e.g. from a browser) is refused, and changes nothing
    text = QMimeData()
    text.setText("just some words")
    assert drag_and_drop(zone, text) is False
    web = QMimeData()
    web.setUrls([QUrl("https://example.com/data.txt")])
    assert drag_and_drop(zone, web) is False
    assert zone.paths() == []

    with qtbot.waitSignal(panel.validated, timeout=CLI_TIMEOUT_MS) as blocker:
        assert drag_and_drop(zone, url_mime(good, folder)) is True
    assert zone.paths() == [str(good), str(folder)]
    assert [zone.list.item(i).text().rstrip("/") for i in range(zone.list.count())] == [str(good), str(folder)]
    report = blocker.args[0]
    assert report["records"] == 4 and report["format"] == "mixed"
    assert len(report["files"]) == 3
    assert "4 records" in panel.status.text() and "mixed" in panel.status.text()
    assert "Say hi" in panel.preview.text()
    assert panel.is_valid()

    # a broken file: its one-line error, in red, and no report
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"text": "fine"}\n{not json\n', encoding="utf-8")
    with qtbot.waitSignal(panel.invalid, timeout=CLI_TIMEOUT_MS) as blocker:
        assert drag_and_drop(zone, url_mime(bad)) is True
    message = blocker.args[0]
    assert "broken.jsonl" in message and "line 2" in message and "\n" not in message
    assert "Traceback" not in message and not message.startswith("modron-train")
    assert panel.status.text() == message and "c62828" in panel.status.styleSheet()
    assert not panel.is_valid() and panel.report is None

    # dropping the same paths again adds nothing; clearing empties the list
    assert drag_and_drop(zone, url_mime(good)) is True
    assert zone.paths().count(str(good)) == 1
    zone.clear()
    assert zone.paths() == [] and panel.report is None and not panel.busy()


# ---- new finetune ----------------------------------------------------------------------------
def _fill_form(view, data):
    view.set_model("scratch:tiny")
    view.steps_radio.setChecked(True)
    view.steps_spin.setValue(15)
    view.advanced_btn.setChecked(True)
    view.batch_spin.setValue(4)
    view.micro_spin.setValue(2)
    view.seq_spin.setValue(32)
    view.lr_edit.setText("1e-3")
    view.ckpt_spin.setValue(5)
    view.eval_spin.setValue(5)
    view.precision_combo.setCurrentIndex(view.precision_combo.findData("fp32"))
    view.gc_combo.setCurrentIndex(view.gc_combo.findData(False))
    view.tokenizer_combo.setCurrentIndex(view.tokenizer_combo.findData("bytes"))
    view.threads_spin.setValue(1)
    view.name_edit.setText("my stories")


def test_new_finetune_checks_with_the_real_plan_and_queues_the_spec(qtbot, tmp_path, store, real_run):
    # real_run is not used here: it is started so that its worker overlaps this test's plan process
    data = tmp_path / "stories.txt"
    write_text_dataset(data, n_paragraphs=20)
    queue = JobQueue(store, autostart=False)
    view = NewFinetuneView(store, queue)
    qtbot.addWidget(view)
    assert view.demo_row.isVisibleTo(view) and not view.add_btn.isEnabled()
    with qtbot.waitSignal(view.dataset.validated, timeout=CLI_TIMEOUT_MS):
        view.dataset.drop_zone.set_paths([str(data)])
    _fill_form(view, data)
    assert view.method_combo.currentData() == "full"      # the default for a model from scratch
    assert not view.demo_row.isVisibleTo(view)

    view.check_btn.click()
    assert not view.add_btn.isEnabled()
    qtbot.waitUntil(lambda: view.plan is not None or "c62828" in view.plan_status.styleSheet(),
                    timeout=CLI_TIMEOUT_MS)
    assert view.plan is not None, view.plan_status.text()
    assert view.plan["model"] == "scratch:tiny" and view.plan["steps"] == 15
    assert view.plan["verdict"] in ("fits", "tight")
    assert view.verdict_label.text().startswith("<b>Fits") or view.verdict_label.text().startswith("<b>Tight")
    assert "Estimated time" in view.details_label.text() and "Disk" in view.details_label.text()
    assert "licence-free" in view.licence_label.text()
    assert view.add_btn.isEnabled()

    # a change after the check makes it stale; a plan for other values never unlocks "Add to queue"
    plan = view.plan
    view.seq_spin.setValue(64)
    assert not view.add_btn.isEnabled() and view.plan is None
    view.seq_spin.setValue(32)
    assert not view.add_btn.isEnabled()
    view.show_plan(plan, {**view.form_spec(), "model": "scratch:mini"})
    assert not view.add_btn.isEnabled() and "check again" in view.plan_status.text()
    view.show_plan(plan)            # as if checked again with the form's values
    assert view.add_btn.isEnabled()

    with qtbot.waitSignal(view.submitted) as blocker:
        view.add_btn.click()
    job = store.get_job(blocker.args[0])
    assert job.name == "my stories" and job.state == "queued"
    spec = job.spec
    assert spec["model"] == "scratch:tiny" and spec["method"] == "full" and spec["steps"] == 15
    assert spec["epochs"] is None and spec["data"] == [str(data)]
    assert (spec["batch_size"], spec["micro_batch_size"], spec["seq_len"]) == (4, 2, 32)
    assert spec["lr"] == pytest.approx(1e-3)
    assert (spec["checkpoint_every"], spec["eval_every"]) == (5, 5)
    assert (spec["precision"], spec["gradient_checkpointing"], spec["tokenizer"], spec["threads"]) == \
        ("fp32", False, "bytes", 1)
    assert spec["trust_remote_code"] is False
    assert Path(spec["out"]).parent == store.runs_dir


def test_new_finetune_plan_display_and_confirmations(qtbot, tmp_path, store, monkeypatch):
    data = tmp_path / "d.txt"
    data.write_text("hello world " * 50, encoding="utf-8")
    queue = JobQueue(store, autostart=False)
    view = NewFinetuneView(store, queue)
    qtbot.addWidget(view)
    with qtbot.waitSignal(view.dataset.validated, timeout=CLI_TIMEOUT_MS):
        view.dataset.drop_zone.set_paths([str(data)])
    view.set_model("/nowhere/my-model")
    assert view.model_combo.currentData() == "hub" and view.model_id() == "/nowhere/my-model"
    assert view.method_combo.currentData() == "lora"        # the default for a pretrained model
    view.epochs_radio.setChecked(True)
    view.epochs_spin.setValue(2.5)
    view.advanced_btn.click()
    assert not view.trust_check.isChecked() and not view.trust_warning.isVisibleTo(view)
    view.trust_check.setChecked(True)
    assert view.trust_warning.isVisibleTo(view)
    spec = view.form_spec()
    assert spec["epochs"] == 2.5 and spec["steps"] is None and spec["trust_remote_code"] is True
    assert spec["model"] == "/nowhere/my-model" and spec["data"] == [str(data)]

    plan = {"model": "/nowhere/my-model", "method": "lora", "precision": "bf16", "device": "cuda:0",
            "params_total": 7_000_000_000, "params_trainable": 40_000_000,
            "memory": {"total": 30 * 2**30, "available": 8 * 2**30, "verdict": "wont_fit"},
            "verdict": "wont_fit", "advice": ["use QLoRA", "lower the sequence length to 512"],
            "disk": {"needed": 2**30, "free": 100 * 2**30, "verdict": "fits"},
            "licence": {"klass": "non-commercial", "name": "CC-BY-NC-4.0", "summary": "Not for sale.",
                        "warning": "You may not sell what you make with this model."},
            "tokens": 600, "tokens_exact": False, "steps": 3, "eta_s": 7200, "eta_note": "rough", "dataset": {},
            "speed_notes": ["Fused kernels (Liger): not used here: the liger-kernel package is not installed"]}
    view.show_plan(plan)
    assert view.verdict_label.text().startswith("<b>Won't fit")
    assert "use QLoRA" in view.verdict_label.text() and "c62828" in view.verdict_label.styleSheet()
    assert "2 h" in view.details_label.text()
    assert view.details_label.text().endswith("Fused kernels (Liger): not used here: the liger-kernel package is not installed")
    assert "You may not sell" in view.licence_label.text()
    reason = view.needs_confirmation()
    assert "won't fit" in reason and "lower the sequence length" in reason and "may not sell" in reason
    assert view.add_btn.isEnabled()

    asked = []
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: asked.append(a) or QMessageBox.No)
    view.add_btn.click()
    assert len(asked) == 1 and store.list_jobs() == []
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: asked.append(a) or QMessageBox.Yes)
    view.add_btn.click()
    assert len(asked) == 2
    [job] = store.list_jobs()
    assert job.spec["epochs"] == 2.5 and job.spec["method"] == "lora" and job.spec["trust_remote_code"] is True

    # a plan failure shows its line in red and locks "Add to queue"
    view.lr_edit.setText("fast")
    view.check()
    assert "Learning rate" in view.plan_status.text() and "c62828" in view.plan_status.styleSheet()
    assert not view.add_btn.isEnabled()


def test_try_the_demo_queues_the_demo_job(qtbot, store):
    queue = JobQueue(store, autostart=False)
    view = NewFinetuneView(store, queue)
    qtbot.addWidget(view)
    with qtbot.waitSignal(view.demo_submitted) as blocker:
        view.demo_btn.click()
    job = store.get_job(blocker.args[0])
    assert job.name == "Demo" and job.spec["model"] == "scratch:tiny"
    assert job.run_dir == str(store.runs_dir / f"job-{job.id:05d}")


# ---- queue view ------------------------------------------------------------------------------
def test_queue_view_buttons_drive_the_queue(qtbot, tmp_path, store):
    data = tmp_path / "d.txt"
    write_text_dataset(data, n_paragraphs=5)
    queue = JobQueue(store, autostart=False)      # nothing starts: the buttons act on queued jobs
    view = QueueView(store, queue)
    qtbot.addWidget(view)
    assert view.empty_label.isVisibleTo(view)
    ids = [queue.submit(tiny_spec(data), f"job {n}") for n in range(3)]
    view.refresh()
    assert view.job_ids == ids and not view.empty_label.isVisibleTo(view)
    assert [view.table.item(r, 0).text() for r in range(3)] == ["job 0", "job 1", "job 2"]
    assert all(view.state_of(i) == "queued" for i in ids)
    assert view.table.item(0, 1).text() == "scratch:tiny"
    assert not view.pause_btn.isEnabled()               # nothing selected

    view.select_job(ids[1])
    assert view.pause_btn.isEnabled() and not view.resume_btn.isEnabled() and not view.retry_btn.isEnabled()
    view.pause_btn.click()
    assert store.get_job(ids[1]).state == "paused" and view.state_of(ids[1]) == "paused"
    assert view.resume_btn.isEnabled() and not view.pause_btn.isEnabled()
    view.resume_btn.click()
    assert store.get_job(ids[1]).state == "queued" and view.state_of(ids[1]) == "queued"

    view.down_btn.click()
    assert [j.id for j in store.list_jobs()] == [ids[0], ids[2], ids[1]] == view.job_ids
    assert view.selected_job_id() == ids[1] and not view.down_btn.isEnabled()
    view.select_job(ids[2])
    view.up_btn.click()
    assert view.job_ids == [ids[2], ids[0], ids[1]] and not view.up_btn.isEnabled()

    view.select_job(ids[0])
    view.confirm_cancel = lambda parent, job: True      # the question itself: test_app_run_queue_ux.py
    view.cancel_btn.click()
    assert store.get_job(ids[0]).state == "cancelled"
    assert ids[0] not in view.job_ids                    # cancelled jobs go to History

    store.update_job(ids[1], state="failed", error="data.txt: no text found")
    queue.job_changed.emit(ids[1])
    qtbot.waitUntil(lambda: view.state_of(ids[1]) == "failed", timeout=2000)
    view.select_job(ids[1])
    assert view.retry_btn.isEnabled() and "no text found" in view.error_label.text()
    view.retry_btn.click()
    assert store.get_job(ids[1]).state == "queued" and view.state_of(ids[1]) == "queued"

    view.pause_all_btn.click()
    assert queue.paused_all is True
    view.pause_all_btn.click()
    assert queue.paused_all is False

    opened = []
    view.open_job.connect(opened.append)
    view.table.cellDoubleClicked.emit(0, 0)
    assert opened == [view.job_ids[0]]


# ---- a real run, shared by the run view and history tests ---------------------------------------
@pytest.fixture(scope="module")
def real_run(qapp, tmp_path_factory):
    """A real worker job (tiny, ~15 steps) followed by a RunView through the real JobQueue.
    Only started here: it runs on while other tests wait on their own subprocesses."""
    base = tmp_path_factory.mktemp("views-run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MODRON_DATA_DIR", str(base / "data"))
        mp.setenv("MODRON_CACHE_DIR", str(base / "cache"))
        data = base / "stories.txt"
        write_text_dataset(data)
        store = Store(base / "data" / "modron.sqlite3")
        queue = JobQueue(store)
        view = RunView(store, queue)
        view.resize(1000, 800)
        events = []
        queue.job_event.connect(lambda jid, ev: events.append((jid, ev)))
        job_id = queue.submit(tiny_spec(data), "tiny run")
        # the worker inherits this fixture's data folders, so wait until it is spawned
        wait_until(qapp, lambda: queue.running_job() is not None or store.get_job(job_id).state != "queued", 30,
                   "the worker to start")
    yield {"store": store, "queue": queue, "view": view, "job_id": job_id, "events": events, "base": base}
    queue.shutdown(timeout_ms=10_000)
    view.deleteLater()
    store.close()


@pytest.fixture
def finished_run(real_run, qapp):
    store, job_id = real_run["store"], real_run["job_id"]
    wait_until(qapp, lambda: store.get_job(job_id).state in ("finished", "failed", "cancelled"), 120,
               "the worker to finish")
    qapp.processEvents()
    return real_run


def test_run_view_follows_a_real_worker_to_the_end(finished_run):
    store, view, job_id = finished_run["store"], finished_run["view"], finished_run["job_id"]
    job = store.get_job(job_id)
    assert job.state == "finished", job.error
    assert view.job_id == job_id                          # it switched to the job that started
    steps_sent = [ev for jid, ev in finished_run["events"] if jid == job_id and ev["type"] == "step"]
    evals_sent = [ev for jid, ev in finished_run["events"] if jid == job_id and ev["type"] == "eval"]
    metrics = store.metrics(job_id)
    loss_chart = view.charts.loss_chart
    assert loss_chart.count("loss") > 0
    assert loss_chart.count("loss") == len(metrics["loss"]) == len(steps_sent)
    assert loss_chart.count("eval_loss") == len(metrics["eval_loss"]) == len(evals_sent) >= 3
    x, y = loss_chart.data("loss")
    assert list(x) == [float(s) for s in metrics["step"]] and x[-1] == 15
    assert np.allclose(y, metrics["loss"])
    assert view.charts.speed_chart.count("tokens_per_s") == len(steps_sent)
    assert view.charts.memory_chart.count("ram_used") == len(steps_sent)
    assert view.progress.value() == 100 and "15 / 15" in view.progress.format()
    assert "· finished" in view.state_label.text()
    assert "Once upon a time" in view.samples.toPlainText() and "At step 15" in view.samples.toPlainText()
    log = view.log.toPlainText()
    assert "Started scratch:tiny" in log and "Checkpoint (periodic) at step 5" in log and "Finished at step 15" in log
    assert not view.pause_btn.isEnabled() and not view.cancel_btn.isEnabled()

    view.charts.set_x_mode("time")
    tx, _ = loss_chart.data("loss")
    assert np.allclose(tx, metrics["elapsed_s"]) and np.all(np.diff(tx) >= 0)
    view.charts.set_x_mode("step")


def test_run_view_reloads_the_same_history_after_a_restart(finished_run, qtbot):
    base, job_id = finished_run["base"], finished_run["job_id"]
    live = finished_run["view"].charts
    store = Store(base / "data" / "modron.sqlite3")         # a new app on the same data folder
    try:
        queue = JobQueue(store, autostart=False)
        view = RunView(store, queue)
        qtbot.addWidget(view)
        view.show_job()                                    # nothing runs: the newest job
        assert view.job_id == job_id
        for name in ("loss", "eval_loss"):
            assert view.charts.loss_chart.count(name) == live.loss_chart.count(name) > 0
            assert np.array_equal(view.charts.loss_chart.data(name)[0], live.loss_chart.data(name)[0])
            assert np.allclose(view.charts.loss_chart.data(name)[1], live.loss_chart.data(name)[1])
        assert view.charts.memory_chart.count("vram_used") == live.memory_chart.count("vram_used")
        assert view.progress.value() == 100
        assert view.samples.toPlainText() == finished_run["view"].samples.toPlainText()
        assert "Finished at step 15" in view.log.toPlainText()
    finally:
        store.close()


def test_history_lists_the_run_reloads_charts_and_exports(finished_run, qtbot, tmp_path, monkeypatch):
    store, queue, job_id = finished_run["store"], finished_run["queue"], finished_run["job_id"]
    finished = [ev for jid, ev in finished_run["events"] if jid == job_id and ev["type"] == "finished"][0]
    view = HistoryView(store, queue)
    qtbot.addWidget(view)
    assert view.job_ids == [job_id]
    row = view.row_texts(job_id)
    assert row[0] == "tiny run" and row[2] == "finished" and row[4] == "15"
    assert row[5] == f"{finished['final_loss']:.4f}" and row[6] == f"{finished['final_eval_loss']:.4f}"

    view.table.selectRow(0)
    assert view.job_id == job_id
    metrics = store.metrics(job_id)
    assert view.charts.loss_chart.count("loss") == len(metrics["loss"]) > 0
    assert view.charts.loss_chart.count("eval_loss") == len(metrics["eval_loss"]) > 0
    assert "Once upon a time" in view.detail.text()

    opened = []
    monkeypatch.setattr("app.views.history.QDesktopServices.openUrl", lambda url: opened.append(url) or True)
    view.open_btn.click()
    assert [u.toLocalFile() for u in opened] == [store.get_job(job_id).run_dir]

    # Export… opens the dialog; a merged model into an empty folder the user picks goes into it.
    out = tmp_path / "exported"
    out.mkdir()
    monkeypatch.setattr("app.views.export_dialog.QFileDialog.getExistingDirectory", lambda *a, **k: str(out))
    view.export_btn.click()
    dialog = view._dialogs[-1]
    assert dialog.isVisible() and dialog.windowTitle() == "Export tiny run"
    dialog.choose("merged")
    dialog.browse_btn.click()
    assert dialog.target_edit.text() == str(out)
    dialog.export_btn.click()
    # One export at a time: History's button is off, and asking again brings back the running dialog.
    assert view.exporting() and not view.export_btn.isEnabled()
    assert view.open_export_dialog() is dialog and len(view._dialogs) == 1
    qtbot.waitUntil(lambda: not view.exporting(), timeout=CLI_TIMEOUT_MS)
    line = f"Merged model written to {out}"
    assert dialog.status.text() == line and dialog.isVisible(), dialog.status.text()
    assert view.export_status.text() == line and view.export_btn.isEnabled()
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 128
    # the folder is no longer empty: picking it again proposes a new subfolder named after the run
    dialog.browse_btn.click()
    assert dialog.target_edit.text() == str(out / "tiny-run-merged")
    dialog.reject()
    qtbot.waitUntil(lambda: not dialog.busy(), timeout=CLI_TIMEOUT_MS)
    # the line stays with the run once the dialog is closed, and comes back when the run is selected again
    view.select_job(None)
    assert view.export_status.text() == ""
    view.select_job(job_id)
    assert view.export_status.text() == line


def test_time_axis_ticks_read_as_durations_and_stay_distinct_below_a_second(qtbot):
    from app.charts import ElapsedAxis
    axis = ElapsedAxis(orientation="bottom")
    axis.as_time = True
    assert axis.tickStrings([0, 90, 3900], 1.0, 30) == ["0s", "1m30", "1h05"]
    # An empty chart spans 0..1 s; whole seconds would print "0s 0s 0s 1s 1s".
    ticks = axis.tickStrings([0.0, 0.2, 0.4, 0.6], 1.0, 0.2)
    assert len(set(ticks)) == 4 and ticks[1] == "0.2s"
