"""A job spec run as the app runs it: `modron-train run --spec JOB.json [--resume]` (cli.py), whose
body is `serve` here.

Streams protocol events (training_core.protocol) as JSON lines on stdout and obeys control
messages on stdin. Anything else that writes to stdout (a library's print) is redirected to
stderr, so stdout carries protocol lines only. Exit: 0 finished or stopped, 2 bad input,
1 internal error; the last event says which in plain words.
"""
from __future__ import annotations

import _thread
import os
import signal
import sys
import threading
import traceback

from .protocol import encode, make_event


def _event_stream():
    """Keep the real stdout for events; point fd 1 (and sys.stdout) at stderr."""
    events_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(events_fd, "w", encoding="utf-8", buffering=1)


def serve(spec_path: str, resume: bool = False) -> int:
    """Run the job in `spec_path` (from its last checkpoint if `resume`), speaking the protocol; the exit status."""
    out = _event_stream()
    lock = threading.Lock()

    def emit(event: dict) -> None:
        with lock:
            out.write(encode(event))
            out.flush()

    from .controls import Controls, StopRequested, read_controls
    from .errors import user_error_from
    controls = Controls()

    def on_control(kind: str) -> None:
        # A stop while the model loads or the data is tokenized: interrupt set-up now (the main thread
        # runs the SIGTERM handler below), not after minutes of loading.
        if kind == "stop" and not controls.polling:
            _thread.interrupt_main(signal.SIGTERM)

    engine = None
    try:
        # SIGTERM acts as `stop` at every phase: checkpoint and stop in the loop, end set-up at once before it.
        signal.signal(signal.SIGTERM, lambda *_: controls.stop())
        threading.Thread(target=read_controls, args=(sys.stdin, controls, emit, on_control), daemon=True).start()
        from .config import JobSpec
        from .engine import Engine
        spec = JobSpec.load(spec_path)
        engine = Engine(spec, emit, controls, resume=resume)
        engine.run()
        return 0
    except StopRequested:   # before the engine could take it (still importing)
        emit(make_event("stopped", step=engine.step if engine else 0, checkpoint=None))
        return 0
    except Exception as exc:
        err = user_error_from(exc)   # bad input, or the user's disk (full, read-only, a symlink loop...)
        if err is not None:
            extra = {}
            for name in ("suggested_lr", "checkpoint"):
                if getattr(err, name, None) is not None:
                    extra[name] = getattr(err, name)
            emit(make_event("failed", code=err.code, message=str(err), step=engine.step if engine else 0, **extra))
            return 2
        # A bug: say so plainly, keep the traceback on stderr for the log.
        traceback.print_exc(file=sys.stderr)
        emit(make_event("failed", code="internal", message=f"internal error: {type(exc).__name__}: {exc}",
                        step=engine.step if engine else 0))
        return 1


if __name__ == "__main__":   # the old entry point: say where it went rather than exit 0 doing nothing
    sys.exit("python -m training_core.worker is gone: use `python -m training_core.cli run --spec JOB.json [--resume]`")
