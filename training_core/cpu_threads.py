"""How many CPU threads a run trains with: the cores other programs leave free, looked at as it goes.

torch's CPU kernels split each operation over all their threads and wait for the slowest. When
another program (a browser, a game, the desktop itself) takes one core, the thread sharing it holds
every operation back, and a 2-thread run on 2 cores gets 3x slower than the same run with 1 thread
(bench/cpu_threads.py). So a run that was not given `--threads` starts with torch's own count (the
physical cores) and, every couple of seconds, gives up one thread per core that other processes
kept busy, and takes it back once they are quiet. A run given `--threads` keeps that count.

psutil reads the counters (what the OS already keeps); torch.set_num_threads does the switching.
Nothing here knows about Qt or the app.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import psutil

INTERVAL_S = 2.0      # how often the count is reconsidered: a few steps, and far above its cost (~0.1 ms)
# Another program's share of a core below which it is ignored: an idle desktop's few percent must not
# cost a whole thread, a browser tab playing video (~0.3-0.5 of a core) should.
IGNORE_BELOW = 0.25


def _busy_cpu_s() -> float:
    c = psutil.cpu_times()
    return (c.user + c.nice + c.system + getattr(c, "irq", 0) + getattr(c, "softirq", 0)
            + getattr(c, "steal", 0))


def threads_for(max_threads: int, others_busy_cpus: float) -> int:
    """Threads that leave every core other programs used (rounded up past IGNORE_BELOW) to them."""
    taken = max(0, math.ceil(others_busy_cpus - IGNORE_BELOW))
    return max(1, min(max_threads, max_threads - taken))


class ThreadGovernor:
    """Call `tick()` between steps; it changes torch's thread count when other programs' use changes."""

    def __init__(self, max_threads: int, set_threads: Callable[[int], None], interval_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 busy: Callable[[], float] = _busy_cpu_s,
                 own: Callable[[], float] | None = None):
        self.max_threads = max(1, int(max_threads))
        self.threads = self.max_threads
        self._set, self._clock, self._busy = set_threads, clock, busy
        self._interval = INTERVAL_S if interval_s is None else interval_s
        proc = psutil.Process()
        self._own = own or (lambda: sum(proc.cpu_times()[:2]))   # this process's threads, not its children
        self._t, self._busy0, self._own0 = clock(), busy(), self._own()
        self.changes = 0

    def others_busy(self) -> float | None:
        """CPUs other processes kept busy since the last look (None until an interval has passed)."""
        now = self._clock()
        dt = now - self._t
        if dt < self._interval or dt <= 0:
            return None
        busy, own = self._busy(), self._own()
        others = max(0.0, (busy - self._busy0) - (own - self._own0)) / dt
        self._t, self._busy0, self._own0 = now, busy, own
        return others

    def tick(self) -> int | None:
        """The new thread count when it changed, else None."""
        others = self.others_busy()
        if others is None:
            return None
        want = threads_for(self.max_threads, others)
        if want == self.threads:
            return None
        self.threads = want
        self._set(want)
        self.changes += 1
        return want
