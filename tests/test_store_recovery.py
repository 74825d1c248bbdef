"""The app's side of issue 11: an emptied or damaged database is noticed at start, the user chooses,
runs are found again from their folders; a run folder is never shared; a diverged job says why and
its Retry goes on with the lower learning rate."""
import json
import random
import sqlite3
import time
from pathlib import Path

from PySide6.QtCore import QObject, QTimer
from PySide6.QtWidgets import QApplication, QMessageBox, QSystemTrayIcon

from app.job_queue import JobQueue
from app.store import DB_NAME, Store, _salvage_rows, recover_store, store_problem

SPEC = {"model": "scratch:tiny", "data": ["/data/stories.txt"], "steps": 1000}


def make_run(folder: Path, job_id: str, step: int | None, total: int = 1000) -> Path:
    """A run folder as the engine leaves it: job.json and (JSON parts of) its newest checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "job.json").write_text(json.dumps({**SPEC, "out": str(folder), "job_id": job_id, "steps": total}))
    if step is not None:
        ckpt = folder / "checkpoints" / f"ckpt-{step:08d}"
        ckpt.mkdir(parents=True)
        (ckpt / "modron_checkpoint.json").write_text(json.dumps({"format": "modron-checkpoint", "version": 1,
                                                                 "step": step}))
        (ckpt / "trainer_state.json").write_text(json.dumps({"step": step, "total_steps": total,
                                                             "last_loss": 2.5, "elapsed_s": 3600.0}))
        (ckpt / "eval.json").write_text(json.dumps({"eval_loss": 2.75, "perplexity": 15.6}))
    return folder


def filled_store(path: Path, jobs: int = 30) -> Store:
    store = Store(path)
    for i in range(jobs):
        job = store.add_job(dict(SPEC), f"job {i}")
        store.update_job(job.id, state="finished" if i < jobs - 3 else "queued")
        for k in range(200):
            store.add_metric(job.id, {"type": "step", "step": k, "loss": 3.0 - k / 100, "time": time.time()})
        for _ in range(20):
            store.add_event(job.id, {"type": "warning", "code": "x", "message": "x" * 100})
    return store


# ---- 1. an emptied store: noticed, runs found again, no folder ever shared -------------------------
def test_an_emptied_store_is_noticed_and_no_new_job_takes_an_old_run_folder(tmp_path):
    data = tmp_path / "data"
    store = Store(data / DB_NAME)
    night = store.add_job(dict(SPEC), "Night run")
    assert Path(night.run_dir).name == "job-00001"
    make_run(Path(night.run_dir), night.spec["job_id"], step=300)
    store.close()
    (data / DB_NAME).write_bytes(b"")   # emptied

    problem = store_problem(data / DB_NAME)
    assert problem and "is empty (0 bytes)" in problem and "1 run folder" in problem
    store, recovery = recover_store(data / DB_NAME)
    assert recovery.aside.is_file() and recovery.aside.stat().st_size == 0
    (job,) = store.list_jobs()
    assert job.id == night.id and job.state == "cancelled" and job.attempts == 1   # Retry resumes it
    assert job.spec["job_id"] == night.spec["job_id"] and job.run_dir == night.run_dir
    assert job.summary["step"] == 300 and job.summary["eval_loss"] == 2.75 and "step 300" in job.error
    assert "1 run(s) were found again" in recovery.message()
    new = store.add_job(dict(SPEC), "Next")
    assert new.id == 2 and Path(new.run_dir).name == "job-00002"
    assert store_problem(data / DB_NAME) is None

    # A store that lost its file without a trace starts at id 1 again: its job 1 gets a folder of its own.
    other = Store(tmp_path / "other" / DB_NAME)
    make_run(other.runs_dir / "job-00001", "0123456789ab", step=10)
    fresh = other.add_job(dict(SPEC), "Fresh")
    assert fresh.id == 1 and Path(fresh.run_dir).name == f"job-00001-{fresh.spec['job_id']}"


def test_an_empty_file_without_runs_is_just_a_new_store(tmp_path):
    (tmp_path / DB_NAME).write_bytes(b"")
    assert store_problem(tmp_path / DB_NAME) is None


# ---- 2. damaged pages: read around them ------------------------------------------------------------
def test_salvage_reads_the_rows_around_a_damaged_page(tmp_path):
    path = tmp_path / "t.sqlite3"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, text TEXT)")
    db.executemany("INSERT INTO t (text) VALUES (?)", [("row %d " % i + "x" * 200,) for i in range(2000)])
    db.commit()
    db.close()
    raw = bytearray(path.read_bytes())
    middle = (len(raw) // 4096 // 2) * 4096
    raw[middle:middle + 4096] = random.Random(1).randbytes(4096)   # one leaf page in the middle
    path.write_bytes(bytes(raw))
    db = sqlite3.connect(path)
    try:
        db.execute("SELECT COUNT(*) FROM t WHERE text LIKE '%'").fetchone()
        raised = False
    except sqlite3.DatabaseError:
        raised = True
    assert raised   # a plain scan fails
    columns, rows = _salvage_rows(db, "t")
    assert columns == ["id", "text"]
    assert 1900 <= len(rows) < 2000 and rows[0][0] == 1 and rows[-1][0] == 2000


def _run_main(monkeypatch, tmp_path, button: str, inspect=None):
    """main() in this process; a timer answers the start-up question with `button`, another runs
    `inspect(window)` once the window is up. Returns (exit code, the question's text)."""
    import app.main
    from app.main_window import MainWindow
    monkeypatch.setattr(app.main, "_home", None)
    monkeypatch.setenv("MODRON_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(QSystemTrayIcon, "isSystemTrayAvailable", staticmethod(lambda: False))
    qapp = QApplication.instance()
    quit_on_close = qapp.quitOnLastWindowClosed()
    before = QApplication.topLevelWidgets()   # the widgets, not id()s, which a freed wrapper lends on
    seen = {"polls": 0}

    def answer():
        boxes = [w for w in QApplication.topLevelWidgets() if isinstance(w, QMessageBox) and w.isVisible()]
        if not boxes:
            seen["polls"] += 1
            if seen["polls"] < 400:
                QTimer.singleShot(50, answer)
            return
        seen["question"] = boxes[0].text() + "\n" + boxes[0].informativeText()
        next(b for b in boxes[0].buttons() if button in b.text()).click()
        if inspect is not None:
            QTimer.singleShot(50, look)

    def look():
        windows = [w for w in QApplication.topLevelWidgets()
                   if isinstance(w, MainWindow) and w.isVisible() and not any(w is b for b in before)]
        if not windows:
            QTimer.singleShot(50, look)
            return
        seen["window"] = windows[-1]
        try:
            inspect(windows[-1])
        except BaseException as exc:   # re-raised after the loop ends
            seen["error"] = exc
        qapp.quit()

    # An earlier test's app may have asked to quit after its loop ended; a loop run once clears that,
    # or the question (asked before the app's loop starts) would close at once.
    QTimer.singleShot(0, qapp.quit)
    qapp.exec()
    QTimer.singleShot(50, answer)
    try:
        code = app.main.main(["--no-tray", "--data-dir", str(tmp_path / "data")])
        qapp.setQuitOnLastWindowClosed(False)   # closing our window must not leave a quit for the next test
        if "window" in seen:
            seen["window"].close()
            seen["window"].deleteLater()
        qapp.processEvents()
    finally:
        qapp.setQuitOnLastWindowClosed(quit_on_close)
    if "error" in seen:
        raise seen["error"]
    return code, seen.get("question", "")


def _damaged_data_folder(tmp_path) -> Path:
    data = tmp_path / "data"
    store = filled_store(data / DB_NAME)
    for job in store.list_jobs()[:2]:
        make_run(Path(job.run_dir), job.spec["job_id"], step=1000 if job.id == 1 else 400)
    store.close()
    raw = bytearray((data / DB_NAME).read_bytes())
    raw[8192:16384] = random.Random(0).randbytes(8192)   # dd if=/dev/urandom bs=1 seek=8192 count=8192
    (data / DB_NAME).write_bytes(bytes(raw))
    return data


def test_a_damaged_store_at_start_asks_keeps_it_aside_and_recovers(qapp, tmp_path, monkeypatch):
    data = _damaged_data_folder(tmp_path)
    damaged = (data / DB_NAME).read_bytes()

    def inspect(window):
        history = window.views["history"]
        history.refresh()
        names = [history.row_texts(job_id)[0] for job_id in history.job_ids]
        assert any(name.startswith("job-00001") or name == "job 0" for name in names), names
        assert "job-00002" in " ".join(names) or "job 1" in names, names
        assert "kept as" in window.banner.text() and window.banner.isVisible()
    code, question = _run_main(monkeypatch, tmp_path, "start fresh", inspect)
    assert code == 0
    assert "is damaged" in question and "nothing is deleted" in question
    (aside,) = [p for p in data.glob(f"{DB_NAME}.damaged-*") if not p.name.endswith(("-wal", "-shm"))]
    assert aside.read_bytes() == damaged
    assert store_problem(data / DB_NAME) is None


def test_a_damaged_store_is_left_alone_when_the_user_quits(qapp, tmp_path, monkeypatch, capfd):
    data = _damaged_data_folder(tmp_path)
    damaged = (data / DB_NAME).read_bytes()
    code, question = _run_main(monkeypatch, tmp_path, "Quit")
    assert code == 2 and "is damaged" in question
    assert (data / DB_NAME).read_bytes() == damaged and not list(data.glob("*.damaged-*"))
    assert "nothing was changed" in capfd.readouterr().err


# ---- 3. a diverged job on the GUI ------------------------------------------------------------------
class FakeWorker(QObject):
    resume = False
    pid = 4242

    def __init__(self, failed: dict):
        super().__init__()
        self.last_failed = failed

    def retire(self) -> None:
        self.blockSignals(True)


def test_a_diverged_job_says_why_and_retry_goes_on_with_the_lower_lr(qtbot, tmp_path):
    from app.views.queue_view import QueueView
    store = Store(tmp_path / DB_NAME)
    queue = JobQueue(store, autostart=False)
    job_id = queue.submit({**SPEC, "lr": 3e-3}, "Night run")
    message = (f"{tmp_path}: training diverged: the loss became nan by step 37 with learning rate 0.003; the last "
               "good checkpoint (step 30) is kept; continue with a lower learning rate, e.g. 0.001")
    failed = {"v": 1, "type": "failed", "time": time.time(), "code": "diverged", "message": message, "step": 37,
              "suggested_lr": 0.001, "checkpoint": str(tmp_path / "checkpoints" / "ckpt-00000030")}
    w = FakeWorker(failed)
    queue._worker, queue._job_id, queue._serial = w, job_id, 1   # as _start leaves them
    store.update_job(job_id, state="running", attempts=1)
    queue._on_event(job_id, 1, failed)
    queue._on_exit(job_id, 1, 2, message)

    job = store.get_job(job_id)
    assert job.state == "failed" and "training diverged" in job.error and "step 30) is kept" in job.error
    assert job.error.endswith("Retry goes on from there with learning rate 0.001.")
    view = QueueView(store, queue)
    qtbot.addWidget(view)
    view.refresh()
    view.select_job(job_id)
    assert "training diverged" in view.error_label.text()

    queue.retry(job_id)
    job = store.get_job(job_id)
    assert job.state == "queued" and job.spec["lr"] == 0.001 and job.summary.get("suggested_lr") is None
    view.refresh()   # runs the refresh that retry scheduled now: its timer must not fire on a closed store later
    store.close()


def test_new_finetune_offers_going_back_with_a_lower_lr(qtbot, tmp_path):
    from app.views.new_finetune import NewFinetuneView
    store = Store(tmp_path / DB_NAME)
    view = NewFinetuneView(store, JobQueue(store, autostart=False))
    qtbot.addWidget(view)
    view.set_model("/nowhere/my-model")
    view.dataset.drop_zone.set_paths([str(tmp_path / "d.txt")])
    assert view.diverge_combo.currentData() == "stop"
    view.diverge_combo.setCurrentIndex(view.diverge_combo.findData("lower_lr"))
    spec = view.form_spec()
    assert spec["on_divergence"] == "lower_lr"
    store.close()


def test_going_back_after_divergence_trims_the_chart_to_the_checkpoint(qtbot, tmp_path):
    store = Store(tmp_path / DB_NAME)
    queue = JobQueue(store, autostart=False)
    job_id = queue.submit(dict(SPEC), "Night run")
    w = FakeWorker({})
    queue._worker, queue._job_id, queue._serial = w, job_id, 1
    started = {"type": "started", "time": time.time(), "total_steps": 8, "resumed_from": None}
    queue._on_event(job_id, 1, started)
    for step in range(1, 7):
        queue._on_event(job_id, 1, {"type": "step", "time": time.time(), "step": step, "loss": 1.0})
    queue._on_event(job_id, 1, {"type": "warning", "time": time.time(), "code": "diverged", "message": "back"})
    queue._on_event(job_id, 1, {**started, "resumed_from": 4})   # the same worker starts again from step 4
    assert store.metrics(job_id)["step"] == [1, 2, 3, 4]
    store.close()
