"""ModelDownload: the model picker's service. One `modron-train download HUB_ID --json` at a time in its own
process (an EngineRun), so the app never imports the hub's client: progress events, then the folder.

A cancel asks the engine to stop (it does at once, as on SIGTERM) and it keeps the partial file: the next
download of the same model continues where this one stopped.
"""
from __future__ import annotations

from PySide6.QtCore import QObject, Signal

from app.engine_client import EngineRun
from training_core.paths import data_dir


class ModelDownload(QObject):
    """`start(hub_id)`, `cancel()`; exactly one of done/stopped/failed ends each start."""
    progress = Signal(dict)   # each progress event: done, total (bytes), rate (bytes/s), eta_s; some may be None
    done = Signal(str)        # the downloaded model's folder
    stopped = Signal(str)     # cancelled: the engine's line (what came is kept)
    failed = Signal(str)      # one plain line

    def __init__(self, parent=None):
        super().__init__(parent)
        self.hub_id: str | None = None          # the model being downloaded
        self._run: EngineRun | None = None
        self._retired: list[EngineRun] = []     # ended runs, deleted when the next one starts (EngineRun.retire)
        self._folder: str | None = None
        self._stopped: str | None = None

    def running(self) -> bool:
        return self._run is not None

    def start(self, hub_id: str) -> bool:
        """False while another download runs."""
        if self._run is not None:
            return False
        while self._retired:
            self._retired.pop().deleteLater()
        self.hub_id, self._folder, self._stopped = hub_id, None, None
        run = EngineRun(["download", hub_id, "--json"], data_dir() / "models" / "logs", parent=self)
        run.event.connect(self._on_event)
        run.exited.connect(self._on_exit)
        self._run = run
        run.start()
        return True

    def cancel(self, wait_ms: int = 0) -> None:
        """Ask it to stop; with wait_ms, block until it has (closing the picker: the process must not outlive it)."""
        if self._run is not None:
            self._run.send("stop")
            if wait_ms:
                self._run.wait(wait_ms)

    def _on_event(self, ev: dict) -> None:
        kind = ev["type"]
        if kind == "progress":
            self.progress.emit(ev)
        elif kind == "result":
            self._folder = ev["answer"].get("folder")
        elif kind == "stopped":
            self._stopped = str(ev.get("message") or "")

    def _on_exit(self, code: int, reason: str) -> None:
        run, self._run = self._run, None
        if run is not None:
            run.retire()                 # deleted at the next start, never inside its own signal
            self._retired.append(run)
        if code == 0 and self._folder:
            self.done.emit(self._folder)
        elif self._stopped is not None:
            self.stopped.emit(self._stopped)
        elif code != 0:
            self.failed.emit(reason or f"The download ended with exit status {code}.")
        else:
            self.failed.emit("The download ended without saying where the model is.")
