"""Control messages arriving while a run trains (from the worker's stdin, or signals)."""
from __future__ import annotations

import queue
from typing import Callable, Iterable

from .protocol import ProtocolError, decode_control, make_event


class StopRequested(BaseException):
    """A stop that came before the training loop reads its controls (while a model loads, data is
    tokenized...): raised in the main thread, so set-up ends at once. A BaseException, like
    KeyboardInterrupt, so that a library's `except Exception` does not swallow it."""


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
