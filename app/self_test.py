"""`modron --self-test`: a check without a window that the install works.

It imports every app module (creating no window, so it needs no display), then has the engine train
the demo model for a few steps in a throwaway data folder, the way the app runs its workers, and checks
that the worker protocol's events arrive and the loss is a finite number. The installers run it last.
Exit status 0 when everything passed, 1 otherwise.
"""
from __future__ import annotations

import importlib
import math
import os
import pkgutil
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEMO_STEPS = 4
ENGINE_TIMEOUT_S = 600


def check_imports() -> list[str]:
    """Import every module of the app package; the problems, one line each."""
    import app
    problems = []
    for info in pkgutil.walk_packages(app.__path__, "app."):
        if info.name == __name__:
            continue
        try:
            importlib.import_module(info.name)
        except Exception as exc:   # report every broken module, not just the first
            problems.append(f"{info.name}: {type(exc).__name__}: {exc}")
    return problems


def run_engine(steps: int = DEMO_STEPS, timeout_s: float = ENGINE_TIMEOUT_S) -> tuple[list[dict], str]:
    """The demo for `steps` steps in a worker subprocess; its protocol events and a problem ('' if none)."""
    import training_core
    from training_core.protocol import ProtocolError, decode_event
    code_root = str(Path(training_core.__file__).resolve().parents[1])
    with tempfile.TemporaryDirectory(prefix="modron-self-test-") as tmp:
        env = dict(os.environ, MODRON_DATA_DIR=str(Path(tmp, "data")), MODRON_CACHE_DIR=str(Path(tmp, "cache")),
                   PYTHONPATH=os.pathsep.join(p for p in (code_root, os.environ.get("PYTHONPATH")) if p),
                   HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8")
        from app.engine_client import engine_command   # the engine's one entry point, as the app starts it
        program, argv = engine_command(["demo", "--steps", steps, "--json", "--out", Path(tmp, "run")])
        cmd = [program, *argv]
        try:
            proc = subprocess.run(cmd, env=env, cwd=tmp, stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, encoding="utf-8", errors="replace", timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return [], f"the engine did not finish {steps} demo steps within {timeout_s:.0f} s"
        except OSError as exc:
            return [], f"the engine could not be started ({exc})"
    events, bad = [], []
    for line in proc.stdout.splitlines():
        if line.strip():
            try:
                events.append(decode_event(line))
            except ProtocolError as exc:
                bad.append(str(exc))
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(nothing on stderr)"])[-1]
        return events, f"the engine exited with status {proc.returncode}: {tail}"
    if bad:
        return events, f"the engine sent lines that are not protocol events: {bad[0]}"
    return events, ""


def check_events(events: list[dict], steps: int = DEMO_STEPS) -> str:
    """'' when the events are those of a healthy run of `steps` steps, else what is wrong."""
    types = [e["type"] for e in events]
    for needed in ("started", "step", "finished"):
        if needed not in types:
            return f"the engine sent no '{needed}' event (got: {', '.join(dict.fromkeys(types)) or 'nothing'})"
    losses = [e["loss"] for e in events if e["type"] == "step"]
    if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in losses):
        return f"the training loss is not a finite number: {losses}"
    last = events[types.index("finished")]
    if last["step"] != steps:
        return f"the run finished at step {last['step']}, not {steps}"
    return ""


def main() -> int:
    t0 = time.monotonic()
    print(f"Modron self-test (Python {platform.python_version()}, {sys.prefix})")
    ok = True
    problems = check_imports()
    if problems:
        ok = False
        print("  app modules:  FAILED")
        for p in problems:
            print(f"    {p}")
    else:
        print("  app modules:  ok")
    events, problem = run_engine()
    problem = problem or check_events(events)
    if problem:
        ok = False
        print(f"  engine:       FAILED: {problem}")
    else:
        started = next(e for e in events if e["type"] == "started")
        finished = next(e for e in events if e["type"] == "finished")
        losses = [e["loss"] for e in events if e["type"] == "step"]   # step events are rate-limited
        print(f"  engine:       ok ({finished['step']} demo steps on {started['device']}, "
              f"{started['precision']}; loss {losses[0]:.3f} -> {losses[-1]:.3f})")
    print(f"{'PASSED' if ok else 'FAILED'} in {time.monotonic() - t0:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
