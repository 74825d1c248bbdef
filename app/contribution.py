"""Contribute while idle: the controller between the idle rules and the swarm worker.

Every second it reads the sensors (idle time, battery, programs, GPU), feeds app.idle_policy, and
acts on the answer: a tray notice a few seconds before taking the GPU, then the swarm worker
(`training_core.cli swarm join`, through app/swarm_runner) is launched or resumed; when a rule fails
the worker is told to `pause` and, if no `paused` comes within the grace period, killed. A worker
left paused for long is stopped so its CUDA context goes too. The local finetune queue and the swarm
share one GPU: `gpu_priority` says which one waits (JobQueue.gate is how the queue asks).

A hub model or tokenizer that an invite names is downloaded only with the user's consent: the Swarm
view asks (model, licence class, where it comes from) before joining; the consent is kept with the
invite and given to the worker as `--accept-download ORG/NAME`.

Everything the user would miss after a crash lives in the Store: the joined invite, the rules,
contribution totals per swarm run (absolute values rewritten on every `swarm` event), the swarm's
chart points and recent hand-back latencies.
"""
from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from pathlib import Path

from PySide6.QtCore import QObject, QTimer, Signal

from app import settings
from app.engine_client import EngineRun
from app.idle_policy import Decision, IdlePolicy, IdleRules, Sensors
from app.swarm_runner import Runner, pick_runner
from training_core.errors import ConfigError
from training_core.protocol import ENTRY_MODULE
from training_core.swarm.manifest import SwarmManifest, hub_downloads, make_invite, read_invite
from training_core.swarm.sources import CONSENT_FLAG, consent_problem

DEFAULT_GRACE_S = settings.SWARM_GRACE_S.default
PAUSED_KEEP_S = 300.0          # a worker paused longer than this is stopped (frees its CUDA context)
PRIORITIES = ("local", "swarm")
KEEP_LATENCIES = 50
RETRY_FIRST_S, RETRY_MAX_S = 60.0, 1800.0

# Worker states in which the swarm holds (or is about to hold) the GPU.
ACTIVE = ("starting", "contributing", "resuming")
WATCH_MS = 100   # while contributing: how often the user's return is looked for (bench/yield_latency.py)
# Rules that a reason of ours (local job, no invite...) may replace: the user-set ones stay visible.
_GATEABLE = ("ok", "user_active", "idle_unknown")


# --- settings --------------------------------------------------------------------------------

def load_rules(store) -> tuple[IdleRules, str]:
    """The stored rules (defaults when none or unreadable) and a plain problem line, or ""."""
    problem = ""
    try:
        rules = IdleRules.from_dict(settings.IDLE_RULES.get(store))
    except ConfigError as exc:
        rules, problem = IdleRules(), f"Your contribution rules could not be read ({exc}); using the defaults."
    # enabled and snooze_until are the tray's settings (one source for each)
    rules.enabled = bool(settings.CONTRIBUTE.get(store))
    until = settings.SNOOZE_UNTIL.get(store)
    rules.snooze_until = float(until) if until is not None else None
    return rules, problem


def save_rules(store, rules: IdleRules) -> None:
    # enabled and snooze_until belong to the tray's settings; keep one source for each.
    data = rules.to_dict()
    data.pop("enabled", None)
    data.pop("snooze_until", None)
    settings.IDLE_RULES.set(store, data)


def grace_s(store) -> float:
    value = settings.SWARM_GRACE_S.get(store)
    return float(value) if value > 0 else DEFAULT_GRACE_S


def gpu_priority(store) -> str:
    value = settings.GPU_PRIORITY.get(store)
    return value if value in PRIORITIES else settings.GPU_PRIORITY.default


def joined_manifest(store) -> SwarmManifest | None:
    text = settings.SWARM_INVITE.get(store)
    if not text:
        return None
    try:
        return read_invite(text)
    except ConfigError:
        return None


def join_invite(store, text_or_path, accept_downloads=()) -> SwarmManifest:
    """Check an invite (text or a file) and remember it, with the hub downloads the user agreed to.
    Raises ConfigError (one plain line) when bad, or when it needs a download not in `accept_downloads`."""
    manifest = read_invite(text_or_path)
    problem = consent_problem(manifest, list(accept_downloads))
    if problem:
        raise ConfigError("invite", problem)
    settings.SWARM_INVITE.set(store, make_invite(manifest))
    settings.SWARM_DOWNLOAD_CONSENT.set(store, sorted({repo for _, repo in hub_downloads(manifest)}))
    return manifest


def forget_invite(store) -> None:
    """Leave the swarm as far as the settings go: its invite and the downloads agreed to for it."""
    settings.SWARM_INVITE.set(store, None)
    settings.SWARM_DOWNLOAD_CONSENT.set(store, None)


def missing_consent(store, manifest: SwarmManifest) -> list[str]:
    """Hub ids this swarm would download that the user has not agreed to (no network, no cache look-up)."""
    agreed = set(settings.SWARM_DOWNLOAD_CONSENT.get(store))
    return [repo for _, repo in hub_downloads(manifest) if repo not in agreed]


def consent_args(store, manifest: SwarmManifest) -> list[str]:
    """`--accept-download ORG/NAME` for each hub download of this swarm that the user agreed to."""
    missing = set(missing_consent(store, manifest))
    return [arg for _, repo in hub_downloads(manifest) if repo not in missing for arg in (CONSENT_FLAG, repo)]


def handback_latencies(store) -> list[float]:
    return [float(x) for x in settings.SWARM_HANDBACK_S.get(store) if isinstance(x, (int, float))]


def kill_orphan_peer(store) -> bool:
    """End a swarm worker that a crashed app left running (it would hold the GPU with nobody to pause it).
    Only a process whose command line is a swarm join is touched: pids get reused."""
    pid = settings.SWARM_WORKER_PID.get(store)
    if not pid:
        return False
    settings.SWARM_WORKER_PID.set(store, None)
    try:
        import psutil
        proc = psutil.Process(int(pid))
        cmd = " ".join(proc.cmdline())
        if ENTRY_MODULE not in cmd or " join" not in cmd:
            return False
        proc.kill()
        return True
    except Exception:   # gone already, not ours, or not allowed
        return False


def _no_sensors(exclude_pids=frozenset()) -> tuple[Sensors, dict]:
    return (Sensors(now=dt.datetime.now(), idle_seconds=None),
            {"idle_source": None, "idle_note": "Modron can't read idle time on this system"})


def default_sensors() -> Callable:
    try:
        from app.idle_sensors import read_sensors
    except ImportError:      # sensors not installed with this build: idle is "unknown"
        return _no_sensors
    return read_sensors


class _GatedPolicy(IdlePolicy):
    """IdlePolicy plus the app's own reasons to wait (a local job, no invite...), which only replace
    the decisions that would otherwise let contribution start or count down to it."""
    block: Decision | None = None

    def _action(self, d: Decision, now: dt.datetime) -> str:
        if self.block is not None and d.rule in _GATEABLE:
            d = self.last = self.block
        return super()._action(d, now)


class Contributor(QObject):
    changed = Signal()                  # state, reason or figures changed
    swarm_event = Signal(dict)          # every event of the swarm worker
    contributing_changed = Signal(bool)
    notify = Signal(str, str)           # title, text: for the tray

    def __init__(self, store, queue=None, *, sensors: Callable | None = None, runner: Runner | None = None,
                 clock: Callable[[], float] = time.monotonic, tick_ms: int = 1000, watch_ms: int | None = None,
                 notify_before_s: float = 10.0, paused_keep_s: float = PAUSED_KEEP_S,
                 join_args: list[str] | None = None, parent=None):
        super().__init__(parent)
        self.store, self.queue = store, queue
        self._sensors = sensors or default_sensors()
        self.runner = runner or pick_runner()
        self.clock = clock
        self.paused_keep_s = paused_keep_s
        self.join_args = list(join_args or [])
        self.policy = _GatedPolicy(load_rules(store)[0], notify_before_s=notify_before_s)

        self.state = "off"             # off | waiting | starting | contributing | pausing | paused | resuming | stopping
        self.reason = ""               # why not contributing, in plain words
        self.rule = ""                 # Decision.rule, or local_job | paused_all | no_invite | unavailable | failed
        self.decision: Decision | None = None   # the idle rules' own answer (before the app's reasons)
        self.notes: dict = {}          # from the sensors: idle_source, idle_note
        self.rules_problem = ""
        self.message = ""              # the last thing that went wrong with the worker, plain words
        self.latencies = handback_latencies(store)
        self.kills = 0
        self.run_id: str | None = None
        self.last_swarm: dict = {}

        self._worker: EngineRun | None = None
        self._contributing = False
        self._pause_sent: tuple[float, float] | None = None   # (perf_counter, clock)
        self._paused_since: float | None = None
        self._stop_sent: float | None = None
        self._stop_after_pause = False
        self._base: dict = {}
        self._session_s = 0.0
        self._last_tick: float | None = None
        self._retry_at: float | None = None
        self._retry_s = RETRY_FIRST_S
        self._hold: tuple[str, str] | None = None   # (invite, message): bad input, wait for a new invite
        self._available: tuple[float, tuple[bool, str]] | None = None
        self._serial = 0                          # which worker the slots listen to
        self._retired: list[EngineRun] = []   # ended workers, deleted when the next one starts

        kill_orphan_peer(store)
        if queue is not None:
            queue.gate = self.local_may_start
            queue.gpu_job_started.connect(self.poke)
            queue.gpu_job_ended.connect(self.poke)
            queue.queue_changed.connect(self.poke)
        self._timer = QTimer(self)
        self._timer.timeout.connect(self.tick)
        if tick_ms > 0:
            self._timer.start(tick_ms)
        # While the GPU is lent, the user's return is looked for every watch_ms (one idle read costs well
        # under a millisecond), not only at the 1 s tick that reads the rules and decides everything else.
        self.watch_ms = watch_ms if watch_ms is not None else (WATCH_MS if tick_ms > 0 else 0)
        self._watch = QTimer(self)
        self._watch.timeout.connect(self._watch_for_return)
        self._watched_idle: float | None = None

    # --- queries ---------------------------------------------------------------------------
    @property
    def worker_pid(self) -> int | None:
        return self._worker.pid if self._worker is not None else None

    @property
    def contributing(self) -> bool:
        return self.state in ACTIVE

    def last_latency(self) -> float | None:
        return self.latencies[-1] if self.latencies else None

    # --- the loop --------------------------------------------------------------------------
    def poke(self, *_args) -> None:
        """Something changed (a setting, the queue): decide again soon, not in the caller's stack."""
        QTimer.singleShot(0, self.tick)

    def tick(self) -> None:
        now = self.clock()
        if self._last_tick is not None and self.state == "contributing":
            self._session_s += max(0.0, now - self._last_tick)
        self._last_tick = now
        rules, self.rules_problem = load_rules(self.store)
        self.policy.rules = rules
        pids = {p for p in (self.worker_pid, self.queue.worker_pid() if self.queue is not None else None) if p}
        try:
            sensors, self.notes = self._sensors(pids)
        except Exception as exc:   # a sensor bug must never take the app down: idle becomes unknown
            sensors, self.notes = Sensors(now=dt.datetime.now(), idle_seconds=None), {
                "idle_source": None, "idle_note": f"reading the sensors failed ({type(exc).__name__}: {exc})"}
        self.policy.block = self._block()
        action, self.decision = self.policy.update(sensors)
        final = self.policy.last
        if action == "warn_start":
            secs = self.policy.notify_before_s if final.allowed else (final.starts_in or 0)
            self.notify.emit("Modron will contribute soon",
                             f"Your computer looks idle: in {secs:.0f} s Modron lends the GPU to a swarm. "
                             "Use the computer or choose Snooze to keep it.")
        self._reconcile(final)
        self._check_timers(final)
        self._set_contributing(self.contributing)
        self._watched_idle = sensors.idle_seconds
        if self.watch_ms > 0 and self.contributing:
            if not self._watch.isActive() or self._watch.interval() != self.watch_ms:
                self._watch.start(self.watch_ms)
        else:
            self._watch.stop()
        self.changed.emit()

    def _watch_for_return(self) -> None:
        """Between ticks while contributing: idle time that went down means input came; decide now."""
        if not self.contributing:
            self._watch.stop()
            return
        try:
            sensors, _notes = self._sensors({p for p in (self.worker_pid,) if p})
        except Exception:   # the tick reports sensor trouble; the watch just waits for it
            return
        idle, before = sensors.idle_seconds, self._watched_idle
        self._watched_idle = idle
        # `before >= 1`: someone already at the keyboard (idle near 0) must not make every look a tick.
        if idle is not None and before is not None and before >= 1.0 and idle < before:
            self.tick()

    def _block(self) -> Decision | None:
        """The app's reasons to wait, in the order the user most needs to hear them."""
        q = self.queue
        if q is not None and q.paused_all:
            return Decision(False, "everything is paused (tray menu)", "paused_all")
        if q is not None:
            job = q.running_job()
            if job is not None:
                return Decision(False, f"a local finetune ({job.name}) has the GPU", "local_job")
            waiting = q.waiting_job()
            if waiting is not None and gpu_priority(self.store) == "local":
                return Decision(False, f"a local finetune ({waiting.name}) is waiting for the GPU", "local_job")
        invite = settings.SWARM_INVITE.get(self.store)
        manifest = joined_manifest(self.store)
        if manifest is None:
            return Decision(False, "join a swarm first: paste an invite in the Swarm view", "no_invite")
        self.run_id = manifest.run_id
        missing = missing_consent(self.store, manifest)
        if missing:   # an invite kept from before consent was asked: ask again by joining again
            return Decision(False, f"the swarm needs your agreement to download {missing[0]}: leave it and "
                                   "join again in the Swarm view", "no_invite")
        if self._hold is not None:
            if self._hold[0] == invite:
                return Decision(False, self._hold[1], "failed")
            self._hold = None
        ok, why = self._runner_available()
        if not ok:
            return Decision(False, why, "unavailable")
        if self._retry_at is not None:
            wait = self._retry_at - self.clock()
            if wait > 0:
                when = f"{wait / 60:.0f} min" if wait >= 90 else f"{wait:.0f} s"
                return Decision(False, f"{self.message or 'the swarm worker stopped'}; trying again in {when}",
                                "failed")
            self._retry_at = None
        return None

    def _runner_available(self) -> tuple[bool, str]:
        # Asking WSL spawns a process: once a minute is plenty.
        now = self.clock()
        if self._available is None or now - self._available[0] > 60:
            self._available = (now, self.runner.available())
        return self._available[1]

    def _reconcile(self, d: Decision) -> None:
        want = self.policy.running
        if self.state not in ACTIVE + ("pausing", "paused", "stopping"):
            self.state = "waiting" if d.rule != "disabled" else "off"
        if not want:
            self.reason, self.rule = d.reason, d.rule
            if self.state in ACTIVE:
                self._pause(d.reason)
            return
        self.reason, self.rule = "", "ok"
        if self._worker is None:
            self._launch()
        elif self.state == "paused":
            self._send("resume")
            self.state, self._paused_since = "resuming", None

    def _check_timers(self, d: Decision) -> None:
        now, grace = self.clock(), grace_s(self.store)
        if self.state == "pausing" and self._pause_sent and now - self._pause_sent[1] > grace:
            self._kill(f"the swarm worker did not pause within {grace:g} s, so Modron stopped it")
        elif self.state == "paused" and not self.policy.running:
            long_paused = self._paused_since is not None and now - self._paused_since > self.paused_keep_s
            if long_paused or d.rule in ("disabled", "no_invite") or self._stop_after_pause:
                self._stop()
        elif self.state == "stopping" and self._stop_sent is not None and now - self._stop_sent > grace:
            self._kill(f"the swarm worker did not stop within {grace:g} s, so Modron ended it")

    # --- actions ---------------------------------------------------------------------------
    def _launch(self) -> None:
        manifest = joined_manifest(self.store)
        if manifest is None:
            return
        folder = Path(self.store.path).parent / "swarm"
        invite_file = folder / "joined-invite.txt"
        folder.mkdir(parents=True, exist_ok=True)
        invite_file.write_text(settings.SWARM_INVITE.get(self.store) + "\n", encoding="utf-8")
        rules = self.policy.rules
        args = ["--invite-file", self.runner.path(invite_file), "--json", "--device", "auto",
                "--vram-fraction", f"{rules.vram_cap_fraction:g}", *consent_args(self.store, manifest)]
        args += self.join_args
        for old in self._retired:      # ended workers are deleted here, never inside their own signals
            old.deleteLater()
        self._retired = []
        self._serial += 1
        w = EngineRun(["swarm", "join", *args], folder / manifest.run_id, parent=self,
                      command=self.runner.command(args))
        # The slots name the worker by a number, not by the object: a connection holding the object
        # it belongs to is a reference cycle through C++ that PySide tears down badly.
        w.event.connect(lambda ev, n=self._serial: self._on_event(n, ev))
        w.exited.connect(lambda code, reason, n=self._serial: self._on_exit(n, code, reason))
        self._worker, self.run_id = w, manifest.run_id
        self._base = self.store.swarm_stats(manifest.run_id)
        self._session_s, self._stop_after_pause, self._pause_sent = 0.0, False, None
        self.state, self.message = "starting", ""
        w.start()
        settings.SWARM_WORKER_PID.set(self.store, w.pid)

    def _send(self, kind: str) -> None:
        if self._worker is not None:
            self._worker.send(kind)

    def _pause(self, reason: str) -> None:
        if self._worker is None or self.state not in ACTIVE:
            return
        self._send("pause")
        self._pause_sent = (time.perf_counter(), self.clock())
        self.state = "pausing"
        self.policy.running = False
        self.reason = reason or self.reason

    def _stop(self) -> None:
        if self._worker is None or self.state == "stopping":
            return
        self._send("stop")
        self.state, self._stop_sent = "stopping", self.clock()

    def _kill(self, message: str) -> None:
        if self._worker is None:
            return
        self.kills += 1
        self.message = message
        self.notify.emit("Modron took the GPU back", message[0].upper() + message[1:] + ".")
        self._worker.kill()

    def leave(self) -> None:
        """Leave the swarm: forget the invite; a running worker leaves the swarm and exits."""
        forget_invite(self.store)
        self._hold, self._retry_at, self.message = None, None, ""
        if self._worker is not None:
            if self.state == "pausing":
                self._stop_after_pause = True
            else:
                self._stop()
        self.policy.running = False
        self.poke()

    def join(self, text_or_path, accept_downloads=()) -> SwarmManifest:
        """Join a swarm (ConfigError when the invite is bad, or names a hub download not in
        `accept_downloads`). A worker of another swarm is stopped."""
        manifest = join_invite(self.store, text_or_path, accept_downloads)
        if self._worker is not None and self.run_id != manifest.run_id:
            self._stop_after_pause = True
            if self.state in ACTIVE:
                self._pause(f"joining {manifest.run_id}")
            else:
                self._stop()
        self._hold, self._retry_at, self.message, self._retry_s = None, None, "", RETRY_FIRST_S
        self.run_id = manifest.run_id
        self.poke()
        return manifest

    def local_may_start(self, job) -> bool:
        """JobQueue.gate: may this local job take the GPU now? When the swarm has it and local jobs
        win, the worker is told to pause at once; the queue is asked again when it has."""
        if self._worker is None or self.state in ("paused",):
            return True
        if self.state == "stopping":
            return False
        if gpu_priority(self.store) == "swarm":
            return False
        self._pause(f"a local finetune ({job.name}) is starting")
        return False

    def shutdown(self, timeout_ms: int = 10000) -> None:
        """Quit: the worker leaves the swarm (killed after timeout_ms). Blocks, on purpose."""
        self._timer.stop()
        self._watch.stop()
        w = self._worker
        if w is None:
            return
        w.send("stop")
        if not w.wait(timeout_ms):
            w.kill()
            w.wait(5000)

    # --- the worker's side -----------------------------------------------------------------
    def _on_event(self, serial: int, ev: dict) -> None:
        if serial != self._serial or self._worker is None:
            return
        t = ev["type"]
        if t == "started" and self.state == "starting":
            self.state = "contributing"
            self._retry_s = RETRY_FIRST_S
        elif t == "paused":
            if self._pause_sent is not None:
                self.latencies = (self.latencies + [time.perf_counter() - self._pause_sent[0]])[-KEEP_LATENCIES:]
                settings.SWARM_HANDBACK_S.set(self.store, [round(x, 4) for x in self.latencies])
                self._pause_sent = None
            self.state, self._paused_since = "paused", self.clock()
            if self._stop_after_pause:
                self._stop()
            if self.queue is not None:
                self.queue.reconsider()
        elif t == "resumed" and self.state == "resuming":
            self.state = "contributing"
        elif t == "swarm":
            self._record_swarm(ev)
        elif t == "failed":
            self.message = str(ev.get("message") or "").strip().splitlines()[0] if ev.get("message") else ""
        self._set_contributing(self.contributing)
        self.swarm_event.emit(ev)
        self.changed.emit()

    def _record_swarm(self, ev: dict) -> None:
        run_id = str(ev.get("run_id") or self.run_id or "")
        if not run_id:
            return
        b = self._base or {}
        theirs = ev.get("contributed_s")
        session_s = float(theirs) if isinstance(theirs, (int, float)) else self._session_s
        totals = {"samples": int(b.get("samples", 0)) + int(ev.get("samples_contributed") or 0),
                  "contributed_s": float(b.get("contributed_s", 0.0)) + session_s,
                  "bytes_up": int(b.get("bytes_up", 0)) + int(ev.get("bytes_up") or 0),
                  "bytes_down": int(b.get("bytes_down", 0)) + int(ev.get("bytes_down") or 0)}
        # The round figures too (DiLoCo workers send them), so a restarted app still shows the last
        # round; not the phase or the next exchange, which are stale once the worker is gone.
        status = {k: ev.get(k) for k in ("time", "peers", "epoch", "loss", "global_samples_per_s", "client_mode")}
        status.update({k: ev[k] for k in ("algorithm", "round", "round_peers", "round_bytes_up", "round_bytes_down")
                       if k in ev})
        self.last_swarm = {**ev, **totals}
        self.store.set_swarm_stats(run_id, last_status=status, **totals)
        self.store.add_swarm_metric(run_id, ev)

    def _on_exit(self, serial: int, code: int, reason: str) -> None:
        w = self._worker
        if serial != self._serial or w is None:
            return
        self._worker = None
        settings.SWARM_WORKER_PID.set(self.store, None)
        w.retire()
        self._retired.append(w)
        expected = self.state in ("stopping", "pausing") or self._stop_after_pause
        if self._pause_sent is not None:    # killed (or gone) before `paused`: the GPU is free now
            self._pause_sent = None
        if not expected and code != 0:
            self.message = reason or self.message or f"the swarm worker stopped (status {code})"
            if code == 2:   # bad input: the same invite will fail the same way
                self._hold = (settings.SWARM_INVITE.get(self.store), self.message)
            else:
                self._retry_at = self.clock() + self._retry_s
                self._retry_s = min(self._retry_s * 2, RETRY_MAX_S)
        elif not expected and code == 0:
            # Ended on its own (a --minutes/--steps bound): start again only after a pause.
            self._retry_at = self.clock() + 10
        self.state, self._stop_after_pause, self._paused_since, self._stop_sent = "waiting", False, None, None
        self.policy.running = False
        self._set_contributing(False)
        if self.queue is not None:
            self.queue.reconsider()
        self.changed.emit()

    def _set_contributing(self, on: bool) -> None:
        if on != self._contributing:
            self._contributing = on
            self.contributing_changed.emit(on)
