"""Ctrl-C keeps working in a process that starts hivemind averagers.

hivemind's `DecentralizedAverager.run_in_background` sets SIGINT to SIG_IGN in the calling process before
it forks the averager (so the averager child ignores Ctrl-C), and leaves it so: from then on `swarm join`
and `swarm host` ignored Ctrl-C altogether. `KeepsSigint` goes first in our averagers' bases and puts the
handler back in the parent once the child is forked (the child keeps ignoring it, as hivemind wants)."""
from __future__ import annotations

import signal
import threading


class KeepsSigint:
    def run_in_background(self, *args, **kwargs):
        if threading.current_thread() is not threading.main_thread():   # only the main thread sets handlers
            return super().run_in_background(*args, **kwargs)
        ours = signal.getsignal(signal.SIGINT)
        try:
            return super().run_in_background(*args, **kwargs)
        finally:
            signal.signal(signal.SIGINT, ours)
