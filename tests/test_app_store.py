"""The app's SQLite store: schema, WAL, jobs, metrics, events, settings, reopening, sharing;
and what it is for: the app SIGKILLed mid-job, restarted, finds its queue and chart history intact."""
import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import json
import math
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import numpy as np
import pytest

from app.job_queue import JobQueue
from app.store import JOB_STATES, SCHEMA_VERSION, Store
from helpers import tiny_job as tiny_spec
from training_core.errors import UserError
from training_core.paths import data_dir

ROOT = Path(__file__).resolve().parents[1]
WAIT = 90_000   # ms; a worker needs a few seconds to import torch, more on a busy 2-core machine


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "db" / "modron.sqlite3")
    yield s
    s.close()


def test_schema_and_wal(store):
    tables = {r[0] for r in sqlite3.connect(store.path).execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"schema_version", "jobs", "metrics", "events", "settings"} <= tables
    other = sqlite3.connect(store.path)
    assert other.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.set_setting("x", 1)
    assert store.path.with_name(store.path.name + "-wal").exists()


def test_default_path_is_in_the_data_folder():
    s = Store.open_default()
    try:
        assert s.path == data_dir() / "modron.sqlite3" and s.path.exists()
        job = s.add_job({"model": "scratch:tiny", "data": ["x.txt"]}, "demo")
        assert job.run_dir == str(data_dir() / "runs" / "job-00001") == job.spec["out"]
    finally:
        s.close()


def test_a_newer_schema_is_refused_in_plain_words(tmp_path):
    path = tmp_path / "m.sqlite3"
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE schema_version SET version = 99")
    db.commit()
    db.close()
    with pytest.raises(UserError, match="newer Modron"):
        Store(path)


def test_jobs_add_list_order_move_update(store):
    a = store.add_job({"model": "scratch:tiny", "data": ["a.txt"]}, "A")
    b = store.add_job({"model": "scratch:tiny", "data": ["b.txt"], "out": "/somewhere/b"}, "B")
    c = store.add_job({"model": "scratch:tiny", "data": ["c.txt"]}, "C")
    assert [j.name for j in store.list_jobs()] == ["A", "B", "C"]
    assert a.state == "queued" and a.attempts == 0 and a.started is None and a.summary == {}
    assert a.run_dir == str(store.path.parent / "runs" / "job-00001")
    assert b.run_dir == "/somewhere/b"            # a given out is kept
    assert store.get_job(c.id).spec["data"] == ["c.txt"]

    store.move_job(c.id, 0)
    assert [j.name for j in store.list_jobs()] == ["C", "A", "B"]
    store.move_job(c.id, 99)                      # clamped to the end
    assert [j.name for j in store.list_jobs()] == ["A", "B", "C"]
    assert store.next_queued().id == a.id

    store.update_job(a.id, state="paused")
    assert store.next_queued().id == b.id          # a paused job is skipped
    store.update_job(b.id, state="finished", finished=123.0)
    assert store.next_queued().id == c.id
    # Moving among the queue's jobs leaves the finished one where it was.
    store.move_job(c.id, 0)
    assert [j.name for j in store.list_jobs(("queued", "paused"))] == ["C", "A"]
    assert [j.name for j in store.list_jobs(("finished",))] == ["B"]
    with pytest.raises(KeyError):
        store.move_job(b.id, 0)

    store.update_job(a.id, summary={"step": 3, "loss": 2.5}, attempts=1)
    j = store.update_job(a.id, summary={"step": 4}, error="boom")
    assert j.summary == {"step": 4, "loss": 2.5}   # merged, not replaced
    assert j.attempts == 1 and j.error == "boom"
    with pytest.raises(ValueError):
        store.update_job(a.id, state="exploded")
    with pytest.raises(TypeError):
        store.update_job(a.id, colour="red")
    with pytest.raises(KeyError):
        store.get_job(999)
    assert set(JOB_STATES) == {"queued", "running", "paused", "finished", "failed", "cancelled"}


def test_metrics_round_trip(store):
    job = store.add_job({"model": "scratch:tiny", "data": ["a.txt"]}, "A")
    for i in range(1, 6):
        store.add_metric(job.id, {"type": "step", "time": 100.0 + i, "step": i, "loss": 5.0 - i / 10,
                                  "lr": 1e-3, "tokens_per_s": 1000.0 + i, "vram_used": 0, "vram_reserved": 0,
                                  "ram_used": 10_000_000, "eta_s": 10 - i, "elapsed_s": i * 1.5})
    store.add_metric(job.id, {"type": "eval", "time": 105.5, "step": 5, "eval_loss": 4.2, "perplexity": 66.7})
    store.add_metric(job.id, {"type": "step", "time": 107.0, "step": 6, "loss": None, "lr": 1e-3,
                              "tokens_per_s": 999.0, "elapsed_s": 9.0})
    other = store.add_job({"model": "scratch:tiny", "data": ["b.txt"]}, "B")
    store.add_metric(other.id, {"type": "step", "time": 1.0, "step": 1, "loss": 9.0, "elapsed_s": 0.1})

    m = store.metrics(job.id)
    assert m["step"] == [1, 2, 3, 4, 5, 6]
    assert m["loss"][:5] == pytest.approx([4.9, 4.8, 4.7, 4.6, 4.5]) and m["loss"][5] is None
    assert m["tokens_per_s"][0] == 1001.0 and m["ram_used"][0] == 10_000_000
    assert m["elapsed_s"] == pytest.approx([1.5, 3.0, 4.5, 6.0, 7.5, 9.0])
    assert m["eval_step"] == [5] and m["eval_loss"] == [4.2] and m["eval_perplexity"] == [66.7]
    assert m["eval_elapsed_s"] == [7.5]     # placed on the training clock of its step
    assert len(m["time"]) == 6 and m["time"] == sorted(m["time"])
    assert store.metrics(other.id)["loss"] == [9.0]
    assert store.metric_count(job.id) == 7

    # What the charts load: the same series as float arrays, NaN where a value is missing.
    a = store.metric_arrays(job.id)
    assert a.keys() == m.keys()
    for key, values in m.items():
        assert a[key].dtype == np.float64 and len(a[key]) == len(values), key
        assert [None if np.isnan(x) else x for x in a[key].tolist()] == values, key
    assert store.metric_arrays(other.id)["loss"].tolist() == [9.0]

    assert store.truncate_metrics(job.id, 3) == 4   # steps 4, 5, 6 and the eval at 5
    m = store.metrics(job.id)
    assert m["step"] == [1, 2, 3] and m["eval_step"] == []
    store.truncate_metrics(job.id, None)
    assert store.metrics(job.id)["step"] == []
    assert store.metrics(other.id)["step"] == [1]
    with pytest.raises(ValueError):
        store.add_metric(job.id, {"type": "sample", "step": 1})


def test_events_and_settings(store):
    job = store.add_job({"model": "scratch:tiny", "data": ["a.txt"]}, "A")
    store.add_event(job.id, {"type": "warning", "time": 1.0, "code": "data", "message": "short file"})
    store.add_event(job.id, {"type": "sample", "time": 2.0, "step": 4, "prompt": "Once", "text": "upon ✓"})
    store.add_event(job.id, {"type": "checkpoint", "time": 3.0, "step": 4, "path": "/x", "reason": "periodic"})
    assert [e["type"] for e in store.events(job.id)] == ["warning", "sample", "checkpoint"]
    assert store.events(job.id, {"sample"})[0]["text"] == "upon ✓"
    assert [e["type"] for e in store.events(job.id, {"warning", "checkpoint"})] == ["warning", "checkpoint"]
    assert store.events(job.id + 1) == []

    assert store.get_setting("missing") is None and store.get_setting("missing", 7) == 7
    store.set_setting("contribute_while_idle", True)
    store.set_setting("checkpoint_minutes", 12.5)
    store.set_setting("window", {"w": 800, "h": [1, 2]})
    store.set_setting("checkpoint_minutes", 15)          # overwrite
    assert store.get_setting("contribute_while_idle") is True
    assert store.get_setting("checkpoint_minutes") == 15
    assert store.get_setting("window") == {"w": 800, "h": [1, 2]}


def test_reopen_keeps_everything_and_a_second_store_sees_commits(tmp_path):
    path = tmp_path / "modron.sqlite3"
    s1 = Store(path)
    job = s1.add_job({"model": "scratch:tiny", "data": ["a.txt"]}, "A")
    s1.update_job(job.id, state="running", summary={"step": 2}, attempts=1, started=50.0)
    s1.add_metric(job.id, {"type": "step", "time": 1.0, "step": 2, "loss": 3.0, "elapsed_s": 1.0})
    s1.add_event(job.id, {"type": "checkpoint", "time": 2.0, "step": 2, "path": "/p", "reason": "periodic"})
    s1.set_setting("paused_all", True)

    # A second Store on the same file (another process would see the same): reads what s1 committed...
    s2 = Store(path)
    assert s2.get_job(job.id).summary == {"step": 2}
    assert s2.metrics(job.id)["loss"] == [3.0]
    # ...and s1 reads what s2 writes, while both are open.
    s2.add_job({"model": "scratch:tiny", "data": ["b.txt"]}, "B")
    s2.add_metric(job.id, {"type": "step", "time": 3.0, "step": 3, "loss": 2.0, "elapsed_s": 2.0})
    assert [j.name for j in s1.list_jobs()] == ["A", "B"]
    assert s1.metrics(job.id)["step"] == [2, 3]
    s2.close()
    s1.close()

    s3 = Store(path)
    try:
        j = s3.get_job(job.id)
        assert (j.state, j.attempts, j.started, j.name) == ("running", 1, 50.0, "A")
        assert [x.name for x in s3.list_jobs()] == ["A", "B"]
        assert s3.metrics(job.id)["loss"] == [3.0, 2.0]
        assert s3.events(job.id)[0]["path"] == "/p"
        assert s3.get_setting("paused_all") is True
        # Ids keep counting up: a new job never reuses an old run folder.
        assert s3.add_job({"model": "scratch:tiny", "data": ["c.txt"]}, "C").id == 3
    finally:
        s3.close()


def test_writes_from_several_threads(store):
    job = store.add_job({"model": "scratch:tiny", "data": ["a.txt"]}, "A")

    def writer(k):
        for i in range(50):
            store.add_metric(job.id, {"type": "step", "time": k * 1000 + i, "step": i, "loss": float(k),
                                      "elapsed_s": float(i)})
            store.update_job(job.id, summary={f"t{k}": i})

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.metric_count(job.id) == 200
    assert store.get_job(job.id).summary == {"t0": 49, "t1": 49, "t2": 49, "t3": 49}
    assert not any(math.isnan(x) for x in store.metrics(job.id)["loss"])


# ---- crash recovery with real workers ------------------------------------------------------
def latest_checkpoint_step(run_dir) -> int | None:
    steps = [int(m.group(1)) for p in (Path(run_dir) / "checkpoints").glob("ckpt-*")
             if (m := re.fullmatch(r"ckpt-(\d+)", p.name))]
    return max(steps) if steps else None


APP_SCRIPT = """
import os, sys
os.environ["QT_QPA_PLATFORM"] = "offscreen"
sys.path.insert(0, {root!r})
import json
from PySide6.QtCore import QCoreApplication
from app.store import Store
from app.job_queue import JobQueue
app = QCoreApplication([])
store = Store.open_default()
queue = JobQueue(store)
queue.submit(json.loads({spec!r}), "crashy")
app.exec()
"""


def test_app_killed_mid_job_resumes_and_a_killed_worker_fails_then_retries(qtbot, tmp_path, queues):
    spec = tiny_spec(tmp_path, steps=24, checkpoint_every=3, test_sleep_per_step=0.12)
    script = tmp_path / "app.py"
    script.write_text(APP_SCRIPT.format(root=str(ROOT), spec=json.dumps(spec)), encoding="utf-8")
    app_log = open(tmp_path / "app.log", "wb")
    app = subprocess.Popen([sys.executable, str(script)], stdout=app_log, stderr=app_log)
    try:
        watcher = Store.open_default()      # a second connection, reading what the app commits
        qtbot.waitUntil(lambda: bool(watcher.list_jobs() and watcher.events(watcher.list_jobs()[0].id,
                                                                               {"checkpoint"})), timeout=WAIT)
        job = watcher.list_jobs()[0]
        orphan = job.summary["worker_pid"]
        assert psutil.pid_exists(orphan)
        # SIGKILL the app only, as a crash would: its worker is left behind without a parent.
        app.send_signal(signal.SIGKILL)
        app.wait(10)
        killed_at = time.time()
        watcher.close()
    finally:
        if app.poll() is None:
            app.kill()
        app_log.close()
    pre = Store.open_default()
    before = pre.metrics(job.id)
    assert pre.get_job(job.id).state == "running" and before["step"]
    pre.close()

    # Start "the app" again on the same data folder.
    store = Store.open_default()
    q = JobQueue(store)
    queues.append(q)
    events: list[dict] = []
    q.job_event.connect(lambda jid, ev: events.append(ev))
    assert [j.name for j in store.list_jobs()] == ["crashy"]
    q.recover()
    # The orphan worker is gone before the new one touches the run folder.
    assert not psutil.pid_exists(orphan) or psutil.Process(orphan).status() == psutil.STATUS_ZOMBIE
    ckpt = latest_checkpoint_step(job.run_dir)
    assert ckpt is not None and ckpt >= 3
    qtbot.waitUntil(lambda: any(e["type"] == "started" for e in events), timeout=WAIT)
    started = next(e for e in events if e["type"] == "started")
    assert started["resumed_from"] == ckpt
    assert store.get_job(job.id).attempts == 2

    # Now the worker dies under a running app (an OOM kill): failed, in plain words.
    qtbot.waitUntil(lambda: any(e["type"] == "checkpoint" and e["step"] > ckpt for e in events), timeout=WAIT)
    os.kill(q.worker_pid(), signal.SIGKILL)
    qtbot.waitUntil(lambda: store.get_job(job.id).state == "failed", timeout=WAIT)
    failed = store.get_job(job.id)
    assert "killed" in failed.error and "\n" not in failed.error
    assert q.running_job() is None
    ckpt2 = latest_checkpoint_step(job.run_dir)
    assert ckpt2 > ckpt

    # Retry resumes from the newest checkpoint and finishes.
    events.clear()
    q.retry(job.id)
    qtbot.waitUntil(lambda: store.get_job(job.id).state in ("finished", "failed"), timeout=WAIT)
    done = store.get_job(job.id)
    assert done.state == "finished", done.error
    assert next(e for e in events if e["type"] == "started")["resumed_from"] == ckpt2
    assert done.attempts == 3

    # The chart history spans the crash: points from the first app and from this one, one per step.
    m = store.metrics(job.id)
    assert min(m["time"]) < killed_at < max(m["time"])
    assert [s for s, t in zip(m["step"], m["time"]) if t < killed_at] == [s for s in before["step"] if s <= ckpt]
    assert m["step"] == sorted(set(m["step"])) and m["step"][-1] == 24
    assert store.events(job.id, {"recovered"})
    assert "killed" in (Path(job.run_dir) / "worker.log").read_text(encoding="utf-8")
    q.shutdown()     # before the store goes: no queued start-up check may touch it
    store.close()
