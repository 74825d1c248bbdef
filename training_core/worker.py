"""A job spec run as the app runs it: `modron-train run --spec JOB.json [--resume]` (cli.py), whose
body is `serve` here.

Streams protocol events (training_core.protocol) as JSON lines on stdout and obeys control
messages on stdin. Anything else that writes to stdout (a library's print) is redirected to
stderr, so stdout carries protocol lines only. Exit: 0 finished or stopped, 2 bad input,
1 internal error; the last event says which in plain words.
"""
from __future__ import annotations

import gc
import importlib
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
    gc.disable()   # until the imports are done (_import_engine)
    out = _event_stream()
    lock = threading.Lock()

    def emit(event: dict) -> None:
        with lock:
            out.write(encode(event))
            out.flush()

    from .controls import Controls, StopRequested, read_controls
    from .errors import user_error_from
    controls = Controls()
    # SIGTERM acts as `stop` at every phase: checkpoint and stop in the loop, end set-up at once before it.
    # The handler only sets a flag (Controls.stop): an exception thrown from it would land in whatever
    # library code runs at that moment, which may swallow it (a finaliser did).
    signal.signal(signal.SIGTERM, lambda *_: controls.stop())
    # The first second: say so before the heavy imports (torch, transformers) take several.
    emit(make_event("phase", phase="loading_model", message="Starting the training engine…"))

    def on_control(kind: str) -> None:
        if kind == "stop" and not controls.polling:
            controls.stop()   # set-up ends at once (the loop reads the queued `stop` itself)

    engine = None
    try:
        threading.Thread(target=read_controls, args=(sys.stdin, controls, emit, on_control), daemon=True).start()
        from .config import JobSpec
        spec = JobSpec.load(spec_path)
        Engine = controls.run_setup(_import_engine)   # seconds of imports a stop need not wait for
        engine = Engine(spec, emit, controls, resume=resume)
        engine.run()
        return _exit_now(out, 0) if controls.abandoned is not None else 0
    except StopRequested:   # before the engine could take it (still importing)
        emit(make_event("stopped", step=engine.step if engine else 0, checkpoint=None))
        return _exit_now(out, 0)
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


def _import_engine():
    """The engine and the modules its set-up goes on to import (transformers' model code, tokenizers, the
    data pipeline), with the cyclic garbage collector off (serve): the imports make some 600,000 objects
    that live as long as the process, and each full collection while they pile up walks them all, about
    a fifth of the imports' time. Frozen afterwards, no later collection walks them again; the little
    cyclic garbage the imports leave (a few MB) stays."""
    try:
        from .engine import Engine
        for name in ("models", "data", "licence"):   # else imported later by Engine._load_model
            importlib.import_module(f".{name}", __package__)
    finally:
        gc.freeze()
        gc.enable()
    return Engine


def _exit_now(out, code: int) -> int:
    """End the process now, its events and log written: set-up work a stop abandoned (an import, a model
    load) may still run in a helper thread, and an interpreter shutting down around it can take long.
    No worse than the SIGKILL a run must survive anyway (checkpoints and caches are written atomically)."""
    for stream in (out, sys.stderr, sys.__stderr__):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":   # the old entry point: say where it went rather than exit 0 doing nothing
    sys.exit("python -m training_core.worker is gone: use `python -m training_core.cli run --spec JOB.json [--resume]`")
