"""The job queue with real training workers: order, pause/resume, failures, cancel.

Each worker is a real `python -m training_core.cli run` (an EngineRun of app/engine_client.py; scratch:tiny,
byte tokenizer, one thread), so these tests follow the same path as the app. Worker start-up (importing torch) dominates the
time, so each test drives several scenarios through as few workers as possible. The crash-recovery
test (the app SIGKILLed mid-job) lives in test_app_store.py to keep each file's run time short.
"""
import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from pathlib import Path

import pytest

from app.job_queue import JobQueue
from app.store import Store
from helpers import tiny_job as tiny_spec
from training_core.errors import ConfigError

WAIT = 90_000   # ms; a worker needs a few seconds to import torch, more on a busy 2-core machine


def state(store, job_id):
    return store.get_job(job_id).state


def test_queue_bookkeeping_without_workers(qtbot, tmp_path, queues):
    store = Store.open_default()
    store.set_setting("checkpoint_minutes", 7)
    q = JobQueue(store, autostart=False)    # nothing starts by itself
    queues.append(q)
    with pytest.raises(ConfigError, match="steps"):
        q.submit(tiny_spec(tmp_path, steps=0), "bad spec")
    with pytest.raises(ConfigError, match="unknown field"):
        q.submit({**tiny_spec(tmp_path), "colour": "red"}, "bad spec")
    assert store.list_jobs() == []
    a = q.submit(tiny_spec(tmp_path, checkpoint_every=None), "a")
    b = q.submit(tiny_spec(tmp_path), "b")
    c = q.submit(tiny_spec(tmp_path), "c")
    ja = store.get_job(a)
    assert ja.spec["checkpoint_minutes"] == 7.0                        # the setting, for new jobs
    assert store.get_job(b).spec["checkpoint_minutes"] == 10.0        # an explicit checkpoint_every wins
    assert ja.spec["job_id"] and ja.spec["out"] == ja.run_dir          # complete spec, fixed job_id
    qtbot.wait(200)
    assert q.running_job() is None and [j.state for j in store.list_jobs()] == ["queued"] * 3

    with qtbot.waitSignal(q.queue_changed, timeout=1000):
        q.move(c, 0)
    assert [j.name for j in store.list_jobs()] == ["c", "a", "b"]
    q.pause(a)
    assert store.get_job(a).state == "paused" and store.next_queued().id == c
    q.resume(a)
    assert store.get_job(a).state == "queued"
    with qtbot.waitSignal(q.job_changed, timeout=1000, check_params_cb=lambda jid: jid == b):
        q.cancel(b)
    assert store.get_job(b).state == "cancelled" and store.get_job(b).finished
    q.retry(b)                                                         # back in the queue, at the end
    assert store.get_job(b).state == "queued" and store.get_job(b).finished is None
    assert [j.name for j in store.list_jobs()] == ["c", "a", "b"]
    q.retry(a)                                                         # only failed/cancelled jobs retry
    assert [j.name for j in store.list_jobs()] == ["c", "a", "b"]

    # A job left "running" by a dead app goes first. Its recorded worker pid now belongs to another
    # process (this one): recover() must not kill it.
    store.update_job(b, state="running", attempts=1, summary={"worker_pid": os.getpid()})
    q.recover()
    assert [j.name for j in store.list_jobs()] == ["b", "c", "a"]
    assert store.get_job(b).state == "queued" and store.get_job(b).attempts == 1
    assert store.events(b, {"recovered"})
    q.shutdown()     # before the store goes: no queued start-up check may touch it
    store.close()


def test_queue_order_pause_all_failure_one_at_a_time_pause_resume_cancel(qtbot, tmp_path, queues):
    store = Store.open_default()
    q = JobQueue(store)
    queues.append(q)
    events: dict[int, list[dict]] = {}
    q.job_event.connect(lambda jid, ev: events.setdefault(jid, []).append(ev))

    # Pause everything first: jobs can be queued and reordered, but none starts.
    q.pause_all()
    assert q.paused_all and store.get_setting("paused_all") is True
    slow = q.submit(tiny_spec(tmp_path, steps=24, test_sleep_per_step=0.1), "slow")
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    bad = q.submit(tiny_spec(tmp_path, data=[str(empty)]), "bad data")
    last = q.submit(tiny_spec(tmp_path, steps=400, test_sleep_per_step=0.1), "last")
    with qtbot.waitSignal(q.queue_changed, timeout=1000):
        q.move(bad, 0)
    assert [j.name for j in store.list_jobs()] == ["bad data", "slow", "last"]
    q.move(last, 1)
    q.move(last, 5)
    assert [j.name for j in store.list_jobs()] == ["bad data", "slow", "last"]
    qtbot.wait(500)
    assert q.running_job() is None
    assert [j.state for j in store.list_jobs()] == ["queued"] * 3

    # Go: the bad job fails with one plain line, and the queue moves on to the next one.
    q.resume_all()
    assert not q.paused_all
    qtbot.waitUntil(lambda: state(store, bad) == "failed", timeout=WAIT)
    err = store.get_job(bad).error
    assert "empty.txt" in err and "\n" not in err and "Traceback" not in err
    qtbot.waitUntil(lambda: any(e["type"] == "step" for e in events.get(slow, [])), timeout=WAIT)

    # One job at a time: the last one waits while "slow" trains.
    assert q.running_job().id == slow and state(store, slow) == "running"
    assert state(store, last) == "queued"
    assert store.get_job(slow).attempts == 1

    # Pause and resume the running job.
    q.pause(slow)
    qtbot.waitUntil(lambda: state(store, slow) == "paused", timeout=WAIT)
    paused = store.events(slow, {"paused"})
    assert len(paused) == 1 and Path(paused[0]["checkpoint"]).is_dir()
    qtbot.wait(300)
    assert state(store, last) == "queued"        # a paused worker keeps its place; nothing else starts
    q.resume(slow)
    qtbot.waitUntil(lambda: state(store, slow) in ("finished", "failed"), timeout=WAIT)
    job = store.get_job(slow)
    assert job.state == "finished", job.error
    assert [e["type"] for e in events[slow]].count("resumed") == 1
    m = store.metrics(slow)
    assert m["step"][-1] == 24 and len(m["step"]) >= 2 and m["step"] == sorted(m["step"])
    assert all(x is not None and x > 0 for x in m["loss"])
    assert m["eval_loss"] and m["eval_loss"][-1] == pytest.approx(job.summary["final_eval_loss"])
    assert job.summary["step"] == 24 and job.summary["loss"] is not None and job.finished >= job.started
    assert store.events(slow, {"finished"}) and store.events(slow, {"sample"})
    assert not store.events(slow, {"step"})        # steps live in the metrics table only

    # The last job starts by itself; cancel it while it trains.
    qtbot.waitUntil(lambda: any(e["type"] == "step" for e in events.get(last, [])), timeout=WAIT)
    q.cancel(last)
    qtbot.waitUntil(lambda: state(store, last) == "cancelled", timeout=WAIT)
    assert store.events(last, {"stopped"})         # it checkpointed on the way out
    assert store.get_job(last).summary["step"] < 400
    qtbot.waitUntil(lambda: q.running_job() is None, timeout=5000)

    # Pause everything again: a new job stays queued until resume_all.
    q.pause_all()
    again = q.submit(tiny_spec(tmp_path), "held")
    qtbot.wait(500)
    assert state(store, again) == "queued" and q.running_job() is None
    # A queued job can be paused (skipped) and cancelled without a worker.
    q.pause(again)
    assert state(store, again) == "paused"
    q.cancel(again)
    assert state(store, again) == "cancelled"
    q.shutdown()     # before the store goes: no queued start-up check may touch it
    store.close()
