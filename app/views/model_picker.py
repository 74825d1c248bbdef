"""Choose a model: small open base models and the from-scratch presets, each with what full, LoRA and QLoRA
training would need of this computer's GPU (marked where it fits), a search of the hub by id, a model
folder on this computer, and a download with its progress that can be cancelled and continued later.

The memory figures come from training_core.catalog (the engine's own planning arithmetic on each model's
config numbers: nothing is downloaded to show them). Downloads are the service app/model_download.py's
(`modron-train download ID --json`: progress events, then the folder) and searches are
`modron-train models search TEXT --json` (an EngineCall), so the app never imports the hub's client.
"""
from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (QAbstractItemView, QDialog, QHBoxLayout, QHeaderView, QLabel, QLineEdit,
                               QProgressBar, QPushButton, QTableWidget, QTableWidgetItem, QVBoxLayout)

from app.engine_client import EngineCall
from app.model_download import ModelDownload
from app.views.drop_zone import ERROR_STYLE, WARN_STYLE
from app.views.form_ux import choose_folder
from training_core import catalog
from training_core.errors import UserError
from training_core.hardware import HardwareReport, detect
from training_core.preflight import format_bytes, format_duration

COLUMNS = ("Model", "Parameters", "Download", "Licence", "Full", "LoRA", "QLoRA", "GGUF", "About")
METHOD_COLUMN = {"full": 4, "lora": 5, "qlora": 6}
GGUF_COLUMN, ABOUT_COLUMN = 7, 8
# Said before training: whoever wants the model in llama.cpp/KoboldCpp must not find out at export time.
GGUF_TIP = {True: "Exports to GGUF (llama.cpp, Ollama, LM Studio, KoboldCpp)",
            False: "No GGUF export: Modron writes GGUF for Llama, Mistral and Qwen2 models only, so this one "
                   "cannot go to llama.cpp, Ollama, LM Studio or KoboldCpp (a merged safetensors folder works)"}
MARK = {"fits": ("✓", "#2e7d32"), "tight": ("tight", "#9a6700"), "wont_fit": ("✗", "#c62828")}
HUB_ID_ROLE = Qt.ItemDataRole.UserRole
VERDICT_ROLE = Qt.ItemDataRole.UserRole + 1


def _params_text(n: int) -> str:
    return f"{n / 1e9:.1f} B" if n >= 1e9 else f"{n / 1e6:.0f} M" if n >= 1e6 else f"{n / 1e3:.0f} k"


def memory_line(report: HardwareReport) -> str:
    gpu = report.best_gpu()
    if gpu is None:
        return (f"No NVIDIA GPU found: the figures are for training on the CPU, in this computer's memory "
                f"({format_bytes(report.ram_available)} free).")
    return f"Your GPU: {gpu.name}, {format_bytes(gpu.vram_free)} free of {format_bytes(gpu.vram_total)}."


class ModelPicker(QDialog):
    chosen = Signal(str)   # a hub id, "scratch:NAME" or a local folder

    def __init__(self, store=None, parent=None, *, report: HardwareReport | None = None, spec=None):
        super().__init__(parent)
        self.setWindowTitle("Choose a model")
        self.store = store
        self.report = report if report is not None else detect(include_torch=False)
        self.spec = spec
        self._search: EngineCall | None = None
        # The download itself (its process, Cancel) is the service's; this dialog shows it.
        self.download = ModelDownload(self)
        self.download.progress.connect(self._on_progress)
        self.download.done.connect(self._on_downloaded)
        self.download.stopped.connect(self._on_download_stopped)
        self.download.failed.connect(self._on_download_failed)
        self._build()
        self.fill([*catalog.CATALOG, *catalog.PRESETS])

    # ---- layout ---------------------------------------------------------------------------
    def _build(self) -> None:
        self.gpu_label = QLabel(memory_line(self.report))
        self.gpu_label.setWordWrap(True)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.itemSelectionChanged.connect(self._update_buttons)
        self.table.itemDoubleClicked.connect(lambda _item: self.use_selected())

        self.legend = QLabel("Memory for the form's batch and sequence length, with gradient checkpointing "
                             "turned on where a run would need it (hover a figure for details). "
                             "✓ fits, tight: it may fit, ✗ won't fit. GGUF: whether the trained model "
                             "can be exported for llama.cpp, Ollama, LM Studio and KoboldCpp.")
        self.legend.setWordWrap(True)
        self.hub_edit = QLineEdit()
        self.hub_edit.setPlaceholderText("a Hugging Face hub id, e.g. HuggingFaceTB/SmolLM2-135M")
        self.hub_edit.setToolTip("Any model on the Hugging Face hub by its id (org/name)")
        self.hub_edit.textChanged.connect(self._update_buttons)
        self.hub_edit.returnPressed.connect(self.use_hub_id)
        self.search_btn = QPushButton("Search the hub")
        self.search_btn.setToolTip("Text-generation models whose id contains this text, most downloaded first")
        self.search_btn.clicked.connect(self.search_hub)
        self.hub_btn = QPushButton("Use this id")
        self.hub_btn.clicked.connect(self.use_hub_id)
        self.folder_btn = QPushButton("Model folder on this computer…")
        self.folder_btn.setToolTip("A folder with config.json, safetensors weights and a tokenizer")
        self.folder_btn.clicked.connect(self.browse_folder)
        hub_row = QHBoxLayout()
        hub_row.addWidget(self.hub_edit, 1)
        hub_row.addWidget(self.search_btn)
        hub_row.addWidget(self.hub_btn)
        hub_row.addWidget(self.folder_btn)

        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setVisible(False)
        self.use_btn = QPushButton("Use this model")
        self.use_btn.setToolTip("Put the chosen model in the form; a hub model is downloaded when the job starts")
        self.use_btn.clicked.connect(self.use_selected)
        self.download_btn = QPushButton("Download now")
        self.download_btn.setToolTip("Download the weights, config and tokenizer now (safetensors only); an "
                                     "interrupted download continues where it stopped")
        self.download_btn.clicked.connect(self.start_download)
        self.cancel_btn = QPushButton("Cancel download")
        self.cancel_btn.setToolTip("Stop now; what is downloaded is kept for the next try")
        self.cancel_btn.clicked.connect(self.cancel_download)
        close_btn = QPushButton("Close")
        close_btn.clicked.connect(self.reject)
        buttons = QHBoxLayout()
        for b in (self.use_btn, self.download_btn, self.cancel_btn):
            buttons.addWidget(b)
        buttons.addStretch(1)
        buttons.addWidget(close_btn)

        layout = QVBoxLayout(self)
        layout.addWidget(self.gpu_label)
        layout.addWidget(self.table, 1)
        layout.addWidget(self.legend)
        layout.addLayout(hub_row)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addLayout(buttons)
        self.resize(1000, 520)
        self._update_buttons()

    def fill(self, models) -> None:
        gpu = self.report.best_gpu()
        self._fixed_rows = len(models)   # search results go below these
        self.table.setRowCount(len(models))
        for row, m in enumerate(models):
            figures = catalog.method_figures(m.config, m.params, gpu=gpu, ram_available=self.report.ram_available,
                                             spec=self.spec if not m.is_scratch else None, scratch=m.is_scratch)
            name = QTableWidgetItem(m.hub_id.replace("scratch:", "New model from scratch: "))
            name.setData(HUB_ID_ROLE, m.hub_id)
            cells = [name, QTableWidgetItem(_params_text(m.params)),
                     QTableWidgetItem(format_bytes(m.download_bytes) if m.download_bytes else "—"),
                     QTableWidgetItem(m.licence_class + (f" ({m.licence_id})" if m.licence_id else ""))]
            for col, item in enumerate(cells):
                self.table.setItem(row, col, item)
            for method, col in METHOD_COLUMN.items():
                self.table.setItem(row, col, self._method_item(figures[method], method))
            gguf = QTableWidgetItem("yes" if m.gguf_export else "no ✗")
            gguf.setToolTip(GGUF_TIP[m.gguf_export])
            if not m.gguf_export:
                gguf.setForeground(QColor(MARK["wont_fit"][1]))
            self.table.setItem(row, GGUF_COLUMN, gguf)
            about = QTableWidgetItem(f"{m.architecture}: {m.note}" + ("" if m.gguf_export else "; GGUF export: no"))
            about.setToolTip(about.text())
            self.table.setItem(row, ABOUT_COLUMN, about)

    def _method_item(self, fig: dict, method: str) -> QTableWidgetItem:
        verdict = fig["verdict"]
        if verdict == "unavailable":
            item = QTableWidgetItem("—")
            item.setToolTip(fig["why"])
        else:
            mark, colour = MARK[verdict]
            item = QTableWidgetItem(f"{format_bytes(fig['total'])} {mark}")
            item.setForeground(QColor(colour))
            where = "GPU memory" if self.report.best_gpu() is not None else "memory"
            words = {"fits": "fits", "tight": "is tight: it may fit", "wont_fit": "won't fit"}[verdict]
            gc = " with gradient checkpointing" if fig["gradient_checkpointing"] else ""
            item.setToolTip(f"{method}: about {format_bytes(fig['total'])}{gc} of "
                            f"{format_bytes(fig['available'])} free {where}; {words}")
        item.setData(VERDICT_ROLE, verdict)
        return item

    # ---- searching the hub ----------------------------------------------------------------
    def search_hub(self) -> None:
        text = self.hub_edit.text().strip()
        if not text:
            return
        if self._search is not None:
            self._search.cancel()
        call = EngineCall(["models", "search", text, "--json"], parent=self)
        call.done.connect(lambda answer, c=call: self._search_done(c, answer))
        call.failed.connect(lambda message, c=call: self._search_failed(c, message))
        self._search = call
        self._say(f"Searching the hub for {text!r}…")
        call.start()

    def _search_done(self, call: EngineCall, answer: dict) -> None:
        if call is not self._search:
            return
        self._search = None
        found = [m for m in answer.get("models") or [] if isinstance(m, dict) and catalog.is_hub_id(str(m.get("id")))]
        self.table.setRowCount(self._fixed_rows + len(found))
        for row, m in enumerate(found, start=self._fixed_rows):
            name = QTableWidgetItem(m["id"])
            name.setData(HUB_ID_ROLE, m["id"])
            licence = str(m.get("licence_class") or "unknown")
            if m.get("licence_id"):
                licence += f" ({m['licence_id']})"
            about = f"{int(m.get('downloads') or 0):,} downloads on the hub"
            if m.get("gated"):
                about += "; gated: accept its terms on its page and log in first"
            for col, text in enumerate(("?", "?", licence)):
                self.table.setItem(row, col + 1, QTableWidgetItem(text))
            self.table.setItem(row, 0, name)
            for col in METHOD_COLUMN.values():
                item = QTableWidgetItem("?")
                item.setToolTip("Not known before its config is read: Check in the form shows it")
                self.table.setItem(row, col, item)
            gguf = QTableWidgetItem("?")
            gguf.setToolTip("GGUF export writes Llama, Mistral and Qwen2 models only; its card on the hub says "
                            "which this is")
            self.table.setItem(row, GGUF_COLUMN, gguf)
            self.table.setItem(row, ABOUT_COLUMN, QTableWidgetItem(about))
        self._say(f"{len(found)} models on the hub match {answer.get('query', '')!r}."
                  if found else "No text-generation model on the hub matches that.")

    def _search_failed(self, call: EngineCall, message: str) -> None:
        if call is self._search:
            self._search = None
            self._say(message, ERROR_STYLE)

    # ---- choosing -------------------------------------------------------------------------
    def selected_id(self) -> str | None:
        rows = self.table.selectionModel().selectedRows()
        return self.table.item(rows[0].row(), 0).data(HUB_ID_ROLE) if rows else None

    def select(self, hub_id: str) -> None:
        for row in range(self.table.rowCount()):
            if self.table.item(row, 0).data(HUB_ID_ROLE) == hub_id:
                self.table.selectRow(row)
                return
        raise KeyError(hub_id)

    def _choose(self, model: str) -> None:
        self.chosen.emit(model)
        self.accept()

    def use_selected(self) -> None:
        model = self.selected_id()
        if model:
            self._choose(model)

    def use_hub_id(self) -> None:
        text = self.hub_edit.text().strip()
        if not catalog.is_hub_id(text):
            self._say(f"{text or 'The hub id'}: is not a hub model id; use the form org/name", ERROR_STYLE)
            return
        self._choose(text)

    def browse_folder(self) -> None:
        folder = choose_folder(self, self.store, "model", "Choose a model folder (with config.json)")
        if folder:
            self.use_folder(folder)

    def use_folder(self, folder: str) -> bool:
        """Take a local model folder after a plain check (config.json, safetensors, tokenizer)."""
        try:
            catalog.check_local_folder(folder)
        except UserError as exc:
            self._say(str(exc), ERROR_STYLE)
            return False
        self._choose(str(Path(folder).expanduser()))
        return True

    # ---- downloading ----------------------------------------------------------------------
    def _target(self) -> str | None:
        model = self.selected_id()
        if model and not model.startswith("scratch:"):
            return model
        text = self.hub_edit.text().strip()
        return text or None

    def start_download(self) -> None:
        model = self._target()
        if model is None or not self.download.start(model):
            return
        self.progress.setValue(0)
        self.progress.setVisible(True)
        self._say(f"Asking the hub what {model} holds…")
        self._update_buttons()

    def cancel_download(self) -> None:
        self.download.cancel()   # the engine stops at once and keeps the partial file

    def _on_progress(self, ev: dict) -> None:
        done, total = ev.get("done") or 0, ev.get("total") or 0
        if total:
            self.progress.setValue(int(1000 * min(done, total) / total))
        parts = [f"{format_bytes(done)} of {format_bytes(total)}" if total else format_bytes(done)]
        if ev.get("rate"):
            parts.append(f"{format_bytes(ev['rate'])}/s")
        if ev.get("eta_s") is not None and done < total:
            parts.append(f"{format_duration(ev['eta_s'])} left")
        self._say(f"Downloading {self.download.hub_id}: " + " · ".join(parts))

    def _on_downloaded(self, folder: str) -> None:
        self._download_ended()
        self._say(f"Downloaded into {folder}")
        self._choose(folder)

    def _on_download_stopped(self, message: str) -> None:
        self._download_ended()
        self._say(f"Stopped. {message}".strip(), WARN_STYLE)

    def _on_download_failed(self, message: str) -> None:
        self._download_ended()
        self._say(message, ERROR_STYLE)

    def _download_ended(self) -> None:
        self.progress.setVisible(False)
        self._update_buttons()

    def reject(self) -> None:
        self.download.cancel(wait_ms=3000)   # closing stops the download; it continues next time
        super().reject()

    # ---- state ----------------------------------------------------------------------------
    def _say(self, text: str, style: str = "") -> None:
        self.status.setStyleSheet(style)
        self.status.setText(text)

    def _update_buttons(self) -> None:
        busy = self.download.running()
        self.use_btn.setEnabled(self.selected_id() is not None and not busy)
        self.download_btn.setEnabled(self._target() is not None and not busy)
        self.cancel_btn.setVisible(busy)
        self.hub_btn.setEnabled(bool(self.hub_edit.text().strip()) and not busy)
        self.search_btn.setEnabled(bool(self.hub_edit.text().strip()))
