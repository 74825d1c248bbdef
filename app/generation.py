"""Generation: the Playground's service. One `modron-train generate --json` at a time in its own process
(an EngineRun), so the app never loads a model; the view starts and stops it and shows its signals.

The GPU rule: a training job that is running owns the GPU. A generation is refused while the queue's job
runs, and a job that starts during a generation stops it.
"""
from __future__ import annotations

import json
from pathlib import Path

from PySide6.QtCore import QObject, QTimer, Signal

from app.engine_client import EngineRun
from training_core.escapes import escape
from training_core.paths import data_dir

KILL_AFTER_MS = 5000      # a stopped generation that has not ended by then is killed
LOG_CAP_BYTES = 1 << 20   # the generations' stderr log starts again past this
GPU_TAKEN = "A training job started and takes the GPU: generation stopped."


def generate_args(source: str, prompt_file: Path, *, mode: str = "story", temperature: float = 0.8,
                  top_p: float = 0.95, top_k: int = 40, repetition_penalty: float = 1.1,
                  max_new_tokens: int = 200, stops=(), compare_base: bool = False,
                  history_file: Path | None = None, trust_remote_code: bool = False) -> list[str]:
    """The engine command of one generation (`history_file`: a chat's earlier messages, see `Generation.start`)."""
    args = ["generate", str(source), "--json", "--prompt-file", str(prompt_file), "--mode", mode,
            "--temperature", f"{temperature:g}", "--top-p", f"{top_p:g}", "--top-k", str(top_k),
            "--repetition-penalty", f"{repetition_penalty:g}", "--max-new-tokens", str(max_new_tokens)]
    for stop in stops:   # written back in the form --stop reads (it unescapes), so a stop arrives as it was
        args += ["--stop", escape(stop)]
    if compare_base:
        args.append("--compare-base")
    if history_file is not None:
        args += ["--history", str(history_file)]
    if trust_remote_code:   # the user turned it on for this job; generate never reads it from the run folder
        args.append("--trust-remote-code")
    return args


class Generation(QObject):
    """`start(source, prompt, **settings)`, `stop()`; exactly one of done/stopped/failed ends each start."""
    started = Signal()                      # a generation begins (before any text)
    text = Signal(str, str)                 # stream ("trained" or "base"), the new text
    phase = Signal(str)                     # what the engine is doing, in its words
    progress = Signal(str, object, object)  # stream, tokens done, tokens in all
    stopping = Signal(str)                  # a stop was asked, and why (plain line)
    done = Signal(dict)                     # the engine's answer (streams, device, stopped)
    stopped = Signal()                      # stopped before the engine could answer
    failed = Signal(str)                    # one plain line

    def __init__(self, queue, parent=None):
        super().__init__(parent)
        self.queue = queue
        self.answer: dict | None = None     # the last generation's answer
        self.warnings: list[str] = []       # its `warning` events (e.g. a damaged newest checkpoint passed over)
        self._run: EngineRun | None = None
        self._retired: list[EngineRun] = []   # ended runs, deleted when the next one starts (EngineRun.retire)
        self._stopping = False
        # One timer, stopped when the run ends, so a late kill can never reach the next generation.
        self._kill_timer = QTimer(self)
        self._kill_timer.setSingleShot(True)
        self._kill_timer.setInterval(KILL_AFTER_MS)
        self._kill_timer.timeout.connect(self.kill)
        queue.gpu_job_started.connect(self._on_gpu_job)

    def running(self) -> bool:
        return self._run is not None

    def busy_reason(self) -> str | None:
        """Why a generation must wait: a training job that is running holds the GPU (a paused one gave it back)."""
        job = self.queue.running_job()
        if job is not None and job.state == "running":
            return (f"A training job ({job.name}) is using the GPU right now; generate when it ends, "
                    "or pause it in the Queue.")
        return None

    def start(self, source: str, prompt: str, history: list[dict] | None = None, **settings) -> str | None:
        """Start one; returns why it cannot (a plain line), or None when it started.
        `history`: a chat's earlier messages ({"role", "content"}, user first, taking turns); `settings` are
        generate_args' keywords."""
        if self._run is not None:
            return "A generation is already running."
        busy = self.busy_reason()
        if busy:
            return busy
        folder = data_dir() / "playground"
        folder.mkdir(parents=True, exist_ok=True)
        log = folder / "worker.log"
        if log.is_file() and log.stat().st_size > LOG_CAP_BYTES:   # each generation appends to it
            log.unlink()
        prompt_file = folder / "prompt.txt"   # a file, not argv: prompts can be long (Windows caps argv)
        prompt_file.write_text(prompt, encoding="utf-8")
        history_file = None
        if history:
            history_file = folder / "history.json"
            history_file.write_text(json.dumps(history, ensure_ascii=False), encoding="utf-8")
        while self._retired:
            self._retired.pop().deleteLater()
        self._stopping, self.answer, self.warnings = False, None, []
        run = EngineRun(generate_args(source, prompt_file, history_file=history_file, **settings), folder, parent=self)
        run.event.connect(self._on_event)
        run.exited.connect(self._on_exit)
        self._run = run
        self.started.emit()
        run.start()
        return None

    def stop(self, why: str = "Stopping…") -> None:
        """Ask the engine to stop (it obeys between two tokens); killed if still there after KILL_AFTER_MS."""
        if self._run is None:
            return
        self._stopping = True
        self._run.send("stop")
        self.stopping.emit(why)
        if not self._kill_timer.isActive():
            self._kill_timer.start()

    def kill(self) -> None:
        """End it now (a stop that was not obeyed, or the app quitting: it holds nothing worth saving)."""
        if self._run is not None:
            self._run.kill()

    def _on_gpu_job(self, _job_id: int) -> None:
        if self._run is not None:
            self.stop(GPU_TAKEN)

    def _on_event(self, ev: dict) -> None:
        t = ev.get("type")
        if t == "token":
            self.text.emit(str(ev.get("stream")), str(ev.get("text", "")))
        elif t == "phase" and not self._stopping:    # after a stop, "Stopping…" stays said
            self.phase.emit(str(ev.get("message", "")))
        elif t == "progress" and not self._stopping:
            self.progress.emit(str(ev.get("stream")), ev.get("done"), ev.get("total"))
        elif t == "result":
            self.answer = ev.get("answer") or {}
        elif t == "warning":
            self.warnings.append(str(ev.get("message", "")))

    def _on_exit(self, code: int, reason: str) -> None:
        run, self._run = self._run, None
        self._kill_timer.stop()
        if run is not None:
            run.retire()                 # deleted at the next start, never inside its own signal
            self._retired.append(run)
        if self.answer is not None:
            self.done.emit(self.answer)
        elif self._stopping:
            self.stopped.emit()
        else:
            self.failed.emit(reason or f"Generation ended with exit status {code}.")
