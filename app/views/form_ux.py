"""Small behaviours every form in the app shares, set in one place.

- `polish_form(root)`: the mouse wheel over a combo or spin box the user has not clicked into scrolls
  the page instead of changing the value; each form row's label shows its field's tooltip.
- `choose_folder` / `choose_files`: file dialogs that open where the user last picked something of
  the same kind, remembered in the store's settings so it holds across restarts.
"""
from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QEvent, QObject, Qt
from PySide6.QtWidgets import QAbstractSpinBox, QComboBox, QFileDialog, QFormLayout, QLabel, QWidget

from app import settings


class _WheelToPage(QObject):
    """Event filter for combo and spin boxes: an unfocused box passes the wheel on to the page."""

    def eventFilter(self, obj, event) -> bool:
        if event.type() == QEvent.Type.Wheel and not obj.hasFocus():
            # Consumed here, so the box's value stays; ignored, so Qt hands it on to the parent
            # (the scroll area), and the page scrolls as if the box were not there.
            event.ignore()
            return True
        return False


def polish_form(root: QWidget) -> None:
    """Apply the shared form behaviours to every combo/spin box and form row under `root` (call it
    once the form is built)."""
    guard = root.findChild(_WheelToPage)
    if guard is None:
        guard = _WheelToPage(root)   # one filter per view, owned by it
    boxes = root.findChildren(QComboBox) + root.findChildren(QAbstractSpinBox)
    for box in boxes:
        # The default WheelFocus would let the wheel itself focus the box and then change it.
        box.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
        box.removeEventFilter(guard)   # idempotent when called twice
        box.installEventFilter(guard)
    for form in root.findChildren(QFormLayout):
        for row in range(form.rowCount()):
            label = form.itemAt(row, QFormLayout.ItemRole.LabelRole)
            field = form.itemAt(row, QFormLayout.ItemRole.FieldRole)
            label_w = label.widget() if label is not None else None
            field_w = field.widget() if field is not None else None
            if isinstance(label_w, QLabel) and field_w is not None and not label_w.toolTip():
                label_w.setToolTip(field_w.toolTip())


# ---- file dialogs that remember where the user was ------------------------------------------
def start_dir(store, kind: str) -> str:
    """Where a dialog for `kind` opens: the last folder picked for it, else the last of any kind,
    else the home folder. A remembered folder that is gone is skipped."""
    if store is not None:
        for setting in (settings.last_dir(kind), settings.LAST_DIR):
            value = setting.get(store)
            if value and Path(value).is_dir():
                return value
    return str(Path.home())


def remember_dir(store, kind: str, picked: str | Path) -> None:
    """Record the folder `picked` (a file or a folder) lies in: for a chosen folder too, so the next
    dialog shows it among its siblings (the next dataset is usually next to the last one)."""
    if store is None or not picked:
        return
    folder = str(Path(picked).parent)
    settings.last_dir(kind).set(store, folder)
    settings.LAST_DIR.set(store, folder)


def choose_folder(parent: QWidget, store, kind: str, title: str) -> str:
    """A folder from the user ('' when cancelled), starting where they last were."""
    folder = QFileDialog.getExistingDirectory(parent, title, start_dir(store, kind))
    if folder:
        remember_dir(store, kind, folder)
    return folder


def choose_files(parent: QWidget, store, kind: str, title: str, filters: str) -> list[str]:
    """Files from the user ([] when cancelled), starting where they last were."""
    files, _ = QFileDialog.getOpenFileNames(parent, title, start_dir(store, kind), filters)
    if files:
        remember_dir(store, kind, files[0])
    return list(files)
