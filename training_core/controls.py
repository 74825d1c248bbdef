"""Control messages arriving while a run trains (from the worker's stdin, or signals)."""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterable, TypeVar

from .protocol import ProtocolError, decode_control, make_event

T = TypeVar("T")


class StopRequested(BaseException):
    """A stop that came before the training loop reads its controls (while a model loads, data is
    tokenized...): raised in the main thread, so set-up ends at once. A BaseException, like
    KeyboardInterrupt, so that a library's `except Exception` does not swallow it."""


def interruptible(fn: Callable[..., T], *args, **kwargs) -> T:
    """fn(*args, **kwargs) in a helper thread while this (main) thread waits in short sleeps, so a signal
    handler (a stop raising StopRequested) still runs during long native calls that never return to
    Python, such as a tokenizer's training in Rust. fn's exception, if any, is raised here."""
    out: dict[str, Any] = {}

    def call() -> None:
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as exc:   # handed to the caller as it is
            out["error"] = exc
    thread = threading.Thread(target=call, name=getattr(fn, "__name__", "call"), daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.1)
    if "error" in out:
        raise out["error"]
    return out["value"]


class Controls:
    """A thread-safe inbox of control message types: pause, resume, stop, checkpoint."""

    def __init__(self) -> None:
        self._q: queue.Queue[str] = queue.Queue()
        self.polling = False    # set by the engine once its loop reads this inbox

    def stop(self) -> None:
        """Stop from a signal handler (main thread): queued while the loop reads controls (it checkpoints
        first), else StopRequested is raised right here, ending set-up."""
        if self.polling:
            self.put("stop")
        else:
            raise StopRequested

    def put(self, kind: str) -> None:
        self._q.put(kind)

    def poll(self) -> str | None:
        """The next message if one has arrived, without waiting.

        One at a time: a `pause` obeyed now must still see the `stop` queued behind it.
        """
        try:
            return self._q.get_nowait()
        except queue.Empty:
            return None

    def wait(self, timeout: float | None = None) -> str | None:
        try:
            return self._q.get(timeout=timeout)
        except queue.Empty:
            return None


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
        controls.put(msg["type"])
        if on_control is not None:
            on_control(msg["type"])
