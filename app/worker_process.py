"""One training worker subprocess (`python -m training_core.worker`), seen as Qt signals.

The worker speaks the protocol in training_core/protocol.py: JSON events on stdout, controls on
stdin. Its stderr (logs, tracebacks) goes to RUN_DIR/worker.log so the user can send it to us,
and never into the GUI. Everything is asynchronous: nothing here blocks the event loop.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from PySide6.QtCore import QObject, QProcess, QProcessEnvironment, Signal

import training_core
from training_core.protocol import ProtocolError, decode_event, encode, make_control


def guard_bool_refcounts() -> bool:
    """Work around a PySide6 6.12.0 bug; returns True when it was needed (and applied).

    SignalInstance.emit() there returns Py_True without taking a reference, so every emit from
    Python drops one reference from True. Python < 3.12 aborts the process ("Fatal Python error:
    bool_dealloc") once the count reaches zero, after a few hundred emits: a minute of training
    events, or pyqtgraph's own emits. Give True and False a count that can never run out (Python
    3.12 makes them immortal for the same reason). Idempotent; a no-op where emit is correct.
    """
    if sys.version_info >= (3, 12):
        return False
    import ctypes

    class _Probe(QObject):
        ping = Signal()

    probe = _Probe()
    before = sys.getrefcount(True)
    for _ in range(16):
        probe.ping.emit()
    if before - sys.getrefcount(True) < 8:
        return False
    for obj in (True, False):
        count = ctypes.c_ssize_t.from_address(id(obj))   # ob_refcnt is the first field of every object
        if count.value < 1 << 40:
            count.value += 1 << 60
    return True


guard_bool_refcounts()

# The folder that holds the training_core package, so the worker imports the same code the app does
# (a source checkout works without being installed).
_CODE_ROOT = str(Path(training_core.__file__).resolve().parents[1])


def exit_reason(code: int, crashed: bool, signal_no: int | None = None) -> str:
    """A plain sentence for a worker that ended without telling us why."""
    if crashed:
        sig = signal_no if signal_no else code
        if sig == getattr(signal, "SIGKILL", 9):
            return (f"The training process was killed (signal {sig}); "
                    "the system may have run out of memory.")
        name = ""
        try:
            name = f", {signal.Signals(sig).name}"
        except (ValueError, TypeError):
            pass
        return f"The training process crashed (signal {sig}{name}); details are in worker.log in the run folder."
    return f"The training process stopped with exit status {code}; details are in worker.log in the run folder."


class WorkerProcess(QObject):
    event = Signal(dict)        # every protocol event, decoded
    exited = Signal(int, str)   # exit code (-1 if it crashed), plain reason ("" after a normal exit 0)

    def __init__(self, spec_path: Path | None = None, resume: bool = False, parent=None, *,
                 command: tuple[str, list[str]] | None = None, run_dir: Path | None = None):
        """The training worker for `spec_path`, or any program speaking the protocol: `command` is
        (program, argv) (the swarm peer) and `run_dir` the folder for its worker.log."""
        super().__init__(parent)
        self.spec_path = Path(spec_path) if spec_path is not None else None
        self.resume = resume
        self.run_dir = Path(run_dir) if run_dir is not None else self._run_dir_of(self.spec_path)
        self.log_path = self.run_dir / "worker.log"
        self.last_failed: dict | None = None
        self.last_event: dict | None = None
        self._buf = b""
        self._killed_by_us = False
        self._done = False
        self._proc = QProcess(self)
        if command is None:
            command = (sys.executable, ["-m", "training_core.worker", "--spec", str(self.spec_path)]
                       + (["--resume"] if resume else []))
        self.command = (command[0], list(command[1]))
        self._proc.setProgram(self.command[0])
        self._proc.setArguments(self.command[1])
        env = QProcessEnvironment.systemEnvironment()
        old = env.value("PYTHONPATH", "")
        env.insert("PYTHONPATH", _CODE_ROOT + (os.pathsep + old if old else ""))
        self._proc.setProcessEnvironment(env)
        self._proc.readyReadStandardOutput.connect(self._on_stdout)
        self._proc.readyReadStandardError.connect(self._on_stderr)
        self._proc.finished.connect(self._on_finished)
        self._proc.errorOccurred.connect(self._on_error)

    @staticmethod
    def _run_dir_of(spec_path: Path) -> Path:
        try:
            out = json.loads(spec_path.read_text(encoding="utf-8")).get("out")
        except (OSError, ValueError, AttributeError):
            out = None
        return Path(out) if out else spec_path.parent

    # ---- control --------------------------------------------------------------------------
    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        what = self.spec_path if self.spec_path is not None else " ".join(self.command[1])
        self._log(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting worker"
                  f"{' (resume)' if self.resume else ''}: {what}\n".encode())
        self._proc.start()

    def send(self, kind: str) -> None:
        if not self.running():
            return
        self._proc.write(encode(make_control(kind)).encode("utf-8"))

    def kill(self) -> None:
        if self.running():
            self._killed_by_us = True
            self._proc.kill()

    def retire(self) -> None:
        """This worker has ended and its owner is done with it: no signal of it reaches Python again.

        The owner deletes it later (`deleteLater()` when it starts the next worker), never from inside
        one of its signals: a QProcess deleted while its `finished` is being delivered, or one that
        emits into Python while it is being destroyed, is a use-after-free in PySide (a segfault in
        the next processEvents(), seen in CI).
        """
        self._proc.blockSignals(True)
        self.blockSignals(True)

    def running(self) -> bool:
        return self._proc.state() != QProcess.ProcessState.NotRunning

    @property
    def pid(self) -> int | None:
        pid = self._proc.processId()
        return int(pid) if pid else None

    def wait(self, timeout_ms: int) -> bool:
        """Block until the worker exits (only for Quit, where blocking is the point). True if it did."""
        if not self.running():
            return True
        return self._proc.waitForFinished(timeout_ms)

    # ---- process output -------------------------------------------------------------------
    def _log(self, data: bytes) -> None:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "ab") as fh:
                fh.write(data)
        except OSError:
            pass   # a full disk must not take the GUI down; the events still arrive

    def _on_stderr(self) -> None:
        self._log(bytes(self._proc.readAllStandardError().data()))

    def _on_stdout(self) -> None:
        self._buf += bytes(self._proc.readAllStandardOutput().data())
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            self._handle_line(line)

    def _handle_line(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            ev = decode_event(line)
        except ProtocolError as exc:
            # Only protocol lines should arrive here; keep anything else for the log, never crash on it.
            self._log(f"[app] ignored a stdout line ({exc}): {line[:500]!r}\n".encode())
            return
        self.last_event = ev
        if ev["type"] == "failed":
            self.last_failed = ev
        self.event.emit(ev)

    def _on_finished(self, code: int, status: QProcess.ExitStatus) -> None:
        if self._done:
            return
        self._done = True
        # Read what is left so no event is lost behind the exit notice.
        self._on_stderr()
        self._buf += bytes(self._proc.readAllStandardOutput().data())
        if self._buf:
            self._handle_line(self._buf)
            self._buf = b""
        crashed = status == QProcess.ExitStatus.CrashExit
        message = str((self.last_failed or {}).get("message") or "").strip()
        if message:
            reason = message.splitlines()[0]   # the worker's own plain line says it best
        elif self._killed_by_us:
            reason = "The training process was stopped by Modron."
        elif crashed:
            reason = exit_reason(code, True)   # on Unix QProcess reports the signal as the code
        elif code != 0:
            reason = exit_reason(code, False)
        else:
            reason = ""
        self._log(f"--- worker exited: {'crashed' if crashed else f'status {code}'}"
                  f"{': ' + reason if reason else ''}\n".encode())
        self.exited.emit(-1 if crashed else code, reason)

    def _on_error(self, error: QProcess.ProcessError) -> None:
        if error == QProcess.ProcessError.FailedToStart and not self._done:
            self._done = True
            reason = f"The training process could not be started ({self._proc.errorString()})."
            self._log(f"--- {reason}\n".encode())
            self.exited.emit(-1, reason)
