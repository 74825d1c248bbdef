"""Control messages arriving while a run trains (from the worker's stdin, or signals)."""
from __future__ import annotations

import queue


class Controls:
    """A thread-safe inbox of control message types: pause, resume, stop, checkpoint."""

    def __init__(self) -> None:
        self._q: queue.Queue[str] = queue.Queue()

    def put(self, kind: str) -> None:
        self._q.put(kind)

    def poll(self) -> list[str]:
        """Everything that has arrived, without waiting."""
        out = []
        while True:
            try:
                out.append(self._q.get_nowait())
            except queue.Empty:
                return out

    def wait(self, timeout: float | None = None) -> str | None:
        try:
            return self._q.get(timeout=timeout)
        except queue.Empty:
            return None
