"""The run view: live charts, progress with ETA, the latest samples and the event log of one job.

When a job is shown its whole history is reloaded from the store (so charts survive an app
restart), then live events from the queue are appended as they come.
"""
from __future__ import annotations

import time

import numpy as np
from PySide6.QtCore import Qt
from PySide6.QtWidgets import (QButtonGroup, QGridLayout, QHBoxLayout, QLabel, QPlainTextEdit, QProgressBar,
                               QPushButton, QRadioButton, QSplitter, QVBoxLayout, QWidget)

from app.charts import TimeSeriesChart
from app.job_queue import phase_fraction, phase_text
from app.views.job_table import view_title
from app.views.queue_view import CANCELLING, cancel_after_asking, confirm_cancel
from training_core.preflight import format_bytes, format_duration, verdict_words

GIB = 1024 ** 3
VRAM_SERIES = ("vram_used", "vram_reserved")
ACTIVE = ("queued", "running", "paused")
HOLD = ("running", "paused")     # while the shown job is in one of these, don't jump to another
MAX_LOG_LINES = 5000
PHASE_BAR_STEPS = 1000


def _floats(values) -> np.ndarray:
    # One C-level conversion; None (a non-finite number in the store) becomes NaN, which the chart drops.
    return np.asarray(values if values is not None else [], dtype=np.float64)


def describe_event(ev: dict) -> str | None:
    """One log line for a protocol event; None for events the log leaves out (steps)."""
    t = ev.get("type")
    if t == "preflight":
        mem = ev.get("memory") or {}
        advice = "; ".join(ev.get("advice") or [])
        return (f"Pre-flight: about {format_bytes(mem.get('total', 0))} of memory, "
                f"{verdict_words(str(ev.get('verdict', '?')))}" + (f"; {advice}" if advice else ""))
    if t == "started":
        resumed = f", resumed from step {ev['resumed_from']}" if ev.get("resumed_from") is not None else ""
        return (f"Started {ev.get('model')} ({ev.get('method')}, {ev.get('params_total', 0):,} parameters) "
                f"on {ev.get('device')} in {ev.get('precision')}, {ev.get('total_steps')} steps{resumed}")
    if t == "eval":
        ppl = f", perplexity {ev['perplexity']:.2f}" if ev.get("perplexity") is not None else ""
        loss = f"{ev['eval_loss']:.4f}" if ev.get("eval_loss") is not None else "n/a"
        return f"Eval at step {ev.get('step')}: loss {loss}{ppl}"
    if t == "sample":
        return f"Sample at step {ev.get('step')}: {ev.get('prompt', '')}{ev.get('text', '')}".replace("\n", " ")[:200]
    if t == "checkpoint":
        return f"Checkpoint ({ev.get('reason')}) at step {ev.get('step')}"
    if t in ("warning", "oom_recovered"):
        return f"⚠ {ev.get('message')}"
    if t == "paused":
        return f"Paused at step {ev.get('step')} (checkpoint written, GPU memory freed)"
    if t == "resumed":
        return f"Resumed at step {ev.get('step')}"
    if t == "stopped":
        return f"Stopped at step {ev.get('step')} (checkpoint written)"
    if t == "finished":
        loss = f", loss {ev['final_loss']:.4f}" if ev.get("final_loss") is not None else ""
        ev_loss = f", eval loss {ev['final_eval_loss']:.4f}" if ev.get("final_eval_loss") is not None else ""
        return f"Finished at step {ev.get('step')}{loss}{ev_loss}"
    if t == "failed":
        return f"✖ Failed: {ev.get('message')}"
    if t == "phase":
        return ev.get("message") or None
    if t == "step":
        return None
    return None if t is None else f"{t}"


def _stamp(ev: dict) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ev.get("time") or time.time()))


class RunCharts(QWidget):
    """Loss (train + eval), tokens/s and memory charts with a step/time toggle; shared with History."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.loss_chart = TimeSeriesChart("Loss", "loss")
        self.loss_chart.add_series("loss", "train loss")
        self.loss_chart.add_series("eval_loss", "eval loss", symbol="o")
        self.speed_chart = TimeSeriesChart("Speed", "tokens/s")
        self.speed_chart.add_series("tokens_per_s", "tokens/s")
        self.memory_chart = TimeSeriesChart("Memory", "GiB")
        self.memory_chart.add_series("vram_used", "VRAM used")
        self.memory_chart.add_series("vram_reserved", "VRAM reserved")
        self.memory_chart.add_series("ram_used", "RAM (worker)")
        self.charts = (self.loss_chart, self.speed_chart, self.memory_chart)

        self.step_radio = QRadioButton("Steps")
        self.time_radio = QRadioButton("Time")
        self.step_radio.setChecked(True)
        group = QButtonGroup(self)
        group.addButton(self.step_radio)
        group.addButton(self.time_radio)
        self.time_radio.toggled.connect(lambda on: self.set_x_mode("time" if on else "step"))
        toggle = QHBoxLayout()
        toggle.addWidget(QLabel("x axis:"))
        toggle.addWidget(self.step_radio)
        toggle.addWidget(self.time_radio)
        toggle.addStretch(1)

        grid = QGridLayout()
        grid.addWidget(self.loss_chart, 0, 0, 1, 2)
        grid.addWidget(self.speed_chart, 1, 0)
        grid.addWidget(self.memory_chart, 1, 1)
        grid.setRowStretch(0, 3)
        grid.setRowStretch(1, 2)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(toggle)
        layout.addLayout(grid)
        self.last_elapsed = 0.0
        self.has_gpu = False
        self._show_vram(False)

    def _show_vram(self, on: bool) -> None:
        # Without a GPU the engine reports VRAM as 0: a flat line of zeros says nothing, so the
        # VRAM series stay hidden until a GPU device or a non-zero reading shows there is one.
        self.has_gpu = on
        for col in VRAM_SERIES:
            self.memory_chart.set_series_visible(col, on)

    def note_device(self, device) -> None:
        """The run's device (from its `started` event): VRAM is charted on a CUDA device."""
        if isinstance(device, str) and device.startswith("cuda") and not self.has_gpu:
            self._show_vram(True)

    def set_x_mode(self, mode: str) -> None:
        for chart in self.charts:
            chart.set_x_mode(mode)
        (self.time_radio if mode == "time" else self.step_radio).setChecked(True)

    def clear(self) -> None:
        for chart in self.charts:
            chart.clear()
        self.last_elapsed = 0.0
        self._show_vram(False)

    def load(self, metrics: dict, device: str | None = None) -> None:
        """Replace everything with a job's stored metrics (Store.metric_arrays()); `device` as its summary says."""
        self.clear()
        vram = _floats(metrics.get("vram_used"))
        self._show_vram(bool(np.any(vram[np.isfinite(vram)] > 0)))
        self.note_device(device)
        steps, t = _floats(metrics.get("step")), _floats(metrics.get("elapsed_s"))
        self.loss_chart.set_series("loss", steps, _floats(metrics.get("loss")), t)
        self.speed_chart.set_series("tokens_per_s", steps, _floats(metrics.get("tokens_per_s")), t)
        for col in ("vram_used", "vram_reserved", "ram_used"):
            self.memory_chart.set_series(col, steps, _floats(metrics.get(col)) / GIB, t)
        eval_t = _floats(metrics.get("eval_elapsed_s"))
        eval_steps = _floats(metrics.get("eval_step"))
        if len(eval_t) != len(eval_steps):
            eval_t = None
        self.loss_chart.set_series("eval_loss", eval_steps, _floats(metrics.get("eval_loss")), eval_t)
        finite = t[np.isfinite(t)]
        self.last_elapsed = float(finite[-1]) if len(finite) else 0.0
        for chart in self.charts:
            chart.redraw()

    def add_event(self, ev: dict) -> None:
        """Append a live step or eval event."""
        if ev.get("type") == "step":
            step = ev.get("step")
            t = ev.get("elapsed_s")
            if t is not None:
                self.last_elapsed = float(t)
            t = self.last_elapsed
            self.loss_chart.append("loss", step, _none_nan(ev.get("loss")), t)
            self.speed_chart.append("tokens_per_s", step, _none_nan(ev.get("tokens_per_s")), t)
            for col in ("vram_used", "vram_reserved", "ram_used"):
                self.memory_chart.append(col, step, _none_nan(ev.get(col)) / GIB, t)
            if not self.has_gpu and (ev.get("vram_used") or 0) > 0:
                self._show_vram(True)
        elif ev.get("type") == "started":
            self.note_device(ev.get("device"))
        elif ev.get("type") == "eval":
            # eval events carry no clock: put them at the last step's elapsed time (as the store does)
            self.loss_chart.append("eval_loss", ev.get("step"), _none_nan(ev.get("eval_loss")), self.last_elapsed)


def _none_nan(value) -> float:
    return np.nan if value is None else float(value)


class RunView(QWidget):
    def __init__(self, store, queue, parent=None):
        super().__init__(parent)
        self.store, self.queue = store, queue
        self.job_id: int | None = None
        self.follow_running = True   # switch to a job that starts when the shown one is done
        # (parent, job) -> bool; tests put a scripted answer here instead of the modal box
        self.confirm_cancel = confirm_cancel

        self.title = QLabel("No run yet. Queue a finetune or try the demo.")
        self.title.setStyleSheet("font-size: 15px; font-weight: bold;")
        self.state_label = QLabel("")
        self.pause_btn = QPushButton("Pause")
        self.resume_btn = QPushButton("Resume")
        self.cancel_btn = QPushButton("Cancel")
        self.pause_btn.clicked.connect(lambda: self._act("pause"))
        self.resume_btn.clicked.connect(lambda: self._act("resume"))
        self.cancel_btn.clicked.connect(self._cancel)
        header = QHBoxLayout()
        header.addWidget(self.title)
        header.addWidget(self.state_label)
        header.addStretch(1)
        for b in (self.pause_btn, self.resume_btn, self.cancel_btn):
            header.addWidget(b)

        # What the worker is doing while the charts are still empty (loading, tokenizing, the first step)
        # or between steps (evaluating, checkpointing); hidden while it simply trains.
        self.phase_label = QLabel("")
        self.phase_bar = QProgressBar()
        self.phase_bar.setRange(0, PHASE_BAR_STEPS)
        self.phase_bar.setTextVisible(False)
        self.phase_bar.setMaximumHeight(8)
        self.phase_label.hide()
        self.phase_bar.hide()
        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.progress.setValue(0)
        self.progress.setTextVisible(True)
        self.figures = QLabel("")
        self.charts = RunCharts()

        self.samples = QPlainTextEdit()
        self.samples.setReadOnly(True)
        self.samples.setPlaceholderText("Text samples appear at each checkpoint.")
        self.log = QPlainTextEdit()
        self.log.setReadOnly(True)
        self.log.setMaximumBlockCount(MAX_LOG_LINES)
        bottom = QSplitter(Qt.Horizontal)
        for title, widget in (("Latest samples", self.samples), ("Events", self.log)):
            box = QWidget()
            lay = QVBoxLayout(box)
            lay.setContentsMargins(0, 0, 0, 0)
            lay.addWidget(QLabel(f"<b>{title}</b>"))
            lay.addWidget(widget)
            bottom.addWidget(box)
        split = QSplitter(Qt.Vertical)
        split.addWidget(self.charts)
        split.addWidget(bottom)
        split.setStretchFactor(0, 3)
        split.setStretchFactor(1, 1)

        layout = QVBoxLayout(self)
        layout.addWidget(view_title("Run"))
        layout.addLayout(header)
        layout.addWidget(self.phase_label)
        layout.addWidget(self.phase_bar)
        layout.addWidget(self.progress)
        layout.addWidget(self.figures)
        layout.addWidget(split, 1)

        self._summary: dict = {}
        self._samples: list[dict] = []
        self._last_phase_line: str | None = None
        queue.job_event.connect(self._on_job_event)
        queue.job_changed.connect(self._on_job_changed)
        self.show_job()

    # ---- which job ----------------------------------------------------------------------
    def show_job(self, job_id: int | None = None) -> None:
        """Show a job (default: the running one, else the newest) with its full stored history."""
        if job_id is None:
            job = self.queue.running_job()
            if job is None:
                jobs = self.store.list_jobs()
                job = max(jobs, key=lambda j: j.id) if jobs else None
            job_id = job.id if job else None
        self.job_id = job_id
        self.charts.clear()
        self.samples.clear()
        self.log.clear()
        self._samples = []
        self._summary = {}
        self._last_phase_line = None
        if job_id is None:
            self._update_header()
            return
        try:
            job = self.store.get_job(job_id)
        except KeyError:
            self.job_id = None
            self._update_header()
            return
        self._summary = dict(job.summary)
        self.charts.load(self.store.metric_arrays(job_id), device=job.summary.get("device"))
        lines = []
        for ev in self.store.events(job_id):
            if ev.get("type") == "sample":
                self._keep_sample(ev)
            line = describe_event(ev)
            if line:
                lines.append(f"{_stamp(ev)}  {line}")
        self.log.setPlainText("\n".join(lines[-MAX_LOG_LINES:]))
        self._show_samples()
        self._update_header()

    def _on_job_changed(self, job_id: int) -> None:
        if job_id == self.job_id:
            self._update_header()
            return
        if not self.follow_running:
            return
        try:
            job = self.store.get_job(job_id)
        except KeyError:
            return
        if job.state == "running" and not self._shown_is_held():
            self.show_job(job_id)

    def _shown_is_held(self) -> bool:
        if self.job_id is None:
            return False
        try:
            return self.store.get_job(self.job_id).state in HOLD
        except KeyError:
            return False

    # ---- live events --------------------------------------------------------------------
    def _on_job_event(self, job_id: int, ev: dict) -> None:
        if job_id != self.job_id:
            if self.follow_running and not self._shown_is_held():
                self.show_job(job_id)   # reload includes this event if the queue stored it already
            return
        t = ev.get("type")
        if t in ("step", "eval", "started"):
            self.charts.add_event(ev)
        if t == "step":
            for key in ("step", "total_steps", "loss", "tokens_per_s", "eta_s", "elapsed_s"):
                if key in ev:
                    self._summary[key] = ev[key]
        elif t == "eval":
            self._summary["eval_loss"] = ev.get("eval_loss")
            self._summary["perplexity"] = ev.get("perplexity")
        elif t == "started":
            self._summary["total_steps"] = ev.get("total_steps")
        elif t == "phase":
            self._summary.update(phase=ev.get("phase"), phase_message=ev.get("message"), phase_done=ev.get("done"),
                                 phase_total=ev.get("total"), phase_unit=ev.get("unit"))
        elif t == "finished":
            self._summary["step"] = ev.get("step")
            self._summary["total_steps"] = max(self._summary.get("total_steps") or 0, ev.get("step") or 0)
        elif t == "sample":
            self._keep_sample(ev)
            self._show_samples()
        line = describe_event(ev)
        if line and (t != "phase" or line != self._last_phase_line):   # not each progress update
            self.log.appendPlainText(f"{_stamp(ev)}  {line}")
        if t == "phase":
            self._last_phase_line = line
        self._update_header(ev if t in ("finished", "failed", "stopped", "paused", "resumed") else None)

    def _keep_sample(self, ev: dict) -> None:
        # Keep only the newest checkpoint's samples: older ones are in the event log.
        if self._samples and self._samples[-1].get("step") != ev.get("step"):
            self._samples = []
        self._samples.append(ev)

    def _show_samples(self) -> None:
        if not self._samples:
            self.samples.clear()
            return
        head = f"At step {self._samples[-1].get('step')}:\n\n"
        self.samples.setPlainText(head + "\n\n".join(f"{s.get('prompt', '')}{s.get('text', '')}"
                                                      for s in self._samples))

    # ---- header -------------------------------------------------------------------------
    def _update_header(self, last_event: dict | None = None) -> None:
        job = None
        if self.job_id is not None:
            try:
                job = self.store.get_job(self.job_id)
            except KeyError:
                pass
        for b in (self.pause_btn, self.resume_btn, self.cancel_btn):
            b.setEnabled(False)
        if job is None:
            self.title.setText("No run yet. Queue a finetune or try the demo.")
            self.state_label.setText("")
            self.progress.setValue(0)
            self.progress.setFormat("")
            self.figures.setText("")
            self._show_phase({}, None)
            return
        state = job.state
        if last_event and last_event.get("type") == "finished":
            state = "finished"   # the queue may update the store right after this event
        cancelling = self.queue.cancelling(job.id)
        self.title.setText(job.name)
        shown = CANCELLING if cancelling else state
        self.state_label.setText(f"· {shown}" + (f": {job.error}" if state == "failed" and job.error else ""))
        self.state_label.setStyleSheet("color: #c62828;" if state == "failed" else "")
        self.pause_btn.setEnabled(state in ("running", "queued") and not cancelling)
        self.resume_btn.setEnabled(state == "paused" and not cancelling)
        self.cancel_btn.setEnabled(state in ACTIVE and not cancelling)

        s = {**job.summary, **self._summary}
        self._show_phase(s, state)
        step, total = s.get("step") or 0, s.get("total_steps") or 0
        if state == "finished":
            step = total = max(step, total, 1)
        pct = int(100 * step / total) if total else 0
        self.progress.setValue(pct)
        eta = s.get("eta_s")
        eta_text = f" · ETA {format_duration(eta)}" if state == "running" and eta is not None else ""
        self.progress.setFormat(f"step {step:,} / {total:,} ({pct} %){eta_text}" if total else state)
        figures = []
        if s.get("loss") is not None:
            figures.append(f"loss {s['loss']:.4f}")
        if s.get("eval_loss") is not None:
            figures.append(f"eval loss {s['eval_loss']:.4f}")
        if s.get("tokens_per_s") is not None:
            figures.append(f"{s['tokens_per_s']:,.0f} tokens/s")
        if s.get("elapsed_s") is not None:
            figures.append(f"running for {format_duration(s['elapsed_s'])}")
        self.figures.setText(" · ".join(figures))

    def _show_phase(self, summary: dict, state: str | None) -> None:
        """The phase line (and its bar when the worker counts its progress) of a running job."""
        text = phase_text(summary) if state == "running" and not self.queue.cancelling(self.job_id) else ""
        self.phase_label.setText(text)
        self.phase_label.setVisible(bool(text))
        fraction = phase_fraction(summary) if text else None
        if fraction is not None:
            self.phase_bar.setValue(round(fraction * PHASE_BAR_STEPS))
        self.phase_bar.setVisible(fraction is not None)

    def _act(self, action: str) -> None:
        if self.job_id is not None:
            getattr(self.queue, action)(self.job_id)
            self._update_header()

    def _cancel(self) -> None:
        # The job shown at the click: while the question is open the view may follow another job.
        if cancel_after_asking(self, self.job_id, ACTIVE):
            self._update_header()
