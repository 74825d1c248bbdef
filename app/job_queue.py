"""The job queue: one training worker at a time, driven from the Store so it survives a crash.

Every state change is written to the Store before it is announced, so whatever the app
shows can be rebuilt from the database after a restart (or a SIGKILL).
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import psutil
from PySide6.QtCore import QObject, QTimer, Signal

from training_core.config import JobSpec
from training_core.errors import UserError
from training_core.protocol import ENTRY_MODULE

from training_core.preflight import format_bytes, format_duration

from . import settings
from .engine_client import EngineRun, job_args
from .spare_worker import SpareWorker
from .store import Job, Store

SPEC_FILE = "queue-spec.json"   # the spec the queue hands its worker, inside the run folder
DEMO_NAME = "Demo"
FOLLOWER_LEAD_S = 30   # start the next queued job's worker imports this long before the running job ends

_STEP_SUMMARY = ("step", "total_steps", "epoch", "loss", "lr", "tokens_per_s", "eta_s", "elapsed_s",
                 "vram_used", "vram_reserved", "ram_used", "tokens_seen")
_STARTED_SUMMARY = ("total_steps", "device", "precision", "method", "model", "params_total",
                    "params_trainable", "resumed_from")
# The running worker's latest `phase` event, in the summary like the step figures; cleared when it ends.
NO_PHASE = {"phase": None, "phase_message": None, "phase_done": None, "phase_total": None, "phase_unit": None}


def demo_job_spec() -> dict:
    """The bundled demo job as a spec dict, `out` left for the store to fill."""
    from training_core.demo import demo_spec
    spec = demo_spec().to_dict()
    spec.pop("out", None)
    return spec


def phase_text(summary: dict) -> str:
    """What a running job's worker is doing, from its summary's phase: 'Loading the model…',
    'Tokenizing the data: 45 % (12 MB of 26 MB)'; '' while it simply trains or nothing is known."""
    phase = summary.get("phase")
    if not phase or phase == "training":
        return ""
    text = summary.get("phase_message") or phase.replace("_", " ").capitalize()
    done, total = summary.get("phase_done"), summary.get("phase_total")
    if isinstance(done, (int, float)) and isinstance(total, (int, float)) and total > 0:
        unit = summary.get("phase_unit")
        figures = (f"{format_bytes(done)} of {format_bytes(total)}" if unit == "bytes"
                   else f"{done:,} of {total:,}" + (f" {unit}" if unit else ""))
        text = f"{text.rstrip('.…')}: {int(100 * done / total)} % ({figures})"
    return text


def phase_fraction(summary: dict) -> float | None:
    """The phase's progress (0..1) when its worker counts it, else None."""
    done, total = summary.get("phase_done"), summary.get("phase_total")
    if summary.get("phase") and isinstance(done, (int, float)) and isinstance(total, (int, float)) and total > 0:
        return min(1.0, max(0.0, done / total))
    return None


def progress_text(job) -> str:
    """'step 40 of 150 (27 %), 1 min 5 s left' from a Job's summary, with what the worker is doing when
    that is more than training ('Loading the model…' before the first step); '' when nothing is known yet.
    Here, not in a view: the dashboard and the tray say it alike."""
    s = job.summary or {}
    doing = phase_text(s) if getattr(job, "state", "running") == "running" else ""
    step, total = s.get("step"), s.get("total_steps")
    if step is None or not total:
        return doing
    text = f"step {step} of {total} ({100 * step // total} %)"
    if s.get("eta_s") is not None and step < total:
        text += f", {format_duration(s['eta_s'])} left"
    return f"{text} · {doing}" if doing else text


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return lines[0] if lines else "The job failed for an unknown reason."


def _kill_orphan(pid: int, spec_path: Path) -> bool:
    """Kill a worker left behind by an app that died, so two workers never share a run folder.
    Only a process whose command line is our engine running this very spec is touched (pids get reused)."""
    try:
        proc = psutil.Process(int(pid))
        cmd = proc.cmdline()
        if ENTRY_MODULE not in cmd or "run" not in cmd:
            return False
        if str(spec_path) not in cmd and not ("--spare" in cmd and _holds(proc, spec_path.parent / ".lock")):
            return False   # a spare worker names its job on stdin: it is this job's if it holds its run folder
        proc.kill()
    except Exception:   # gone already, not ours, or not allowed: nothing to do
        return False
    # Not our child, so it may linger as a zombie until its new parent reaps it: dead is enough.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.Error:
            break
        time.sleep(0.05)
    return True


def _holds(proc: psutil.Process, path: Path) -> bool:
    """`proc` has `path` open (the engine keeps RUN_DIR/.lock open while it works in the folder)."""
    target = os.path.realpath(path)
    return any(os.path.realpath(f.path) == target for f in proc.open_files())


class JobQueue(QObject):
    job_changed = Signal(int)        # a job's state or summary changed
    job_event = Signal(int, dict)    # every event of the running job
    queue_changed = Signal()         # jobs added, removed (finished/cancelled) or reordered; pause-all toggled
    # For the GPU's other user (swarm contribution): a job's worker started / ended.
    gpu_job_started = Signal(int)
    gpu_job_ended = Signal(int)

    def __init__(self, store: Store, parent=None, autostart: bool = True):
        super().__init__(parent)
        self.store = store
        self.autostart = autostart
        self._worker: EngineRun | None = None
        self._job_id: int | None = None
        self._intent: str | None = None     # why we asked the worker to stop: "cancel" or "shutdown"
        self._seen: set[str] = set()        # event types seen from the current worker
        self._phase_said: tuple | None = None   # the current worker's last (phase, message) put in the log
        self._resuming = False              # the current worker continues from a checkpoint
        self._shutting_down = False
        self._serial = 0                          # which worker the slots listen to
        self._retired: list[EngineRun] = []   # ended workers, deleted when the next one starts
        self._recovered = False
        self._gate_held = False             # the gate said no to the next job the last time it was asked
        # Consulted before a job's worker starts; False holds the queue until reconsider() (the swarm
        # contribution uses it to hand the GPU over first, or to keep it while the swarm has priority).
        self.gate: Callable[[Job], bool] | None = None
        self.spare = SpareWorker(self)      # a worker that imports the engine before its job (expect_job)
        self._spare_for_follower = False    # started by _prepare_follower, for a job already queued
        if autostart:
            # recover() is the start-up entry point; run it even if the caller forgets.
            QTimer.singleShot(0, self.recover)

    # ---- queries --------------------------------------------------------------------------
    @property
    def paused_all(self) -> bool:
        return settings.PAUSED_ALL.get(self.store)

    def running_job(self) -> Job | None:
        """The job that has a worker (training, or paused with its worker waiting)."""
        return self.store.get_job(self._job_id) if self._worker is not None else None

    def worker_pid(self) -> int | None:
        return self._worker.pid if self._worker is not None else None

    def waiting_job(self) -> Job | None:
        """The job that would start next if nothing held the queue (None while everything is paused)."""
        if self.paused_all or self._shutting_down:
            return None
        return self.store.next_queued()

    def cancelling(self, job_id: int) -> bool:
        """A cancel was asked for this job and its worker is still saving and stopping."""
        return self._owns(job_id) and self._intent == "cancel"

    def wait_reason(self, job: Job) -> str:
        """Why a queued or paused job does not train, in plain words ("" when nothing holds it)."""
        if job.state == "paused":
            return "paused: everything is paused" if job.summary.get("paused_by_all") else "paused by you"
        if job.state != "queued" or self._shutting_down:
            return ""
        if self.paused_all:
            return "waiting: everything is paused"
        running = self.running_job()
        if running is not None and running.id != job.id:
            if running.state == "paused":
                return "waiting: another job is paused (resume or cancel it)"
            return "waiting: another job is running"
        if self._gate_held:
            # The gate's only user is the swarm contribution (app/contribution.py).
            return "waiting: GPU lent to the swarm"
        if not self.autostart:
            return "waiting to be started"
        return ""

    def reconsider(self) -> None:
        """Whatever held the gate shut has changed: try to start the next job."""
        self._schedule()

    # ---- user actions ---------------------------------------------------------------------
    def prepare(self, spec: dict) -> dict:
        """The complete spec the queue runs for `spec` (a form's or the demo's; without `out`, the store
        picks the run folder): Settings' checkpoint interval filled in, every JobSpec field present with a
        fixed job_id, checked by training_core.config.validate. New finetune's Check plans this very spec.
        Raises a UserError (one plain line) when it cannot run."""
        spec = dict(spec)
        if spec.get("checkpoint_every") is None and "checkpoint_minutes" not in spec:
            minutes = settings.CHECKPOINT_MINUTES.get(self.store)
            if minutes > 0:
                spec["checkpoint_minutes"] = float(minutes)
        full = JobSpec.from_dict({**spec, "out": spec.get("out") or "-"}).to_dict()
        if not spec.get("out"):
            del full["out"]
        return full

    def submit(self, spec: dict, name: str) -> int:
        """Queue a job: validated once (prepare) and stored once, complete, so every worker for this job
        sees the same spec. Raises a UserError (one plain line) when the spec is not valid."""
        job = self.store.add_job(self.prepare(spec), name)
        self.queue_changed.emit()
        self.job_changed.emit(job.id)
        self._schedule()
        return job.id

    def submit_demo(self) -> int:
        """Queue the bundled demo job (every "Try the demo" button); its id."""
        return self.submit(demo_job_spec(), DEMO_NAME)

    def pause(self, job_id: int) -> None:
        job = self.store.get_job(job_id)
        if self._owns(job_id):
            if job.state == "running":
                self._worker.send("pause")    # the state follows the worker's `paused` event
        elif job.state == "queued":
            self._set(job_id, state="paused")

    def resume(self, job_id: int) -> None:
        job = self.store.get_job(job_id)
        if job.state != "paused":
            return
        if self._owns(job_id):
            self._worker.send("resume")       # the state follows the worker's `resumed` event
            self.store.update_job(job_id, summary={"paused_by_all": False})
        else:
            self._set(job_id, state="queued", summary={"paused_by_all": False})
            self._schedule()

    def cancel(self, job_id: int) -> None:
        job = self.store.get_job(job_id)
        if self._owns(job_id):
            if self._intent == "cancel":
                return
            self._intent = "cancel"
            self._worker.send("stop")         # it checkpoints and exits; _on_exit marks it cancelled
            self.job_changed.emit(job_id)     # saving takes seconds: views show "cancelling…" now
        elif job.state in ("queued", "paused", "failed"):
            self._set(job_id, state="cancelled", finished=time.time())
            self._release_follower()
            self.queue_changed.emit()

    def retry(self, job_id: int) -> None:
        """Queue a failed or cancelled job again, at the end; its worker resumes from the last checkpoint.
        A run whose loss diverged goes on with the lower learning rate its failure suggested."""
        job = self.store.get_job(job_id)
        if job.state not in ("failed", "cancelled"):
            return
        lower = job.summary.get("suggested_lr")
        if job.state == "failed" and isinstance(lower, (int, float)) and lower > 0:
            self.store.update_job(job_id, spec={**job.spec, "lr": lower}, summary={"suggested_lr": None})
        self.store.move_job_to_end(job_id)
        self._set(job_id, state="queued", error=None, finished=None)
        self.queue_changed.emit()
        self._schedule()

    def move(self, job_id: int, index: int) -> None:
        self.store.move_job(job_id, index)
        self.queue_changed.emit()

    def pause_all(self) -> None:
        """Start nothing new, and pause the running job (it checkpoints and frees the GPU)."""
        settings.PAUSED_ALL.set(self.store, True)
        if self._worker is not None:
            job = self.store.get_job(self._job_id)
            if job.state == "running":
                self.store.update_job(job.id, summary={"paused_by_all": True})
                self._worker.send("pause")
        self._release_follower()
        self.queue_changed.emit()

    def resume_all(self) -> None:
        settings.PAUSED_ALL.set(self.store, False)
        for job in self.store.list_jobs(("paused",)):
            if job.summary.get("paused_by_all"):
                self.resume(job.id)
        self.queue_changed.emit()
        self._schedule()

    def expect_job(self) -> None:
        """The user is about to queue a job (New finetune is open): start a worker's imports now, so that
        the job, if it starts at once, trains within a second of "Add to queue" (app/spare_worker.py).
        Not while a job's worker runs or everything is paused (the new job would wait anyway), nor when
        Settings say not to (it holds some 0.4 GB of RAM for up to 5 minutes)."""
        if (self._worker is None and not self._shutting_down and not self.paused_all
                and settings.PREPARE_WORKER.get(self.store)):
            self._spare_for_follower = False   # New finetune's now: kept for its TTL, not for a queued job
            self.spare.expect()

    def _prepare_follower(self, eta_s) -> None:
        """The running job ends soon and another is queued behind it: start the next worker's imports now
        (a spare, as for New finetune), so that the next job trains within a second of this one's end
        instead of after a cold start. The spare takes no GPU memory; on a CPU its imports share the cores
        with the last seconds of this job."""
        if (isinstance(eta_s, (int, float)) and eta_s <= FOLLOWER_LEAD_S and self.autostart
                and not self._shutting_down and not self.paused_all
                and settings.PREPARE_WORKER.get(self.store) and self.store.next_queued() is not None):
            if self.spare.pid() is None:
                self._spare_for_follower = True
            self.spare.expect()

    def _release_follower(self) -> None:
        """A spare started for a queued follower whose job is gone (cancelled, or everything paused) is let go
        now rather than holding its ~0.4 GB of RAM for the rest of its TTL; one New finetune asked for stays."""
        if self._spare_for_follower and (self.paused_all or self.store.next_queued() is None):
            self._spare_for_follower = False
            self.spare.drop()

    def start_next(self) -> None:
        """Start the next queued job now if nothing runs (also when autostart is off)."""
        self._maybe_start_next(force=True)

    # ---- start-up and quit ----------------------------------------------------------------
    def recover(self) -> None:
        """At start-up: a job left 'running' by an app that died goes first, resuming from its checkpoint."""
        if self._recovered or self._shutting_down:
            return
        self._recovered = True
        for job in self.store.list_jobs(("running", "paused")):
            if self._owns(job.id):
                continue
            pid = job.summary.get("worker_pid")
            if pid:
                _kill_orphan(pid, Path(job.run_dir) / SPEC_FILE)
            if job.state == "running":
                self.store.add_event(job.id, {"type": "recovered", "time": time.time(),
                                              "message": "Modron was closed while this job ran; "
                                                         "it continues from its last checkpoint"})
                self.store.move_job(job.id, 0)
                self._set(job.id, state="queued", summary={"worker_pid": None, **NO_PHASE})
        self.queue_changed.emit()
        self._schedule()

    def shutdown(self, timeout_ms: int = 30000) -> None:
        """Quit: the running worker checkpoints and stops (killed after timeout_ms); the job resumes next start.
        Blocks, on purpose: the app is going away."""
        self._shutting_down = True
        self.spare.shutdown()
        w = self._worker
        if w is None:
            return
        job_id = self._job_id
        self._intent = "shutdown"
        w.send("stop")
        if not w.wait(timeout_ms):
            w.kill()
            w.wait(5000)
        if self._worker is w:   # no exit notice came through: record the outcome ourselves
            self._worker, self._job_id = None, None
            w.retire()
            self._retired.append(w)
            self._requeue_front(job_id)

    # ---- internals ------------------------------------------------------------------------
    def _owns(self, job_id: int) -> bool:
        return self._worker is not None and self._job_id == job_id

    def _set(self, job_id: int, **fields) -> None:
        self.store.update_job(job_id, **fields)
        self.job_changed.emit(job_id)

    def _requeue_front(self, job_id: int) -> None:
        self.store.move_job(job_id, 0)
        self._set(job_id, state="queued", summary={"worker_pid": None, **NO_PHASE})

    def _schedule(self) -> None:
        # Later, from the event loop: never start a process from inside another one's signal.
        QTimer.singleShot(0, self._maybe_start_next)

    def _maybe_start_next(self, force: bool = False) -> None:
        if (not (self.autostart or force)) or self._shutting_down or self._worker is not None or self.paused_all:
            return
        job = self.store.next_queued()
        if job is None:
            self._set_gate_held(False)
            self._release_follower()
        elif self.gate is None or self.gate(job):
            self._set_gate_held(False)
            self._start(job)
        else:
            self._set_gate_held(True)

    def _set_gate_held(self, held: bool) -> None:
        if held != self._gate_held:
            self._gate_held = held
            self.queue_changed.emit()     # the queue view says why the next job waits

    def _start(self, job: Job) -> None:
        spec_path = Path(job.run_dir) / SPEC_FILE
        try:
            JobSpec.from_dict(job.spec, where=f"job {job.name!r}").save(spec_path)
        except (UserError, OSError) as exc:
            self._set(job.id, state="failed", error=_one_line(str(exc)), finished=time.time())
            self.queue_changed.emit()
            self._schedule()
            return
        resume = job.attempts > 0
        for old in self._retired:      # ended workers are deleted here, never inside their own signals
            old.deleteLater()
        self._retired = []
        self._serial += 1
        spare = self.spare.take(self)
        self._spare_for_follower = False
        w = spare or EngineRun(job_args(spec_path, resume), job.run_dir, parent=self)
        # The slots name the worker by a number, not by the object (see app/contribution.py).
        w.event.connect(lambda ev, jid=job.id, n=self._serial: self._on_event(jid, n, ev))
        w.exited.connect(lambda code, reason, jid=job.id, n=self._serial: self._on_exit(jid, n, code, reason))
        self._worker, self._job_id, self._intent, self._seen = w, job.id, None, set()
        self._phase_said = None
        self._resuming = resume
        self.store.update_job(job.id, state="running", attempts=job.attempts + 1, started=job.started or time.time(),
                              finished=None, error=None)
        if spare is not None:
            w.assign(spec_path, resume, job.run_dir)   # the spare has imported the engine already
        else:
            w.start()
        self._set(job.id, summary={"worker_pid": w.pid, **NO_PHASE})
        self.queue_changed.emit()
        self.gpu_job_started.emit(job.id)

    def _on_event(self, job_id: int, serial: int, ev: dict) -> None:
        w = self._worker
        if serial != self._serial or w is None:
            return
        t = ev["type"]
        started_before = "started" in self._seen
        self._seen.add(t)
        store = self.store
        if t in ("step", "eval"):
            store.add_metric(job_id, ev)
        elif t != "phase" or (ev.get("phase"), ev.get("message")) != self._phase_said:
            store.add_event(job_id, ev)   # a phase's progress updates (4 a second) only reach the summary
            if t == "phase":
                self._phase_said = (ev.get("phase"), ev.get("message"))
        summary: dict = {}
        fields: dict = {}
        if t == "phase":
            summary = {"phase": ev.get("phase"), "phase_message": ev.get("message"), "phase_done": ev.get("done"),
                       "phase_total": ev.get("total"), "phase_unit": ev.get("unit")}
        elif t == "step":
            summary = {k: ev.get(k) for k in _STEP_SUMMARY}
            self._prepare_follower(ev.get("eta_s"))
        elif t == "eval":
            summary = {"eval_loss": ev.get("eval_loss"), "perplexity": ev.get("perplexity")}
        elif t == "started":
            if self._resuming or started_before:
                # Steps after the checkpoint are done again (a resumed worker, or one that went back to
                # its last good checkpoint after the loss diverged): drop their old points so the chart
                # holds one history (all of it when there was no checkpoint to resume from).
                store.truncate_metrics(job_id, ev.get("resumed_from"))
            summary = {k: ev.get(k) for k in _STARTED_SUMMARY}
            summary["worker_pid"] = ev.get("pid") or w.pid
        elif t == "checkpoint":
            summary = {"checkpoint": ev.get("path"), "checkpoint_step": ev.get("step")}
        elif t == "paused":
            fields["state"] = "paused"
            summary = {"step": ev.get("step"), "vram_used": ev.get("vram_used"), "checkpoint": ev.get("checkpoint"),
                       **NO_PHASE}
            # The worker reads the controls that arrived together as one batch and, once paused, waits for
            # new ones: a stop or resume sent while the pause was pending may be lost. Say it again now.
            if self._intent in ("cancel", "shutdown"):
                w.send("stop")
            elif store.get_job(job_id).summary.get("paused_by_all") and not self.paused_all:
                w.send("resume")
                summary["paused_by_all"] = False
        elif t == "resumed":
            fields["state"] = "running"
        elif t == "finished":
            summary = {"step": ev.get("step"), "loss": ev.get("final_loss"), "final_loss": ev.get("final_loss"),
                       "final_eval_loss": ev.get("final_eval_loss"), "elapsed_s": ev.get("elapsed_s"),
                       "checkpoint": ev.get("checkpoint"), "eta_s": 0}
            if ev.get("final_eval_loss") is not None:
                summary["eval_loss"] = ev["final_eval_loss"]
            if ev.get("perplexity") is not None:
                summary["perplexity"] = ev["perplexity"]
        if summary or fields:
            store.update_job(job_id, summary=summary, **fields)
            self.job_changed.emit(job_id)
        self.job_event.emit(job_id, ev)

    def _on_exit(self, job_id: int, serial: int, code: int, reason: str) -> None:
        w = self._worker
        if serial != self._serial or w is None:
            return
        self._worker, self._job_id = None, None
        intent, seen = self._intent, self._seen
        self._intent = None
        w.retire()
        self._retired.append(w)
        self.store.update_job(job_id, summary=NO_PHASE)   # nothing is being done any more
        now = time.time()
        if code == 0 and "finished" in seen:
            self._set(job_id, state="finished", finished=now, error=None, summary={"worker_pid": None})
        elif intent == "cancel":
            self._set(job_id, state="cancelled", finished=now, summary={"worker_pid": None})
        elif intent == "shutdown":
            if self.store.get_job(job_id).state == "paused":   # the user paused it: it stays paused
                self._set(job_id, summary={"worker_pid": None})
            else:
                self._requeue_front(job_id)
        elif code == 0 and "stopped" in seen:
            # Stopped from outside (SIGTERM at logout): keep it, as if the user had paused it.
            self._set(job_id, state="paused", summary={"worker_pid": None})
        else:
            if code == 0:
                reason = "The training process exited without finishing; details are in worker.log in the run folder."
            summary: dict = {"worker_pid": None}
            failed = w.last_failed or {}
            error = _one_line(reason)
            lower = failed.get("suggested_lr")
            if failed.get("code") == "diverged" and isinstance(lower, (int, float)):
                summary["suggested_lr"] = lower
                error += f". Retry goes on from there with learning rate {lower:g}."
            self._set(job_id, state="failed", finished=now, error=error, summary=summary)
        self.queue_changed.emit()
        self.gpu_job_ended.emit(job_id)
        if not self._shutting_down:
            self._schedule()
