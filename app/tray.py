"""The tray icon: state at a glance, a menu for the things people do without opening the window,
and a notification when a job finishes or fails.

A failure keeps the icon red until the user has seen it (opened the window or the failed job),
also across later jobs and a restart: someone who left a queue running overnight must not find a
grey icon over a failed job."""
from __future__ import annotations

import time

from PySide6.QtCore import QEvent, QObject
from PySide6.QtGui import QAction
from PySide6.QtWidgets import QApplication, QMenu, QSystemTrayIcon

from app import settings
from app.icons import state_icon
from app.job_queue import progress_text

SNOOZE_SECONDS = 3600


class Tray(QObject):
    """Owns the QSystemTrayIcon (`self.icon`) and its menu (`self.menu`)."""

    def __init__(self, store, queue, window, parent=None):
        super().__init__(parent)
        self.store, self.queue, self.window = store, queue, window
        self.state = "idle"
        self.unseen: list[int] = self._load_unseen()   # failed jobs not seen yet, oldest first
        self.contributing = False   # set by the swarm feature through set_contributing()
        self._running: tuple[int, str] | None = None   # (id, name) of the job with a worker
        self._close_hint_shown = False
        self._notice_job: int | None = None
        self._known = {job.id: job.state for job in store.list_jobs()}

        self.menu = QMenu()
        self.status_action = self._action("No job running")
        self.status_action.setEnabled(False)
        self.menu.addSeparator()
        self.contribute_action = self._action("Contribute while idle", checkable=True)
        self.contribute_action.toggled.connect(self._contribute_toggled)
        self.pause_action = self._action("Pause everything", checkable=True)
        self.pause_action.toggled.connect(self._pause_toggled)
        self.snooze_action = self._action("Snooze 1 h")
        self.snooze_action.triggered.connect(self.snooze)
        self.menu.addSeparator()
        self.open_action = self._action("Open Modron")
        self.open_action.triggered.connect(self.open_window)
        self.quit_action = self._action("Quit")
        self.quit_action.triggered.connect(self.quit)
        self.menu.aboutToShow.connect(self.sync_menu)

        self.icon = QSystemTrayIcon(state_icon("idle"), self)
        self.icon.setContextMenu(self.menu)
        self.icon.activated.connect(self._activated)
        self.icon.messageClicked.connect(self._message_clicked)

        queue.job_changed.connect(self._job_changed)
        queue.queue_changed.connect(self.refresh)
        queue.job_event.connect(self._job_event)
        window.installEventFilter(self)
        if hasattr(window, "job_shown"):
            window.job_shown.connect(self._job_seen)
        self.sync_menu()
        self.refresh()

    def _action(self, text: str, checkable: bool = False) -> QAction:
        action = QAction(text, self.menu)
        action.setCheckable(checkable)
        self.menu.addAction(action)
        return action

    def show(self) -> None:
        self.icon.show()

    def hide(self) -> None:
        self.icon.hide()

    # --- state --------------------------------------------------------------------------------

    @property
    def error(self) -> bool:
        """A job failed and the user has not seen it yet."""
        return bool(self.unseen)

    def compute_state(self) -> str:
        # An unseen failure comes first: the next job training must not hide it.
        if self.error:
            return "error"
        job = self.queue.running_job()
        if self.queue.paused_all or (job is not None and job.state == "paused"):
            return "paused"
        if job is not None:
            return "training"
        return "contributing" if self.contributing else "idle"

    def refresh(self, *_args) -> None:
        # Some trays (D-Bus menus) do not always say when the menu opens: keep this switch current here.
        self._set_checked(self.pause_action, bool(self.queue.paused_all))
        state = self.compute_state()
        if state != self.state:
            self.state = state
            self.icon.setIcon(state_icon(state))
        job = self.queue.running_job()
        self._running = (job.id, job.name) if job else None
        self._set_status(job.name if job else None, progress_text(job) if job else "")

    def _set_status(self, name: str | None, progress: str) -> None:
        if name is None:
            text = {"paused": "Everything is paused", "error": "The last job failed",
                    "contributing": "Contributing to a swarm while you are away"}.get(self.state, "No job running")
        else:
            job = self.queue.running_job()
            verb = "Paused" if self.queue.paused_all or (job is not None and job.state == "paused") else "Training"
            text = f"{verb}: {name}" + (f", {progress}" if progress else "")
            if self.error:
                text += " (an earlier job failed)"
        self.status_action.setText(text)
        self.icon.setToolTip(f"Modron: {text}")

    def set_contributing(self, on: bool) -> None:
        """For the swarm feature: the icon shows "contributing" while idle and contributing."""
        self.contributing = bool(on)
        self.refresh()

    def attach_contributor(self, contributor) -> None:
        """Show what the swarm contribution does, and let the menu's switches take effect at once."""
        contributor.contributing_changed.connect(self.set_contributing)
        contributor.notify.connect(lambda title, text: self.notify(title, text))
        self.contribute_action.toggled.connect(contributor.poke)
        self.snooze_action.triggered.connect(contributor.poke)
        self.pause_action.toggled.connect(contributor.poke)
        self.set_contributing(contributor.contributing)

    def _job_event(self, job_id: int, event: dict) -> None:
        # Step events come several times a second: update the progress line from the event itself
        # rather than reading the store each time.
        if event.get("type") == "step" and self.state in ("training", "error") and self._running \
                and self._running[0] == job_id:
            s = {k: event.get(k) for k in ("step", "total_steps", "eta_s")}
            self._set_status(self._running[1], progress_text(_Summary(s)))

    def _job_changed(self, job_id: int) -> None:
        try:
            job = self.store.get_job(job_id)
        except Exception:   # removed meanwhile
            job = None
        if job is not None:
            before, self._known[job_id] = self._known.get(job_id), job.state
            if job.state != before:
                if job.state == "failed":
                    self._set_unseen([*(i for i in self.unseen if i != job_id), job_id])
                    self.notify(f"{job.name} failed", job.error or "The training stopped with an error.",
                                QSystemTrayIcon.MessageIcon.Critical, job_id=job_id)
                elif job.state == "finished":
                    # Another job's success does not mean the failure was seen: the error stays.
                    self.notify(f"{job.name} finished", _finished_text(job),
                                QSystemTrayIcon.MessageIcon.Information, job_id=job_id)
        if job_id in self.unseen and (job is None or job.state != "failed"):
            self._set_unseen([i for i in self.unseen if i != job_id])   # retried or cancelled: dealt with
        self.refresh()

    def _load_unseen(self) -> list[int]:
        ids = settings.UNSEEN_FAILURES.get(self.store)
        alive = []
        for i in ids:
            try:
                if self.store.get_job(int(i)).state == "failed":
                    alive.append(int(i))
            except Exception:   # removed meanwhile, or a bad value
                pass
        return alive

    def _set_unseen(self, ids: list[int]) -> None:
        if ids != self.unseen:
            self.unseen = list(ids)
            settings.UNSEEN_FAILURES.set(self.store, self.unseen)

    def notify(self, title: str, text: str, icon=QSystemTrayIcon.MessageIcon.Information,
               job_id: int | None = None) -> None:
        self._notice_job = job_id     # what a click on the notice opens
        self.icon.showMessage(title, text, icon, 10_000)

    # --- menu actions -------------------------------------------------------------------------

    def sync_menu(self) -> None:
        """Show the persisted settings (the Settings view may have changed them)."""
        self._set_checked(self.contribute_action, settings.CONTRIBUTE.get(self.store))
        self._set_checked(self.pause_action, bool(self.queue.paused_all))
        until = settings.SNOOZE_UNTIL.get(self.store)
        if until and until > time.time():
            self.snooze_action.setText(f"Snooze 1 h (snoozed until {time.strftime('%H:%M', time.localtime(until))})")
        else:
            self.snooze_action.setText("Snooze 1 h")

    @staticmethod
    def _set_checked(action: QAction, value: bool) -> None:
        if action.isChecked() != value:
            action.blockSignals(True)
            action.setChecked(value)
            action.blockSignals(False)

    def _contribute_toggled(self, on: bool) -> None:
        settings.CONTRIBUTE.set(self.store, bool(on))

    def _pause_toggled(self, on: bool) -> None:
        if on:
            self.queue.pause_all()
        else:
            self.queue.resume_all()
        self.refresh()

    def snooze(self) -> None:
        settings.SNOOZE_UNTIL.set(self.store, time.time() + SNOOZE_SECONDS)
        self.sync_menu()

    def open_window(self) -> None:
        self.window.showNormal()
        self.window.raise_()
        self.window.activateWindow()
        self._acknowledge()

    def quit(self) -> None:
        """Checkpoint and stop a running job, then leave."""
        self.icon.setToolTip("Modron: saving a checkpoint before quitting…")
        self.queue.shutdown()
        self.icon.hide()
        QApplication.quit()

    def _acknowledge(self) -> None:
        if self.unseen:
            self._set_unseen([])
            self.refresh()

    def _job_seen(self, job_id: int) -> None:
        # The window showed this job (the user opened it): that failure is seen.
        if job_id in self.unseen:
            self._set_unseen([i for i in self.unseen if i != job_id])
            self.refresh()

    def _message_clicked(self) -> None:
        # A click on a job's notice (failed, finished) opens that job, not just the window.
        job_id = self._notice_job
        self.open_window()
        if job_id is not None and hasattr(self.window, "show_job"):
            self.window.show_job(job_id)

    def _activated(self, reason) -> None:
        if reason in (QSystemTrayIcon.ActivationReason.Trigger, QSystemTrayIcon.ActivationReason.DoubleClick):
            self.open_window()

    def eventFilter(self, obj, event) -> bool:
        # Seeing the window counts as seeing the failure: the icon goes back from "error".
        if obj is self.window and event.type() == QEvent.Type.WindowActivate:
            self._acknowledge()
        elif obj is self.window and event.type() == QEvent.Type.Close and not self._close_hint_shown \
                and self.icon.isVisible():
            # Closing the window only hides it; say so once, or people think training stopped.
            self._close_hint_shown = True
            self.notify("Modron is still running", "Jobs go on in the background. The tray icon's menu "
                        "opens the window again or quits.")
        return False


class _Summary:
    """Just enough of a Job for progress_text()."""

    def __init__(self, summary: dict):
        self.summary = summary


def _finished_text(job) -> str:
    s = job.summary or {}
    parts = []
    if s.get("eval_loss") is not None:
        parts.append(f"eval loss {s['eval_loss']:.3f}")
    elif s.get("loss") is not None:
        parts.append(f"loss {s['loss']:.3f}")
    if s.get("elapsed_s") is not None:
        from training_core.preflight import format_duration
        parts.append(f"took {format_duration(s['elapsed_s'])}")
    return ("Done: " + ", ".join(parts) + ".") if parts else "Training is done."
