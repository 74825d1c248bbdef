"""The Swarm view: join by pasting or dropping an invite, live figures and chart, why not contributing."""
import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import sys
import time
import warnings

import pytest
from PySide6.QtCore import QMimeData, QPointF, Qt, QUrl
from PySide6.QtGui import QDragEnterEvent, QDropEvent
from PySide6.QtWidgets import QApplication

from app import settings
from app.contribution import Contributor, load_rules
from app.idle_policy import Sensors
from app.views.swarm_view import SwarmView, about, human_bytes
from training_core.swarm.manifest import bundled_path, load_manifest, make_invite

PEER = "/ip4/127.0.0.1/tcp/31337/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
INVITE = make_invite(load_manifest(bundled_path("swarms/demo.toml")), [PEER])


def drop(widget, mime) -> None:
    pos = widget.rect().center()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        enter = QDragEnterEvent(pos, Qt.CopyAction, mime, Qt.LeftButton, Qt.NoModifier)
    enter.ignore()
    QApplication.sendEvent(widget, enter)
    assert enter.isAccepted()
    QApplication.sendEvent(widget, QDropEvent(QPointF(pos), Qt.CopyAction, mime, Qt.LeftButton, Qt.NoModifier))


def swarm_event(t, samples, loss, **kw):
    ev = {"v": 1, "type": "swarm", "time": t, "role": "peer", "run_id": "modron-demo", "peers": 4, "epoch": 7,
          "samples_contributed": samples, "bytes_up": 2_500_000, "bytes_down": 7_000_000, "loss": loss,
          "global_samples_per_s": 123.4}
    ev.update(kw)
    return ev


def test_paste_a_garbage_invite_then_a_good_one_then_leave(qtbot, store):
    view = SwarmView(store, None)
    qtbot.addWidget(view)
    view.show()
    assert view.join_box.isVisible() and not view.joined_box.isVisible()
    view.invite_edit.setText("hello, please join my swarm")
    view.join_button.click()
    assert view.error_label.isVisible() and "\n" not in view.error_label.text()
    assert "is not a Modron invite" in view.error_label.text() and store.get_setting(settings.SWARM_INVITE.key) is None

    view.invite_edit.setText(INVITE)
    view.join_button.click()
    assert not view.error_label.isVisible() and view.joined_box.isVisible() and not view.join_box.isVisible()
    assert "modron-demo" in view.swarm_label.text() and "1 initial peer" in view.swarm_label.text()
    assert store.get_setting(settings.SWARM_INVITE.key) == INVITE

    view.leave_button.click()
    assert store.get_setting(settings.SWARM_INVITE.key) is None and view.join_box.isVisible()


def test_drop_an_invite_file_or_text(qtbot, store, tmp_path):
    view = SwarmView(store, None)
    qtbot.addWidget(view)
    bad = tmp_path / "notes.txt"
    bad.write_text("just notes", encoding="utf-8")
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(bad))])
    drop(view, mime)
    assert "does not hold a Modron invite" in view.error_label.text()
    good = tmp_path / "invite.txt"
    good.write_text(INVITE + "\n", encoding="utf-8")
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(good))])
    drop(view, mime)
    assert store.get_setting(settings.SWARM_INVITE.key) == INVITE and view.error_label.isHidden()
    store.set_setting(settings.SWARM_INVITE.key, None)
    mime = QMimeData()
    mime.setText(INVITE)
    drop(view, mime)
    assert store.get_setting(settings.SWARM_INVITE.key) == INVITE


def test_events_update_figures_and_chart_and_the_store_reloads_them(qtbot, store):
    clock = [1000.0]

    def sensors(exclude=frozenset()):
        return Sensors(now=__import__("datetime").datetime.now(), idle_seconds=None), {
            "idle_note": "idle time can't be read on this Wayland desktop"}

    c = Contributor(store, None, sensors=sensors, clock=lambda: clock[0], tick_ms=0)
    view = SwarmView(store, None, contributor=c)
    qtbot.addWidget(view)
    view.join(INVITE)
    c.tick()
    # Idle unknown and the rule says "ask": the choice is right there.
    assert c.decision.rule == "idle_unknown" or c.rule == "disabled"
    store.set_setting("contribute_while_idle", True)
    c.tick()
    assert c.decision.rule == "idle_unknown" and view.unknown_box.isVisibleTo(view)
    assert "Wayland desktop" in view.unknown_label.text() and view.state_label.text().startswith("Not contributing:")
    view.never_button.click()
    c.tick()
    assert load_rules(store)[0].unknown_idle == "never" and not view.unknown_box.isVisibleTo(view)
    assert "you chose not to contribute" in view.state_label.text()

    t0 = time.time()
    for i in range(5):
        ev = swarm_event(t0 + 2 * i, 64 * (i + 1), 5.0 - 0.1 * i)
        c._record_swarm(ev)
        c.swarm_event.emit(ev)
    assert view.peers_label.text() == "4" and view.epoch_label.text() == "7"
    assert view.samples_label.text() == "320" and view.bandwidth_label.text() == "2.5 MB / 7.0 MB"
    assert view.speed_label.text() == "123.4 samples/s"
    view.chart.redraw()
    xs, ys = view.chart.data("loss")
    assert list(xs) == [0, 2, 4, 6, 8] and ys[-1] == pytest.approx(4.6)
    view.on_event(swarm_event(t0 + 20, 999, 1.0, run_id="another-run"))    # not our swarm: ignored
    assert view.chart.count("loss") == 5

    fresh = SwarmView(store, None)      # a new window after a restart: all from the store
    qtbot.addWidget(fresh)
    assert fresh.chart.count("loss") == 5 and fresh.samples_label.text() == "320"
    assert fresh.peers_label.text() == "4"
    c.shutdown()


def test_human_bytes():
    assert [human_bytes(x) for x in (0, 999, 1500, 2_000_000, 3.2e9)] == ["0 B", "999 B", "1.5 KB", "2.0 MB",
                                                                        "3.2 GB"]


# --- DiLoCo rounds: algorithm, round, what the peer does now, the last round -------------------------

def diloco_event(phase, **kw):
    fields = dict(algorithm="diloco", round=12, phase=phase, next_exchange_s=None, round_bytes_up=1_200_000,
                  round_bytes_down=3_400_000, round_peers=3)
    return swarm_event(time.time(), 64, 4.2, **{**fields, **kw})


def joined_view(qtbot, store, contributor=None):
    view = SwarmView(store, None, contributor=contributor)
    qtbot.addWidget(view)
    assert view.join(INVITE)
    return view


def test_diloco_events_show_the_algorithm_round_phase_next_exchange_and_last_round(qtbot, store):
    view = joined_view(qtbot, store)
    assert view.algorithm_label.text() == "–" and not view.form.isRowVisible(view.round_label)
    assert view.activity_label.isHidden()

    view.on_event(diloco_event("inner", next_exchange_s=130.0))
    assert view.algorithm_label.text() == "DiLoCo rounds"
    assert view.form.isRowVisible(view.round_label) and view.round_label.text() == "12"
    assert view.activity_label.text() == "Training locally (round 12), next exchange in about 2 min"
    assert not view.activity_label.isHidden()
    assert view.last_round_label.text() == "3 peers, 1.2 MB up / 3.4 MB down"

    expected = {"exchanging": "Exchanging with 3 peers (round 12)", "waiting": "Waiting for the swarm",
                "syncing": "Catching up with the swarm", "paused": "Paused"}
    for phase, text in expected.items():
        view.on_event(diloco_event(phase, next_exchange_s=42.0))    # the next exchange only while training
        assert view.activity_label.text() == text, phase
    view.on_event(diloco_event("exchanging", peers=2))
    assert view.activity_label.text() == "Exchanging with 1 peer (round 12)"
    view.on_event(diloco_event("exchanging", peers=1))
    assert view.activity_label.text() == "Exchanging with the swarm (round 12)"
    view.on_event(diloco_event("watching", role="host", next_exchange_s=20.0))
    assert view.activity_label.text() == "Watching the swarm (round 12), next exchange in about 20 s"
    view.on_event(diloco_event("inner", next_exchange_s=2.0))
    assert view.activity_label.text() == "Training locally (round 12), next exchange in a few seconds"

    # Before the first round: round figures are 0.
    view.on_event(diloco_event("inner", round=0, round_peers=0, round_bytes_up=0, round_bytes_down=0))
    assert view.last_round_label.text() == "none yet" and view.round_label.text() == "0"
    assert view.activity_label.text() == "Training locally (round 0)"
    # A phase this app doesn't know yet: no line rather than a wrong one.
    view.on_event(diloco_event("reticulating"))
    assert view.activity_label.isHidden()


def test_sync_events_with_and_without_the_new_fields(qtbot, store):
    view = joined_view(qtbot, store)
    view.on_event(swarm_event(time.time(), 64, 4.0))    # an older, sync-only worker
    assert view.algorithm_label.text() == "Per-step averaging" and view.last_round_label.text() == "–"
    assert not view.form.isRowVisible(view.round_label) and view.activity_label.isHidden()
    assert view.peers_label.text() == "4" and view.epoch_label.text() == "7"

    view.on_event(swarm_event(time.time(), 64, 4.0, algorithm="sync", round=7, phase="inner", next_exchange_s=7300,
                              round_bytes_up=2500, round_bytes_down=999, round_peers=1))
    assert view.algorithm_label.text() == "Per-step averaging" and not view.form.isRowVisible(view.round_label)
    assert view.activity_label.text() == "Training locally (epoch 7), next exchange in about 2 h"
    assert view.last_round_label.text() == "1 peer, 2.5 KB up / 999 B down"

    view.on_event(diloco_event("inner"))      # then a DiLoCo worker: the round row appears
    assert view.form.isRowVisible(view.round_label)
    view.on_event(swarm_event(time.time(), 64, 4.0))
    assert not view.form.isRowVisible(view.round_label) and view.activity_label.isHidden()


def test_the_phase_shows_only_while_contributing_and_round_figures_survive_a_restart(qtbot, store):
    c = Contributor(store, None, sensors=lambda exclude=frozenset(): (Sensors(
        now=__import__("datetime").datetime.now(), idle_seconds=None), {}), tick_ms=0)
    view = joined_view(qtbot, store, contributor=c)
    c.state = "contributing"

    def deliver(ev):          # what Contributor._on_event does with a worker's `swarm` event
        c._record_swarm(ev)
        c.swarm_event.emit(ev)
        c.changed.emit()

    deliver(diloco_event("exchanging", round_bytes_up=5_000_000))
    assert view.activity_label.text() == "Exchanging with 3 peers (round 12)" and not view.activity_label.isHidden()
    assert view.last_round_label.text() == "3 peers, 5.0 MB up / 3.4 MB down"

    c.state = "pausing"        # the GPU is being handed back: the phase is stale from now on
    c.changed.emit()
    assert view.activity_label.isHidden()
    assert view.state_label.text() == "Handing the GPU back…"
    c.state = "contributing"   # resumed: nothing shown until the worker says what it does
    c.changed.emit()
    assert view.activity_label.isHidden()
    deliver(diloco_event("syncing"))
    assert view.activity_label.text() == "Catching up with the swarm"

    fresh = SwarmView(store, None)      # after a restart: the figures from the store, no phase
    qtbot.addWidget(fresh)
    assert fresh.algorithm_label.text() == "DiLoCo rounds" and fresh.round_label.text() == "12"
    assert fresh.form.isRowVisible(fresh.round_label)
    assert fresh.last_round_label.text() == "3 peers, 1.2 MB up / 3.4 MB down"
    assert fresh.activity_label.isHidden()
    c.shutdown()


def test_about_reads_as_a_rough_time():
    assert [about(s) for s in (0, 9.9, 12, 44, 60, 130, 89 * 60, 5400, -3)] == [
        "in a few seconds", "in a few seconds", "in about 10 s", "in about 45 s", "in about 1 min",
        "in about 2 min", "in about 89 min", "in about 1.5 h", "in a few seconds"]
    assert about(4000) == "in about 67 min"


# --- consent before a hub download ----------------------------------------------------------------

def hub_invite(model="someorg/some-model", **changes) -> str:
    import dataclasses
    m = dataclasses.replace(load_manifest(bundled_path("swarms/demo.toml")), model=model, tokenizer="auto",
                            **changes)
    return make_invite(m, [PEER])


def test_an_invite_with_a_hub_model_asks_before_joining_and_cancel_joins_nothing(qtbot, store):
    view = SwarmView(store, None)
    qtbot.addWidget(view)
    view.show()
    view.invite_edit.setText(hub_invite())
    view.join_button.click()
    dialog = view.consent_dialog
    assert dialog is not None and dialog.isVisible() and dialog.windowTitle() == "Download from the Hugging Face hub?"
    text = dialog.text_label.text()
    assert "<b>someorg/some-model</b>" in text and "modron-demo" in text
    assert "downloaded from the Hugging Face hub (https://huggingface.co/someorg/some-model)" in text
    assert "Licence: unknown until downloaded: check it on https://huggingface.co/someorg/some-model" in text
    assert "Nothing is downloaded unless you choose" in text
    assert dialog.cancel_button.isDefault() and dialog.accept_button.text() == "Download and join"
    assert store.get_setting(settings.SWARM_INVITE.key) is None                 # nothing joined while asking

    qtbot.keyClick(dialog, Qt.Key_Return)                           # Enter does not agree: it cancels
    qtbot.waitUntil(lambda: view.consent_dialog is None)
    assert store.get_setting(settings.SWARM_INVITE.key) is None
    assert store.get_setting(settings.SWARM_DOWNLOAD_CONSENT.key) is None
    assert view.error_label.isVisible()
    assert view.error_label.text() == "Not joined: you did not agree to download someorg/some-model."
    assert view.invite_edit.text() == hub_invite()                   # still there to think again


def test_agreeing_joins_and_the_worker_is_given_the_consent(qtbot, store):
    from app.contribution import consent_args
    runs = []

    class Runner:
        name = "fake"

        def command(self, args):
            runs.append(list(args))
            return sys.executable, ["-c", "pass"]

        def available(self):
            return True, ""

        def path(self, p):
            return str(p)

    c = Contributor(store, None, runner=Runner(), tick_ms=0,
                    sensors=lambda exclude=frozenset(): (Sensors(now=__import__("datetime").datetime.now(),
                                                                  idle_seconds=None), {}))
    view = SwarmView(store, None, contributor=c)
    qtbot.addWidget(view)
    view.show()
    invite = hub_invite()
    assert view.join(invite) is False                                 # asked, not joined yet
    view.consent_dialog.accept_button.click()
    qtbot.waitUntil(lambda: store.get_setting(settings.SWARM_INVITE.key) is not None)
    assert view.consent_dialog is None and not view.error_label.isVisible()
    assert store.get_setting(settings.SWARM_DOWNLOAD_CONSENT.key) == ["someorg/some-model"]
    assert "someorg/some-model (from the Hugging Face hub)" in view.swarm_label.text()
    manifest = load_manifest(bundled_path("swarms/demo.toml"))
    assert consent_args(store, manifest) == []                          # the demo downloads nothing
    c._launch()
    assert runs and runs[-1][-2:] == ["--accept-download", "someorg/some-model"]
    c.shutdown(timeout_ms=5000)

    view.leave_button.click()
    assert store.get_setting(settings.SWARM_DOWNLOAD_CONSENT.key) is None


def test_an_invite_kept_without_consent_waits_with_a_reason(qtbot, store):
    store.set_setting(settings.SWARM_INVITE.key, hub_invite("someorg/other"))     # e.g. kept by an older Modron
    store.set_setting("contribute_while_idle", True)
    c = Contributor(store, None, tick_ms=0,
                    sensors=lambda exclude=frozenset(): (Sensors(now=__import__("datetime").datetime.now(),
                                                                  idle_seconds=10_000), {}))
    c.tick()
    assert c.worker_pid is None and "agreement to download someorg/other" in c.reason
    c.shutdown()


def test_an_invite_naming_a_local_folder_is_refused_in_the_view(qtbot, store, tmp_path):
    import base64
    import json
    import zlib
    data = load_manifest(bundled_path("swarms/demo.toml")).to_dict()
    data.update(model=str(tmp_path), tokenizer="auto")
    invite = "modron-invite:1:" + base64.urlsafe_b64encode(zlib.compress(json.dumps(data).encode())).decode()
    view = SwarmView(store, None)
    qtbot.addWidget(view)
    view.invite_edit.setText(invite)
    view.join_button.click()
    assert view.consent_dialog is None and store.get_setting(settings.SWARM_INVITE.key) is None
    assert "not allowed in an invite" in view.error_label.text() and "\n" not in view.error_label.text()
