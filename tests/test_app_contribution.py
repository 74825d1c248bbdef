"""The Contributor controller with fake sensors, a fake clock and a fake swarm worker (a tiny script
speaking the protocol), plus the JobQueue gate it uses."""
import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import datetime as dt
import sys
import textwrap

import pytest
from PySide6.QtCore import QObject, Signal

from app import settings
from app.contribution import Contributor, join_invite, load_rules, save_rules
from app.idle_policy import IdleRules, Sensors
from app.store import Store
from training_core.swarm.manifest import bundled_path, load_manifest, make_invite

FAKE_WORKER = textwrap.dedent('''
    import json, sys, threading, time
    mode = sys.argv[1]
    lock = threading.Lock()
    def emit(type_, **f):
        with lock:
            sys.stdout.write(json.dumps({"v": 1, "type": type_, "time": time.time(), **f}) + "\\n")
            sys.stdout.flush()
    if mode == "bad":
        emit("failed", code="bad_input", message="invite: the swarm refused this peer", step=0)
        sys.exit(2)
    if mode == "crash":
        time.sleep(0.2)
        sys.exit(1)
    state = {"paused": False, "stop": False}
    def controls():
        for line in sys.stdin:
            kind = json.loads(line)["type"]
            if kind == "pause" and mode != "ignore_pause":
                state["paused"] = True
                emit("paused", step=0, vram_used=0, vram_reserved=0, checkpoint=None)
            elif kind == "resume":
                state["paused"] = False
                emit("resumed", step=0)
            elif kind == "stop":
                state["stop"] = True
                return
    threading.Thread(target=controls, daemon=True).start()
    emit("started", job_id="modron-demo", run_dir=".", device="cpu", precision="fp32", method="full",
         model="scratch:tiny", params_total=1, params_trainable=1, total_steps=0, resumed_from=None)
    samples, step = 0, 0
    while not state["stop"]:
        time.sleep(0.05)
        if state["paused"]:
            continue
        step += 1
        samples += 8
        emit("swarm", role="peer", run_id="modron-demo", peers=3, epoch=step // 4, samples_contributed=samples,
             bytes_up=1000 * step, bytes_down=2000 * step, loss=5.0 - 0.01 * step, global_samples_per_s=80.0)
    emit("stopped", step=step, checkpoint=None)
''')


class FakeClock:
    def __init__(self):
        self.t = dt.datetime(2024, 1, 5, 12, 0).timestamp()   # a Friday noon

    def __call__(self):
        return self.t


class FakeSensors:
    """The user and the machine, as the controller sees them."""

    def __init__(self, clock):
        self.clock = clock
        self.idle, self.battery, self.programs, self.gpu_apps, self.temp = 0.0, False, set(), [], 60
        self.excluded = []

    def __call__(self, exclude_pids=frozenset()):
        self.excluded.append(set(exclude_pids))
        return (Sensors(dt.datetime.fromtimestamp(self.clock()), self.idle, self.battery, set(self.programs),
                        list(self.gpu_apps), self.temp), {"idle_source": "x11"})


class FakeRunner:
    name = "fake"

    def __init__(self, script, mode="normal"):
        self.script, self.mode, self.args = script, mode, []
        self.ok = (True, "")

    def command(self, args):
        self.args.append(list(args))
        return sys.executable, [str(self.script), self.mode]

    def available(self):
        return self.ok

    def path(self, p):
        return str(p)


class FakeQueue(QObject):
    """Just what the Contributor uses of a JobQueue; jobs are names."""
    gpu_job_started = Signal(int)
    gpu_job_ended = Signal(int)
    queue_changed = Signal()

    class Job:
        def __init__(self, name):
            self.name = name

    def __init__(self):
        super().__init__()
        self.paused_all, self.running, self.waiting, self.gate = False, None, None, None

    def running_job(self):
        return self.running

    def waiting_job(self):
        return self.waiting

    def worker_pid(self):
        return 4242 if self.running else None

    def submit(self, name):
        self.waiting = self.Job(name)
        self.reconsider()

    def reconsider(self):
        if self.waiting is not None and self.running is None and self.gate(self.waiting):
            self.running, self.waiting = self.waiting, None

    def finish(self):
        self.running = None
        self.gpu_job_ended.emit(1)


DEMO_INVITE = make_invite(load_manifest(bundled_path("swarms/demo.toml")))


@pytest.fixture
def rig(tmp_path, store, qtbot):
    """make(mode) -> (contributor, sensors, clock, runner, notices); every contributor is shut down after."""
    script = tmp_path / "fake_swarm_worker.py"
    script.write_text(FAKE_WORKER, encoding="utf-8")
    made = []

    def make(mode="normal", queue=None, store=store, **kw):
        clock = FakeClock()
        sensors = FakeSensors(clock)
        runner = FakeRunner(script, mode)
        store.set_setting(settings.CONTRIBUTE.key, True)
        if store.get_setting(settings.SWARM_INVITE.key) is None:
            join_invite(store, DEMO_INVITE)
        rules, _ = load_rules(store)
        rules.idle_minutes = 1
        save_rules(store, rules)
        c = Contributor(store, queue, sensors=sensors, runner=runner, clock=clock, tick_ms=0,
                        notify_before_s=3, **kw)
        notices = []
        c.notify.connect(lambda title, text: notices.append(title))
        made.append(c)
        return c, sensors, clock, runner, notices

    yield make
    for c in made:
        c.shutdown(timeout_ms=3000)


def go_idle(c, sensors, clock, qtbot):
    """The user leaves: countdown warning, then the worker starts and contributes."""
    sensors.idle = 57.0
    c.tick()
    sensors.idle, clock.t = 60.0, clock.t + 3
    c.tick()
    assert c.state in ("starting", "resuming", "contributing")
    qtbot.waitUntil(lambda: c.state == "contributing", timeout=10_000)


def user_returns(c, sensors, clock):
    sensors.idle, clock.t = 0.0, clock.t + 1
    c.tick()


def test_idle_warn_start_then_user_returns_pauses_fast_and_resumes(rig, qtbot, store):
    c, sensors, clock, runner, notices = rig()
    changes = []
    c.contributing_changed.connect(changes.append)
    c.tick()
    assert c.state == "waiting" and c.rule == "user_active" and c.worker_pid is None
    sensors.idle = 57.0
    c.tick()
    assert notices == ["Modron will contribute soon"] and c.worker_pid is None
    sensors.idle, clock.t = 60.0, clock.t + 3
    c.tick()
    assert c.state == "starting" and c.worker_pid is not None
    args = runner.args[0]
    assert args[args.index("--invite-file") + 1].endswith("joined-invite.txt") and "--json" in args
    assert args[args.index("--vram-fraction") + 1] == "0.9"
    qtbot.waitUntil(lambda: c.state == "contributing", timeout=10_000)
    qtbot.waitUntil(lambda: c.last_swarm.get("samples", 0) >= 16, timeout=10_000)
    c.tick()
    assert c.worker_pid in sensors.excluded[-1]   # our own worker is not "another GPU program"

    user_returns(c, sensors, clock)
    assert c.state == "pausing" and "using the computer" in c.reason
    qtbot.waitUntil(lambda: c.state == "paused", timeout=5_000)
    assert len(c.latencies) == 1 and 0 < c.latencies[0] < 2.0
    assert store.get_setting(settings.SWARM_HANDBACK_S.key) == [round(c.latencies[0], 4)]
    assert changes == [True, False]

    # Idle again: a fresh warning, then the paused worker is resumed (not a second process).
    pid = c.worker_pid
    sensors.idle, clock.t = 600.0, clock.t + 1
    c.tick()
    assert c.state == "paused" and notices[-1] == "Modron will contribute soon"
    clock.t += 3
    c.tick()
    assert c.state == "resuming" and c.worker_pid == pid
    qtbot.waitUntil(lambda: c.state == "contributing", timeout=5_000)
    assert changes == [True, False, True]


def test_a_worker_that_ignores_pause_is_killed_after_the_grace_period(rig, qtbot, store):
    c, sensors, clock, runner, notices = rig("ignore_pause")
    store.set_setting(settings.SWARM_GRACE_S.key, 10)
    go_idle(c, sensors, clock, qtbot)
    user_returns(c, sensors, clock)
    assert c.state == "pausing"
    clock.t += 9
    c.tick()
    assert c.state == "pausing" and c.worker_pid is not None     # still within the grace period
    clock.t += 2
    c.tick()
    qtbot.waitUntil(lambda: c.worker_pid is None, timeout=5_000)
    assert c.kills == 1 and "did not pause within 10 s" in c.message
    assert notices[-1] == "Modron took the GPU back" and c.state == "waiting" and c.latencies == []


@pytest.mark.parametrize("what, reason", [("battery", "running on battery"), ("game", "steam is running"),
                                          ("hot", "GPU too hot (91 °C")])
def test_a_failing_rule_pauses_with_its_reason(rig, qtbot, store, what, reason):
    c, sensors, clock, runner, notices = rig()
    rules, _ = load_rules(store)
    rules.blocked_programs = ["Steam.exe"]
    save_rules(store, rules)
    go_idle(c, sensors, clock, qtbot)
    if what == "battery":
        sensors.battery = True
    elif what == "game":
        sensors.programs = {"steam"}
    else:
        sensors.temp = 91
    clock.t += 1
    c.tick()
    assert c.state == "pausing" and reason in c.reason
    qtbot.waitUntil(lambda: c.state == "paused", timeout=5_000)
    assert reason in c.reason and not c.contributing


def test_snooze_then_toggle_off_stops_the_worker(rig, qtbot, store):
    c, sensors, clock, runner, notices = rig()
    go_idle(c, sensors, clock, qtbot)
    store.set_setting(settings.SNOOZE_UNTIL.key, clock.t + 3600)
    clock.t += 1
    c.tick()
    assert c.rule == "snoozed" and c.state == "pausing"
    qtbot.waitUntil(lambda: c.state == "paused", timeout=5_000)
    store.set_setting(settings.CONTRIBUTE.key, False)
    c.tick()
    assert c.state == "stopping"
    qtbot.waitUntil(lambda: c.worker_pid is None, timeout=5_000)
    c.tick()
    assert c.state == "off" and c.reason == "Contribute while idle is off" and c.kills == 0


def test_a_long_pause_stops_the_worker(rig, qtbot):
    c, sensors, clock, runner, notices = rig(paused_keep_s=300)
    go_idle(c, sensors, clock, qtbot)
    user_returns(c, sensors, clock)
    qtbot.waitUntil(lambda: c.state == "paused", timeout=5_000)
    clock.t += 200
    c.tick()
    assert c.state == "paused"
    clock.t += 101
    c.tick()
    assert c.state == "stopping"
    qtbot.waitUntil(lambda: c.worker_pid is None, timeout=5_000)


def test_local_priority_pauses_the_swarm_before_a_local_job_starts(rig, qtbot, store):
    queue = FakeQueue()
    c, sensors, clock, runner, notices = rig(queue=queue)
    assert queue.gate == c.local_may_start
    go_idle(c, sensors, clock, qtbot)
    queue.submit("my finetune")
    assert queue.running is None and c.state == "pausing"      # the job waits for the GPU...
    qtbot.waitUntil(lambda: queue.running is not None, timeout=5_000)   # ...and starts once it is paused
    assert c.state == "paused" and len(c.latencies) == 1
    sensors.idle, clock.t = 3600.0, clock.t + 60
    c.tick()
    assert c.rule == "local_job" and "my finetune" in c.reason and c.state == "paused" and notices == [
        "Modron will contribute soon"]      # the first start's warning only: no countdown while the job runs
    queue.finish()
    c.tick()
    clock.t += 3
    c.tick()
    assert c.state == "resuming"
    qtbot.waitUntil(lambda: c.state == "contributing", timeout=5_000)


def test_swarm_priority_keeps_local_jobs_waiting_while_contributing(rig, qtbot, store):
    store.set_setting(settings.GPU_PRIORITY.key, "swarm")
    queue = FakeQueue()
    c, sensors, clock, runner, notices = rig(queue=queue)
    go_idle(c, sensors, clock, qtbot)
    queue.submit("my finetune")
    clock.t += 1
    c.tick()
    assert queue.running is None and c.state == "contributing"
    user_returns(c, sensors, clock)
    qtbot.waitUntil(lambda: queue.running is not None, timeout=5_000)
    assert c.state == "paused"
    sensors.idle, clock.t = 3600.0, clock.t + 60
    c.tick()
    assert c.rule == "local_job" and c.state == "paused"


def test_stats_survive_a_crash_and_add_up_across_workers(rig, qtbot, store, tmp_path):
    c, sensors, clock, runner, notices = rig()
    go_idle(c, sensors, clock, qtbot)
    qtbot.waitUntil(lambda: c.last_swarm.get("samples", 0) >= 24, timeout=10_000)
    c._worker.kill()      # the worker dies; what was recorded stays
    qtbot.waitUntil(lambda: c.worker_pid is None, timeout=5_000)
    other = Store(store.path)   # as the app would see it after a restart
    try:
        first = other.swarm_stats("modron-demo")
        assert first["samples"] >= 24 and first["bytes_up"] >= 3000 and first["last_status"]["peers"] == 3
        assert len(other.swarm_metrics("modron-demo")["loss"]) >= 3
        assert other.get_setting(settings.SWARM_INVITE.key) == DEMO_INVITE
    finally:
        other.close()
    c.tick()
    assert c.rule == "failed" and "trying again" in c.reason     # backs off instead of relaunching at once

    # A new app on the same file: the next worker's figures add to the totals.
    store2 = Store(store.path)
    try:
        c2, sensors2, clock2, _, _ = rig(store=store2)
        go_idle(c2, sensors2, clock2, qtbot)
        qtbot.waitUntil(lambda: c2.last_swarm.get("samples", 0) >= first["samples"] + 8, timeout=10_000)
        assert store2.swarm_stats("modron-demo")["samples"] > first["samples"]
        c2.shutdown(3000)
    finally:
        store2.close()


def test_bad_input_holds_until_a_new_invite_and_missing_pieces_are_said_plainly(rig, qtbot, store):
    c, sensors, clock, runner, notices = rig("bad")
    sensors.idle = 600.0
    c.tick()
    clock.t += 3
    c.tick()
    qtbot.waitUntil(lambda: c.worker_pid is None and c.state == "waiting", timeout=5_000)
    for _ in range(3):
        clock.t += 5
        c.tick()
    assert len(runner.args) == 1 and c.rule == "failed" and "refused this peer" in c.reason

    runner.ok = (False, "Swarm contribution on Windows needs WSL2")
    c._available = None
    c.leave()
    c.tick()
    assert c.rule == "no_invite" and "paste an invite" in c.reason
    c.join(DEMO_INVITE)
    c.tick()
    assert c.rule == "unavailable" and "WSL2" in c.reason and len(runner.args) == 1


def test_rules_and_settings_round_trip(store):
    rules = IdleRules(idle_minutes=7, blocked_programs=["steam"], max_gpu_temp_c=75, unknown_idle="never")
    save_rules(store, rules)
    store.set_setting(settings.CONTRIBUTE.key, True)
    store.set_setting(settings.SNOOZE_UNTIL.key, 123.0)
    back, problem = load_rules(store)
    assert problem == "" and back.enabled and back.snooze_until == 123.0
    assert (back.idle_minutes, back.blocked_programs, back.max_gpu_temp_c, back.unknown_idle) == (
        7, ["steam"], 75, "never")
    store.set_setting("idle_rules", {"unknown_idle": "sometimes"})
    back, problem = load_rules(store)
    assert back.unknown_idle == "ask" and "could not be read" in problem


def test_job_queue_gate_holds_jobs_until_it_opens(store, qtbot):
    from app.job_queue import JobQueue
    queue = JobQueue(store, autostart=True)
    asked = []
    queue.gate = lambda job: asked.append(job.name) or False
    job_id = queue.submit({"model": "scratch:tiny", "data": ["x.txt"], "steps": 1}, "held")
    qtbot.waitUntil(lambda: "held" in asked, timeout=3_000)
    qtbot.wait(50)
    assert queue.running_job() is None and store.get_job(job_id).state == "queued"
    assert queue.waiting_job().id == job_id
    before = len(asked)
    queue.reconsider()
    qtbot.waitUntil(lambda: len(asked) == before + 1, timeout=3_000)
    assert queue.running_job() is None
    queue.pause_all()
    assert queue.waiting_job() is None


def test_while_contributing_the_users_return_is_seen_between_ticks(rig, qtbot):
    """The 1 s tick decided the hand-back alone (p95 near 1 s); a cheap idle look every watch_ms sees
    the user come back and decides at once. Without the watch nothing happens until the next tick."""
    still, sensors_still, clock_still, _, _ = rig()            # no watch (tick_ms=0: ticks by hand)
    go_idle(still, sensors_still, clock_still, qtbot)
    sensors_still.idle = 0.0
    qtbot.wait(400)
    assert still.state == "contributing"

    c, sensors, clock, _, _ = rig(watch_ms=20)
    go_idle(c, sensors, clock, qtbot)
    sensors.idle = 0.0                                          # the user is back; no tick is called
    qtbot.waitUntil(lambda: c.state in ("pausing", "paused"), timeout=1000)
    assert c.rule == "user_active"
