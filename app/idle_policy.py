"""When may this computer contribute to a swarm? Pure rules, no Qt, no hivemind.

Sensors are read elsewhere (idle time, battery, processes, NVML) and handed in as one `Sensors`
reading; `decide` says yes/no and why in plain words, and `IdlePolicy` turns the per-second
decisions into start/stop actions with a warning before taking the GPU and hysteresis on heat.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from training_core.errors import ConfigError

UNKNOWN_IDLE = ("ask", "assume_idle", "never")
RULES = ("disabled", "snoozed", "schedule", "user_active", "idle_unknown", "battery", "program",
         "gpu_app", "gpu_hot", "ok")
_WHERE = "idle rules"


def _parse_time(text, what: str) -> dt.time:
    try:
        hours, minutes = str(text).split(":")
        return dt.time(int(hours), int(minutes))
    except ValueError:
        raise ConfigError(_WHERE, f"{what} {text!r} is not a time like 22:30") from None


def _hhmm(t: dt.time) -> str:
    return f"{t.hour:02d}:{t.minute:02d}"


@dataclass
class Window:
    weekday: int            # 0 = Monday .. 6 = Sunday: the day the window starts
    start: dt.time
    end: dt.time            # end <= start: runs past midnight into the next day

    def __post_init__(self) -> None:
        if not isinstance(self.weekday, int) or not 0 <= self.weekday <= 6:
            raise ConfigError(_WHERE, f"weekday {self.weekday!r} must be 0 (Monday) to 6 (Sunday)")

    def covers(self, now: dt.datetime) -> bool:
        """Start inclusive, end exclusive."""
        day, t = now.weekday(), now.time()
        if self.start < self.end:
            return day == self.weekday and self.start <= t < self.end
        # Across midnight: the evening part on its own day, the morning part on the next.
        return ((day == self.weekday and t >= self.start)
                or (day == (self.weekday + 1) % 7 and t < self.end))

    def to_dict(self) -> dict:
        return {"weekday": self.weekday, "start": _hhmm(self.start), "end": _hhmm(self.end)}

    @classmethod
    def from_dict(cls, data: dict) -> "Window":
        if not isinstance(data, dict) or not {"weekday", "start", "end"} <= set(data):
            raise ConfigError(_WHERE, f"schedule window {data!r} needs weekday, start and end")
        return cls(data["weekday"], _parse_time(data["start"], "start"), _parse_time(data["end"], "end"))


def in_schedule(schedule: list[Window], now: dt.datetime) -> bool:
    """An empty schedule means any time."""
    return not schedule or any(w.covers(now) for w in schedule)


@dataclass
class IdleRules:
    enabled: bool = False
    schedule: list[Window] = field(default_factory=list)     # empty: any time
    idle_minutes: float = 10
    allow_on_battery: bool = False
    blocked_programs: list[str] = field(default_factory=list)  # process names, any case
    block_on_other_gpu_apps: bool = True
    max_gpu_temp_c: int = 83
    vram_cap_fraction: float = 0.9      # not a start/stop rule: the swarm worker caps its memory with it
    unknown_idle: str = "ask"           # when idle time cannot be read: ask | assume_idle | never
    snooze_until: float | None = None   # unix time

    def __post_init__(self) -> None:
        if self.unknown_idle not in UNKNOWN_IDLE:
            raise ConfigError(_WHERE, f"unknown_idle {self.unknown_idle!r} must be one of {', '.join(UNKNOWN_IDLE)}")
        if not self.idle_minutes >= 0:
            raise ConfigError(_WHERE, "idle minutes must be 0 or more")
        if not 0 < self.vram_cap_fraction <= 1:
            raise ConfigError(_WHERE, "the VRAM cap must be a fraction between 0 and 1")

    def to_dict(self) -> dict:
        return {"enabled": self.enabled, "schedule": [w.to_dict() for w in self.schedule],
                "idle_minutes": self.idle_minutes, "allow_on_battery": self.allow_on_battery,
                "blocked_programs": list(self.blocked_programs),
                "block_on_other_gpu_apps": self.block_on_other_gpu_apps,
                "max_gpu_temp_c": self.max_gpu_temp_c, "vram_cap_fraction": self.vram_cap_fraction,
                "unknown_idle": self.unknown_idle, "snooze_until": self.snooze_until}

    @classmethod
    def from_dict(cls, data: dict) -> "IdleRules":
        if not isinstance(data, dict):
            raise ConfigError(_WHERE, "are not a JSON object")
        # Unknown keys are ignored so that settings saved by a newer version still load.
        known = set(cls().to_dict())
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["schedule"] = [Window.from_dict(w) for w in data.get("schedule") or []]
        kwargs["blocked_programs"] = [str(p) for p in data.get("blocked_programs") or []]
        try:
            return cls(**kwargs)
        except TypeError as exc:     # e.g. a number saved as text
            raise ConfigError(_WHERE, f"have a value of the wrong type ({exc})") from None


@dataclass
class Sensors:
    """One reading, gathered elsewhere. None means the value could not be read."""
    now: dt.datetime
    idle_seconds: float | None
    on_battery: bool | None = None
    running_programs: set[str] = field(default_factory=set)
    other_gpu_processes: list[str] = field(default_factory=list)  # non-Modron processes on the GPU (NVML)
    gpu_temp_c: int | None = None


@dataclass
class Decision:
    allowed: bool
    reason: str                       # plain words for the UI
    rule: str                         # one of RULES
    starts_in: float | None = None    # seconds until the idle threshold (rule "user_active" only)


def _norm(name: str) -> str:
    # "Steam.exe" on Windows and "steam" on Linux are the same program to the user.
    name = name.strip().lower()
    return name[:-4] if name.endswith(".exe") else name


def _clock(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%H:%M")


def _no(rule: str, reason: str, starts_in: float | None = None) -> Decision:
    return Decision(False, reason, rule, starts_in)


def decide(rules: IdleRules, s: Sensors) -> Decision:
    return _decide(rules, s, cool_to=None)


def _decide(rules: IdleRules, s: Sensors, cool_to: int | None) -> Decision:
    """cool_to: after overheating, the GPU counts as hot until it is at or below this."""
    if not rules.enabled:
        return _no("disabled", "Contribute while idle is off")
    if rules.snooze_until is not None and s.now.timestamp() < rules.snooze_until:
        return _no("snoozed", f"snoozed until {_clock(rules.snooze_until)}")
    if not in_schedule(rules.schedule, s.now):
        return _no("schedule", "outside your contribution schedule")
    if s.on_battery and not rules.allow_on_battery:
        return _no("battery", "running on battery")
    blocked = {_norm(p) for p in rules.blocked_programs}
    running = sorted(p for p in s.running_programs if _norm(p) in blocked)
    if running:
        return _no("program", f"{running[0]} is running")
    if rules.block_on_other_gpu_apps and s.other_gpu_processes:
        return _no("gpu_app", f"{s.other_gpu_processes[0]} is using the GPU")
    t = s.gpu_temp_c
    if cool_to is not None and (t is None or t > cool_to):
        shown = "unknown" if t is None else f"{t} °C"
        return _no("gpu_hot", f"GPU cooling down ({shown}; resumes at {cool_to} °C)")
    if t is not None and t > rules.max_gpu_temp_c:
        return _no("gpu_hot", f"GPU too hot ({t} °C, limit {rules.max_gpu_temp_c} °C)")
    # Idle comes last so that starts_in is only given when nothing else holds contribution back.
    if s.idle_seconds is None:
        if rules.unknown_idle == "assume_idle":
            return Decision(True, "idle time unknown; contributing as chosen in settings", "ok")
        if rules.unknown_idle == "never":
            return _no("idle_unknown", "idle time can't be read here, and you chose not to contribute then")
        return _no("idle_unknown", "idle time can't be read on this desktop; choose in settings what to do")
    threshold = rules.idle_minutes * 60
    if s.idle_seconds < threshold:
        return _no("user_active", f"you are using the computer (starts after {rules.idle_minutes:g} min idle)",
                  threshold - s.idle_seconds)
    since = s.now - dt.timedelta(seconds=s.idle_seconds)
    return Decision(True, f"idle since {since.strftime('%H:%M')}", "ok")


class IdlePolicy:
    """Evaluated every second. Actions: "start" | "stop" | "warn_start" | "none".

    "stop" comes on the very tick a rule fails. Before each start there is one "warn_start":
    normally notify_before_s before the idle threshold; when contribution becomes allowed without
    that countdown (a schedule window opens, snooze ends, assume_idle...) the warning comes first
    and the start follows notify_before_s later, so the GPU is never taken unannounced.
    """

    def __init__(self, rules: IdleRules, notify_before_s: float = 10.0, hot_resume_margin_c: int = 5):
        self.rules = rules          # the app may replace or edit it between ticks (settings, snooze)
        self.notify_before_s = notify_before_s
        self.hot_resume_margin_c = hot_resume_margin_c
        self.running = False
        self.last: Decision | None = None
        self._warned = False
        self._start_at: dt.datetime | None = None   # set when warned without an idle countdown
        self._hot = False

    def update(self, s: Sensors) -> tuple[str, Decision]:
        cool_to = self.rules.max_gpu_temp_c - self.hot_resume_margin_c
        if self._hot and s.gpu_temp_c is not None and s.gpu_temp_c <= cool_to:
            self._hot = False
        d = _decide(self.rules, s, cool_to if self._hot else None)
        if d.rule == "gpu_hot":
            self._hot = True
        self.last = d
        return self._action(d, s.now), d

    def _action(self, d: Decision, now: dt.datetime) -> str:
        if not d.allowed:
            counting_down = (d.rule == "user_active" and self.notify_before_s > 0
                             and d.starts_in is not None and d.starts_in <= self.notify_before_s)
            if self.running:
                self.running = False
                self._warned, self._start_at = False, None
                return "stop"
            if counting_down and not self._warned:
                self._warned, self._start_at = True, None
                return "warn_start"
            if not counting_down:
                self._warned, self._start_at = False, None
            return "none"
        if self.running:
            return "none"
        if not self._warned and self.notify_before_s > 0:
            self._warned = True
            self._start_at = now + dt.timedelta(seconds=self.notify_before_s)
            return "warn_start"
        if self._start_at is not None and now < self._start_at:
            return "none"
        self.running = True
        self._warned, self._start_at = False, None
        return "start"
