"""One job worker started ahead of its job, so that "Add to queue" reaches the first step in well under a second.

A worker spends 3-4 s on two cores importing torch and transformers' model code before it can train
(bench/worker_startup.py), and none of it depends on the job. The New finetune view says a job is
likely soon (`JobQueue.expect_job`), and so does the queue when the running job is due to end with another
queued behind it; this keeper then starts one spare worker (`run --spare`,
training_core/worker.py) that does those imports while the user fills in the form, and the queue hands
it the next job it starts (`EngineRun.assign`). Bought with memory: a spare holds ~0.3-0.5 GB of RAM
(no accelerator memory) for at most TTL_MS after the last sign of a coming job, then it is let go.
"""
from __future__ import annotations

from PySide6.QtCore import QObject, QTimer

from .engine_client import EngineRun

TTL_MS = 5 * 60_000   # how long a spare waits for a job after the last expect()


class SpareWorker(QObject):
    def __init__(self, parent=None):
        super().__init__(parent)
        self._spare: EngineRun | None = None
        self._leaving: list[EngineRun] = []   # let go; deleted once they have exited
        self._ttl = QTimer(self, singleShot=True, interval=TTL_MS)
        self._ttl.timeout.connect(self.drop)

    def expect(self) -> None:
        """A job is likely soon: have a spare starting or waiting (for TTL_MS from now)."""
        self._reap()
        if self._spare is not None and not self._spare.running():
            self._forget(self._spare)   # it ended by itself (killed, or its imports failed): start anew
            self._spare = None
        if self._spare is None:
            self._spare = EngineRun.spare(parent=self)
            self._spare.start()
        self._ttl.start()

    def take(self, parent: QObject) -> EngineRun | None:
        """The spare, now `parent`'s, for the job about to start (the caller assigns it), or None: start one
        the usual way."""
        spare, self._spare = self._spare, None
        self._ttl.stop()
        if spare is not None and not spare.running():
            self._forget(spare)
            return None
        if spare is not None:
            spare.setParent(parent)   # the caller's retire/deleteLater rules apply from here
        return spare

    def drop(self) -> None:
        """No job came: let the spare go (it exits by itself when its stdin closes)."""
        self._ttl.stop()
        if self._spare is not None:
            self._forget(self._spare)
            self._spare = None

    def pid(self) -> int | None:
        return self._spare.pid if self._spare is not None else None

    def shutdown(self, timeout_ms: int = 2000) -> None:
        """Quit: no spare outlives the app. Killed at once: a spare holds no job, no file and no GPU memory,
        and one still importing would hold the quit up for seconds before it read its closed stdin."""
        self.drop()
        for run in self._leaving:
            run.kill()
            run.wait(timeout_ms)

    def _forget(self, run: EngineRun) -> None:
        run.retire()
        run.let_go()
        self._leaving.append(run)

    def _reap(self) -> None:
        # Deleted here, never inside their own signals (see EngineRun.retire).
        keep = []
        for run in self._leaving:
            if run.running():
                keep.append(run)
            else:
                run.deleteLater()
        self._leaving = keep
