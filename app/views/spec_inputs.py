"""Form inputs bound to JobSpec fields (training_core/config.py, the one schema of a job's settings).

`make_input` builds a widget for a field from its type, choices, default and help; `read_input` and
`write_input` move values between any such widget and the spec. A field added to JobSpec gets an
input in New finetune without code here; a view may hand-build a nicer widget for a field, as long as
it is one of the kinds below (combo box with the values as item data, check box, spin box whose
lowest value stands for None, line edit, plain-text edit).
"""
from __future__ import annotations

import dataclasses

from PySide6.QtWidgets import QCheckBox, QComboBox, QDoubleSpinBox, QLineEdit, QPlainTextEdit, QSpinBox, QWidget

from training_core.config import JobSpec, default
from training_core.errors import ConfigError

SPIN_MAX = 10_000_000
FIELDS = {f.name: f for f in dataclasses.fields(JobSpec)}


def _kind(name: str) -> str:
    return str(FIELDS[name].type)


def _optional(name: str) -> bool:
    return _kind(name).endswith("| None")


def optional_spin(minimum: int, maximum: int, special: str) -> QSpinBox:
    """A spin box whose lowest value shows as `special` ("auto", "same as batch"...) and means None."""
    box = QSpinBox()
    box.setRange(minimum - 1, maximum)
    box.setSpecialValueText(special)
    return box


def make_input(name: str) -> QWidget:
    meta, kind, value = FIELDS[name].metadata, _kind(name), default(name)
    if meta.get("choices"):
        box = QComboBox()
        for choice in meta["choices"]:
            box.addItem(choice, choice)
    elif kind == "bool | None":
        box = QComboBox()
        for text, choice in (("auto", None), ("on", True), ("off", False)):
            box.addItem(text, choice)
    elif kind == "bool":
        box = QCheckBox(meta["label"])
    elif kind.startswith("int"):
        low = int(meta["minimum"] or 0)
        box = optional_spin(low, SPIN_MAX, "auto") if _optional(name) else QSpinBox()
        if not _optional(name):
            box.setRange(low, SPIN_MAX)
    elif kind == "list[str]":
        box = QPlainTextEdit()
        box.setPlaceholderText("one per line")
        box.setFixedHeight(box.fontMetrics().lineSpacing() * 4)
    else:   # floats, strings and name lists are typed
        box = QLineEdit()
        if _optional(name):
            box.setPlaceholderText("auto")
    box.setToolTip(meta["help"][:1].upper() + meta["help"][1:])
    write_input(name, box, value)
    return box


def write_input(name: str, box: QWidget, value) -> None:
    if isinstance(box, QComboBox):
        box.setCurrentIndex(max(0, box.findData(value)))
    elif isinstance(box, QCheckBox):
        box.setChecked(bool(value))
    elif isinstance(box, (QSpinBox, QDoubleSpinBox)):
        box.setValue(box.minimum() if value is None else value)
    elif isinstance(box, QPlainTextEdit):
        box.setPlainText("\n".join(value or []))
    else:
        box.setText("" if value is None else ", ".join(value) if isinstance(value, list) else str(value))


def read_input(name: str, box: QWidget):
    """The field's value in `box`; a ConfigError naming the field's label when it is not one."""
    if isinstance(box, QComboBox):
        return box.currentData()
    if isinstance(box, QCheckBox):
        return box.isChecked()
    if isinstance(box, (QSpinBox, QDoubleSpinBox)):
        return None if box.specialValueText() and box.value() == box.minimum() else box.value()
    if isinstance(box, QPlainTextEdit):
        return [line.strip() for line in box.toPlainText().splitlines() if line.strip()]
    text, kind = box.text().strip(), _kind(name)
    if not text:
        if _optional(name):
            return None
        if not kind.startswith("str"):
            raise ConfigError(FIELDS[name].metadata["label"], "is empty; type a value")
    if kind.startswith(("float", "int")):
        try:
            return (float if kind.startswith("float") else int)(text)
        except ValueError:
            raise ConfigError(FIELDS[name].metadata["label"], f"{text!r} is not a number") from None
    if "list[str]" in kind:   # a name, or several separated by commas
        names = [n.strip() for n in text.split(",") if n.strip()]
        return names[0] if len(names) == 1 else names
    return text


def changed_signal(box: QWidget):
    """The signal a user's edit of `box` emits."""
    if isinstance(box, QComboBox):
        return box.currentIndexChanged
    if isinstance(box, QCheckBox):
        return box.toggled
    if isinstance(box, (QSpinBox, QDoubleSpinBox)):
        return box.valueChanged
    return box.textChanged
