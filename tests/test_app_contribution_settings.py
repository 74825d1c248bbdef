"""The contribution rules page: a round trip through the store, and bad input said plainly."""
import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import datetime as dt

import pytest

from app import settings
from app.contribution import load_rules
from app.idle_policy import Window
from app.views.contribution_settings import ContributionSettingsView, format_schedule, parse_schedule


def test_round_trip(qtbot, store):
    view = ContributionSettingsView(store, None)
    qtbot.addWidget(view)
    assert view.schedule_edit.toPlainText() == "" and view.grace_spin.value() == 10
    view.schedule_edit.setPlainText("Mon-Fri 22:00-07:00\nSun 10:00-12:30")
    view.idle_spin.setValue(5)
    view.battery_box.setChecked(True)
    view.programs_edit.setPlainText("steam\nblender, obs")
    view.gpu_apps_box.setChecked(False)
    view.temp_spin.setValue(78)
    view.vram_spin.setValue(60)
    view.unknown_combo.setCurrentIndex(view.unknown_combo.findData("never"))
    view.grace_spin.setValue(4)
    view.priority_combo.setCurrentIndex(view.priority_combo.findData("swarm"))
    assert view.save() and view.message_label.text() == "Saved."

    rules, problem = load_rules(store)
    assert problem == ""
    assert len(rules.schedule) == 6 and rules.schedule[0] == Window(0, dt.time(22), dt.time(7))
    assert rules.schedule[-1] == Window(6, dt.time(10), dt.time(12, 30))
    assert (rules.idle_minutes, rules.allow_on_battery, rules.blocked_programs, rules.block_on_other_gpu_apps,
            rules.max_gpu_temp_c, rules.vram_cap_fraction, rules.unknown_idle) == (
        5, True, ["steam", "blender", "obs"], False, 78, 0.6, "never")
    assert settings.SWARM_GRACE_S.get(store) == 4 and settings.GPU_PRIORITY.get(store) == "swarm"

    again = ContributionSettingsView(store, None)
    qtbot.addWidget(again)
    assert again.schedule_edit.toPlainText().splitlines()[0] == "Mon 22:00-07:00"
    assert again.programs_edit.toPlainText() == "steam\nblender\nobs" and again.vram_spin.value() == 60
    assert again.unknown_combo.currentData() == "never" and again.priority_combo.currentData() == "swarm"


def test_an_invalid_window_says_so_and_loses_nothing(qtbot, store):
    view = ContributionSettingsView(store, None)
    qtbot.addWidget(view)
    view.idle_spin.setValue(3)
    assert view.save()
    typed = "Mon-Fri 22:00-07:00\nFunday 25:00-26:00"
    view.schedule_edit.setPlainText(typed)
    view.idle_spin.setValue(20)
    assert not view.save()
    assert view.message_label.text() == "schedule: line 2 ('Funday 25:00-26:00'): 'funday' is not a weekday " \
                                        "(Mon, Tue, … Sun)"
    assert view.schedule_edit.toPlainText() == typed and view.idle_spin.value() == 20   # still there to fix
    assert load_rules(store)[0].idle_minutes == 3                                      # nothing half-saved
    view.schedule_edit.setPlainText("Mon 24:00-01:00")
    assert not view.save() and "not on a clock" in view.message_label.text()


@pytest.mark.parametrize("text, n", [("", 0), ("every day 23:00-06:00", 7), ("Sat-Mon 01:00-02:00", 3),
                                     ("  tue 9:00 - 17:00 ", 1)])
def test_parse_schedule(text, n):
    windows = parse_schedule(text)
    assert len(windows) == n
    assert parse_schedule(format_schedule(windows)) == windows
