"""History's Export dialog: one run's model as a merged safetensors folder, its LoRA adapter, one GGUF file
(with a quant) or a GGUF LoRA; the expected size, a progress bar and Cancel. It proposes a free name after
the run in the last export folder (settings' last_dir "export"), asks before replacing a file that is there
(then passes the engine's --force), and keeps the line saying where it wrote until it is closed (History
shows that line too).

The engine does the work (`modron-train export RUN ... --json`): the sizes come from `--gguf-sizes` (an
EngineCall when the dialog opens), a GGUF export streams `progress` events (an EngineTask) and Cancel
stops it, leaving no partial file.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QComboBox, QDialog, QFileDialog, QFormLayout, QHBoxLayout, QLabel, QLineEdit,
                               QMessageBox, QProgressBar, QPushButton, QVBoxLayout)

from app.engine_client import EngineCall, EngineTask
from app.views.form_ux import remember_dir, start_dir
from training_core.preflight import format_bytes

# The engine's weight types (training_core/gguf_export.py QUANTS), best quality first; the engine says
# which it can write here (the k-quants need llama-cpp-python).
QUANTS = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m")
QUANT_NOTES = {"f32": "full precision, largest", "f16": "half precision, same quality",
               "bf16": "half precision", "q8_0": "8-bit, near-lossless", "q6_k": "6-bit",
               "q5_k_m": "5-bit, a good balance", "q4_k_m": "4-bit, smallest; the usual choice"}
DEFAULT_QUANT = "q8_0"
MODELFILE_SUFFIX = ".Modelfile"   # the engine writes a GGUF file's Ollama Modelfile beside it (gguf_export.py)
FORMATS = {   # key -> (label, written as a file (else a folder), needs a LoRA run)
    "gguf": ("GGUF file (llama.cpp, Ollama, LM Studio, KoboldCpp)", True, False),
    "gguf_lora": ("GGUF LoRA adapter (llama.cpp / KoboldCpp --lora)", True, True),
    "merged": ("Merged model (safetensors folder for transformers)", False, False),
    "adapter": ("LoRA adapter (safetensors folder for PEFT)", False, True),
}


def checkpoint_kind(run_dir) -> str | None:
    """'lora' or 'full' from the newest checkpoint's manifest (a small JSON file), None without one."""
    root = Path(run_dir) / "checkpoints"
    best = None
    for p in root.glob("ckpt-*") if root.is_dir() else ():
        digits = p.name[5:]
        if digits.isdigit() and (p / "modron_checkpoint.json").is_file() and (best is None or int(digits) > best[0]):
            best = (int(digits), p)
    if best is None:
        return None
    try:
        kind = json.loads((best[1] / "modron_checkpoint.json").read_text(encoding="utf-8")).get("kind", "full")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if kind in ("lora", "full") else None


def slug(name: str) -> str:
    return re.sub(r"[^\w.-]+", "-", name).strip("-") or "model"


def free_path(folder: str | Path, stem: str, suffix: str = "", also: tuple[str, ...] = ()) -> Path:
    """folder/stem+suffix, else stem-2, stem-3, ...: a proposed name never points at an earlier export (the
    engine refuses a non-empty folder, and an existing file unless told to replace it). `also`: suffixes of
    files the export writes beside it (a GGUF file's Modelfile), which must be free too."""
    n = 1
    while True:
        name = stem if n == 1 else f"{stem}-{n}"
        if not any((Path(folder) / f"{name}{s}").exists() for s in (suffix, *also)):
            return Path(folder) / f"{name}{suffix}"
        n += 1


def written_files(target: str | Path, fmt: str) -> list[Path]:
    """The files a file export to `target` writes: the GGUF file, and for a model its Modelfile."""
    target = Path(target)
    return [target, target.with_name(target.stem + MODELFILE_SUFFIX)] if fmt == "gguf" else [target]


def gui_words(message: str) -> str:
    """The engine's refusal of an existing file names its command-line flag; here Export asks instead."""
    return message.replace("pass --force to replace it", "Export again to replace it")


def folder_target(picked: str | Path, stem: str) -> Path:
    """A picked folder itself when it is new or empty, else a new subfolder named `stem` inside it: picking
    one's usual exports folder must not end in the engine's "not empty" refusal."""
    picked = Path(picked)
    if not picked.exists() or (picked.is_dir() and not any(picked.iterdir())):
        return picked
    return free_path(picked, stem)


class ExportDialog(QDialog):
    exported = Signal(dict)   # the engine's answer when an export finished
    running = Signal(bool)    # an export started (True) or ended, however it ended (False)

    def __init__(self, job_name: str, run_dir: str, store=None, parent=None, trust_remote_code: bool = False):
        super().__init__(parent)
        self.setWindowTitle(f"Export {job_name}")
        self.job_name, self.run_dir, self.store = job_name, str(run_dir), store
        self.trust_remote_code = trust_remote_code   # the job's own setting: export never reads it from the folder
        self.kind = checkpoint_kind(run_dir)
        self.sizes: dict | None = None
        self.task: EngineTask | EngineCall | None = None
        self._estimate: EngineCall | None = None
        self._typed_target = False

        self.format_box = QComboBox()
        for key, (label, _, lora_only) in FORMATS.items():
            if not lora_only or self.kind == "lora":
                self.format_box.addItem(label, key)
        self.quant_box = QComboBox()
        for q in QUANTS:
            self.quant_box.addItem(f"{q} ({QUANT_NOTES[q]})", q)
        self.quant_box.setCurrentIndex(QUANTS.index(DEFAULT_QUANT))
        self.quant_box.setToolTip("How the weights are stored: fewer bits, a smaller file and a little less quality.")
        self.size_label = QLabel("Expected size: working it out…")
        self.target_edit = QLineEdit()
        self.browse_btn = QPushButton("Choose…")
        target_row = QHBoxLayout()
        target_row.addWidget(self.target_edit, 1)
        target_row.addWidget(self.browse_btn)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.export_btn = QPushButton("Export")
        self.export_btn.setDefault(True)
        self.cancel_btn = QPushButton("Close")

        form = QFormLayout()
        form.addRow("Format", self.format_box)
        form.addRow("Quantization", self.quant_box)
        form.addRow("", self.size_label)
        form.addRow("Save to", target_row)
        buttons = QHBoxLayout()
        buttons.addStretch(1)
        buttons.addWidget(self.export_btn)
        buttons.addWidget(self.cancel_btn)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addLayout(buttons)

        self.format_box.currentIndexChanged.connect(self._on_choice)
        self.quant_box.currentIndexChanged.connect(self._on_choice)
        self.target_edit.textEdited.connect(self._on_typed)
        self.browse_btn.clicked.connect(self._browse)
        self.export_btn.clicked.connect(self.start_export)
        self.cancel_btn.clicked.connect(self._on_cancel)
        self._on_choice()
        self._ask_sizes()

    # ---- choices ------------------------------------------------------------------------
    def format(self) -> str:
        return self.format_box.currentData()

    def quant(self) -> str:
        return self.quant_box.currentData()

    def choose(self, fmt: str, quant: str | None = None) -> None:
        self.format_box.setCurrentIndex(self.format_box.findData(fmt))
        if quant is not None:
            self.quant_box.setCurrentIndex(self.quant_box.findData(quant))

    def _is_file(self) -> bool:
        return FORMATS[self.format()][1]

    def _stem(self) -> str:
        """The export's name after the run: tiny-run-q8_0, tiny-run-lora, tiny-run-merged, tiny-run-adapter."""
        fmt, name = self.format(), slug(self.job_name)
        return {"gguf": f"{name}-{self.quant()}", "gguf_lora": f"{name}-lora",
                "merged": f"{name}-merged", "adapter": f"{name}-adapter"}[fmt]

    def _also(self) -> tuple[str, ...]:
        return (MODELFILE_SUFFIX,) if self.format() == "gguf" else ()

    def default_target(self) -> str:
        return str(free_path(start_dir(self.store, "export"), self._stem(), ".gguf" if self._is_file() else "",
                             self._also()))

    def _on_typed(self, _text: str) -> None:
        self._typed_target = True

    def _on_choice(self) -> None:
        self.quant_box.setEnabled(self.format() == "gguf" and self.task is None)
        if not self._typed_target:
            self.target_edit.setText(self.default_target())
        self._show_size()
        self._update_buttons()

    def _browse(self) -> None:
        if self._is_file():
            # Export asks before replacing (the Modelfile too): one question, not the file dialog's as well.
            path, _ = QFileDialog.getSaveFileName(self, "Save the GGUF file as", self.target_edit.text(),
                                                  "GGUF files (*.gguf)",
                                                  options=QFileDialog.Option.DontConfirmOverwrite)
            if path and not path.endswith(".gguf"):
                path += ".gguf"
        else:
            picked = QFileDialog.getExistingDirectory(self, "Export to a folder",
                                                      str(Path(self.target_edit.text()).parent))
            path = str(folder_target(picked, self._stem())) if picked else ""
        if path:
            self.target_edit.setText(path)
            self._typed_target = True
            remember_dir(self.store, "export", path)   # picked counts even if this export is never started

    # ---- sizes --------------------------------------------------------------------------
    def _ask_sizes(self) -> None:
        if self.kind is None:
            self.size_label.setText("This run has no checkpoint to export yet.")
            return
        call = EngineCall(["export", self.run_dir, "--gguf-sizes", "--json"], parent=self)
        call.done.connect(self._on_sizes)
        call.failed.connect(self._on_sizes_failed)
        self._estimate = call
        call.start()

    def _on_sizes(self, doc: dict) -> None:
        self._estimate = None
        self.sizes = doc
        available = set(doc.get("available") or ())
        model = self.quant_box.model()
        for i, q in enumerate(QUANTS):
            size = (doc.get("sizes") or {}).get(q)
            text = f"{q} ({QUANT_NOTES[q]})" + (f", about {format_bytes(size)}" if size else "")
            self.quant_box.setItemText(i, text)
            item = model.item(i)
            item.setEnabled(q in available)
            item.setToolTip("" if q in available else str(doc.get("k_quants_hint") or ""))
        if self.quant() not in available and available:
            fallback = "q8_0" if "q8_0" in available else sorted(available)[0]
            self.quant_box.setCurrentIndex(self.quant_box.findData(fallback))
        self._show_size()

    def _on_sizes_failed(self, message: str) -> None:
        self._estimate = None
        self.size_label.setText(f"Expected size unknown: {message}")
        self.size_label.setToolTip(message)

    def _show_size(self) -> None:
        if self.sizes is None:
            return
        fmt = self.format()
        size = None
        if fmt == "gguf":
            size = (self.sizes.get("sizes") or {}).get(self.quant())
        elif fmt == "gguf_lora":
            size = self.sizes.get("lora")
        elif fmt == "merged":
            size = (self.sizes.get("sizes") or {}).get("f32")
        elif fmt == "adapter" and self.sizes.get("lora"):
            size = self.sizes["lora"]
        self.size_label.setText(f"Expected size: about {format_bytes(size)}" if size else "Expected size: unknown")

    # ---- the export ---------------------------------------------------------------------
    def exporting(self) -> bool:
        return self.task is not None

    def _update_buttons(self) -> None:
        busy = self.task is not None
        self.export_btn.setEnabled(not busy and self.kind is not None)
        self.cancel_btn.setText("Cancel" if busy else "Close")
        for w in (self.format_box, self.target_edit, self.browse_btn):
            w.setEnabled(not busy)
        self.quant_box.setEnabled(not busy and self.format() == "gguf")

    def command(self, replace: bool = False) -> list[str]:
        target, fmt = self.target_edit.text().strip(), self.format()
        flag = {"gguf": "--gguf", "gguf_lora": "--gguf-lora", "merged": "--merged", "adapter": "--adapter"}[fmt]
        args = ["export", self.run_dir, flag, target, "--json"]
        return (args + (["--quant", self.quant()] if fmt == "gguf" else []) + (["--force"] if replace else [])
                + (["--trust-remote-code"] if self.trust_remote_code and fmt == "merged" else []))

    def _ask_replace(self, target: str) -> bool | None:
        """For a file export: False when nothing is in the way, True when the user agreed to replace what is,
        None when they did not (the field then holds a free name beside it)."""
        existing = [p for p in written_files(target, self.format()) if p.is_file()]
        if not existing:
            return False
        names, two = " and ".join(p.name for p in existing), len(existing) > 1
        answer = QMessageBox.question(
            self, "Replace it?", f"{names} already {'exist' if two else 'exists'} in {existing[0].parent}. "
            f"Replace {'them' if two else 'it'}?", QMessageBox.Yes | QMessageBox.No, QMessageBox.No)
        if answer == QMessageBox.Yes:
            return True
        path = Path(target)
        free = free_path(path.parent, path.stem, path.suffix, self._also())
        self.target_edit.setText(str(free))
        self._typed_target = True
        self.status.setStyleSheet("")
        self.status.setText(f"{path.name} is kept. Export saves as {free.name} instead.")
        return None

    def start_export(self) -> EngineTask | EngineCall | None:
        if self.task is not None or self.kind is None:
            return None
        target = self.target_edit.text().strip()
        if not target:
            self._finish("Say where to save it.", ok=False)
            return None
        replace = self._ask_replace(target) if self._is_file() else False
        if replace is None:
            return None
        remember_dir(self.store, "export", target)
        if self._is_file():
            task = EngineTask(self.command(replace), parent=self)
            task.progress.connect(self._on_progress)
            self.progress.setRange(0, 0)   # busy until the first progress event says how many tensors
        else:   # the merged model and the adapter folder answer once, without progress events
            task = EngineCall(self.command(), parent=self)
            self.progress.setRange(0, 0)
        task.done.connect(self._on_done)
        task.failed.connect(lambda message: self._finish(gui_words(message), ok=False))
        self.task = task
        self.status.setStyleSheet("")
        self.status.setText(f"Exporting to {target}…")
        self._update_buttons()
        task.start()
        self.running.emit(True)
        return task

    def _on_progress(self, ev: dict) -> None:
        total, done = ev.get("total"), ev.get("done") or 0
        if isinstance(total, int) and total > 0:
            self.progress.setRange(0, total)
            self.progress.setValue(min(done, total))
        if ev.get("message"):
            self.status.setText(str(ev["message"]))

    def _on_done(self, answer: dict) -> None:
        fmt = self.format()
        if fmt == "gguf":
            size = format_bytes(answer.get("bytes") or 0)
            text = f"GGUF ({answer.get('quant')}, {size}) written to {answer.get('gguf')}"
            if answer.get("modelfile"):
                text += f"; for Ollama: ollama create {slug(self.job_name).lower()} -f {answer['modelfile']}"
        elif fmt == "gguf_lora":
            text = f"GGUF LoRA adapter written to {answer.get('lora')}"
        else:
            text = f"{'Merged model' if fmt == 'merged' else 'Adapter'} written to {answer.get(fmt)}"
        self.progress.setRange(0, 1)
        self.progress.setValue(1)
        if not self._typed_target:   # a second Export must not land on the file just written
            self.target_edit.setText(self.default_target())
        self._finish(text, ok=True)
        self.exported.emit(dict(answer))

    def _finish(self, message: str, ok: bool) -> None:
        self.task = None
        if not ok:
            self.progress.setRange(0, 1)
            self.progress.setValue(0)
        self.status.setStyleSheet("" if ok else "color: #c62828;")
        self.status.setText(message)
        self._update_buttons()
        self.running.emit(False)

    def cancel_export(self) -> None:
        task, self.task = self.task, None
        if task is not None:
            task.cancel()
            self._finish("Export cancelled; nothing was written.", ok=False)

    def _on_cancel(self) -> None:
        if self.task is not None:
            self.cancel_export()
        else:
            self.reject()

    def busy(self) -> bool:
        """An engine process of this dialog is still running (an export, or the size estimate)."""
        return self.task is not None or self._estimate is not None

    def reject(self) -> None:   # Escape or the window's close button: never leave an export running behind
        self.cancel_export()
        super().reject()   # the size estimate ends by itself in seconds; its answer is then ignored
