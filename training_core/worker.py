"""The training worker: `python -m training_core.worker --spec JOB.json [--resume]`.

Streams protocol events (training_core.protocol) as JSON lines on stdout and obeys control
messages on stdin. Anything else that writes to stdout (a library's print) is redirected to
stderr, so stdout carries protocol lines only. Exit: 0 finished or stopped, 2 bad input,
1 internal error; the last event says which in plain words.
"""
from __future__ import annotations

import argparse
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training_core.worker")
    parser.add_argument("--spec", required=True, help="job spec JSON file")
    parser.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    args = parser.parse_args(argv)

    out = _event_stream()
    lock = threading.Lock()

    def emit(event: dict) -> None:
        with lock:
            out.write(encode(event))
            out.flush()

    from .controls import Controls, read_controls
    from .errors import UserError
    controls = Controls()
    threading.Thread(target=read_controls, args=(sys.stdin, controls, emit), daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: controls.put("stop"))

    engine = None
    try:
        from .config import JobSpec
        from .engine import Engine
        spec = JobSpec.load(args.spec)
        engine = Engine(spec, emit, controls, resume=args.resume)
        engine.run()
        return 0
    except UserError as exc:
        emit(make_event("failed", code=exc.code, message=str(exc), step=engine.step if engine else 0))
        return 2
    except Exception as exc:  # a bug: say so plainly, keep the traceback on stderr for the log
        traceback.print_exc(file=sys.stderr)
        emit(make_event("failed", code="internal", message=f"internal error: {type(exc).__name__}: {exc}",
                        step=engine.step if engine else 0))
        return 1


if __name__ == "__main__":
    sys.exit(main())
