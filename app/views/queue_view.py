"""The queue: jobs still to run (and failed ones to retry), with pause/resume/cancel/retry/reorder.

The table is rebuilt from the store on the queue's signals; a short timer folds the 4-a-second
step updates of a running job into one refresh. Each waiting job says why it waits.
"""
from __future__ import annotations

from PySide6.QtCore import QTimer, Signal
from PySide6.QtWidgets import (QHBoxLayout, QLabel, QMessageBox, QProgressBar, QPushButton,
                               QTableWidgetItem, QVBoxLayout, QWidget)

from app.job_queue import phase_text
from app.views.job_table import job_table, view_title
from app.store import ACTIVE_STATES
from training_core.preflight import format_duration

COLUMNS = ("Name", "Model", "State", "Why it waits", "Progress", "Loss", "ETA")
STATE_COL, WHY_COL, PROGRESS_COL = 2, 3, 4
REFRESH_MS = 250
STATE_TEXT = {"queued": "queued", "running": "running", "paused": "paused", "failed": "failed",
              "finished": "finished", "cancelled": "cancelled"}
CANCELLING = "cancelling\u2026"
CANCELLABLE = ("queued", "running", "paused", "failed")


def state_text(queue, job) -> str:
    """The State column: the job's state, what a running job's worker is doing when that is more than
    training ("Loading the model…", "Tokenizing the data: 45 % (…)"), or "cancelling…" while it saves and stops."""
    if queue.cancelling(job.id):
        return CANCELLING
    doing = phase_text(job.summary or {}) if job.state == "running" else ""
    return doing or STATE_TEXT.get(job.state, job.state)


def cancel_after_asking(view, job_id: str | None, states) -> bool:
    """Cancel `job_id` (the job chosen at the click) once the user said yes and if it is still in one
    of `states` (it may end while the question is open); the view's own `confirm_cancel` asks."""
    if job_id is None:
        return False
    try:
        if not view.confirm_cancel(view, view.store.get_job(job_id)):
            return False
        if view.store.get_job(job_id).state not in states:
            return False
    except KeyError:
        return False
    view.queue.cancel(job_id)
    return True


def confirm_cancel(parent, job) -> bool:
    """Ask before cancelling: one click must not throw away a run. "Keep it" is the default button,
    so Enter or Escape never cancels."""
    box = QMessageBox(parent)
    box.setIcon(QMessageBox.Icon.Warning)
    box.setWindowTitle("Cancel this job?")
    box.setText(f"Cancel \u201c{job.name}\u201d?")
    if job.state in ("running", "paused"):
        box.setInformativeText("It saves a checkpoint, stops, and moves to History.")
    else:
        box.setInformativeText("It leaves the queue and moves to History.")
    yes = box.addButton("Cancel the job", QMessageBox.ButtonRole.DestructiveRole)
    keep = box.addButton("Keep it", QMessageBox.ButtonRole.RejectRole)
    box.setDefaultButton(keep)
    box.setEscapeButton(keep)
    box.exec()
    return box.clickedButton() is yes


def progress_of(job) -> tuple[int, str]:
    """(percent, text) from a job's summary."""
    s = job.summary
    step, total = s.get("step") or 0, s.get("total_steps") or 0
    if job.state == "finished":
        return 100, "done"
    if not total:
        return 0, "not started" if job.state == "queued" and not job.attempts else ""
    pct = int(100 * step / total)
    return pct, f"{step:,} / {total:,}"


class QueueView(QWidget):
    open_job = Signal(int)      # double-click: show this job in the run view

    def __init__(self, store, queue, parent=None):
        super().__init__(parent)
        self.store, self.queue = store, queue
        # (parent, job) -> bool; tests put a scripted answer here instead of the modal box
        self.confirm_cancel = confirm_cancel
        self.table = job_table(COLUMNS)
        self.table.itemSelectionChanged.connect(self._update_buttons)
        self.table.cellDoubleClicked.connect(lambda row, _c: self._open(row))

        self.pause_btn = QPushButton("Pause")
        self.resume_btn = QPushButton("Resume")
        self.cancel_btn = QPushButton("Cancel")
        self.retry_btn = QPushButton("Retry")
        self.up_btn = QPushButton("Move up")
        self.down_btn = QPushButton("Move down")
        self.pause_btn.clicked.connect(lambda: self._act("pause"))
        self.resume_btn.clicked.connect(lambda: self._act("resume"))
        self.cancel_btn.clicked.connect(self._cancel)
        self.retry_btn.clicked.connect(lambda: self._act("retry"))
        self.up_btn.clicked.connect(lambda: self._move(-1))
        self.down_btn.clicked.connect(lambda: self._move(+1))
        self.pause_all_btn = QPushButton("Pause everything")
        self.pause_all_btn.setCheckable(True)
        self.pause_all_btn.toggled.connect(self._toggle_all)
        buttons = QHBoxLayout()
        for b in (self.pause_btn, self.resume_btn, self.cancel_btn, self.retry_btn, self.up_btn, self.down_btn):
            buttons.addWidget(b)
        buttons.addStretch(1)
        buttons.addWidget(self.pause_all_btn)
        self.error_label = QLabel("")
        self.error_label.setWordWrap(True)
        self.error_label.setStyleSheet("color: #c62828;")
        self.empty_label = QLabel("The queue is empty. Add a finetune from \u201cNew finetune\u201d.")

        layout = QVBoxLayout(self)
        layout.addWidget(view_title("Queue"))
        layout.addWidget(self.empty_label)
        layout.addWidget(self.table, 1)
        layout.addWidget(self.error_label)
        layout.addLayout(buttons)

        self.job_ids: list[int] = []
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(REFRESH_MS)
        self._timer.timeout.connect(self.refresh)
        queue.job_changed.connect(lambda _id: self._schedule())
        queue.queue_changed.connect(self._schedule)
        self.refresh()

    # ---- table --------------------------------------------------------------------------
    def _schedule(self) -> None:
        if not self._timer.isActive():
            self._timer.start()

    def refresh(self) -> None:
        self._timer.stop()
        selected = self.selected_job_id()
        jobs = self.store.list_jobs(ACTIVE_STATES)
        self.job_ids = [j.id for j in jobs]
        self.table.setRowCount(len(jobs))
        for row, job in enumerate(jobs):
            s = job.summary
            loss = s.get("loss")
            eta = s.get("eta_s") if job.state == "running" else None
            texts = (job.name, str(job.spec.get("model", "")), state_text(self.queue, job),
                     self.queue.wait_reason(job), None,
                     f"{loss:.4f}" if isinstance(loss, (int, float)) else "",
                     format_duration(eta) if eta is not None else "")
            for col, text in enumerate(texts):
                if text is None:
                    continue
                item = self.table.item(row, col)
                if item is None:
                    item = QTableWidgetItem()
                    self.table.setItem(row, col, item)
                item.setText(text)
                item.setToolTip((job.error or "") if col == STATE_COL else text)
            bar = self.table.cellWidget(row, PROGRESS_COL)
            if not isinstance(bar, QProgressBar):
                bar = QProgressBar()
                bar.setRange(0, 100)
                self.table.setCellWidget(row, PROGRESS_COL, bar)
            pct, text = progress_of(job)
            bar.setValue(pct)
            bar.setFormat(f"{text} ({pct} %)" if text and job.summary.get("total_steps") and text != "done"
                          else text or "%p %")
        if selected in self.job_ids:
            self.table.selectRow(self.job_ids.index(selected))
        else:
            # The selected job left (cancelled, finished): select nothing rather than let the row's
            # next occupant inherit the selection, so a second click cannot act on another job.
            self.table.clearSelection()
        self.empty_label.setVisible(not jobs)
        self.pause_all_btn.blockSignals(True)
        self.pause_all_btn.setChecked(self.queue.paused_all)
        self.pause_all_btn.blockSignals(False)
        self._update_buttons()

    def state_of(self, job_id: int) -> str | None:
        """The state the table shows for a job (None when it is not in the table)."""
        if job_id not in self.job_ids:
            return None
        return self.table.item(self.job_ids.index(job_id), STATE_COL).text()

    def reason_of(self, job_id: int) -> str | None:
        """The "Why it waits" text the table shows for a job (None when it is not in the table)."""
        if job_id not in self.job_ids:
            return None
        return self.table.item(self.job_ids.index(job_id), WHY_COL).text()

    # ---- selection and actions ----------------------------------------------------------
    def selected_job_id(self) -> int | None:
        rows = self.table.selectionModel().selectedRows() if self.table.selectionModel() else []
        if not rows:
            return None
        row = rows[0].row()
        return self.job_ids[row] if 0 <= row < len(self.job_ids) else None

    def select_job(self, job_id: int) -> None:
        if job_id in self.job_ids:
            self.table.selectRow(self.job_ids.index(job_id))

    def _update_buttons(self) -> None:
        job_id = self.selected_job_id()
        state = None
        if job_id is not None:
            try:
                state = self.store.get_job(job_id).state
            except KeyError:
                job_id = None
        index = self.job_ids.index(job_id) if job_id is not None else -1
        if job_id is not None and self.queue.cancelling(job_id):
            state = "cancelling"       # on its way out: nothing more to do to it
        self.pause_btn.setEnabled(state in ("queued", "running"))
        self.resume_btn.setEnabled(state == "paused")
        self.cancel_btn.setEnabled(state in CANCELLABLE)
        self.retry_btn.setEnabled(state in ("failed", "cancelled"))
        self.up_btn.setEnabled(index > 0)
        self.down_btn.setEnabled(0 <= index < len(self.job_ids) - 1)
        self.error_label.setText((self.store.get_job(job_id).error or "") if state == "failed" else "")

    def _act(self, action: str) -> None:
        job_id = self.selected_job_id()
        if job_id is None:
            return
        getattr(self.queue, action)(job_id)
        self.refresh()

    def _cancel(self) -> None:
        # The job is the one selected at the click: the list may refresh (and rows move) while the
        # question is open, so the selection is not read again afterwards.
        if cancel_after_asking(self, self.selected_job_id(), CANCELLABLE):
            self.refresh()

    def _move(self, delta: int) -> None:
        job_id = self.selected_job_id()
        if job_id is None:
            return
        index = self.job_ids.index(job_id) + delta
        if 0 <= index < len(self.job_ids):
            self.queue.move(job_id, index)
            self.refresh()
            self.select_job(job_id)

    def _toggle_all(self, on: bool) -> None:
        if on:
            self.queue.pause_all()
        else:
            self.queue.resume_all()
        self.refresh()

    def _open(self, row: int) -> None:
        if 0 <= row < len(self.job_ids):
            self.open_job.emit(self.job_ids[row])
