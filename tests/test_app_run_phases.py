"""The app says what a running job's worker is doing from the first second (issue 12, part 4): the
queue keeps its latest `phase`, the Run view shows a phase line (and a bar when counted) while the
charts are empty, and the Queue's and Dashboard's texts say the phase instead of a bare "running".
The worker is the scripted stand-in of test_app_run_queue_ux (no torch, no process)."""
import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from app.job_queue import phase_text, progress_text
from app.views.queue_view import state_text
from app.views.run_view import RunView
from helpers import tiny_job
from test_app_run_queue_ux import queue_and_view, scripted  # noqa: F401 - the fixture is used by name


def started_worker(qtbot, queue, scripted, job_id):
    qtbot.waitUntil(lambda: queue.running_job() is not None and queue.running_job().id == job_id, timeout=2000)
    return scripted[-1]


def test_run_view_shows_the_phase_from_the_first_event_and_hides_it_while_training(
        qtbot, tmp_path, store, scripted, queues):
    queue, view = queue_and_view(qtbot, store, queues, RunView)
    job = queue.submit(tiny_job(tmp_path), "phases")
    w = started_worker(qtbot, queue, scripted, job)
    assert view.job_id == job and view.phase_label.isHidden()   # nothing said yet

    w.say("phase", phase="loading_model", message="Starting the training engine…")
    assert not view.phase_label.isHidden() and view.phase_label.text() == "Starting the training engine…"
    assert view.phase_bar.isHidden()                            # nothing counted: no bar
    assert progress_text(queue.running_job()) == "Starting the training engine…"
    assert state_text(queue, queue.running_job()) == "Starting the training engine…"

    w.say("phase", phase="tokenizing", message="Tokenizing the data…", done=300_000, total=1_000_000, unit="bytes")
    assert view.phase_label.text() == "Tokenizing the data: 30 % (293 KB of 977 KB)"
    assert not view.phase_bar.isHidden() and view.phase_bar.value() == 300
    w.say("phase", phase="tokenizing", message="Tokenizing the data…", done=1_000_000, total=1_000_000, unit="bytes")
    assert view.phase_bar.value() == view.phase_bar.maximum()
    log = view.log.toPlainText()
    assert log.count("Tokenizing the data…") == 1          # the log says a phase once, not each update

    w.say("phase", phase="placing", message="Placing the model on cpu…")
    assert view.phase_label.text() == "Placing the model on cpu…" and view.phase_bar.isHidden()
    w.say("started", total_steps=10, device="cpu", precision="fp32", method="full", model="scratch:tiny",
          params_total=1000, params_trainable=1000, resumed_from=None)
    w.say("phase", phase="first_step", message="First step (slow: allocating memory, warming up kernels)…")
    assert view.phase_label.text().startswith("First step")
    w.step = lambda n: w.say("step", step=n, total_steps=10, loss=2.0, elapsed_s=1.0, tokens_seen=n * 8,
                             tokens_per_s=8.0, eta_s=9.0, vram_used=0, vram_reserved=0, ram_used=1)
    w.say("phase", phase="training", message="Training")
    w.step(1)
    assert view.phase_label.isHidden() and view.phase_bar.isHidden()   # the charts speak now
    assert progress_text(queue.running_job()).startswith("step 1 of 10")
    assert state_text(queue, queue.running_job()) == "running"

    w.say("phase", phase="checkpointing", message="Writing the final checkpoint…")
    assert view.phase_label.text() == "Writing the final checkpoint…"
    assert progress_text(queue.running_job()).endswith(" · Writing the final checkpoint…")

    w.say("finished", step=10, run_dir=str(tmp_path), final_loss=1.0, final_eval_loss=None, checkpoint=None,
          elapsed_s=2.0)
    w.exited.emit(0, "")
    qtbot.waitUntil(lambda: store.get_job(job).state == "finished", timeout=2000)
    assert view.phase_label.isHidden() and view.phase_bar.isHidden()
    assert store.get_job(job).summary["phase"] is None     # an ended job is doing nothing


def test_a_restarted_view_and_a_new_worker_show_the_stored_phase_not_an_old_one(
        qtbot, tmp_path, store, scripted, queues):
    queue, _ = queue_and_view(qtbot, store, queues, RunView)
    job = queue.submit(tiny_job(tmp_path), "again")
    w = started_worker(qtbot, queue, scripted, job)
    w.say("phase", phase="downloading", message="Downloading org/model from the Hugging Face hub…")
    view = RunView(store, queue)   # a view opened later reads the phase from the store
    qtbot.addWidget(view)
    assert view.phase_label.text() == "Downloading org/model from the Hugging Face hub…"
    assert "Downloading org/model" in view.log.toPlainText()

    w.say("paused", step=0, vram_used=0, checkpoint=None)
    assert store.get_job(job).summary["phase"] is None and view.phase_label.isHidden()
    queue.cancel(job)
    w.say("stopped", step=0, checkpoint=None)
    w.exited.emit(0, "")
    qtbot.waitUntil(lambda: store.get_job(job).state == "cancelled", timeout=2000)
    queue.retry(job)
    w2 = started_worker(qtbot, queue, scripted, job)
    assert w2 is not w and phase_text(store.get_job(job).summary) == ""   # the new worker has said nothing yet


def test_phase_text_reads_plainly():
    assert phase_text({}) == "" and phase_text({"phase": "training", "phase_message": "Training"}) == ""
    assert phase_text({"phase": "loading_model"}) == "Loading model"
    assert phase_text({"phase": "tokenizing", "phase_message": "Tokenizing…", "phase_done": 3,
                       "phase_total": 7, "phase_unit": "files"}) == "Tokenizing: 42 % (3 of 7 files)"
    assert phase_text({"phase": "evaluating", "phase_message": "Evaluating…", "phase_done": 5,
                       "phase_total": 0}) == "Evaluating…"
