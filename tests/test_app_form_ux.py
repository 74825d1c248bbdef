"""Form behaviours on the real widgets: the wheel over a box the user has not clicked into scrolls the
page, every option has a tooltip, file dialogs reopen where the user last was, and every bad file of a
dataset is named (engine, CLI and the drop zone)."""
import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import subprocess
import sys
from pathlib import Path

import pytest
from PySide6.QtCore import QPoint, QPointF, Qt
from PySide6.QtTest import QTest
from PySide6.QtWidgets import (QAbstractButton, QAbstractSpinBox, QApplication, QComboBox, QFileDialog,
                               QFormLayout, QLabel, QLineEdit, QPlainTextEdit, QScrollArea)

from app.store import Store
from app.views.contribution_settings import ContributionSettingsView
from app.views.drop_zone import DatasetPanel, DropZone
from app.views.new_finetune import NewFinetuneView
from training_core.data import iter_texts, validate
from training_core.errors import DataError, DataErrors

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def settings_view(qtbot, store, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))   # autostart looks there
    import app.main
    from app.views.settings_view import SettingsView
    monkeypatch.setattr(app.main, "_home", None)
    view = SettingsView(store, None)
    qtbot.addWidget(view)
    return view


def boxes(view):
    return view.findChildren(QComboBox) + view.findChildren(QAbstractSpinBox)


def value(box):
    return box.currentIndex() if isinstance(box, QComboBox) else box.value()


def wheel(box, notches: int) -> None:
    """A real (spontaneous) wheel event over the middle of `box`, as the window system sends it."""
    window = box.window()
    pos = box.mapTo(window, box.rect().center())
    QTest.wheelEvent(window.windowHandle(), QPointF(pos), QPoint(0, 120 * notches))
    QApplication.processEvents()


def show(qtbot, view, w=760, h=360):
    view.resize(w, h)
    view.show()
    view.activateWindow()
    qtbot.waitExposed(view)
    qtbot.waitUntil(view.isActiveWindow, timeout=2000)


# ---- (a) the wheel scrolls the page unless the user clicked into the box ---------------------
def test_wheel_over_an_unfocused_box_scrolls_the_new_finetune_page_and_changes_nothing(qtbot, store):
    view = NewFinetuneView(store, None)
    qtbot.addWidget(view)
    view.advanced_btn.setChecked(True)   # the advanced boxes too
    show(qtbot, view)
    scroll = view.findChild(QScrollArea)
    bar = scroll.verticalScrollBar()
    assert bar.maximum() > 0, "the page must be taller than the window for this test"
    view.name_edit.setFocus()

    combo = view.method_combo
    assert combo.currentData() == "full"   # scratch model: full; one notch down would pick QLoRA
    scroll.ensureWidgetVisible(combo)
    bar.setValue(min(bar.value() + 10, bar.maximum() - 10))   # room to scroll both ways
    QApplication.processEvents()
    top = bar.value()
    wheel(combo, -1)
    assert combo.currentData() == "full" and not combo.hasFocus()
    assert bar.value() > top, "the wheel went nowhere: the page should have scrolled down"

    # Every enabled combo and spin box of the form, both ways.
    checked = 0
    for box in boxes(view):
        if not box.isEnabled():
            continue
        for notches in (-1, 1):
            scroll.ensureWidgetVisible(box)
            QApplication.processEvents()
            before = value(box)
            wheel(box, notches)
            assert value(box) == before, f"{box.toolTip()[:40]!r} changed under the wheel"
        checked += 1
    assert checked >= 10

    # Once the user clicks into the box, the wheel is the box's: the same event changes the value.
    scroll.ensureWidgetVisible(combo)
    combo.setFocus(Qt.FocusReason.MouseFocusReason)
    assert combo.hasFocus()
    wheel(combo, -1)
    assert combo.currentData() != "full"


def test_wheel_leaves_the_rules_and_settings_boxes_alone(qtbot, store, settings_view):
    rules = ContributionSettingsView(store, None)
    qtbot.addWidget(rules)
    for view in (rules, settings_view):
        show(qtbot, view, 760, 900)
        found = boxes(view)
        assert found
        for box in found:
            assert box.focusPolicy() == Qt.FocusPolicy.StrongFocus   # the wheel alone never focuses it
            for notches in (-1, 1):
                before = value(box)
                wheel(box, notches)
                assert value(box) == before
    assert store.get_setting("checkpoint_minutes") is None   # nothing was written behind the user's back


# ---- (b) every option has a tooltip ----------------------------------------------------------
def input_widgets(view):
    kinds = (QComboBox, QAbstractSpinBox, QLineEdit, QPlainTextEdit, QAbstractButton)
    found = [w for kind in kinds for w in view.findChildren(kind)]
    # A spin box's or combo box's own line edit is part of it, not an option of its own.
    return [w for w in found if not isinstance(w.parentWidget(), (QAbstractSpinBox, QComboBox))]


def test_every_option_of_new_finetune_the_rules_and_settings_has_a_tooltip(qtbot, store, settings_view):
    views = [NewFinetuneView(store, None), ContributionSettingsView(store, None), settings_view]
    for view in views[:2]:
        qtbot.addWidget(view)
    for view in views:
        widgets = input_widgets(view)
        assert len(widgets) >= 5
        missing = [getattr(w, "text", lambda: "")() or w.objectName() or type(w).__name__
                   for w in widgets if not w.toolTip().strip()]
        assert not missing, f"{type(view).__name__}: no tooltip on {missing}"
    # A form row's label explains its field too (hovering "Method" is as natural as hovering the box).
    form = views[0].method_combo.parentWidget().layout()
    assert isinstance(form, QFormLayout)
    label = form.labelForField(views[0].method_combo)
    assert isinstance(label, QLabel) and label.toolTip() == views[0].method_combo.toolTip()


# ---- (c) file dialogs reopen where the user last was ------------------------------------------
class FakeDialogs:
    """Stands in for QFileDialog's static calls: records the start folder, answers with `answer`."""

    def __init__(self, monkeypatch):
        self.starts, self.answer = [], ""
        monkeypatch.setattr(QFileDialog, "getExistingDirectory", self._folder)
        monkeypatch.setattr(QFileDialog, "getOpenFileNames", self._files)

    def _folder(self, parent, title, start):
        self.starts.append(start)
        return self.answer

    def _files(self, parent, title, start, filters):
        self.starts.append(start)
        return (self.answer, filters.split(";;")[0]) if isinstance(self.answer, list) else ([], "")


def test_file_dialogs_start_in_the_last_folder_and_remember_it_across_restarts(qtbot, tmp_path, monkeypatch):
    datasets, models = tmp_path / "datasets", tmp_path / "models"
    (datasets / "stories").mkdir(parents=True)
    (datasets / "more").mkdir()
    (datasets / "more" / "a.txt").write_text("x")
    (models / "tiny-llama").mkdir(parents=True)
    dialogs = FakeDialogs(monkeypatch)
    db = tmp_path / "modron.sqlite3"

    store = Store(db)
    zone = DropZone(store=store)   # the bare zone: no validation subprocess behind it
    qtbot.addWidget(zone)
    qtbot.mouseClick(zone.choose_folder_btn, Qt.LeftButton)   # cancelled: nothing chosen, nothing kept
    assert dialogs.starts == [str(Path.home())] and zone.paths() == []
    dialogs.answer = str(datasets / "stories")
    qtbot.mouseClick(zone.choose_folder_btn, Qt.LeftButton)
    assert zone.paths() == [str(datasets / "stories")]
    dialogs.answer = [str(datasets / "more" / "a.txt")]
    qtbot.mouseClick(zone.choose_files_btn, Qt.LeftButton)
    assert dialogs.starts[-1] == str(datasets)   # beside the folder picked last, to pick its sibling
    store.close()

    # After a restart: the data dialogs open in the folder of the last file; the model dialog, never
    # used yet, opens there too, then keeps its own folder.
    store = Store(db)
    view = NewFinetuneView(store, None)
    qtbot.addWidget(view)
    view.set_model(str(models / "tiny-llama"))   # shows the Browse button of a local model
    dialogs.answer = ""
    qtbot.mouseClick(view.dataset.drop_zone.choose_folder_btn, Qt.LeftButton)
    assert dialogs.starts[-1] == str(datasets / "more")
    qtbot.mouseClick(view.browse_btn, Qt.LeftButton)
    assert dialogs.starts[-1] == str(datasets / "more")
    dialogs.answer = str(models / "tiny-llama")
    qtbot.mouseClick(view.browse_btn, Qt.LeftButton)
    assert view.model_edit.text() == str(models / "tiny-llama")
    dialogs.answer = ""
    qtbot.mouseClick(view.browse_btn, Qt.LeftButton)
    assert dialogs.starts[-1] == str(models)
    qtbot.mouseClick(view.dataset.drop_zone.choose_files_btn, Qt.LeftButton)
    assert dialogs.starts[-1] == str(datasets / "more")   # each kind its own folder

    # A remembered folder that was deleted since: the home folder, not a dialog lost in nowhere.
    (datasets / "more" / "a.txt").unlink()
    (datasets / "more").rmdir()
    (models / "tiny-llama").rmdir()
    models.rmdir()
    qtbot.mouseClick(view.browse_btn, Qt.LeftButton)
    assert dialogs.starts[-1] == str(Path.home())
    store.close()


# A stand-in engine for History's Export dialog: a merged "model" is one config.json; anything else fails.
FAKE_EXPORT_ENGINE = r"""
import json, pathlib, sys
args = sys.argv[1:]
if "--merged" not in args:
    sys.exit("modron-train: error: not in this stand-in")
out = pathlib.Path(args[args.index("--merged") + 1])
out.mkdir(parents=True, exist_ok=True)
(out / "config.json").write_text("{}")
print(json.dumps({"v": VERSION, "merged": str(out)}))
"""


def test_history_export_dialog_starts_in_the_last_export_folder(qtbot, tmp_path, store, monkeypatch):
    import json
    from app.job_queue import JobQueue
    from app.views.history import HistoryView
    from training_core.protocol import PROTOCOL_VERSION
    exports = tmp_path / "exports"
    (exports / "first").mkdir(parents=True)
    job = store.add_job({"model": "scratch:tiny", "data": ["x.txt"], "out": str(tmp_path / "run")}, "tiny run")
    ckpt = tmp_path / "run" / "checkpoints" / "ckpt-00000010"   # something to export
    ckpt.mkdir(parents=True)
    (ckpt / "modron_checkpoint.json").write_text(json.dumps({"step": 10, "kind": "full"}), encoding="utf-8")
    store.update_job(job.id, state="finished", finished=1.0)
    engine = tmp_path / "fake_engine.py"
    engine.write_text(FAKE_EXPORT_ENGINE.replace("VERSION", str(PROTOCOL_VERSION)), encoding="utf-8")
    monkeypatch.setattr("app.engine_client.engine_command",
                        lambda args: (sys.executable, [str(engine), *map(str, args)]))
    dialogs = FakeDialogs(monkeypatch)
    view = HistoryView(store, JobQueue(store, autostart=False))
    qtbot.addWidget(view)
    view.select_job(job.id)
    assert view.export_btn.isEnabled()

    qtbot.mouseClick(view.export_btn, Qt.LeftButton)
    dialog = view._dialogs[-1]
    dialog.choose("merged")
    assert Path(dialog.target_edit.text()).parent == Path.home()   # nothing remembered yet
    dialogs.answer = str(exports / "first")
    qtbot.mouseClick(dialog.browse_btn, Qt.LeftButton)
    assert dialogs.starts == [str(Path.home())] and dialog.target_edit.text() == str(exports / "first")
    qtbot.mouseClick(dialog.export_btn, Qt.LeftButton)
    qtbot.waitUntil(lambda: not view.exporting(), timeout=30_000)
    assert (exports / "first" / "config.json").is_file(), dialog.status.text()
    assert view.export_status.text() == f"Merged model written to {exports / 'first'}"
    dialog.reject()
    qtbot.waitUntil(lambda: not dialog.busy(), timeout=30_000)

    # The next export opens beside the last one, proposing a name after the run.
    qtbot.mouseClick(view.export_btn, Qt.LeftButton)
    dialog = view._dialogs[-1]
    dialog.choose("merged")
    assert dialog.target_edit.text() == str(exports / "tiny-run-merged")
    dialogs.answer = ""
    qtbot.mouseClick(dialog.browse_btn, Qt.LeftButton)   # cancelled: the proposal stays
    assert dialogs.starts[-1] == str(exports) and dialog.target_edit.text() == str(exports / "tiny-run-merged")
    assert store.get_setting("last_dir.export") == str(exports)
    dialog.reject()
    qtbot.waitUntil(lambda: not dialog.busy(), timeout=30_000)


# ---- (d) every bad file of a dataset is named -------------------------------------------------
def bad_folder(tmp_path) -> tuple[Path, list[str]]:
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "good.jsonl").write_text('{"text": "fine"}\n', encoding="utf-8")
    (folder / "a_broken.jsonl").write_text('{"text": "fine"}\n{not json\n', encoding="utf-8")
    (folder / "b_empty.txt").write_bytes(b"")
    (folder / "c_columns.csv").write_text("x,y\n1,2\n", encoding="utf-8")
    (folder / "d_link.txt").symlink_to(folder / "gone.txt")
    return folder, ["a_broken.jsonl", "b_empty.txt", "c_columns.csv", "d_link.txt"]


def test_validate_names_every_bad_file_one_line_each(tmp_path):
    folder, bad = bad_folder(tmp_path)
    with pytest.raises(DataErrors) as info:
        validate([folder])
    lines = str(info.value).splitlines()
    assert lines[0].startswith("4 problems in the data (a_broken.jsonl, b_empty.txt, c_columns.csv and 1 more)")
    assert [Path(line.strip().split(":")[0]).name for line in lines[1:]] == bad
    assert "line 2" in lines[1] and "empty" in lines[2] and "broken symlink" in lines[4]
    assert "good.jsonl" not in str(info.value)
    assert isinstance(info.value, DataError) and info.value.code == "bad_data"
    with pytest.raises(DataErrors):   # the scratch tokenizer's reader reads the same way
        list(iter_texts([folder]))
    # One bad file is still the plain one-line error it always was.
    one = tmp_path / "one"
    one.mkdir()
    (one / "x.txt").write_bytes(b"")
    with pytest.raises(DataError) as info:
        validate([one, tmp_path / "missing"])
    assert isinstance(info.value, DataErrors) and len(info.value.errors) == 2
    with pytest.raises(DataError) as info:
        validate([one])
    assert not isinstance(info.value, DataErrors) and "\n" not in str(info.value)


def test_cli_validate_lists_every_bad_file_and_exits_2(tmp_path):
    folder, bad = bad_folder(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "training_core.cli", "validate", "--data", str(folder)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("modron-train: error: 4 problems in the data")
    assert [Path(line.strip().split(":")[0]).name for line in lines[1:]] == bad


def test_drop_zone_shows_every_bad_file(qtbot, tmp_path, store):
    folder, bad = bad_folder(tmp_path)
    panel = DatasetPanel(store=store)
    qtbot.addWidget(panel)
    with qtbot.waitSignal(panel.invalid, timeout=60_000) as blocker:
        panel.drop_zone.set_paths([folder])
    shown = panel.status.text().splitlines()
    assert blocker.args[0].splitlines() == shown
    assert shown[0].startswith("4 problems in the data")
    assert [Path(line.split(":")[0]).name for line in shown[1:]] == bad
    assert not panel.is_valid()
