"""Dashboard: one card per GPU, CPU and RAM cards, the running job, and "Try the demo"."""
from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QFrame, QGridLayout, QHBoxLayout, QLabel, QProgressBar, QPushButton,
                               QScrollArea, QVBoxLayout, QWidget)

from app.views.job_table import view_title
from app.job_queue import progress_text
from training_core.preflight import format_bytes

def _bar(maximum: int = 1000) -> QProgressBar:
    bar = QProgressBar()
    bar.setRange(0, maximum)
    bar.setTextVisible(True)
    return bar


def _set_fraction(bar: QProgressBar, used: float, total: float, text: str) -> None:
    bar.setValue(int(bar.maximum() * min(max(used / total, 0.0), 1.0)) if total else 0)
    bar.setFormat(text)


class Card(QFrame):
    """A titled box of label lines and one bar."""

    def __init__(self, title: str, parent=None):
        super().__init__(parent)
        self.setObjectName("card")
        self.setFrameShape(QFrame.Shape.StyledPanel)
        self.setStyleSheet("#card { border: 1px solid palette(mid); border-radius: 8px; }")
        self.title = QLabel(title)
        self.title.setStyleSheet("font-weight: bold; font-size: 11pt;")
        self.title.setWordWrap(True)
        self.bar = _bar()
        self.lines = QLabel()
        self.lines.setWordWrap(True)
        self.lines.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout = QVBoxLayout(self)
        layout.addWidget(self.title)
        layout.addWidget(self.bar)
        layout.addWidget(self.lines)
        layout.addStretch(1)

    def set_lines(self, lines: list[str]) -> None:
        self.lines.setText("\n".join(lines))

    def text(self) -> str:
        """Everything the card says, for tests and screen readers."""
        return "\n".join([self.title.text(), self.bar.text(), self.lines.text()])


class GpuCard(Card):
    def update_gpu(self, gpu: dict, own_pids: set[int]) -> None:
        self.title.setText(f"GPU {gpu.get('index', '?')}: {gpu.get('name', 'NVIDIA GPU')}")
        total, used = gpu.get("vram_total") or 0, gpu.get("vram_used") or 0
        _set_fraction(self.bar, used, total,
                      f"memory: {format_bytes(used)} of {format_bytes(total)} used" if total
                      else "memory: unknown")
        live = []
        if gpu.get("temperature_c") is not None:
            live.append(f"{gpu['temperature_c']} °C")
        if gpu.get("utilization_pct") is not None:
            live.append(f"{gpu['utilization_pct']} % busy")
        if gpu.get("power_w") is not None:
            live.append(f"{gpu['power_w']:g} W")
        lines = [" · ".join(live) if live else "temperature and load: not reported by the driver"]
        ours = [p for p in gpu.get("processes") or [] if p.get("pid") in own_pids]
        others = [p for p in gpu.get("processes") or [] if p.get("pid") not in own_pids]
        if ours:
            mem = sum(p.get("vram_used") or 0 for p in ours)
            lines.append(f"Modron training: {format_bytes(mem)}" if mem else "Modron training is on it")
        if others:
            lines.append("Other programs on it:")
            for p in others:
                mem = format_bytes(p["vram_used"]) if p.get("vram_used") is not None else "memory unknown"
                lines.append(f"  {p.get('name', 'unknown program')} (pid {p.get('pid')}, {mem})")
        else:
            lines.append("No other programs on it.")
        self.set_lines(lines)


class DashboardView(QWidget):
    """Live hardware cards fed by a SysInfoPoller, which runs only while this view is visible."""

    demo_submitted = Signal(int)   # job id; the main window switches to the Run view

    def __init__(self, store, queue, parent=None, poller=None):
        super().__init__(parent)
        self.store, self.queue = store, queue
        if poller is None:
            from app.sysinfo import SysInfoPoller
            poller = SysInfoPoller(parent=self)
        self.poller = poller
        self.poller.updated.connect(self.update_hardware)
        self.gpu_cards: list[GpuCard] = []
        self._first_run = True

        title = view_title("Dashboard")
        self.welcome = QLabel(
            "Welcome to Modron. New here? Try the demo: it trains a tiny language model on a few "
            "bundled stories (about a minute, even on a CPU) so you can watch the charts move.")
        self.welcome.setWordWrap(True)
        self.demo_button = QPushButton("Try the demo")
        self.demo_button.setToolTip("Train a tiny model on bundled stories (about a minute) and watch the charts")
        self.demo_button.setMinimumHeight(34)
        self.demo_button.setStyleSheet("font-weight: bold; padding: 4px 14px;")
        self.demo_button.clicked.connect(self.try_demo)
        self.job_line = QLabel()
        self.job_line.setWordWrap(True)
        self.messages = QLabel()
        self.messages.setWordWrap(True)
        self.messages.setStyleSheet("color: palette(dark);")

        self.cpu_card = Card("CPU")
        self.ram_card = Card("Memory (RAM)")
        self._grid = QGridLayout()
        self._grid.setSpacing(12)
        cards = QWidget()
        cards_layout = QVBoxLayout(cards)
        cards_layout.addLayout(self._grid)
        cards_layout.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        scroll.setWidget(cards)

        top = QHBoxLayout()
        top.addWidget(self.welcome, 1)
        top.addWidget(self.demo_button, 0, Qt.AlignmentFlag.AlignTop)
        layout = QVBoxLayout(self)
        layout.addWidget(title)
        layout.addLayout(top)
        layout.addWidget(self.job_line)
        layout.addWidget(self.messages)
        layout.addWidget(scroll, 1)
        self._place_cards()

        for signal in (queue.job_changed, queue.queue_changed):
            signal.connect(self.refresh_job)
        self.refresh_job()
        self.update_hardware({"gpus": [], "messages": ["Reading the hardware…"]})

    # --- the running job -----------------------------------------------------------------

    def refresh_job(self, *_args) -> None:
        job = self.queue.running_job()
        if job is None:
            self.job_line.setText("No job is running.")
        else:
            progress = progress_text(job)
            self.job_line.setText(f"Running: {job.name}" + (f", {progress}" if progress else ""))
        # The welcome line is for a first run only: once anything was ever queued it is noise
        # (and the store is not asked again on every step).
        if self._first_run:
            self._first_run = not self.store.list_jobs()
            self.welcome.setVisible(self._first_run)

    def try_demo(self) -> int:
        job_id = self.queue.submit_demo()
        self.demo_submitted.emit(job_id)
        return job_id

    # --- hardware ----------------------------------------------------------------------------

    def _place_cards(self) -> None:
        while self._grid.count():
            self._grid.takeAt(0)
        cards = [*self.gpu_cards, self.cpu_card, self.ram_card]
        for i, card in enumerate(cards):
            self._grid.addWidget(card, i // 2, i % 2)

    def update_hardware(self, info: dict) -> None:
        """Render one SysInfoPoller reading (training_core.hardware report dict + cpu_percent, ram_used)."""
        gpus = info.get("gpus") or []
        if len(gpus) != len(self.gpu_cards):
            for card in self.gpu_cards:
                card.deleteLater()
            self.gpu_cards = [GpuCard("GPU") for _ in gpus]
            self._place_cards()
        own = set(info.get("own_pids") or ())
        for card, gpu in zip(self.gpu_cards, gpus):
            card.update_gpu(gpu, own)
        self._update_cpu(info)
        self._update_ram(info)
        notes = list(info.get("messages") or [])
        if info.get("error"):
            notes.append(f"The hardware could not be read: {info['error']}")
        self.messages.setText("\n".join(notes))
        self.messages.setVisible(bool(notes))

    def _update_cpu(self, info: dict) -> None:
        if info.get("cpu_model"):
            self.cpu_card.title.setText(f"CPU: {info['cpu_model']}")
        pct = info.get("cpu_percent")
        _set_fraction(self.cpu_card.bar, pct or 0, 100, f"{pct:.0f} % busy" if pct is not None else "measuring…")
        physical, logical = info.get("cpu_cores_physical"), info.get("cpu_cores_logical")
        cores = f"{physical} cores, {logical} threads" if physical else f"{logical or '?'} threads"
        self.cpu_card.set_lines([cores])

    def _update_ram(self, info: dict) -> None:
        total, avail = info.get("ram_total") or 0, info.get("ram_available") or 0
        used = info.get("ram_used", max(total - avail, 0))
        _set_fraction(self.ram_card.bar, used, total,
                      f"{format_bytes(used)} of {format_bytes(total)} used" if total else "unknown")
        self.ram_card.set_lines([f"{format_bytes(avail)} available" if total else ""])

    # The poller (an NVML thread) runs only while the dashboard is on screen.
    def showEvent(self, event) -> None:
        super().showEvent(event)
        self.poller.start()
        if self._first_run:
            self.queue.expect_job()   # a new user's first click is likely "Try the demo": import meanwhile

    def hideEvent(self, event) -> None:
        self.poller.stop()
        super().hideEvent(event)
