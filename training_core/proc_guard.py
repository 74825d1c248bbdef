"""A process that starts children owns them: when it dies, even by SIGKILL, they go too.

`own_children()` starts a small sentinel process and puts every process this one forks from then
on (hivemind's DHT and averagers, DataLoader workers, ...) in the sentinel's process group; what
those children start in turn (p2pd, a Go binary) inherits the group. When this process dies, for
any reason, the sentinel kills the whole group, itself last.

Why hand-written, and why this way (the alternatives, weighed against what hivemind does):
- PR_SET_PDEATHSIG fires when the parent's *thread* that forked exits, not the process, and it is
  cleared on fork: hivemind may fork from threads other than the main one, and p2pd is started by
  the DHT process through uvloop, where no Python runs between fork and exec to set it.
- a watchdog thread in each forked child cannot cover p2pd either, nor a child killed by SIGKILL.
- killing our own process group would kill whoever shares it (the desktop app when it starts us
  without a new session, `tee` in a shell pipeline); making ourselves a group leader would take a
  shell's Ctrl-C away from us. A group of our own for the children avoids both.
- no library among our dependencies does this; the whole mechanism is a fork hook and ~20 lines.

Processes started by C code in this process without Python's fork hooks (torch_shm_manager) stay in
our group; torch_shm_manager exits by itself 2 s after its last client (us and our children) is gone.
On Windows, and on a second call, `own_children()` does nothing.
"""
from __future__ import annotations

import os
import subprocess
import sys

# The sentinel runs as `python -I -S -c SENTINEL MAIN_PID`: stdlib only, nothing of ours imported (so
# no import path to get right), its own command line (so `ps` tells it from the process it guards). It
# ignores the signals a terminal or a stop request sends: it must outlive the process it watches; then
# it leaves by itself, whether that process died or exited cleanly.
SENTINEL = """\
# modron: when the process given below dies, kill the process group its children were put in
import os, select, signal, sys, time
main = int(sys.argv[1])
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
    signal.signal(s, signal.SIG_IGN)
try:
    fd = os.pidfd_open(main)          # readable the moment it dies (Linux 5.3+)
except (AttributeError, OSError):
    fd = None
while os.getppid() == main:           # we are its child: our parent changes when it dies
    if fd is not None and not select.select([fd], [], [], 5.0)[0]:
        continue
    time.sleep(0.1)
if os.getpgrp() == os.getpid():       # never anyone else's group
    os.killpg(0, signal.SIGKILL)      # its children, then ourselves
"""

_sentinel: subprocess.Popen | None = None


def _join_sentinel_group() -> None:
    if _sentinel is not None:
        try:
            os.setpgid(0, _sentinel.pid)
        except OSError:       # sentinel gone (then nothing would kill the group anyway)
            pass


def sentinel_pid() -> int | None:
    """The sentinel's pid, once own_children() started it."""
    return _sentinel.pid if _sentinel is not None else None


def own_children() -> int | None:
    """Make every process this one forks from now on die with it. Call it early, before any child is
    started (children already running are not covered). Returns the sentinel's pid (None on Windows)."""
    global _sentinel
    if sys.platform == "win32":
        return None
    if _sentinel is not None:
        return _sentinel.pid
    group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
    _sentinel = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", SENTINEL, str(os.getpid())], stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True, cwd="/", **group)
    os.register_at_fork(after_in_child=_join_sentinel_group)
    return _sentinel.pid
