"""The app's one engine client (app/engine_client.py) against the engine's one entry point
(`python -m training_core.cli`): one-shot calls (validate, plan) and a long run (a tiny job, stopped by a
control), plus its handling of stray stdout lines, exit reasons and retired runs."""
import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import ast
import sys
from pathlib import Path

from app.engine_client import EngineCall, EngineRun, exit_reason, job_args
from helpers import tiny_job, write_text_dataset
from training_core.config import JobSpec
from training_core.protocol import encode, make_event

ROOT = Path(__file__).resolve().parents[1]
WAIT = 90_000   # ms; importing torch takes seconds on a busy 2-core machine


def test_one_shot_calls_answer_json_or_one_plain_line(qtbot, tmp_path):
    good = tmp_path / "good.txt"
    write_text_dataset(good, n_paragraphs=10)
    task = EngineCall(["validate", "--data", str(good), "--json"])
    with qtbot.waitSignal(task.done, timeout=WAIT) as blocker:
        task.start()
    report = blocker.args[0]
    assert isinstance(report, dict) and report["records"] >= 1 and report["format"] == "text"

    missing = tmp_path / "nothing-here.txt"
    task = EngineCall(["validate", "--data", str(missing), "--json"])
    with qtbot.waitSignal(task.failed, timeout=WAIT) as blocker:
        task.start()
    line = blocker.args[0]
    assert "nothing-here.txt" in line and "\n" not in line and not line.startswith("modron-train")

    # Plain text mode and an argparse error (exit 2, message after the usage lines).
    task = EngineCall(["validate", "--data", str(good)], json=False)
    with qtbot.waitSignal(task.done, timeout=WAIT) as blocker:
        task.start()
    assert isinstance(blocker.args[0], str) and "text" in blocker.args[0]
    task = EngineCall(["validate"])
    with qtbot.waitSignal(task.failed, timeout=WAIT) as blocker:
        task.start()
    assert "--data" in blocker.args[0]


def test_a_plan_and_a_run_of_the_same_spec_through_the_entry_point(qtbot, tmp_path):
    """Check's call and the queue's run, as the app makes them: `plan --spec` then `run --spec`,
    a `stop` control after the first step; the run says `stopped` and exits 0."""
    spec_path = tmp_path / "run" / "queue-spec.json"
    JobSpec.from_dict(tiny_job(tmp_path, out=str(tmp_path / "run"), steps=400, test_sleep_per_step=0.05),
                      where="test").save(spec_path)
    plan = EngineCall(["plan", "--spec", spec_path, "--json"])
    with qtbot.waitSignal(plan.done, timeout=WAIT) as blocker:
        plan.start()
    assert blocker.args[0]["params_trainable"] > 0

    run = EngineRun(job_args(spec_path), tmp_path / "run")
    events, exits = [], []
    run.event.connect(lambda ev: events.append(ev) or (ev["type"] == "step" and run.send("stop")))
    run.exited.connect(lambda code, reason: exits.append((code, reason)))
    run.start()
    qtbot.waitUntil(lambda: bool(exits), timeout=WAIT)
    kinds = [ev["type"] for ev in events]
    assert exits == [(0, "")], (exits, kinds, (tmp_path / "run" / "worker.log").read_text(encoding="utf-8"))
    # Only phase events (loading_model, from the first second) come before the preflight.
    assert set(kinds[:kinds.index("preflight")]) <= {"phase"}
    assert kinds.index("preflight") < kinds.index("started") < kinds.index("step") and kinds[-1] == "stopped"
    assert events[-1]["step"] < 400 and not run.running()
    assert "run --spec" in (tmp_path / "run" / "worker.log").read_text(encoding="utf-8")


def test_a_run_reads_only_protocol_lines(qtbot, tmp_path):
    run = EngineRun(job_args(tmp_path / "spec.json"), tmp_path / "run")
    got = []
    run.event.connect(got.append)
    run._handle_line(b"some library printed this")
    run._handle_line(encode(make_event("warning", code="data", message="x")).encode())
    assert [e["type"] for e in got] == ["warning"] and not run.running() and run.pid is None
    assert "some library printed this" in (tmp_path / "run" / "worker.log").read_text(encoding="utf-8")
    assert "killed" in exit_reason(9, crashed=True) and "memory" in exit_reason(9, crashed=True)
    assert "SIGSEGV" in exit_reason(11, crashed=True) and "status 3" in exit_reason(3, crashed=False)


def test_a_retired_run_says_nothing_more_and_is_deleted_safely(qtbot, tmp_path):
    """A run its owner is done with (retire) delivers no signal again, then is deleted outside
    its own signals; a real process that keeps printing and then exits, deleted at once after."""
    from PySide6.QtCore import QObject
    import shiboken6
    owner = QObject()
    line = encode(make_event("warning", code="data", message="x")).replace("\n", "")
    script = f"import time\nfor i in range(40): print({line!r}, flush=True); time.sleep(0.02)\n"
    w = EngineRun(["a script"], tmp_path / "run", parent=owner, command=(sys.executable, ["-c", script]))
    got, exits = [], []
    w.event.connect(lambda ev: got.append(ev) or (len(got) == 3 and w.retire()))
    w.exited.connect(lambda code, reason: exits.append(code))
    w.start()
    qtbot.waitUntil(lambda: not w.running(), timeout=30_000)
    qtbot.wait(100)
    assert len(got) == 3 and exits == []     # without retire: 40 events and an exit notice
    w.deleteLater()
    qtbot.waitUntil(lambda: not shiboken6.isValid(w), timeout=5_000)


def test_views_only_display():
    """Views start no process of their own and no long run: one-shot calls go through EngineCall, long
    runs belong to the services (app/job_queue.py, app/contribution.py); services such as the demo job
    and the progress line are the queue's (views call or import them, never define them). import-linter's
    views-display-only contract covers modules; this covers the names it cannot see."""
    banned = {"QProcess", "EngineRun", "Popen"}                    # imported or used
    services = {"submit_demo", "demo_job_spec", "progress_text"}   # defined
    found = []
    for path in sorted((ROOT / "app" / "views").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                found += [f"{path.name}: {a.name}" for a in node.names if a.name in banned]
            elif isinstance(node, ast.Attribute) and node.attr in banned:
                found.append(f"{path.name}: {node.attr}")
            elif isinstance(node, ast.FunctionDef) and node.name in services:
                found.append(f"{path.name}: def {node.name}")
    assert found == []
    assert not (ROOT / "app" / "worker_process.py").exists() and not (ROOT / "app" / "cli_task.py").exists()
