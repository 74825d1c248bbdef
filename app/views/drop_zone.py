"""Where a dataset comes in: drop files or folders (or pick them), then see what Modron reads.

Validation is the engine's `validate` in its own process (an EngineCall, app/engine_client.py), so a huge or odd file
never freezes the window, and the GUI never imports the data stack.
"""
from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QFrame, QHBoxLayout, QLabel, QListWidget, QPushButton,
                               QVBoxLayout, QWidget)

from app.engine_client import EngineCall
from app.views.form_ux import choose_files, choose_folder

ERROR_STYLE = "color: #c62828;"
WARN_STYLE = "color: #9a6700;"
# Lines shown at most; a folder of thousands of bad files must not make the window miles long.
MAX_WARNINGS, MAX_ERRORS = 10, 30
DATA_FILTERS = "Text data (*.txt *.md *.jsonl *.json *.csv *.parquet *.gz);;All files (*)"


def local_paths(mime) -> list[str]:
    """The local file/folder paths a drag carries; [] when it carries anything else."""
    if mime is None or not mime.hasUrls():
        return []
    paths = [u.toLocalFile() for u in mime.urls() if u.isLocalFile()]
    return [p for p in paths if p]


def _plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def describe_report(report: dict) -> str:
    """One summary line for a validation report (ValidationReport.to_dict())."""
    tokens = (_plural(report["tokens"], "token") if report.get("tokens") is not None
              else f"about {_plural(report.get('chars', 0) // 4, 'token')}")
    return (f"Format: {report.get('format', '?')} · {_plural(report.get('records', 0), 'record')} · "
            f"{_plural(len(report.get('files', [])), 'file')} · {tokens}")


class DropZone(QFrame):
    """A drop target listing the chosen files and folders."""

    paths_changed = Signal(list)

    def __init__(self, parent=None, store=None):
        super().__init__(parent)
        self.store = store   # where the file dialogs remember the last folder; None: they don't
        self.setAcceptDrops(True)
        self.setFrameShape(QFrame.StyledPanel)
        self.setMinimumHeight(120)
        self._paths: list[str] = []

        self.hint = QLabel("Drop text files or folders here (txt, md, jsonl, json, csv, parquet)")
        self.hint.setAlignment(Qt.AlignCenter)
        self.list = QListWidget()
        self.list.setAlternatingRowColors(True)
        self.list.setMaximumHeight(140)
        self.choose_files_btn = QPushButton("Choose files…")
        self.choose_folder_btn = QPushButton("Choose folder…")
        self.clear_btn = QPushButton("Clear")
        self.setToolTip("Drop training files or folders here; folders are searched for data files")
        self.choose_files_btn.setToolTip("Pick one or more data files (txt, md, jsonl, json, csv, parquet, "
                                         "or any of them .gz)")
        self.choose_folder_btn.setToolTip("Pick a folder: every data file in it and its subfolders is used")
        self.clear_btn.setToolTip("Remove every file and folder from the list (nothing is deleted on disk)")
        self.choose_files_btn.clicked.connect(self._choose_files)
        self.choose_folder_btn.clicked.connect(self._choose_folder)
        self.clear_btn.clicked.connect(self.clear)

        buttons = QHBoxLayout()
        buttons.addWidget(self.choose_files_btn)
        buttons.addWidget(self.choose_folder_btn)
        buttons.addStretch(1)
        buttons.addWidget(self.clear_btn)
        layout = QVBoxLayout(self)
        layout.addWidget(self.hint)
        layout.addWidget(self.list)
        layout.addLayout(buttons)
        self._refresh()

    # ---- paths --------------------------------------------------------------------------
    def paths(self) -> list[str]:
        return list(self._paths)

    def set_paths(self, paths) -> None:
        self._paths = []
        self.add_paths(paths, force_signal=True)

    def add_paths(self, paths, force_signal: bool = False) -> None:
        new = [str(Path(p)) for p in paths if str(Path(p)) not in self._paths]
        self._paths.extend(new)
        self._refresh()
        if new or force_signal:
            self.paths_changed.emit(self.paths())

    def clear(self) -> None:
        if self._paths:
            self.set_paths([])

    def _refresh(self) -> None:
        self.list.clear()
        for p in self._paths:
            self.list.addItem(p + ("/" if Path(p).is_dir() else ""))
        self.list.setVisible(bool(self._paths))
        self.clear_btn.setEnabled(bool(self._paths))

    def _choose_files(self) -> None:
        files = choose_files(self, self.store, "data", "Choose training files", DATA_FILTERS)
        if files:
            self.add_paths(files)

    def _choose_folder(self) -> None:
        folder = choose_folder(self, self.store, "data", "Choose a folder of training files")
        if folder:
            self.add_paths([folder])

    # ---- drag and drop ------------------------------------------------------------------
    def dragEnterEvent(self, event) -> None:
        if local_paths(event.mimeData()):
            event.acceptProposedAction()
            self.setProperty("dragging", True)
        else:
            event.ignore()   # text, images from a browser, remote URLs: not a dataset

    def dragMoveEvent(self, event) -> None:
        if local_paths(event.mimeData()):
            event.acceptProposedAction()
        else:
            event.ignore()

    def dropEvent(self, event) -> None:
        paths = local_paths(event.mimeData())
        if not paths:
            event.ignore()
            return
        event.acceptProposedAction()
        self.add_paths(paths)


class DatasetPanel(QWidget):
    """DropZone plus the validation result: format, records, tokens, preview, warnings or the error."""

    validated = Signal(dict)      # the report of the current paths
    invalid = Signal(str)         # the error for the current paths: one line, or one per bad file

    def __init__(self, parent=None, store=None):
        super().__init__(parent)
        self.drop_zone = DropZone(store=store)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.warnings = QLabel("")
        self.warnings.setWordWrap(True)
        self.warnings.setStyleSheet(WARN_STYLE)
        self.preview = QLabel("")
        self.preview.setWordWrap(True)
        self.preview.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.preview.setStyleSheet("color: #555; font-family: monospace;")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.drop_zone)
        layout.addWidget(self.status)
        layout.addWidget(self.warnings)
        layout.addWidget(self.preview)

        self.report: dict | None = None
        self.error: str | None = None
        self._task: EngineCall | None = None
        self.drop_zone.paths_changed.connect(self.validate)
        self._show()

    def paths(self) -> list[str]:
        return self.drop_zone.paths()

    def is_valid(self) -> bool:
        return self.report is not None and self._task is None

    def busy(self) -> bool:
        return self._task is not None

    def validate(self, paths=None) -> None:
        """(Re)check the current paths; a check still running for older paths is dropped."""
        paths = self.paths() if paths is None else list(paths)
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self.report, self.error = None, None
        if not paths:
            self._show()
            return
        task = EngineCall(["validate", "--data", *paths, "--json"], parent=self)
        task.done.connect(lambda result, t=task: self._on_done(t, result))
        task.failed.connect(lambda message, t=task: self._on_failed(t, message))
        self._task = task
        self._show()
        task.start()

    def _on_done(self, task, result) -> None:
        if task is not self._task:
            return   # paths changed since this check started
        self._task = None
        self.report = result
        self._show()
        self.validated.emit(result)

    def _on_failed(self, task, message: str) -> None:
        if task is not self._task:
            return
        self._task = None
        self.error = message
        self._show()
        self.invalid.emit(message)

    def _show(self) -> None:
        self.warnings.clear()
        self.preview.clear()
        if self._task is not None:
            self.status.setStyleSheet("")
            self.status.setText("Checking the data…")
        elif self.error:
            self.status.setStyleSheet(ERROR_STYLE)
            self.status.setText(_capped(self.error.splitlines(), MAX_ERRORS))
        elif self.report is not None:
            self.status.setStyleSheet("")
            self.status.setText(describe_report(self.report))
            warns = self.report.get("warnings") or []
            if warns:
                self.warnings.setText(_capped([f"⚠ {w}" for w in warns], MAX_WARNINGS))
            previews = self.report.get("preview") or []
            if previews:
                self.preview.setText("\n\n".join(p.strip()[:300] for p in previews[:2]))
        else:
            self.status.setStyleSheet("")
            self.status.setText("No data yet.")


def _capped(lines: list[str], limit: int) -> str:
    """The lines, at most `limit` of them and a count of the rest."""
    shown = lines[:limit]
    if len(lines) > limit:
        shown.append(f"… and {len(lines) - limit} more")
    return "\n".join(shown)
