"""History: finished, failed and cancelled runs with their final figures and charts from the store,
plus "Open output folder" and "Export…" (app/views/export_dialog.py: GGUF with a quant, the merged model,
a LoRA run's adapter; the engine does the work). Where a run's last export went stays under the buttons."""
from __future__ import annotations

import time
from pathlib import Path

from PySide6.QtCore import Qt, QTimer, QUrl
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import (QHBoxLayout, QLabel, QPushButton, QSplitter, QTableWidgetItem, QVBoxLayout, QWidget)

from app.views.job_table import job_table, view_title
from app.views.export_dialog import ExportDialog
from app.views.run_view import RunCharts
from training_core.preflight import format_duration

HISTORY_STATES = ("finished", "failed", "cancelled")
COLUMNS = ("Name", "Model", "State", "Ended", "Steps", "Final loss", "Eval loss", "Duration")
REFRESH_MS = 500


def _fmt_loss(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else ""


def final_figures(job) -> dict[str, str]:
    """The texts of a job's row: final loss/eval loss (finished event, else the last known)."""
    s = job.summary
    loss = s.get("final_loss", s.get("loss"))
    eval_loss = s.get("final_eval_loss", s.get("eval_loss"))
    step, total = s.get("step"), s.get("total_steps")
    steps = f"{step:,}" if isinstance(step, int) else ""
    if steps and isinstance(total, int) and total != step:
        steps += f" / {total:,}"
    duration = s.get("elapsed_s")
    return {"loss": _fmt_loss(loss), "eval_loss": _fmt_loss(eval_loss), "steps": steps,
            "duration": format_duration(duration) if duration is not None else "",
            "ended": time.strftime("%Y-%m-%d %H:%M", time.localtime(job.finished)) if job.finished else ""}


class HistoryView(QWidget):
    def __init__(self, store, queue, parent=None):
        super().__init__(parent)
        self.store, self.queue = store, queue
        self.table = job_table(COLUMNS)
        self.table.itemSelectionChanged.connect(self._on_selection)

        self.open_btn = QPushButton("Open output folder")
        self.export_btn = QPushButton("Export…")
        self.export_btn.setToolTip("GGUF for llama.cpp and Ollama (with a quantization), the merged model, "
                                   "or a LoRA run's adapter")
        self.export_btn.clicked.connect(self.open_export_dialog)
        self.open_btn.clicked.connect(self.open_output_folder)
        self.detail = QLabel("")
        self.detail.setWordWrap(True)
        self.detail.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.export_status = QLabel("")
        self.export_status.setWordWrap(True)
        self.export_status.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.charts = RunCharts()

        buttons = QHBoxLayout()
        buttons.addWidget(self.open_btn)
        buttons.addWidget(self.export_btn)
        buttons.addStretch(1)
        lower = QWidget()
        lower_layout = QVBoxLayout(lower)
        lower_layout.setContentsMargins(0, 0, 0, 0)
        lower_layout.addWidget(self.detail)
        lower_layout.addLayout(buttons)
        lower_layout.addWidget(self.export_status)
        lower_layout.addWidget(self.charts, 1)
        split = QSplitter(Qt.Vertical)
        split.addWidget(self.table)
        split.addWidget(lower)
        split.setStretchFactor(1, 3)
        self.empty_label = QLabel("No finished runs yet.")
        layout = QVBoxLayout(self)
        layout.addWidget(view_title("History"))
        layout.addWidget(self.empty_label)
        layout.addWidget(split, 1)

        self.job_ids: list[int] = []
        self.job_id: int | None = None          # the job whose charts are shown
        self._dialogs: list[ExportDialog] = []
        self._export_lines: dict[int, str] = {}   # job id -> where its last export was written
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(REFRESH_MS)
        self._timer.timeout.connect(self.refresh)
        # Steps of a running job change nothing here; state changes (and new jobs) do.
        queue.queue_changed.connect(self._schedule)
        queue.job_changed.connect(self._on_job_changed)
        self.refresh()

    # ---- table --------------------------------------------------------------------------
    def _on_job_changed(self, job_id: int) -> None:
        try:
            state = self.store.get_job(job_id).state
        except KeyError:
            return
        if (state in HISTORY_STATES) != (job_id in self.job_ids):
            self._schedule()

    def _schedule(self) -> None:
        if not self._timer.isActive():
            self._timer.start()

    def refresh(self) -> None:
        self._timer.stop()
        jobs = sorted(self.store.list_jobs(HISTORY_STATES), key=lambda j: j.finished or j.created, reverse=True)
        self.job_ids = [j.id for j in jobs]
        self.table.blockSignals(True)
        self.table.setRowCount(len(jobs))
        for row, job in enumerate(jobs):
            f = final_figures(job)
            texts = (job.name, str(job.spec.get("model", "")), job.state, f["ended"], f["steps"], f["loss"],
                     f["eval_loss"], f["duration"])
            for col, text in enumerate(texts):
                item = QTableWidgetItem(text)
                if col == 2 and job.error:
                    item.setToolTip(job.error)
                self.table.setItem(row, col, item)
        self.table.blockSignals(False)
        self.empty_label.setVisible(not jobs)
        if self.job_id in self.job_ids:
            self.table.selectRow(self.job_ids.index(self.job_id))
        elif self.job_id is not None:
            self.select_job(None)
        self._update_buttons()

    def row_texts(self, job_id: int) -> list[str]:
        row = self.job_ids.index(job_id)
        return [self.table.item(row, c).text() for c in range(len(COLUMNS))]

    # ---- selection ----------------------------------------------------------------------
    def _on_selection(self) -> None:
        rows = self.table.selectionModel().selectedRows()
        job_id = self.job_ids[rows[0].row()] if rows else None
        if job_id != self.job_id:
            self.select_job(job_id)

    def select_job(self, job_id: int | None) -> None:
        """Show a run's details and reload its charts from the store."""
        self.job_id = job_id
        self.export_status.setText(self._export_lines.get(job_id, ""))
        if job_id is None:
            self.charts.clear()
            self.detail.clear()
            self.table.clearSelection()
            self._update_buttons()
            return
        if job_id in self.job_ids:
            row = self.job_ids.index(job_id)
            if not self.table.selectionModel().isRowSelected(row):
                self.table.blockSignals(True)
                self.table.selectRow(row)
                self.table.blockSignals(False)
        job = self.store.get_job(job_id)
        self.charts.load(self.store.metric_arrays(job_id), device=job.summary.get("device"))
        lines = [f"<b>{_esc(job.name)}</b> · {job.state} · output: {_esc(job.run_dir)}"]
        if job.error:
            lines.append(f"<span style='color:#c62828'>{_esc(job.error)}</span>")
        samples = self.store.events(job_id, {"sample"})
        if samples:
            last = [s for s in samples if s.get("step") == samples[-1].get("step")]
            lines.append("Last samples: " + " | ".join(_esc(f"{s.get('prompt', '')}{s.get('text', '')}"[:120])
                                                       for s in last))
        self.detail.setText("<br>".join(lines))
        self._update_buttons()

    def _update_buttons(self) -> None:
        job = self._job()
        has_output = job is not None and Path(job.run_dir).is_dir()
        self.open_btn.setEnabled(has_output)
        has_checkpoint = has_output and (Path(job.run_dir) / "checkpoints").is_dir()
        self.export_btn.setEnabled(has_checkpoint and not self.exporting())

    def _job(self):
        if self.job_id is None:
            return None
        try:
            return self.store.get_job(self.job_id)
        except KeyError:
            return None

    # ---- actions ------------------------------------------------------------------------
    def open_output_folder(self) -> bool:
        job = self._job()
        if job is None:
            return False
        return QDesktopServices.openUrl(QUrl.fromLocalFile(job.run_dir))

    def open_export_dialog(self) -> ExportDialog | None:
        """The Export dialog for the selected run (formats, quant, size, progress, Cancel); while an export
        runs, the dialog running it (one export at a time: two would share the disk, and maybe the target)."""
        running = next((d for d in self._dialogs if d.exporting()), None)
        if running is not None:
            running.raise_()
            running.activateWindow()
            return running
        job = self._job()
        if job is None:
            return None
        # A dialog is deleted only once its engine processes are gone: a QProcess deleted while it still
        # reports is a use-after-free in PySide (see EngineRun.retire).
        for old in [d for d in self._dialogs if not d.isVisible() and not d.busy()]:
            self._dialogs.remove(old)
            old.deleteLater()
        dialog = ExportDialog(job.name, job.run_dir, self.store, parent=self,
                              trust_remote_code=job.spec.get("trust_remote_code") is True)
        dialog.running.connect(lambda _running: self._update_buttons())
        dialog.exported.connect(lambda _answer, d=dialog, job_id=job.id: self._exported(job_id, d.status.text()))
        self._dialogs.append(dialog)
        dialog.open()
        return dialog

    def _exported(self, job_id: int, line: str) -> None:
        # The dialog keeps its line until closed; History keeps it with the run, for after the dialog.
        self._export_lines[job_id] = line
        if job_id == self.job_id:
            self.export_status.setText(line)

    def exporting(self) -> bool:
        return any(d.exporting() for d in self._dialogs)


def _esc(text: str) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
