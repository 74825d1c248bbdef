"""Contribution rules: when this computer may lend its GPU to a swarm, and how it hands it back."""
from __future__ import annotations

import datetime as dt
import re

from PySide6.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QGroupBox, QHBoxLayout,
                               QLabel, QPlainTextEdit, QPushButton, QSpinBox, QVBoxLayout, QWidget)

from app import settings
from app.contribution import PRIORITIES, grace_s, gpu_priority, load_rules, save_rules
from app.idle_policy import IdleRules, Window
from app.views.form_ux import polish_form
from app.views.settings_view import note
from training_core.errors import ConfigError

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
UNKNOWN_CHOICES = (("ask", "Ask me"), ("assume_idle", "Contribute anyway"), ("never", "Don't contribute"))
PRIORITY_CHOICES = (("local", "My finetunes (contribution pauses for them)"),
                    ("swarm", "The swarm (my finetunes wait while it contributes)"))
_LINE = re.compile(r"^(?P<days>[A-Za-z ]+?(?:\s*-\s*[A-Za-z]+)?)\s+(?P<start>\d{1,2}:\d{2})\s*-\s*"
                   r"(?P<end>\d{1,2}:\d{2})$")


def _day(name: str, where: str) -> int:
    key = name.strip().lower()[:3]
    if key not in DAYS:
        raise ConfigError("schedule", f"{where}: {name.strip()!r} is not a weekday (Mon, Tue, … Sun)")
    return DAYS.index(key)


def parse_schedule(text: str) -> list[Window]:
    """One window per line: 'Mon 22:00-07:00', 'Mon-Fri 09:00-17:00', 'Every day 23:00-06:00'.
    An end at or before the start runs past midnight. Empty: any time."""
    windows: list[Window] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        where = f"line {n} ({line!r})"
        m = _LINE.match(line)
        if not m:
            raise ConfigError("schedule", f"{where} is not like 'Mon-Fri 22:00-07:00'")
        days_text = m.group("days").strip().lower()
        if days_text in ("every day", "daily"):
            days = list(range(7))
        elif "-" in days_text:
            first, last = (_day(d, where) for d in days_text.split("-"))
            days = [(first + i) % 7 for i in range((last - first) % 7 + 1)]
        else:
            days = [_day(days_text, where)]
        try:
            start, end = (dt.time(*map(int, m.group(k).split(":"))) for k in ("start", "end"))
        except ValueError:
            raise ConfigError("schedule", f"{where} has a time that is not on a clock (00:00 to 23:59)") from None
        windows += [Window(d, start, end) for d in days]
    return windows


def format_schedule(windows: list[Window]) -> str:
    return "\n".join(f"{DAYS[w.weekday].capitalize()} {w.start:%H:%M}-{w.end:%H:%M}" for w in windows)


class ContributionSettingsView(QWidget):
    def __init__(self, store, queue, parent=None, contributor=None):
        super().__init__(parent)
        self.store, self.queue, self.contributor = store, queue, contributor

        title = QLabel("Contribution rules")
        title.setStyleSheet("font-size: 16pt; font-weight: bold;")
        intro = note("When \"Contribute while idle\" is on (tray menu), Modron lends your GPU to the swarm you "
                      "joined only while all of these hold, and hands it back as soon as one fails.")

        self.schedule_edit = QPlainTextEdit()
        self.schedule_edit.setPlaceholderText("Any time. Or one window per line, e.g.\nMon-Fri 22:00-07:00\n"
                                              "Sat 00:00-00:00")
        self.schedule_edit.setMaximumHeight(90)
        self.schedule_edit.setToolTip("When contributing is allowed, one window per line: 'Mon-Fri 22:00-07:00', "
                                      "'Sat 10:00-18:00' or 'Every day 23:00-06:00'. An end before the start runs "
                                      "past midnight. Empty: any time")
        self.idle_spin = QDoubleSpinBox()
        self.idle_spin.setRange(0, 24 * 60)
        self.idle_spin.setDecimals(0)
        self.idle_spin.setSuffix(" min")
        self.idle_spin.setToolTip("Start only after no keyboard or mouse input for this long; "
                                  "any input hands the GPU back")
        self.battery_box = QCheckBox("Also on battery")
        self.battery_box.setToolTip("Off: a laptop contributes only while plugged in")
        self.programs_edit = QPlainTextEdit()
        self.programs_edit.setPlaceholderText("one program per line, e.g. steam, blender")
        self.programs_edit.setMaximumHeight(70)
        self.programs_edit.setToolTip("Program names (one per line or comma-separated, any case): while one of "
                                      "them runs, nothing is contributed")
        self.gpu_apps_box = QCheckBox("Not while another program uses the GPU")
        self.gpu_apps_box.setToolTip("Hand the GPU back as soon as another program (a game, a renderer) "
                                     "starts using it")
        self.temp_spin = QSpinBox()
        self.temp_spin.setRange(40, 110)
        self.temp_spin.setSuffix(" °C")
        self.temp_spin.setToolTip("Pause while the GPU is hotter than this; contributing resumes once it "
                                  "has cooled a few degrees below")
        self.vram_spin = QSpinBox()
        self.vram_spin.setRange(5, 100)
        self.vram_spin.setSuffix(" %")
        self.vram_spin.setToolTip("The swarm worker keeps its GPU memory under this share of the GPU's total")
        self.unknown_combo = QComboBox()
        for value, label in UNKNOWN_CHOICES:
            self.unknown_combo.addItem(label, value)
        self.unknown_combo.setToolTip("Some desktops don't tell how long you have been away. Ask me: don't "
                                      "contribute and say so; Contribute anyway: act as if you were away")
        self.grace_spin = QSpinBox()
        self.grace_spin.setRange(1, 120)
        self.grace_spin.setSuffix(" s")
        self.grace_spin.setToolTip("When the GPU is needed back, the swarm worker is asked to pause; if it "
                                   "hasn't after this long, it is stopped")
        self.priority_combo = QComboBox()
        for value, label in PRIORITY_CHOICES:
            self.priority_combo.addItem(label, value)
        self.priority_combo.setToolTip("Who gets the GPU when a finetune of yours is queued while this "
                                       "computer contributes")

        when = QGroupBox("When")
        f = QFormLayout(when)
        f.addRow("Schedule", self.schedule_edit)
        f.addRow("After I'm away for", self.idle_spin)
        f.addRow("When idle time can't be read", self.unknown_combo)
        f.addRow("", self.battery_box)
        f.addRow("Not while these run", self.programs_edit)
        f.addRow("", self.gpu_apps_box)
        how = QGroupBox("How much")
        f2 = QFormLayout(how)
        f2.addRow("Pause above GPU temperature", self.temp_spin)
        f2.addRow("Use at most this much GPU memory", self.vram_spin)
        f2.addRow("Kill the worker if it hasn't let go after", self.grace_spin)
        f2.addRow("When both want the GPU, first come", self.priority_combo)

        self.save_button = QPushButton("Save")
        self.save_button.clicked.connect(self.save)
        self.revert_button = QPushButton("Revert")
        self.revert_button.clicked.connect(self.reload)
        self.save_button.setToolTip("Keep these rules; they apply at once")
        self.revert_button.setToolTip("Throw away the changes and show the saved rules again")
        self.message_label = QLabel()
        self.message_label.setWordWrap(True)
        buttons = QHBoxLayout()
        buttons.addWidget(self.save_button)
        buttons.addWidget(self.revert_button)
        buttons.addWidget(self.message_label, 1)

        layout = QVBoxLayout(self)
        layout.addWidget(title)
        layout.addWidget(intro)
        layout.addWidget(when)
        layout.addWidget(how)
        layout.addLayout(buttons)
        layout.addStretch(1)
        polish_form(self)
        self.reload()

    def reload(self) -> None:
        rules, problem = load_rules(self.store)
        self.schedule_edit.setPlainText(format_schedule(rules.schedule))
        self.idle_spin.setValue(rules.idle_minutes)
        self.battery_box.setChecked(rules.allow_on_battery)
        self.programs_edit.setPlainText("\n".join(rules.blocked_programs))
        self.gpu_apps_box.setChecked(rules.block_on_other_gpu_apps)
        self.temp_spin.setValue(rules.max_gpu_temp_c)
        self.vram_spin.setValue(round(rules.vram_cap_fraction * 100))
        self.unknown_combo.setCurrentIndex([v for v, _ in UNKNOWN_CHOICES].index(rules.unknown_idle))
        self.grace_spin.setValue(round(grace_s(self.store)))
        self.priority_combo.setCurrentIndex(PRIORITIES.index(gpu_priority(self.store)))
        self._say(problem, error=bool(problem))

    def rules_from_form(self) -> IdleRules:
        """The rules the form shows; ConfigError (one plain line) when something is not valid."""
        current, _ = load_rules(self.store)
        programs = [p.strip() for line in self.programs_edit.toPlainText().splitlines()
                    for p in line.split(",") if p.strip()]
        return IdleRules(enabled=current.enabled, schedule=parse_schedule(self.schedule_edit.toPlainText()),
                         idle_minutes=float(self.idle_spin.value()), allow_on_battery=self.battery_box.isChecked(),
                         blocked_programs=programs, block_on_other_gpu_apps=self.gpu_apps_box.isChecked(),
                         max_gpu_temp_c=int(self.temp_spin.value()), vram_cap_fraction=self.vram_spin.value() / 100,
                         unknown_idle=self.unknown_combo.currentData(), snooze_until=current.snooze_until)

    def save(self) -> bool:
        try:
            rules = self.rules_from_form()
        except ConfigError as exc:
            self._say(str(exc), error=True)   # the form keeps what was typed, to fix it
            return False
        save_rules(self.store, rules)
        settings.SWARM_GRACE_S.set(self.store, float(self.grace_spin.value() or settings.SWARM_GRACE_S.default))
        settings.GPU_PRIORITY.set(self.store, self.priority_combo.currentData())
        if self.contributor is not None:
            self.contributor.poke()
        self._say("Saved.")
        return True

    def _say(self, text: str, error: bool = False) -> None:
        self.message_label.setText(text)
        self.message_label.setStyleSheet("color: #b00020;" if error else "color: palette(dark);")
