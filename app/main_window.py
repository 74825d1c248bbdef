"""The main window: a sidebar of views and a banner for things the user must know."""
from __future__ import annotations

import importlib
from collections.abc import Mapping

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QHBoxLayout, QLabel, QListWidget, QMainWindow, QStackedWidget,
                               QVBoxLayout, QWidget)

from app.icons import app_icon

# name, sidebar label, module, class — in sidebar order.
VIEWS = (
    ("dashboard", "Dashboard", "app.views.dashboard", "DashboardView"),
    ("new", "New finetune", "app.views.new_finetune", "NewFinetuneView"),
    ("queue", "Queue", "app.views.queue_view", "QueueView"),
    ("run", "Run", "app.views.run_view", "RunView"),
    ("history", "History", "app.views.history", "HistoryView"),
    ("playground", "Playground", "app.views.playground", "PlaygroundView"),
    ("swarm", "Swarm", "app.views.swarm_view", "SwarmView"),
    ("contribution", "Contribution rules", "app.views.contribution_settings", "ContributionSettingsView"),
    ("settings", "Settings", "app.views.settings_view", "SettingsView"),
)
VIEW_NAMES = tuple(v[0] for v in VIEWS)
VIEW_LABELS = {v[0]: v[1] for v in VIEWS}


def title_of(view: QWidget) -> str | None:
    """A view's title: the text of the label first in its layout (None when it starts with something else)."""
    layout = view.layout()
    item = layout.itemAt(0) if layout is not None and layout.count() else None
    widget = item.widget() if item is not None else None
    return widget.text() if isinstance(widget, QLabel) else None


class _Views(Mapping):
    """`window.views[name]`: builds a view the first time it is asked for.

    Views import pyqtgraph and read the store; building them only when shown keeps the start to
    the tray fast and a tray-only session light.
    """

    def __init__(self, window: "MainWindow"):
        self._window = window
        self._built: dict[str, QWidget] = {}

    def __getitem__(self, name: str) -> QWidget:
        if name not in VIEW_NAMES:
            raise KeyError(name)
        if name not in self._built:
            self._built[name] = self._window._build_view(name)
        return self._built[name]

    def __iter__(self):
        return iter(VIEW_NAMES)

    def __len__(self) -> int:
        return len(VIEW_NAMES)

    def built(self) -> dict[str, QWidget]:
        return dict(self._built)


class MainWindow(QMainWindow):
    job_shown = Signal(int)   # the user opened a job (Run view): the tray counts its failure as seen

    def __init__(self, store, queue, parent=None, poller=None, contributor=None):
        super().__init__(parent)
        self.store, self.queue, self.poller = store, queue, poller
        self.contributor = contributor   # app.contribution.Contributor, for the swarm views
        self.setWindowTitle("Modron")
        self.setWindowIcon(app_icon())
        self.resize(1180, 760)

        self.banner = QLabel()
        self.banner.setWordWrap(True)
        self.banner.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.banner.setStyleSheet("background: #fff4d6; color: #4a3800; border: 1px solid #e6c66a;"
                                  " border-radius: 6px; padding: 8px;")
        self.banner.hide()

        self.sidebar = QListWidget()
        self.sidebar.setFixedWidth(170)
        self.sidebar.setStyleSheet("QListWidget { font-size: 11pt; } QListWidget::item { padding: 8px; }")
        self.stack = QStackedWidget()
        for _name, label, _module, _cls in VIEWS:
            self.sidebar.addItem(label)
            self.stack.addWidget(QWidget())    # a stand-in until the view is first shown
        self.views = _Views(self)
        self.sidebar.currentRowChanged.connect(lambda row: self.show_view(VIEW_NAMES[row]))

        body = QHBoxLayout()
        body.addWidget(self.sidebar)
        body.addWidget(self.stack, 1)
        central = QWidget()
        layout = QVBoxLayout(central)
        layout.addWidget(self.banner)
        layout.addLayout(body, 1)
        self.setCentralWidget(central)
        self.show_view("dashboard")

    def _build_view(self, name: str) -> QWidget:
        index = VIEW_NAMES.index(name)
        _name, _label, module, cls_name = VIEWS[index]
        cls = getattr(importlib.import_module(module), cls_name)
        extra = {"poller": self.poller} if name == "dashboard" and self.poller is not None else {}
        if name in ("swarm", "contribution"):
            extra = {"contributor": self.contributor}
        view = cls(self.store, self.queue, parent=self, **extra)
        if hasattr(view, "demo_submitted"):   # Dashboard and New finetune have "Try the demo"
            view.demo_submitted.connect(self.show_job)
        if hasattr(view, "open_job"):         # the Queue's double-click
            view.open_job.connect(self.show_job)
        stand_in = self.stack.widget(index)
        self.stack.insertWidget(index, view)
        self.stack.removeWidget(stand_in)
        stand_in.deleteLater()
        return view

    def current_view(self) -> str:
        return VIEW_NAMES[self.stack.currentIndex()]

    def show_view(self, name: str) -> QWidget:
        view = self.views[name]
        self.stack.setCurrentWidget(view)
        index = VIEW_NAMES.index(name)
        if self.sidebar.currentRow() != index:
            self.sidebar.blockSignals(True)
            self.sidebar.setCurrentRow(index)
            self.sidebar.blockSignals(False)
        return view

    def show_banner(self, text: str) -> None:
        self.banner.setText(text)
        self.banner.setVisible(bool(text))

    def start_demo(self) -> int:
        """Queue the demo job and show it in the Run view."""
        job_id = self.queue.submit_demo()
        self.show_job(job_id)
        return job_id

    def show_job(self, job_id: int) -> None:
        """Show one job in the Run view (also from the tray's failure notice)."""
        run = self.show_view("run")
        if hasattr(run, "show_job"):
            run.show_job(job_id)
        self.job_shown.emit(job_id)
