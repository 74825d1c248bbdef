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

from .protocol import ProtocolError, decode_control, encode, make_event


def _event_stream():
    """Keep the real stdout for events; point fd 1 (and sys.stdout) at stderr."""
    events_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(events_fd, "w", encoding="utf-8", buffering=1)


def serve(spec_path: str, resume: bool = False) -> int:
    """Run the job in `spec_path` (from its last checkpoint if `resume`), speaking the protocol; the exit status."""
    gc.disable()   # until the imports are done (_import_engine)
    return _serve(_event_stream(), spec_path, resume)


def serve_spare() -> int:
    """A spare worker (`run --spare`): import the engine before there is a job, say `ready`, then run the
    job the first line on stdin names (a `job` control) exactly as `serve` would; the exit status.

    Why: a worker's imports (torch, transformers' model code) take 3-4 s on two cores before its first step,
    and nothing about them depends on the job. The app starts a spare while the user fills in a new
    finetune (app/spare_worker.py), so "Add to queue" reaches the first step in well under a second
    instead. Until its job comes it holds no run folder and no accelerator memory; stdin closing (the
    app quit or died) or any other first line ends it with status 0."""
    gc.disable()   # until the imports are done (_import_engine)
    # SIGTERM acts as `stop` at every phase: without a job there is nothing to save or say, so leave now.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    out = _event_stream()
    Engine = _import_engine()
    out.write(encode(make_event("ready", pid=os.getpid())))
    out.flush()
    line = sys.stdin.readline()
    term: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: term.append(1))   # a job now: _serve obeys it as `stop`
    if not line.strip():
        return 0   # no job came: the app let this spare go
    try:
        msg = decode_control(line)
    except ProtocolError as exc:
        sys.stderr.write(f"spare worker: {exc}\n")
        return 2
    if msg["type"] != "job":
        return 0   # `stop` (or anything else) before a job: nothing to stop but ourselves
    spec, resume = msg.get("spec"), msg.get("resume", False)
    if not isinstance(spec, str) or not spec or not isinstance(resume, bool):
        sys.stderr.write(f"spare worker: a job control needs a spec path and a true/false resume: {line[:300]!r}\n")
        return 2
    return _serve(out, spec, resume, Engine, stop_first=bool(term))


def _serve(out, spec_path: str, resume: bool, Engine=None, stop_first: bool = False) -> int:
    """serve's body, events to `out`; `Engine`: the engine class when a spare imported it already;
    `stop_first`: a SIGTERM came before this could take it (a spare's, as its job arrived)."""
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
    if stop_first:
        controls.stop()
    # The first second: say so before the heavy imports (torch, transformers) take several.
    emit(make_event("phase", phase="loading_model", message="Starting the training engine…"))

    def on_control(kind: str) -> None:
        if kind == "stop" and not controls.polling:
            controls.stop()   # set-up ends at once (the loop reads the queued `stop` itself)

    engine = spec = None
    try:
        threading.Thread(target=read_controls, args=(sys.stdin, controls, emit, on_control), daemon=True).start()
        from .config import JobSpec
        spec = JobSpec.load(spec_path)
        if Engine is None:
            Engine = controls.run_setup(_import_engine)   # seconds of imports a stop need not wait for
        engine = Engine(spec, emit, controls, resume=resume)
        engine.run()
        return _exit_now(out, 0) if controls.abandoned is not None else 0
    except StopRequested:   # before the engine could take it (still importing): as Engine.run says it
        from .checkpoint_files import list_checkpoints, step_of
        kept = list_checkpoints(spec.out)[-1:] if spec is not None else []
        emit(make_event("stopped", step=max([engine.step if engine else 0, *map(step_of, kept)]),
                        checkpoint=str(kept[0]) if kept else None,
                        **({"run_dir": os.path.abspath(spec.out)} if spec is not None else {})))
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
