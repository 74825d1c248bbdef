"""The spare worker (app/spare_worker.py): New finetune starts a worker's imports before the job exists, and
the queue hands that very process the job on "Add to queue". Real workers (scratch:tiny, one thread)."""
import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import subprocess
import sys

import psutil

from app import settings
from app.job_queue import JobQueue, _kill_orphan
from app.spare_worker import SpareWorker
from app.views.new_finetune import NewFinetuneView
from helpers import engine_job, tiny_job
from training_core.config import JobSpec
from training_core.protocol import decode_event, encode, make_control

WAIT = 90_000   # ms: imports take seconds on a busy 2-core machine


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_new_finetune_prepares_a_spare_that_the_queued_job_runs_in(qtbot, tmp_path, store, queues):
    settings.PREPARE_WORKER.set(store, True)
    q = JobQueue(store)
    queues.append(q)
    view = NewFinetuneView(store, q)
    qtbot.addWidget(view)
    view.show()                                    # the user opens New finetune
    spare_pid = q.spare.pid()
    assert spare_pid and psutil.pid_exists(spare_pid)
    view.hide(); view.show()                       # shown again: still the one spare
    assert q.spare.pid() == spare_pid
    qtbot.waitUntil(lambda: q.spare._spare.ready_at is not None, timeout=WAIT)   # its imports are done

    job = q.submit(tiny_job(tmp_path, steps=4), "from the spare")
    qtbot.waitUntil(lambda: store.get_job(job).state == "running", timeout=5000)
    assert q.worker_pid() == spare_pid and q.spare.pid() is None   # the very process, taken
    assert store.get_job(job).summary["worker_pid"] == spare_pid
    q.expect_job()                                 # a job runs: no second spare beside it
    assert q.spare.pid() is None
    qtbot.waitUntil(lambda: store.get_job(job).state == "finished", timeout=WAIT)
    with open(os.path.join(store.get_job(job).run_dir, "worker.log"), encoding="utf-8") as fh:
        log = fh.read()
    assert "a spare worker" in log and f"pid {spare_pid}" in log and "ready" in log
    assert "run --spec" in log                     # the job it was handed, as a cold start names it


def test_a_job_queued_before_the_spare_is_ready_waits_for_its_imports_in_that_same_process(qtbot, tmp_path, store,
                                                                                          queues):
    settings.PREPARE_WORKER.set(store, True)
    q = JobQueue(store)
    queues.append(q)
    q.expect_job()
    spare_pid = q.spare.pid()
    job = q.submit(tiny_job(tmp_path, steps=2), "quick user")   # at once: the spare is still importing
    qtbot.waitUntil(lambda: store.get_job(job).state == "finished", timeout=WAIT)
    assert store.get_job(job).summary.get("worker_pid") in (None, spare_pid)
    types = [e["type"] for e in store.events(job)]
    assert "started" in types and "ready" not in types          # the spare's own `ready` is not the job's
    with open(os.path.join(store.get_job(job).run_dir, "worker.log"), encoding="utf-8") as fh:
        log = fh.read()
    assert f"pid {spare_pid}" in log and "still importing" in log


def test_a_spare_no_job_takes_is_let_go_and_none_starts_when_settings_say_no(qtbot, tmp_path, store, queues):
    keeper = SpareWorker()
    keeper._ttl.setInterval(300)                   # TTL_MS, shortened
    keeper.expect()
    pid = keeper.pid()
    assert pid
    qtbot.waitUntil(lambda: _gone(pid), timeout=WAIT)   # its stdin closed after the TTL: it left by itself
    assert keeper.pid() is None
    keeper.expect()                                # a new one for the next visit; quitting ends it
    pid = keeper.pid()
    keeper.shutdown(timeout_ms=WAIT)
    assert _gone(pid)

    settings.PREPARE_WORKER.set(store, False)      # Settings: "Load the training engine before the next job starts"
    q = JobQueue(store, autostart=False)
    queues.append(q)
    q.expect_job()
    assert q.spare.pid() is None


def test_recovery_kills_an_orphaned_spare_only_when_it_holds_that_jobs_run_folder(qtbot, tmp_path):
    """A dead app's worker that came from a spare has no --spec on its command line; recovery knows it by
    the run folder's lock it holds (pids get reused: anything else is left alone)."""
    spec_path = tmp_path / "job-spec.json"
    JobSpec.from_dict(engine_job(tmp_path, steps=100_000, checkpoint_every=100_000)).save(spec_path)
    run_dir = tmp_path / "run"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-m", "training_core.cli", "run", "--spare"], cwd=root,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert decode_event(proc.stdout.readline())["type"] == "ready"
        assert not _kill_orphan(proc.pid, spec_path)              # no job yet: not this job's worker
        proc.stdin.write(encode(make_control("job", spec=str(spec_path), resume=False)))
        proc.stdin.flush()
        while decode_event(proc.stdout.readline())["type"] != "step":
            pass
        assert not _kill_orphan(proc.pid, tmp_path / "other" / "job-spec.json")   # another job's folder
        assert proc.poll() is None
        assert _kill_orphan(proc.pid, run_dir / "job-spec.json")   # the queue's spec sits in the run folder
        assert proc.wait(timeout=30) != 0
    finally:
        proc.kill()


def test_the_next_queued_job_gets_a_spare_started_before_the_running_one_ends(qtbot, tmp_path, store, queues):
    """Queued jobs that follow another start warm too: once the running job is due to end within
    FOLLOWER_LEAD_S, the next one's worker imports beside it, and the queue hands it the next job."""
    settings.PREPARE_WORKER.set(store, True)
    q = JobQueue(store, autostart=False)
    queues.append(q)
    first = q.submit(tiny_job(tmp_path, steps=6), "first")
    q.start_next()
    qtbot.waitUntil(lambda: store.get_job(first).state == "finished", timeout=WAIT)
    assert q.spare.pid() is None                   # nothing queued behind it: no spare

    second = q.submit(tiny_job(tmp_path, steps=6), "second")
    third = q.submit(tiny_job(tmp_path, steps=2), "third")
    spares, pids = [], {}

    def seen(jid, ev):
        if jid == second and ev["type"] == "step":
            spares.append(q.spare.pid())
        if ev["type"] == "started":
            pids[jid] = ev["pid"]
    q.job_event.connect(seen)
    q.autostart = True
    q.start_next()
    qtbot.waitUntil(lambda: store.get_job(third).state == "finished", timeout=WAIT)
    spare_pid = next(p for p in spares if p)        # started while the second job trained...
    assert pids[second] != spare_pid and pids[third] == spare_pid   # ...and the third ran in it
    assert q.spare.pid() is None                    # nothing behind the third: none left waiting


def test_a_spare_started_for_a_queued_job_is_let_go_when_that_job_is_cancelled_or_all_paused(qtbot, tmp_path,
                                                                                             store, queues):
    """The follower's spare holds ~0.4 GB of RAM: once no queued job is left for it (cancelled, or Pause all),
    it goes at once instead of after its 5-minute TTL. One New finetune asked for stays for the user's job."""
    settings.PREPARE_WORKER.set(store, True)
    q = JobQueue(store, autostart=False)
    queues.append(q)
    follower = q.submit(tiny_job(tmp_path, steps=2), "queued behind a running job")
    q.autostart = True              # as if a job ran: its step events report an ETA under FOLLOWER_LEAD_S
    q._prepare_follower(10.0)
    pid = q.spare.pid()
    assert pid
    q.cancel(follower)
    assert q.spare.pid() is None
    qtbot.waitUntil(lambda: _gone(pid), timeout=WAIT)

    q.autostart = False             # (submit's scheduling must not start the job: no job runs here)
    again = q.submit(tiny_job(tmp_path, steps=2), "another")
    q.autostart = True
    q._prepare_follower(10.0)
    assert q.spare.pid()
    q.pause_all()
    assert q.spare.pid() is None
    settings.PAUSED_ALL.set(store, False)

    q.autostart = False
    q.expect_job()                  # New finetune is open: the user is about to queue a job
    mine = q.spare.pid()
    q.autostart = True
    q._prepare_follower(10.0)
    q.autostart = False
    q.cancel(again)                 # the queued one goes; the spare stays for the form's job
    assert q.spare.pid() == mine
    q.spare.drop()
    qtbot.waitUntil(lambda: _gone(mine), timeout=WAIT)


def test_a_spare_that_died_while_waiting_is_replaced_and_never_handed_a_job(qtbot, tmp_path):
    """kill -9 of a waiting spare (or the OOM killer, or failed imports): the next expect() starts a new
    one, and take() never hands over a dead one (once, a deleted dead spare broke the whole queue)."""
    import signal
    keeper = SpareWorker()
    keeper.expect()
    first = keeper.pid()
    qtbot.waitUntil(lambda: keeper._spare.ready_at is not None, timeout=WAIT)
    os.kill(first, signal.SIGKILL)
    qtbot.waitUntil(lambda: not keeper._spare.running(), timeout=WAIT)
    keeper.expect()
    second = keeper.pid()
    assert second and second != first and psutil.pid_exists(second) and not _gone(second)
    qtbot.wait(200)                       # the dead one's deletion runs from the event loop
    os.kill(second, signal.SIGKILL)
    qtbot.waitUntil(lambda: not keeper._spare.running(), timeout=WAIT)
    assert keeper.take(keeper) is None    # dead: the caller starts a worker the usual way
    keeper.expect()
    third = keeper.pid()
    assert third not in (first, second)
    keeper.shutdown(timeout_ms=WAIT)
    assert _gone(third)
