"""A one-shot `python -m training_core.cli ...` in its own process (validate, plan, export).

Anything that imports torch or reads a big dataset runs there, never in the GUI; the answer comes
back as a signal: the parsed JSON (or text) on success, one plain line on failure.
"""
from __future__ import annotations

import json as jsonlib
import os
import sys
from pathlib import Path

from PySide6.QtCore import QObject, QProcess, QProcessEnvironment, Signal

import training_core

from .worker_process import guard_bool_refcounts

guard_bool_refcounts()   # a PySide6 6.12.0 bug; see there

_CODE_ROOT = str(Path(training_core.__file__).resolve().parents[1])
_PREFIXES = ("modron-train: error: ", "modron-train: ")


def _error_line(stderr: str, code: int) -> str:
    """The CLI prints its one line last (argparse too, after the usage); drop the program name."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    if not lines:
        return f"The engine stopped with exit status {code} without saying why."
    # Several bad data files: the prefixed line, then one indented line per file; keep them all.
    raw = [ln.rstrip() for ln in stderr.splitlines() if ln.strip()]
    tail = len(raw)
    while tail > 1 and raw[tail - 1][:1].isspace():
        tail -= 1
    if tail < len(raw) and raw[tail - 1].startswith(_PREFIXES[0]):
        return "\n".join([raw[tail - 1][len(_PREFIXES[0]):], *(ln.strip() for ln in raw[tail:])])
    line = lines[-1]
    for prefix in _PREFIXES:
        if line.startswith(prefix):
            return line[len(prefix):]
    # argparse: "modron-train validate: error: ..." names the subcommand.
    if ": error: " in line and line.startswith("modron-train"):
        return line.split(": error: ", 1)[1]
    return line


class CliTask(QObject):
    done = Signal(object)   # parsed JSON stdout (json=True) or the stdout text
    failed = Signal(str)    # one plain line

    def __init__(self, args: list[str], parent=None, json: bool = True):
        super().__init__(parent)
        self.args = [str(a) for a in args]
        self.json = json
        self._cancelled = False
        self._finished = False
        self._proc = QProcess(self)
        self._proc.setProgram(sys.executable)
        self._proc.setArguments(["-m", "training_core.cli", *self.args])
        env = QProcessEnvironment.systemEnvironment()
        old = env.value("PYTHONPATH", "")
        env.insert("PYTHONPATH", _CODE_ROOT + (os.pathsep + old if old else ""))
        env.insert("PYTHONIOENCODING", "utf-8")
        self._proc.setProcessEnvironment(env)
        self._proc.finished.connect(self._on_finished)
        self._proc.errorOccurred.connect(self._on_error)

    def start(self) -> None:
        self._proc.start()

    def cancel(self) -> None:
        """Stop it; neither signal is emitted afterwards."""
        self._cancelled = True
        if self._proc.state() != QProcess.ProcessState.NotRunning:
            self._proc.kill()

    def running(self) -> bool:
        return self._proc.state() != QProcess.ProcessState.NotRunning

    def _on_finished(self, code: int, status: QProcess.ExitStatus) -> None:
        if self._cancelled or self._finished:
            return
        self._finished = True
        out = bytes(self._proc.readAllStandardOutput().data()).decode("utf-8", "replace")
        err = bytes(self._proc.readAllStandardError().data()).decode("utf-8", "replace")
        if status == QProcess.ExitStatus.CrashExit:
            self.failed.emit(f"The engine process crashed (signal {code}).")
            return
        if code != 0:
            self.failed.emit(_error_line(err, code))
            return
        if not self.json:
            self.done.emit(out)
            return
        try:
            result = jsonlib.loads(out)
        except ValueError:
            self.failed.emit("The engine's answer could not be read (it was not JSON).")
            return
        self.done.emit(result)

    def _on_error(self, error: QProcess.ProcessError) -> None:
        if error == QProcess.ProcessError.FailedToStart and not (self._cancelled or self._finished):
            self._finished = True
            self.failed.emit(f"The engine process could not be started ({self._proc.errorString()}).")
