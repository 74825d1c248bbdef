"""Playground: try a finished run (or a checkpoint or exported folder) on your own prompt, side by side with
its base model if you like. In chat mode it is a conversation: each message goes with the exchanges before it
(the engine leaves out the oldest when they outgrow the model's context) until New chat, another model or
story mode starts over.

Generation is `modron-train generate --json` in its own process, run by the service app/generation.py (the
app never loads a model): text streams in as it comes; Stop asks the engine to stop between two tokens. A
training job that is running owns the GPU: Generate is refused while it runs, and a job that starts during
a generation stops it.
"""
from __future__ import annotations

import json
from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtGui import QTextCursor
from PySide6.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QHBoxLayout, QLabel, QLineEdit,
                               QPlainTextEdit, QPushButton, QSpinBox, QSplitter, QVBoxLayout, QWidget)

from app.generation import Generation
from app.views.form_ux import choose_folder, polish_form
from app.views.job_table import view_title
from training_core.escapes import unescape

STREAMS = ("trained", "base")
ERROR_STYLE = "color: #c62828;"


def finished_runs(store) -> list:
    """Finished jobs whose run folder still holds checkpoints, newest first."""
    jobs = [j for j in store.list_jobs(("finished",)) if (Path(j.run_dir) / "checkpoints").is_dir()]
    return sorted(jobs, key=lambda j: j.finished or j.created, reverse=True)


def _finetuned(folder: Path) -> bool:
    """Whether a run or checkpoint folder's job finetuned a model (so there is a base to compare with)."""
    candidates = [folder / "job.json"]
    if (folder / "modron_checkpoint.json").is_file():
        candidates.append(folder.parent.parent / "job.json")   # checkpoints/ckpt-N -> the run's job.json
    for job_file in candidates:
        try:
            model = json.loads(job_file.read_text(encoding="utf-8")).get("model", "")
        except (OSError, ValueError, AttributeError):
            continue
        return isinstance(model, str) and bool(model) and not model.startswith("scratch:")
    return False


def parse_stops(text: str) -> list[str]:
    r"""Stop sequences typed as `\nUser:, THE END`: comma-separated; `\n`, `\t`, `\\` as `generate --stop`
    reads them (the one function, training_core.escapes)."""
    return [unescape(s) for s in (part.strip() for part in text.split(",")) if s]


def _spin(kind, low, high, value, step, tip: str, decimals: int = 2):
    box = kind()
    if kind is QDoubleSpinBox:
        box.setDecimals(decimals)
    box.setRange(low, high)
    box.setSingleStep(step)
    box.setValue(value)
    box.setToolTip(tip)
    return box


class PlaygroundView(QWidget):
    def __init__(self, store, queue, parent=None):
        super().__init__(parent)
        self.store, self.queue = store, queue
        self.folder: str | None = None          # a checkpoint or exported folder picked by hand
        self.conversation: list[dict] = []      # chat mode: the messages so far ({"role", "content"})
        self._asked: str | None = None          # the message of the chat generation under way
        self._chat_source = None                # the source the conversation was had with
        # The generation itself (its process, Stop, the GPU rule) is the service's; this view shows it.
        self.generation = Generation(queue, parent=self)
        self.generation.started.connect(self._on_started)
        self.generation.text.connect(self._on_text)
        self.generation.phase.connect(self._say)
        self.generation.progress.connect(self._on_progress)
        self.generation.stopping.connect(self._say)
        self.generation.done.connect(self._on_done)
        self.generation.stopped.connect(self._on_stopped)
        self.generation.failed.connect(self._on_failed)

        self.source = QComboBox()
        self.source.setToolTip("A finished run (its newest checkpoint), or a folder you picked")
        self.source.currentIndexChanged.connect(self._on_source)
        self.folder_btn = QPushButton("Folder…")
        self.folder_btn.setToolTip("Pick a checkpoint folder (checkpoints/ckpt-…) or an exported model folder")
        self.folder_btn.clicked.connect(self._pick_folder)
        source_row = QHBoxLayout()
        source_row.addWidget(self.source, 1)
        source_row.addWidget(self.folder_btn)

        self.prompt = QPlainTextEdit()
        self.prompt.setPlaceholderText("Once upon a time…  (story: the model continues it; chat: your message)")
        self.prompt.setMaximumHeight(120)

        self.mode = QComboBox()
        self.mode.addItem("Story (continue the text)", "story")
        self.mode.addItem("Chat (the model's chat template)", "chat")
        self.mode.setToolTip("Story continues your text as it is; chat wraps it as a message in the model's "
                             "chat template (a plain User/Assistant layout when it has none), after the "
                             "conversation so far")
        self.mode.currentIndexChanged.connect(lambda: self.new_chat())
        self.temperature = _spin(QDoubleSpinBox, 0.0, 2.0, 0.8, 0.05,
                                 "Randomness: 0 always picks the likeliest token; higher is wilder")
        self.top_p = _spin(QDoubleSpinBox, 0.05, 1.0, 0.95, 0.05,
                           "Sample only from the likeliest tokens that together have this probability (1: off)")
        self.top_k = _spin(QSpinBox, 0, 1000, 40, 5, "Sample only from the k likeliest tokens (0: off)")
        self.repetition = _spin(QDoubleSpinBox, 1.0, 2.0, 1.1, 0.05,
                                "Makes tokens already in the text less likely (1: off)")
        self.max_tokens = _spin(QSpinBox, 1, 4096, 200, 50, "Stop after this many new tokens")
        self.stops = QLineEdit()
        self.stops.setPlaceholderText(r"e.g. \nUser:, THE END")
        self.stops.setToolTip(r"End the text when one of these comes (comma-separated; \n is a new line, \t a tab)")
        self.compare = QCheckBox("Compare with base")
        self.compare.setToolTip("Also generate from the model the run started from, with the same settings "
                                "and seed, shown beside it")
        self.compare.toggled.connect(self._show_panes)
        form = QFormLayout()
        form.addRow("Mode", self.mode)
        form.addRow("Temperature", self.temperature)
        form.addRow("Top-p", self.top_p)
        form.addRow("Top-k", self.top_k)
        form.addRow("Repetition penalty", self.repetition)
        form.addRow("Max new tokens", self.max_tokens)
        form.addRow("Stop sequences", self.stops)
        form.addRow("", self.compare)

        self.generate_btn = QPushButton("Generate")
        self.stop_btn = QPushButton("Stop")
        self.new_chat_btn = QPushButton("New chat")
        self.new_chat_btn.setToolTip("Forget the conversation so far: the next message starts a new one")
        self.generate_btn.clicked.connect(lambda: self.generate())
        self.stop_btn.clicked.connect(lambda: self.stop())
        self.new_chat_btn.clicked.connect(lambda: self.new_chat())
        buttons = QHBoxLayout()
        buttons.addWidget(self.generate_btn)
        buttons.addWidget(self.stop_btn)
        buttons.addWidget(self.new_chat_btn)
        buttons.addStretch(1)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        self.panes: dict[str, QPlainTextEdit] = {}
        self.pane_titles: dict[str, QLabel] = {}
        split = QSplitter(Qt.Orientation.Horizontal)
        for name, title in zip(STREAMS, ("Trained", "Base model")):
            box = QWidget()
            box_layout = QVBoxLayout(box)
            box_layout.setContentsMargins(0, 0, 0, 0)
            self.pane_titles[name] = QLabel(f"<b>{title}</b>")
            self.panes[name] = QPlainTextEdit()
            self.panes[name].setReadOnly(True)
            box_layout.addWidget(self.pane_titles[name])
            box_layout.addWidget(self.panes[name], 1)
            split.addWidget(box)
        self._boxes = [split.widget(0), split.widget(1)]

        layout = QVBoxLayout(self)
        layout.addWidget(view_title("Playground"))
        layout.addLayout(source_row)
        layout.addWidget(self.prompt)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.status)
        layout.addWidget(split, 1)
        polish_form(self)

        queue.queue_changed.connect(self.refresh)
        self.refresh()
        self._show_panes()
        self._update_buttons()

    # ---- the source --------------------------------------------------------------------------
    def refresh(self) -> None:
        """List the finished runs again, keeping the current choice."""
        current = self.source.currentData()
        self.source.blockSignals(True)
        self.source.clear()
        for job in finished_runs(self.store):
            self.source.addItem(f"{job.name} ({job.spec.get('model', '')})", ("job", job.id))
        if self.folder:
            self.source.addItem(f"Folder: {self.folder}", ("folder", self.folder))
        if not self.source.count():
            self.source.addItem("No finished runs yet: train one, or pick a folder", None)
        index = self._index_of(current) if current is not None else -1
        self.source.setCurrentIndex(max(index, 0))
        self.source.blockSignals(False)
        self._on_source()

    def _index_of(self, data) -> int:
        """The item holding `data`, by value: QComboBox.findData matches a Python tuple by identity, so it
        never found the new list's item, and every queue change put the first run back in the box."""
        return next((i for i in range(self.source.count()) if self.source.itemData(i) == data), -1)

    def source_texts(self) -> list[str]:
        return [self.source.itemText(i) for i in range(self.source.count())]

    def select_folder(self, folder: str) -> None:
        self.folder = folder
        self.refresh()
        self.source.setCurrentIndex(self._index_of(("folder", folder)))

    def _pick_folder(self) -> None:
        folder = choose_folder(self, self.store, "playground", "Pick a checkpoint or exported model folder")
        if folder:
            self.select_folder(folder)

    def _source_path(self) -> tuple[str | None, bool]:
        """(the folder to generate from, whether it has a base model to compare with)."""
        data = self.source.currentData()
        if not data:
            return None, False
        kind, value = data
        if kind == "folder":   # a run or checkpoint folder knows its base; an exported model does not here
            return value, _finetuned(Path(value))
        try:
            job = self.store.get_job(value)
        except KeyError:
            return None, False
        return job.run_dir, not str(job.spec.get("model", "")).startswith("scratch:")

    def _on_source(self) -> None:
        if self.source.currentData() != self._chat_source:   # another model: its conversation starts over
            self._chat_source = self.source.currentData()
            self.new_chat()
        _path, can_compare = self._source_path()
        self.compare.setEnabled(can_compare)
        self.compare.setToolTip("Also generate from the model the run started from, with the same settings and "
                                "seed, shown beside it" if can_compare else
                                "Only for runs that finetuned a model (from-scratch runs and exported folders "
                                "have no base model here)")
        if not can_compare:
            self.compare.setChecked(False)
        self._update_buttons()

    def _show_panes(self) -> None:
        self._boxes[1].setVisible(self.compare.isChecked())

    # ---- generating (the Generation service runs it; this shows it) ---------------------------
    def generating(self) -> bool:
        return self.generation.running()

    def settings(self) -> dict:
        """The form's settings, as app.generation.generate_args takes them."""
        return {"mode": self.mode.currentData(), "temperature": self.temperature.value(),
                "top_p": self.top_p.value(), "top_k": self.top_k.value(),
                "repetition_penalty": self.repetition.value(), "max_new_tokens": self.max_tokens.value(),
                "stops": parse_stops(self.stops.text()),
                "compare_base": self.compare.isChecked() and self.compare.isEnabled()}

    def generate(self) -> bool:
        """Start a generation from the chosen source; False (and why, in the status line) if it did not."""
        if self.generation.running():
            return False
        path, _ = self._source_path()
        if path is None:
            self._say("Pick a finished run or a folder first.", error=True)
            return False
        settings = self.settings()
        message = self.prompt.toPlainText()
        chat = settings["mode"] == "chat"
        why = self.generation.start(path, message, history=list(self.conversation) if chat else None,
                                    trust_remote_code=self._trusts_remote_code(), **settings)
        if why:
            self._say(why, error=True)
            return False
        self._asked = message if chat else None
        if chat:   # started: its panes show the conversation, with the message (_on_started cleared them)
            self.panes["trained"].setPlainText(self._transcript() + f"You: {message}\n\nModel: ")
            self.panes["base"].setPlainText(f"You: {message}\n\nBase model: ")
        return True

    def _trusts_remote_code(self) -> bool:
        """The user turned remote code on for this job (a folder picked by hand never gets it)."""
        data = self.source.currentData()
        if not data or data[0] != "job":
            return False
        try:
            return self.store.get_job(data[1]).spec.get("trust_remote_code") is True
        except KeyError:
            return False

    def new_chat(self) -> None:
        """Forget the conversation (New chat; another model or mode does it too)."""
        if self.generation.running():
            return
        self.conversation, self._asked = [], None
        for pane in self.panes.values():
            pane.clear()
        self._update_buttons()

    def _transcript(self) -> str:
        names = {"user": "You", "assistant": "Model"}
        return "".join(f"{names[m['role']]}: {m['content']}\n\n" for m in self.conversation)

    def stop(self) -> None:
        self.generation.stop()

    def _on_started(self) -> None:
        for pane in self.panes.values():
            pane.clear()
        self._say("Starting…")
        self._update_buttons()

    def _on_text(self, stream: str, text: str) -> None:
        pane = self.panes.get(stream)
        if pane is not None:
            pane.moveCursor(QTextCursor.MoveOperation.End)
            pane.insertPlainText(text)
            pane.moveCursor(QTextCursor.MoveOperation.End)

    def _on_progress(self, stream: str, done, total) -> None:
        stream = "base model" if stream == "base" else "trained model"
        self._say(f"Generating ({stream}): {done} of {total} tokens")

    def _on_done(self, answer: dict) -> None:
        trained = (answer.get("streams") or {}).get("trained")
        summary = self._summary(answer)
        if self._asked is not None and trained is not None:
            # The reply joins the conversation (a stopped one too, as far as it got); the box is free for the next.
            self.conversation += [{"role": "user", "content": self._asked},
                                  {"role": "assistant", "content": str(trained.get("text", ""))}]
            self.prompt.clear()
            dropped = trained.get("history_dropped") or 0
            if dropped:
                summary += (f" The oldest {dropped} exchange{'s' if dropped > 1 else ''} no longer fit the model's "
                            "context and were left out.")
        self._asked = None
        for warning in self.generation.warnings:   # e.g. an older checkpoint than the newest spoke
            summary += f" Note: {warning[:1].upper()}{warning[1:]}."
        self._say(summary)
        self._update_buttons()

    def _on_stopped(self) -> None:
        self._asked = None
        self._say("Stopped.")
        self._update_buttons()

    def _on_failed(self, reason: str) -> None:
        self._asked = None
        self._say(reason, error=True)
        self._update_buttons()

    @staticmethod
    def _summary(answer: dict) -> str:
        parts = []
        for name, label in (("trained", "trained"), ("base", "base")):
            s = (answer.get("streams") or {}).get(name)
            if s:
                speed = f", {s['tokens_per_s']:g} tokens/s" if s.get("tokens_per_s") else ""
                parts.append(f"{label}: {s.get('tokens', 0)} tokens{speed} ({s.get('reason')})")
        where = f" on {answer['device']}" if answer.get("device") else ""
        head = "Stopped" if answer.get("stopped") else "Done"
        return f"{head}{where}" + (": " + "; ".join(parts) if parts else ".")

    def _say(self, text: str, error: bool = False) -> None:
        self.status.setStyleSheet(ERROR_STYLE if error else "")
        self.status.setText(text)

    def _update_buttons(self) -> None:
        busy = self.generation.running()
        self.generate_btn.setEnabled(not busy and self.source.currentData() is not None)
        self.stop_btn.setEnabled(busy)
        self.new_chat_btn.setVisible(self.mode.currentData() == "chat")
        self.new_chat_btn.setEnabled(not busy and bool(self.conversation))
        self.mode.setEnabled(not busy)
        self.source.setEnabled(not busy)
        self.folder_btn.setEnabled(not busy)

    def shutdown(self) -> None:
        """The app quits: end a generation now (it holds nothing worth saving)."""
        self.generation.kill()
