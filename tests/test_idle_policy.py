"""Idle policy with a fake clock and fake sensors."""
import datetime as dt
import json
import time

import pytest

from app.idle_policy import IdlePolicy, IdleRules, Sensors, Window, decide, in_schedule
from training_core.errors import ConfigError

FRI = dt.datetime(2024, 1, 5, 12, 0)    # 2024-01-05 is a Friday
SAT = dt.datetime(2024, 1, 6, 0, 0)


def at(day: dt.datetime, hhmm: str) -> dt.datetime:
    h, m = map(int, hhmm.split(":"))
    return day.replace(hour=h, minute=m)


def rules(**kw) -> IdleRules:
    kw.setdefault("enabled", True)
    kw.setdefault("idle_minutes", 1)
    return IdleRules(**kw)


def sensors(now=FRI, idle=3600.0, **kw) -> Sensors:
    return Sensors(now=now, idle_seconds=idle, **kw)


class FakeDesk:
    """A clock and a user: each tick advances one second; idle grows until the user touches the mouse."""

    def __init__(self, now=FRI):
        self.now, self.idle = now, 0.0
        self.temp, self.battery, self.programs = 60, False, set()

    def tick(self, policy, seconds=1.0):
        self.now += dt.timedelta(seconds=seconds)
        self.idle += seconds
        return policy.update(Sensors(self.now, self.idle, self.battery, set(self.programs), [], self.temp))

    def run_until(self, policy, action, limit=1000):
        """Tick until `action`; return the idle time then and the actions seen on the way."""
        seen = []
        for _ in range(limit):
            a, _d = self.tick(policy)
            seen.append(a)
            if a == action:
                return self.idle, seen
        raise AssertionError(f"no {action!r} in {limit} ticks: {set(seen)}")


# --- schedule -------------------------------------------------------------------------------

def test_window_edges_start_inclusive_end_exclusive():
    sched = [Window(4, dt.time(9, 0), dt.time(17, 0))]
    assert in_schedule(sched, at(FRI, "09:00"))
    assert in_schedule(sched, at(FRI, "16:59"))
    assert not in_schedule(sched, at(FRI, "17:00"))
    assert not in_schedule(sched, at(FRI, "08:59"))
    assert not in_schedule(sched, at(FRI, "12:00") + dt.timedelta(days=1))   # Saturday
    assert in_schedule([], at(FRI, "03:00"))                                 # empty: any time


def test_window_across_midnight():
    sched = [Window(4, dt.time(22, 0), dt.time(2, 0))]    # Friday 22:00 to Saturday 02:00
    assert in_schedule(sched, at(FRI, "22:00"))
    assert in_schedule(sched, at(FRI, "23:59"))
    assert in_schedule(sched, at(SAT, "01:30"))
    assert not in_schedule(sched, at(SAT, "02:00"))
    assert not in_schedule(sched, at(FRI, "01:30"))       # Friday morning belongs to Thursday's window
    assert not in_schedule(sched, at(FRI, "21:59"))


def test_sunday_window_runs_into_monday():
    sched = [Window(6, dt.time(23, 0), dt.time(1, 0))]
    monday = dt.datetime(2024, 1, 8, 0, 30)
    assert monday.weekday() == 0
    assert in_schedule(sched, monday)
    assert not in_schedule(sched, monday.replace(hour=1))


def test_decide_outside_schedule():
    r = rules(schedule=[Window(4, dt.time(22, 0), dt.time(2, 0))])
    assert decide(r, sensors(at(SAT, "01:30"))).allowed
    d = decide(r, sensors(at(SAT, "02:00")))
    assert (d.allowed, d.rule) == (False, "schedule")


# --- single rules -----------------------------------------------------------------------------

def test_ok_says_since_when():
    d = decide(rules(), sensors(at(FRI, "14:30"), idle=28 * 60))
    assert d.allowed and d.rule == "ok"
    assert d.reason == "idle since 14:02"


def test_disabled_and_snoozed():
    assert decide(IdleRules(), sensors()).rule == "disabled"
    until = FRI.timestamp() + 3600
    d = decide(rules(snooze_until=until), sensors())
    assert (d.allowed, d.rule) == (False, "snoozed")
    assert "13:00" in d.reason
    assert decide(rules(snooze_until=until), sensors(FRI + dt.timedelta(hours=1))).allowed


def test_battery():
    assert decide(rules(), sensors(on_battery=True)).rule == "battery"
    assert decide(rules(), sensors(on_battery=None)).allowed          # a desktop: unknown is mains
    assert decide(rules(allow_on_battery=True), sensors(on_battery=True)).allowed


def test_blocked_program_any_case():
    r = rules(blocked_programs=["steam", "Blender"])
    d = decide(r, sensors(running_programs={"bash", "Steam.exe"}))
    assert (d.allowed, d.rule) == (False, "program")
    assert "Steam.exe" in d.reason
    assert decide(r, sensors(running_programs={"blender"})).rule == "program"
    assert decide(r, sensors(running_programs={"steamworks", "bash"})).allowed


def test_other_gpu_app():
    d = decide(rules(), sensors(other_gpu_processes=["obs"]))
    assert (d.allowed, d.rule) == (False, "gpu_app")
    assert "obs" in d.reason
    assert decide(rules(block_on_other_gpu_apps=False), sensors(other_gpu_processes=["obs"])).allowed


def test_temperature_limit():
    assert decide(rules(max_gpu_temp_c=80), sensors(gpu_temp_c=80)).allowed
    d = decide(rules(max_gpu_temp_c=80), sensors(gpu_temp_c=81))
    assert (d.allowed, d.rule) == (False, "gpu_hot")
    assert decide(rules(), sensors(gpu_temp_c=None)).allowed


@pytest.mark.parametrize("option, allowed", [("ask", False), ("assume_idle", True), ("never", False)])
def test_unknown_idle(option, allowed):
    d = decide(rules(unknown_idle=option), sensors(idle=None))
    assert d.allowed is allowed
    assert d.rule == ("ok" if allowed else "idle_unknown")
    if option == "ask":
        assert "settings" in d.reason


def test_user_active_gives_time_to_start():
    d = decide(rules(idle_minutes=10), sensors(idle=590))
    assert (d.allowed, d.rule) == (False, "user_active")
    assert d.starts_in == pytest.approx(10)


def test_other_rules_win_over_idle_countdown():
    # No countdown to a start that a rule would block anyway.
    d = decide(rules(idle_minutes=10), sensors(idle=590, on_battery=True))
    assert d.rule == "battery" and d.starts_in is None


# --- the per-second policy ---------------------------------------------------------------------

def test_warn_then_start_at_threshold():
    desk, policy = FakeDesk(), IdlePolicy(rules(idle_minutes=1), notify_before_s=10)
    idle, seen = desk.run_until(policy, "warn_start")
    assert idle == 50 and set(seen[:-1]) == {"none"}
    idle, seen = desk.run_until(policy, "start")
    assert idle == 60 and set(seen[:-1]) == {"none"}
    assert desk.tick(policy)[0] == "none"       # started once only
    assert policy.running


def test_user_returns_stops_on_the_same_tick():
    desk, policy = FakeDesk(), IdlePolicy(rules(idle_minutes=1))
    desk.run_until(policy, "start")
    desk.idle = 0                               # the mouse moved
    action, d = desk.tick(policy)
    assert action == "stop" and d.rule == "user_active"
    assert not policy.running
    # Coming back idle warns and starts again.
    idle, _ = desk.run_until(policy, "warn_start")
    assert idle == 50
    assert desk.run_until(policy, "start")[0] == 60


def test_activity_during_countdown_warns_again_next_time():
    desk, policy = FakeDesk(), IdlePolicy(rules(idle_minutes=1))
    desk.run_until(policy, "warn_start")
    desk.idle = 0
    assert desk.tick(policy)[0] == "none"       # nothing had started, nothing to stop
    assert desk.run_until(policy, "warn_start")[0] == 50


@pytest.mark.parametrize("change, rule", [
    (lambda desk, r: setattr(desk, "battery", True), "battery"),
    (lambda desk, r: desk.programs.add("STEAM"), "program"),
    (lambda desk, r: setattr(r, "snooze_until", desk.now.timestamp() + 3600), "snoozed"),
    (lambda desk, r: setattr(r, "enabled", False), "disabled"),
])
def test_any_failing_rule_stops_at_once(change, rule):
    r = rules(idle_minutes=1, blocked_programs=["steam"])
    desk, policy = FakeDesk(), IdlePolicy(r)
    desk.run_until(policy, "start")
    change(desk, r)
    action, d = desk.tick(policy)
    assert (action, d.rule) == ("stop", rule)


def test_hot_gpu_stops_and_waits_to_cool():
    desk, policy = FakeDesk(), IdlePolicy(rules(idle_minutes=1, max_gpu_temp_c=83), hot_resume_margin_c=5)
    desk.run_until(policy, "start")
    desk.temp = 84
    action, d = desk.tick(policy)
    assert (action, d.rule) == ("stop", "gpu_hot")
    for temp in (83, 80, 79):                   # under the limit but not cool enough yet
        desk.temp = temp
        action, d = desk.tick(policy)
        assert (action, d.rule) == ("none", "gpu_hot"), temp
        assert "78" in d.reason
    desk.temp = 78
    action, d = desk.tick(policy)
    assert action == "warn_start" and d.allowed
    assert desk.run_until(policy, "start")[1].count("none") == 9   # started notify_before_s later
    desk.temp = 83                              # at the limit is fine once cooled
    assert desk.tick(policy)[0] == "none" and policy.running


def test_allowed_without_countdown_still_warns_first():
    # A schedule window opens while the user is long gone: warn, then start notify_before_s later.
    r = rules(idle_minutes=1, schedule=[Window(4, dt.time(22, 0), dt.time(2, 0))])
    desk, policy = FakeDesk(at(FRI, "21:59") + dt.timedelta(seconds=50)), IdlePolicy(r, notify_before_s=10)
    desk.idle = 3600
    seen = [desk.tick(policy)[0] for _ in range(9)]
    assert set(seen) == {"none"}                # still 21:59
    assert desk.tick(policy)[0] == "warn_start"   # 22:00:00
    assert desk.now == at(FRI, "22:00")
    seen = [desk.tick(policy)[0] for _ in range(10)]
    assert seen == ["none"] * 9 + ["start"]


def test_unknown_idle_in_the_policy():
    r = rules(unknown_idle="ask")
    policy = IdlePolicy(r, notify_before_s=0)
    assert policy.update(sensors(idle=None))[0] == "none"
    r.unknown_idle = "assume_idle"              # the user answered the question
    assert policy.update(sensors(idle=None))[0] == "start"
    r.unknown_idle = "never"
    action, d = policy.update(sensors(idle=None))
    assert (action, d.rule) == ("stop", "idle_unknown")


# --- saving ----------------------------------------------------------------------------------

def test_round_trip_through_json():
    r = IdleRules(enabled=True, schedule=[Window(4, dt.time(22, 0), dt.time(2, 0)),
                                          Window(0, dt.time(9, 30), dt.time(17, 45))],
                  idle_minutes=2.5, allow_on_battery=True, blocked_programs=["steam", "Blender"],
                  block_on_other_gpu_apps=False, max_gpu_temp_c=75, vram_cap_fraction=0.7,
                  unknown_idle="never", snooze_until=time.time() + 60)
    data = json.loads(json.dumps(r.to_dict()))
    assert data["schedule"][0] == {"weekday": 4, "start": "22:00", "end": "02:00"}
    assert IdleRules.from_dict(data) == r
    assert IdleRules.from_dict({}) == IdleRules()


@pytest.mark.parametrize("data", [
    {"unknown_idle": "sometimes"},
    {"schedule": [{"weekday": 7, "start": "09:00", "end": "10:00"}]},
    {"schedule": [{"weekday": 1, "start": "9h", "end": "10:00"}]},
    {"schedule": [{"weekday": 1, "start": "25:00", "end": "10:00"}]},
    {"vram_cap_fraction": 1.5},
    {"idle_minutes": "ten"},
    [],
])
def test_bad_saved_rules_are_one_line_errors(data):
    with pytest.raises(ConfigError) as err:
        IdleRules.from_dict(data)
    assert "\n" not in str(err.value) and str(err.value).startswith("idle rules: ")
