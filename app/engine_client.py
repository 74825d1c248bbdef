"""The app's one client for the engine: all engine work is a `python -m training_core.cli COMMAND ...`
(protocol.ENTRY_MODULE, the engine's one entry point) in its own process, seen as Qt signals.

Two shapes, one process plumbing (the engine's code folder on PYTHONPATH, UTF-8 pipes, nothing blocking):
- `EngineCall`: a one-shot command (validate, plan, export). Its answer is the one JSON document
  the command prints with --json (protocol.decode_answer: versioned like the events), or its text; a
  failure is the one plain line the CLI prints last.
- `EngineRun`: a long run that speaks the protocol (training_core/protocol.py): a job
  (`run --spec`, see `job_args`) or a swarm peer (`swarm join --json`). Events arrive decoded; controls
  go to its stdin; its stderr (logs, tracebacks) goes to RUN_DIR/worker.log, never into the GUI.

Views start one-shot calls; only services (app/job_queue.py, app/contribution.py) start long runs.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from PySide6.QtCore import QObject, QProcess, QProcessEnvironment, QTimer, Signal

import training_core
from training_core.protocol import ENTRY_MODULE, ProtocolError, decode_answer, decode_event, encode, make_control


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

# The folder that holds the training_core package, so the engine imports the same code the app does
# (a source checkout works without being installed).
_CODE_ROOT = str(Path(training_core.__file__).resolve().parents[1])
_PREFIXES = ("modron-train: error: ", "modron-train: ")


def engine_command(args) -> tuple[str, list[str]]:
    """(program, argv) of one engine command on this machine."""
    return sys.executable, ["-m", ENTRY_MODULE, *(str(a) for a in args)]


def job_args(spec_path, resume: bool = False) -> list[str]:
    """The engine command of a queued job."""
    return ["run", "--spec", str(spec_path), *(["--resume"] if resume else [])]


def exit_reason(code: int, crashed: bool, signal_no: int | None = None) -> str:
    """A plain sentence for a run that ended without telling us why."""
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


def error_line(stderr: str, code: int) -> str:
    """The CLI prints its one line last (argparse too, after the usage); drop the program name."""
    raw = [ln.rstrip() for ln in stderr.splitlines() if ln.strip()]
    if not raw:
        return f"The engine stopped with exit status {code} without saying why."
    # Several bad data files: the prefixed line, then one indented line per file; keep them all.
    tail = len(raw)
    while tail > 1 and raw[tail - 1][:1].isspace():
        tail -= 1
    if tail < len(raw) and raw[tail - 1].startswith(_PREFIXES[0]):
        return "\n".join([raw[tail - 1][len(_PREFIXES[0]):], *(ln.strip() for ln in raw[tail:])])
    line = raw[-1].strip()
    for prefix in _PREFIXES:
        if line.startswith(prefix):
            return line[len(prefix):]
    # argparse: "modron-train validate: error: ..." names the subcommand.
    if ": error: " in line and line.startswith("modron-train"):
        return line.split(": error: ", 1)[1]
    return line


def _process(owner: QObject, command: tuple[str, list[str]]) -> QProcess:
    proc = QProcess(owner)
    proc.setProgram(command[0])
    proc.setArguments(list(command[1]))
    env = QProcessEnvironment.systemEnvironment()
    old = env.value("PYTHONPATH", "")
    env.insert("PYTHONPATH", _CODE_ROOT + (os.pathsep + old if old else ""))
    env.insert("PYTHONIOENCODING", "utf-8")
    proc.setProcessEnvironment(env)
    return proc


class _Cancellable:
    """start/running/cancel of a one-shot engine command (EngineCall, EngineTask)."""
    CANCEL_GRACE_MS = 5_000
    _proc: QProcess
    _cancelled: bool

    def start(self) -> None:
        self._proc.start()

    def running(self) -> bool:
        return self._proc.state() != QProcess.ProcessState.NotRunning

    def cancel(self) -> None:
        """Stop it (SIGTERM, on which an export removes its temporary files; killed if still there after
        CANCEL_GRACE_MS); neither of its signals is emitted afterwards."""
        self._cancelled = True
        if self.running():
            self._proc.terminate()
            QTimer.singleShot(self.CANCEL_GRACE_MS, self._kill_if_running)

    def _kill_if_running(self) -> None:
        if self.running():
            self._proc.kill()


class EngineCall(_Cancellable, QObject):
    """One one-shot engine command: `EngineCall(["validate", "--data", f, "--json"], parent=view)`,
    connect `done`/`failed`, then `start()`."""
    done = Signal(object)   # the parsed JSON document (json=True) or the stdout text
    failed = Signal(str)    # one plain line

    def __init__(self, args, parent=None, json: bool = True):
        super().__init__(parent)
        self.args = [str(a) for a in args]
        self.json = json
        self._cancelled = False
        self._finished = False
        self._proc = _process(self, engine_command(self.args))
        self._proc.finished.connect(self._on_finished)
        self._proc.errorOccurred.connect(self._on_error)


    def _on_finished(self, code: int, status: QProcess.ExitStatus) -> None:
        if self._cancelled or self._finished:
            return
        self._finished = True
        out = bytes(self._proc.readAllStandardOutput().data()).decode("utf-8", "replace")
        err = bytes(self._proc.readAllStandardError().data()).decode("utf-8", "replace")
        if status == QProcess.ExitStatus.CrashExit:
            self.failed.emit(f"The engine process crashed (signal {code}).")
        elif code != 0:
            self.failed.emit(error_line(err, code))
        elif not self.json:
            self.done.emit(out)
        else:
            try:
                result = decode_answer(out)
            except ProtocolError as exc:   # not JSON, or an engine of another version
                self.failed.emit(f"The engine's answer could not be read ({exc}).")
                return
            self.done.emit(result)

    def _on_error(self, error: QProcess.ProcessError) -> None:
        if error == QProcess.ProcessError.FailedToStart and not (self._cancelled or self._finished):
            self._finished = True
            self.failed.emit(f"The engine process could not be started ({self._proc.errorString()}).")


class _EventLines:
    """An engine process's stdout cut into protocol lines for `_handle_line` (a partial last line waits
    for the rest); shared by EngineRun and EngineTask."""
    _buf: bytes
    _proc: QProcess

    def _on_stdout(self) -> None:
        self._buf += bytes(self._proc.readAllStandardOutput().data())
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            self._handle_line(line)

    def _drain_stdout(self) -> None:
        """At exit: read what is left, the last line too, so no event is lost behind the exit notice."""
        self._on_stdout()
        if self._buf:
            self._handle_line(self._buf)
            self._buf = b""


class EngineRun(_EventLines, QObject):
    """One long engine run speaking the protocol: `EngineRun(job_args(spec), run_dir, parent=queue)`,
    connect `event`/`exited`, then `start()`; `send("pause")` etc. `command` replaces the local
    (program, argv), for a runner that starts the same entry point elsewhere (WSL, app/swarm_runner.py)."""
    event = Signal(dict)        # every protocol event, decoded
    exited = Signal(int, str)   # exit code (-1 if it crashed), plain reason ("" after a normal exit 0)

    def __init__(self, args, run_dir, parent=None, *, command: tuple[str, list[str]] | None = None):
        super().__init__(parent)
        self.args = [str(a) for a in args]
        self.command = command if command is not None else engine_command(self.args)
        self.run_dir = Path(run_dir) if run_dir is not None else None   # None: a spare, until assign()
        self.log_path = self.run_dir / "worker.log" if self.run_dir is not None else None
        self._early_log = b""                # a spare's stderr before it has a run folder to log to
        self.started_at: float | None = None
        self.ready_at: float | None = None   # a spare's `ready` (its imports done), monotonic seconds
        self.last_failed: dict | None = None
        self.last_event: dict | None = None
        self._buf = b""
        self._killed_by_us = False
        self._done = False
        self._proc = _process(self, self.command)
        self._proc.readyReadStandardOutput.connect(self._on_stdout)
        self._proc.readyReadStandardError.connect(self._on_stderr)
        self._proc.finished.connect(self._on_finished)
        self._proc.errorOccurred.connect(self._on_error)

    @classmethod
    def spare(cls, parent=None) -> "EngineRun":
        """A job's worker started before the job exists (`run --spare`, training_core/worker.py): it spends
        the seconds of imports now; `assign()` hands it its job later. Until then it has no run folder and
        emits nothing (its `ready` only sets `ready_at`); its stdin closing ends it."""
        return cls(["run", "--spare"], None, parent)

    # ---- control --------------------------------------------------------------------------
    def start(self) -> None:
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._log(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(self.args)}\n".encode())
        self.started_at = time.monotonic()
        self._proc.start()

    def assign(self, spec_path, resume: bool, run_dir) -> None:
        """Give a spare its job: from here on it is the job's worker, as if started with job_args()."""
        assert self.run_dir is None, "assign() is for a spare that has no job yet"
        self.args = job_args(spec_path, resume)
        self.run_dir = Path(run_dir)
        self.log_path = self.run_dir / "worker.log"
        waited = time.monotonic() - (self.started_at or time.monotonic())
        state = "ready" if self.ready_at is not None else "still importing"
        early, self._early_log = self._early_log, b""
        self._log(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(self.args)} (a spare worker, "
                  f"pid {self.pid}, started {waited:.1f} s ago, {state})\n".encode() + early)
        if self.running():
            self._proc.write(encode(make_control("job", spec=str(spec_path), resume=bool(resume))).encode("utf-8"))

    def let_go(self) -> None:
        """A spare no job came for: close its stdin, on which it exits by itself (status 0)."""
        if self.running():
            self._proc.closeWriteChannel()

    def send(self, kind: str) -> None:
        if self.running():
            self._proc.write(encode(make_control(kind)).encode("utf-8"))

    def kill(self) -> None:
        if self.running():
            self._killed_by_us = True
            self._proc.kill()

    def retire(self) -> None:
        """This run has ended and its owner is done with it: no signal of it reaches Python again.

        The owner deletes it later (`deleteLater()` when it starts the next run), never from inside
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
        """Block until the process exits (only for Quit, where blocking is the point). True if it did."""
        return True if not self.running() else self._proc.waitForFinished(timeout_ms)

    # ---- process output -------------------------------------------------------------------
    def _log(self, data: bytes) -> None:
        if self.log_path is None:   # a spare without its job yet: kept (the tail) until assign()
            self._early_log = (self._early_log + data)[-65536:]
            return
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "ab") as fh:
                fh.write(data)
        except OSError:
            pass   # a full disk must not take the GUI down; the events still arrive

    def _on_stderr(self) -> None:
        self._log(bytes(self._proc.readAllStandardError().data()))


    def _handle_line(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            ev = decode_event(line)
        except ProtocolError as exc:
            # Only protocol lines should arrive here; keep anything else for the log, never crash on it.
            self._log(f"[app] ignored a stdout line ({exc}): {line[:500]!r}\n".encode())
            return
        if ev["type"] == "ready":   # a spare's, about itself (it may come after assign(): not the job's)
            self.ready_at = self.ready_at or time.monotonic()
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
        self._drain_stdout()
        crashed = status == QProcess.ExitStatus.CrashExit
        message = str((self.last_failed or {}).get("message") or "").strip()
        if message:
            reason = message.splitlines()[0]   # the engine's own plain line says it best
        elif self._killed_by_us:
            reason = "The training process was stopped by Modron."
        elif crashed:
            reason = exit_reason(code, True)   # on Unix QProcess reports the signal as the code
        elif code != 0:
            reason = exit_reason(code, False)
        else:
            reason = ""
        self._log(f"--- exited: {'crashed' if crashed else f'status {code}'}"
                  f"{': ' + reason if reason else ''}\n".encode())
        self.exited.emit(-1 if crashed else code, reason)

    def _on_error(self, error: QProcess.ProcessError) -> None:
        if error == QProcess.ProcessError.FailedToStart and not self._done:
            self._done = True
            reason = f"The training process could not be started ({self._proc.errorString()})."
            self._log(f"--- {reason}\n".encode())
            self.exited.emit(-1, reason)


class EngineTask(_Cancellable, _EventLines, QObject):
    """A long one-shot command that speaks the protocol (`export RUN --gguf OUT --json`): `progress` events
    while it works, then `done` with the `result` event's answer, or `failed` with one plain line (its
    `failed` event, else the CLI's last line). `cancel()` sends SIGTERM, on which the engine removes its
    partial files, and kills it if it is still there after CANCEL_GRACE_MS; no signal follows a cancel."""
    progress = Signal(dict)   # each `progress` event, decoded
    done = Signal(object)     # the answer
    failed = Signal(str)

    def __init__(self, args, parent=None):
        super().__init__(parent)
        self.args = [str(a) for a in args]
        self._buf = b""
        self._err = b""
        self._answer = None
        self._failed: str | None = None
        self._cancelled = self._finished = False
        self._proc = _process(self, engine_command(self.args))
        self._proc.readyReadStandardOutput.connect(self._on_stdout)
        self._proc.readyReadStandardError.connect(self._on_stderr)
        self._proc.finished.connect(self._on_finished)
        self._proc.errorOccurred.connect(self._on_error)


    def _on_stderr(self) -> None:
        self._err = (self._err + bytes(self._proc.readAllStandardError().data()))[-65536:]


    def _handle_line(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            ev = decode_event(line)
        except ProtocolError:
            return   # only protocol lines belong on stdout; a stray one is not worth failing the task for
        if ev["type"] == "progress" and not self._cancelled:
            self.progress.emit(ev)
        elif ev["type"] == "result":
            self._answer = ev["answer"]
        elif ev["type"] == "failed":
            self._failed = str(ev.get("message") or "").strip() or None

    def _on_finished(self, code: int, status: QProcess.ExitStatus) -> None:
        if self._finished:
            return
        self._finished = True
        self._on_stderr()
        self._drain_stdout()
        if self._cancelled:
            return
        if status == QProcess.ExitStatus.CrashExit:
            self.failed.emit(f"The engine process crashed (signal {code}).")
        elif self._failed:
            self.failed.emit(self._failed)
        elif code != 0:
            self.failed.emit(error_line(self._err.decode("utf-8", "replace"), code))
        elif self._answer is None:
            self.failed.emit("The engine ended without an answer.")
        else:
            self.done.emit(self._answer)

    def _on_error(self, error: QProcess.ProcessError) -> None:
        if error == QProcess.ProcessError.FailedToStart and not (self._cancelled or self._finished):
            self._finished = True
            self.failed.emit(f"The engine process could not be started ({self._proc.errorString()}).")
