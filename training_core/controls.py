"""Control messages arriving while a run trains (from the worker's stdin, or signals)."""
from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable, Iterable, TypeVar

from .protocol import ProtocolError, decode_control, make_event

T = TypeVar("T")
WAIT_SLICE_S = 0.05   # how soon a waiting main thread sees a stop


class StopRequested(BaseException):
    """A stop that came before the training loop reads its controls (while a model loads, data is
    tokenized...), raised by our own set-up code (Controls.check, Controls.run_setup), never from a
    signal handler: thrown from a handler it lands in whatever library code the main thread runs
    (an import, a finaliser, C code that clears errors) and may be swallowed there. A BaseException,
    like KeyboardInterrupt, so that a library's `except Exception` does not swallow it either."""


def interruptible(fn: Callable[..., T], *args, **kwargs) -> T:
    """fn(*args, **kwargs) in a helper thread while this (main) thread waits in short sleeps, so signal
    handlers still run during long native calls that never return to Python, such as a tokenizer's
    training in Rust. fn's exception, if any, is raised here. (A run's set-up uses Controls.run_setup.)"""
    thread, out = _in_thread(fn, args, kwargs, getattr(fn, "__name__", "call"))
    while thread.is_alive():
        thread.join(0.1)
    return _outcome(out)


def _in_thread(fn: Callable[..., Any], args, kwargs, name: str) -> tuple[threading.Thread, dict[str, Any]]:
    """Start fn(*args, **kwargs) in a daemon thread; `out` gets its "value" or its "error"."""
    out: dict[str, Any] = {}

    def call() -> None:
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as exc:   # handed to the caller as it is
            out["error"] = exc
    thread = threading.Thread(target=call, name=name, daemon=True)
    thread.start()
    return thread, out


def _outcome(out: dict[str, Any]) -> Any:
    if "error" in out:
        raise out["error"]
    return out["value"]


class Controls:
    """A thread-safe inbox of control message types: pause, resume, stop, checkpoint."""

    def __init__(self) -> None:
        self._q: queue.Queue[str] = queue.Queue()
        self.polling = False    # set by the engine once its loop reads this inbox
        # A stop from stop(): a plain attribute, as a signal handler may set it while the main thread
        # holds the inbox's lock (in poll or wait); taking a lock there would deadlock.
        self._stop_asked = False
        self.abandoned: threading.Thread | None = None   # set-up work left running by a stop

    def stop(self) -> None:
        """Stop, from a signal handler or any thread; never raises and takes no lock (see StopRequested).
        The loop obeys it at its next poll (checkpointing first); set-up ends at once (run_setup) or at
        its next check()."""
        self._stop_asked = True

    def check(self) -> None:
        """A set-up checkpoint (between phases, in progress callbacks): StopRequested if a stop came."""
        if self._stop_asked and not self.polling:
            raise StopRequested

    def run_setup(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """fn(*args, **kwargs) (heavy set-up: imports, a model load, tokenizing) in a helper thread while
        this thread waits for it or for a stop, whichever comes first: a stop ends the wait within
        WAIT_SLICE_S, in our own code, however long fn's library calls take. fn sees the stop at its next
        check() and ends there; until then it is `abandoned` (a worker process exits without it)."""
        self.check()
        thread, out = _in_thread(fn, args, kwargs, f"setup-{getattr(fn, '__name__', 'call')}")
        while thread.is_alive():
            thread.join(WAIT_SLICE_S)
            if self._stop_asked and thread.is_alive():
                self.abandoned = thread
                raise StopRequested
        return _outcome(out)

    def put(self, kind: str) -> None:
        self._q.put(kind)

    def _take_stop(self) -> str | None:
        if self._stop_asked:
            self._stop_asked = False
            return "stop"
        return None

    def poll(self) -> str | None:
        """The next message if one has arrived, without waiting; a stop() comes first.

        One at a time: a `pause` obeyed now must still see the `stop` queued behind it.
        """
        if (msg := self._take_stop()) is not None:
            return msg
        try:
            return self._q.get_nowait()
        except queue.Empty:
            return None

    def wait(self, timeout: float | None = None) -> str | None:
        """The next message, waiting up to `timeout` seconds (None: for ever) in short slices, so that a
        stop() from a signal handler is seen too."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            if (msg := self._take_stop()) is not None:
                return msg
            left = WAIT_SLICE_S if end is None else min(WAIT_SLICE_S, end - time.monotonic())
            if left <= 0:
                return None
            try:
                return self._q.get(timeout=left)
            except queue.Empty:
                continue


def read_controls(lines: Iterable[str], controls: Controls, emit: Callable[[dict], None],
                  on_control: Callable[[str], None] | None = None) -> None:
    """Feed protocol control lines (a worker's stdin) into `controls` until the stream ends.

    A malformed line is answered with a `bad_control` warning and otherwise ignored. `on_control`
    runs in this reading thread, for what must happen before the training loop looks (the swarm
    peer leaves an averaging round at once on `pause`)."""
    for line in lines:
        if not line.strip():
            continue
        try:
            msg = decode_control(line)
        except ProtocolError as exc:
            emit(make_event("warning", code="bad_control", message=str(exc)))
            continue
        if msg["type"] == "job":   # only ever a spare worker's first line (worker.serve_spare)
            emit(make_event("warning", code="bad_control", message="this worker has its job already"))
            continue
        controls.put(msg["type"])
        if on_control is not None:
            on_control(msg["type"])
