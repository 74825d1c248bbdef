"""The Swarm view: join by pasting or dropping an invite, live figures and chart, why not contributing."""
import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import time
import warnings

import pytest
from PySide6.QtCore import QMimeData, QPointF, Qt, QUrl
from PySide6.QtGui import QDragEnterEvent, QDropEvent
from PySide6.QtWidgets import QApplication

from app.contribution import INVITE_SETTING, Contributor, load_rules
from app.idle_policy import Sensors
from app.store import Store
from app.views.swarm_view import SwarmView, human_bytes
from training_core.swarm.manifest import bundled_path, load_manifest, make_invite

PEER = "/ip4/127.0.0.1/tcp/31337/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
INVITE = make_invite(load_manifest(bundled_path("swarms/demo.toml")), [PEER])


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "modron.sqlite3")
    yield s
    s.close()


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
    assert "is not a Modron invite" in view.error_label.text() and store.get_setting(INVITE_SETTING) is None

    view.invite_edit.setText(INVITE)
    view.join_button.click()
    assert not view.error_label.isVisible() and view.joined_box.isVisible() and not view.join_box.isVisible()
    assert "modron-demo" in view.swarm_label.text() and "1 initial peer" in view.swarm_label.text()
    assert store.get_setting(INVITE_SETTING) == INVITE

    view.leave_button.click()
    assert store.get_setting(INVITE_SETTING) is None and view.join_box.isVisible()


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
    assert store.get_setting(INVITE_SETTING) == INVITE and view.error_label.isHidden()
    store.set_setting(INVITE_SETTING, None)
    mime = QMimeData()
    mime.setText(INVITE)
    drop(view, mime)
    assert store.get_setting(INVITE_SETTING) == INVITE


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
