"""Pieces the views share: the read-only, one-row-at-a-time job table of the Queue and History
views, and the title each view starts with."""
from __future__ import annotations

from PySide6.QtWidgets import QAbstractItemView, QHeaderView, QLabel, QTableWidget

TITLE_STYLE = "font-size: 16pt; font-weight: bold;"   # as the Dashboard, Swarm and Settings titles


def view_title(text: str) -> QLabel:
    """The view's title, first in its layout (main_window.title_of reads it there; a test walks every view)."""
    label = QLabel(text)
    label.setObjectName("viewTitle")
    label.setStyleSheet(TITLE_STYLE)
    return label


def job_table(columns: list[str] | tuple[str, ...]) -> QTableWidget:
    table = QTableWidget(0, len(columns))
    table.setHorizontalHeaderLabels(list(columns))
    table.setSelectionBehavior(QAbstractItemView.SelectRows)
    table.setSelectionMode(QAbstractItemView.SingleSelection)
    table.setEditTriggers(QAbstractItemView.NoEditTriggers)
    table.verticalHeader().setVisible(False)
    header = table.horizontalHeader()
    header.setSectionResizeMode(QHeaderView.ResizeToContents)
    header.setSectionResizeMode(0, QHeaderView.Stretch)   # the name column takes the slack
    return table
