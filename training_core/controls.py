"""Control messages arriving while a run trains (from the worker's stdin, or signals)."""
from __future__ import annotations

import queue


class Controls:
    """A thread-safe inbox of control message types: pause, resume, stop, checkpoint."""

    def __init__(self) -> None:
        self._q: queue.Queue[str] = queue.Queue()

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
