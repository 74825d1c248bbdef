"""New finetune: data, model, method and length, a pre-flight check, then "Add to queue".

The form is bound to JobSpec (training_core/config.py): every field of a job has an input here, with the
schema's default and choices. Check writes the form's spec to a file and runs the engine's
`plan --spec FILE` on it (an EngineCall, app/engine_client.py: it reads model configs with transformers);
that plan applies the same rules and figures as the engine's pre-flight. "Add to queue" only unlocks once
a check passed for exactly the form's current spec, so what is queued is what was checked.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QButtonGroup, QCheckBox, QComboBox, QFormLayout, QGroupBox,
                               QHBoxLayout, QLabel, QLineEdit, QMessageBox, QPushButton, QRadioButton,
                               QDoubleSpinBox, QScrollArea, QSpinBox, QToolButton, QVBoxLayout, QWidget)

from app.engine_client import EngineCall
from app.views.drop_zone import ERROR_STYLE, WARN_STYLE, DatasetPanel
from app.views.form_ux import choose_folder, polish_form
from app.views.job_table import view_title
from app.views.model_picker import ModelPicker
from app.views.spec_inputs import changed_signal, make_input, optional_spin, read_input, write_input
from training_core import config
from training_core.config import JobSpec
from training_core.errors import UserError
from training_core.preflight import format_bytes, format_duration

PRESETS = (("tiny", "~1 M parameters, minutes on a CPU"), ("mini", "~10 M, fine on a CPU"),
           ("small", "~40 M, a small GPU helps"), ("base", "~125 M, needs a GPU"),
           ("medium", "~350 M, needs a good GPU"))
LOCAL, HUB = "local", "hub"
VERDICT_TEXT = {"fits": ("Fits", "color: #2e7d32;"), "tight": ("Tight: it may fit", WARN_STYLE),
                "wont_fit": ("Won't fit", ERROR_STYLE)}


# The form's words for the schema's choices (the values themselves come from training_core.config).
METHOD_TEXT = {"lora": "LoRA (small adapters, little memory)", "full": "Full (every weight)",
               "qlora": "QLoRA (4-bit base, least memory; NVIDIA GPU)"}
DIVERGE_TEXT = {"stop": "stop, keeping the last good checkpoint",
                "lower_lr": "go back to it with a lower learning rate"}
SPECIAL = ("model", "data", "steps", "epochs")   # fields with inputs of their own shape (see form_spec)


def _choice_combo(name: str, words: dict[str, str] | None = None) -> QComboBox:
    box = QComboBox()
    for value in JobSpec.__dataclass_fields__[name].metadata["choices"]:
        box.addItem((words or {}).get(value, value), value)
    return box


class NewFinetuneView(QWidget):
    submitted = Signal(int)        # job id, after "Add to queue"
    demo_submitted = Signal(int)   # job id of the demo; the main window switches to the Run view

    def __init__(self, store, queue, parent=None):
        super().__init__(parent)
        self.store, self.queue = store, queue
        self.plan: dict | None = None
        self._plan_spec: dict | None = None   # the spec the shown plan was made for
        self._task: EngineCall | None = None
        self._build()
        self._on_model_kind()
        self._invalidate()

    def showEvent(self, event) -> None:
        super().showEvent(event)
        if self.queue is not None:
            self.queue.expect_job()   # the worker's seconds of imports, while the user fills in the form

    # ---- layout -------------------------------------------------------------------------
    def _build(self) -> None:
        self.dataset = DatasetPanel(store=self.store)
        self.demo_btn = QPushButton("Try the demo")
        self.demo_btn.setToolTip("Train a tiny model on bundled stories (about a minute) and watch the charts")
        self.demo_btn.clicked.connect(self.try_demo)
        data_box = QGroupBox("1. Your data")
        data_layout = QVBoxLayout(data_box)
        data_layout.addWidget(self.dataset)
        demo_row = QHBoxLayout()
        demo_row.addWidget(QLabel("Nothing to train on yet?"))
        demo_row.addWidget(self.demo_btn)
        demo_row.addStretch(1)
        self.demo_row = QWidget()
        self.demo_row.setLayout(demo_row)
        data_layout.addWidget(self.demo_row)

        # model
        self.model_combo = QComboBox()
        for name, desc in PRESETS:
            self.model_combo.addItem(f"New model from scratch: {name} ({desc})", f"scratch:{name}")
        self.model_combo.addItem("A model folder on this computer…", LOCAL)
        self.model_combo.addItem("A Hugging Face hub model id", HUB)
        self.model_combo.setToolTip("What to train: a new model built from scratch in one of these sizes, "
                                    "a pretrained model folder on this computer, or a model from the "
                                    "Hugging Face hub (downloaded once)")
        self.model_edit = QLineEdit()
        self.model_edit.setToolTip("The model folder (the one with config.json) or a hub id such as "
                                   "Qwen/Qwen2.5-0.5B")
        self.browse_btn = QPushButton("Browse…")
        self.browse_btn.setToolTip("Pick a model folder on this computer")
        self.browse_btn.clicked.connect(self._browse_model)
        model_row = QHBoxLayout()
        model_row.addWidget(self.model_edit, 1)
        model_row.addWidget(self.browse_btn)
        self.model_row = QWidget()
        self.model_row.setLayout(model_row)
        self.method_combo = _choice_combo("method", METHOD_TEXT)
        self.method_combo.setToolTip("LoRA trains small adapters beside the frozen model: little memory, a small "
                                     "file. Full changes every weight: the most memory; the only choice from "
                                     "scratch. QLoRA is LoRA on a 4-bit copy of the model: the least memory, "
                                     "NVIDIA GPUs only.")
        self.model_combo.currentIndexChanged.connect(self._on_model_kind)
        self.pick_btn = QPushButton("Choose…")
        self.pick_btn.setToolTip("Small open models with what each method needs of your GPU's memory, a hub id, "
                                 "a folder on this computer, and downloads")
        self.pick_btn.clicked.connect(self.open_picker)
        pick_row = QHBoxLayout()
        pick_row.setContentsMargins(0, 0, 0, 0)
        pick_row.addWidget(self.model_combo, 1)
        pick_row.addWidget(self.pick_btn)
        self.model_pick_row = QWidget()
        self.model_pick_row.setLayout(pick_row)
        self.model_pick_row.setToolTip(self.model_combo.toolTip())

        # length
        self.steps_radio = QRadioButton("Steps")
        self.epochs_radio = QRadioButton("Epochs")
        self.epochs_radio.setChecked(True)   # JobSpec's default length: one pass over the data
        group = QButtonGroup(self)
        group.addButton(self.steps_radio)
        group.addButton(self.epochs_radio)
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(1, 10_000_000)
        self.steps_spin.setValue(1000)
        self.steps_spin.setEnabled(False)
        self.epochs_spin = QDoubleSpinBox()
        self.epochs_spin.setRange(0.01, 1000)
        self.epochs_spin.setValue(1.0)   # = JobSpec's epochs=None ("1 epoch"); form_spec sends None for it
        self.steps_radio.setToolTip("Train for a fixed number of optimizer steps")
        self.steps_spin.setToolTip("Optimizer steps; each one trains on one batch of sequences")
        self.epochs_radio.setToolTip("Train for a number of passes over the whole dataset")
        self.epochs_spin.setToolTip("Passes over the dataset; 0.5 is half of it, 2 is everything twice")
        length_row = QHBoxLayout()
        for w in (self.steps_radio, self.steps_spin, self.epochs_radio, self.epochs_spin):
            length_row.addWidget(w)
        length_row.addStretch(1)
        self.steps_radio.toggled.connect(self._on_length_kind)
        self.name_edit = QLineEdit()
        self.name_edit.setPlaceholderText("a name for the queue (default: from the data and model)")
        self.name_edit.setToolTip("How this job is called in the queue and the history")

        model_box = QGroupBox("2. Model and training")
        form = QFormLayout(model_box)
        form.addRow("Model", self.model_pick_row)
        form.addRow("", self.model_row)
        form.addRow("Method", self.method_combo)
        form.addRow("Length", length_row)
        form.addRow("Name", self.name_edit)

        # advanced
        self.advanced_btn = QToolButton()
        self.advanced_btn.setText("Advanced")
        self.advanced_btn.setCheckable(True)
        self.advanced_btn.setToolButtonStyle(Qt.ToolButtonTextBesideIcon)
        self.advanced_btn.setArrowType(Qt.RightArrow)
        self.advanced_btn.toggled.connect(self._toggle_advanced)
        self.advanced_btn.setToolTip("Batch, sequence length, learning rate, checkpoints and more; "
                                     "the defaults suit most jobs")
        self.advanced = QWidget()
        adv = QFormLayout(self.advanced)
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(1, 4096)
        self.batch_spin.setToolTip("Sequences per optimizer step. Larger is steadier but slower per step")
        self.micro_spin = optional_spin(1, 4096, "same as batch")
        self.micro_spin.setToolTip("Sequences per forward pass. Smaller than the batch uses less memory; the "
                                   "batch is then gathered over several passes (same result, slower)")
        self.seq_spin = QSpinBox()
        self.seq_spin.setRange(8, 131072)
        self.seq_spin.setToolTip("Tokens per training sequence: how much text the model sees at once. "
                                 "Memory grows with it")
        self.lr_edit = QLineEdit()
        self.lr_edit.setPlaceholderText("auto (3e-4 full, 2e-4 LoRA)")
        self.lr_edit.setToolTip("Peak learning rate, e.g. 2e-4. Empty: 3e-4 for full training, 2e-4 for LoRA. "
                                "Too high and the loss blows up")
        self.ckpt_spin = optional_spin(1, 10_000_000, "by time (Settings)")
        self.ckpt_spin.setSuffix(" steps")
        self.ckpt_spin.setToolTip("Save a checkpoint every this many steps; a paused, stopped or crashed job "
                                  "continues from the last one. Off: by time, as set in Settings")
        self.eval_spin = optional_spin(1, 10_000_000, "at each checkpoint")
        self.eval_spin.setSuffix(" steps")
        self.eval_spin.setToolTip("Measure the loss on held-back data every this many steps "
                                  "(default: at each checkpoint and at the end)")
        self.precision_combo = _choice_combo("precision")
        self.precision_combo.setToolTip("Number format for training. auto: bf16 where the GPU has it, else fp16 "
                                        "where it is fast, else fp32; the CPU always trains in fp32. fp32 is the "
                                        "safest and uses the most memory")
        self.gc_combo = QComboBox()
        for text, value in (("auto (on when memory is short)", None), ("on", True), ("off", False)):
            self.gc_combo.addItem(text, value)
        self.gc_combo.setToolTip("Recompute activations instead of keeping them: much less memory, "
                                 "typically 20-30 % slower. auto turns it on only when memory is short")
        self.tokenizer_combo = QComboBox()
        for text, value in (("auto", "auto"), ("train one on my data", "train"), ("bytes", "bytes")):
            self.tokenizer_combo.addItem(text, value)
        self.tokenizer_combo.setToolTip("For a model from scratch only: train a tokenizer on your data "
                                        "(auto does this too), or read plain bytes (no tokenizer to train, "
                                        "longer sequences)")
        self.threads_spin = optional_spin(1, 512, "auto")
        self.threads_spin.setToolTip("CPU threads for training on the CPU; auto uses the cores other programs leave free, looked at as it runs")
        self.diverge_combo = _choice_combo("on_divergence", DIVERGE_TEXT)
        self.diverge_combo.setToolTip("When the loss stops being a finite number (the learning rate is too high). "
                                      "Going back retries at a third of the learning rate, at most 3 times.")
        self.trust_check = QCheckBox("Trust remote code")
        self.trust_check.setToolTip("Allow a hub model to run its own Python code (needed by a few models)")
        self.trust_warning = QLabel("Runs Python code shipped with the model on this computer. "
                                    "Only turn this on for models whose authors you trust.")
        self.trust_warning.setWordWrap(True)
        self.trust_warning.setStyleSheet(WARN_STYLE)
        self.trust_check.toggled.connect(self.trust_warning.setVisible)
        self.trust_warning.setVisible(False)
        adv.addRow("Batch size", self.batch_spin)
        adv.addRow("Micro-batch", self.micro_spin)
        adv.addRow("Sequence length", self.seq_spin)
        adv.addRow("Learning rate", self.lr_edit)
        adv.addRow("Checkpoint every", self.ckpt_spin)
        adv.addRow("Evaluate every", self.eval_spin)
        adv.addRow("Precision", self.precision_combo)
        adv.addRow("Gradient checkpointing", self.gc_combo)
        adv.addRow("Tokenizer (scratch)", self.tokenizer_combo)
        adv.addRow("CPU threads", self.threads_spin)
        adv.addRow("If training diverges", self.diverge_combo)
        # Every JobSpec field gets an input: the hand-built ones above, the rest made from the schema.
        self.inputs = {"method": self.method_combo, "batch_size": self.batch_spin, "micro_batch_size": self.micro_spin,
                       "seq_len": self.seq_spin, "lr": self.lr_edit, "checkpoint_every": self.ckpt_spin,
                       "eval_every": self.eval_spin, "precision": self.precision_combo,
                       "gradient_checkpointing": self.gc_combo, "tokenizer": self.tokenizer_combo,
                       "threads": self.threads_spin, "on_divergence": self.diverge_combo,
                       "trust_remote_code": self.trust_check}
        for f in config.options(config.JOB):
            if f.name not in self.inputs and f.name not in SPECIAL:
                self.inputs[f.name] = make_input(f.name)
                adv.addRow(f.metadata["label"], self.inputs[f.name])
        for name, box in self.inputs.items():
            box.setObjectName(name)
            if name != "method":   # the method's default depends on the model (_on_model_kind)
                write_input(name, box, config.default(name))
        adv.addRow(self.trust_check)
        adv.addRow(self.trust_warning)
        self.advanced.setVisible(False)
        form.addRow(self.advanced_btn)
        form.addRow(self.advanced)

        # check and queue
        self.check_btn = QPushButton("Check")
        self.check_btn.setToolTip("Estimate memory, time and disk and read the model's licence")
        self.check_btn.clicked.connect(self.check)
        self.add_btn = QPushButton("Add to queue")
        self.add_btn.clicked.connect(self.add_to_queue)
        self.add_btn.setToolTip("Queue the job exactly as checked; it starts when the jobs before it are done")
        self.plan_status = QLabel("")
        self.plan_status.setWordWrap(True)
        self.verdict_label = QLabel("")
        self.verdict_label.setWordWrap(True)
        self.details_label = QLabel("")
        self.details_label.setWordWrap(True)
        self.licence_label = QLabel("")
        self.licence_label.setWordWrap(True)
        check_box = QGroupBox("3. Check and queue")
        check_layout = QVBoxLayout(check_box)
        buttons = QHBoxLayout()
        buttons.addWidget(self.check_btn)
        buttons.addWidget(self.add_btn)
        buttons.addStretch(1)
        check_layout.addLayout(buttons)
        for w in (self.plan_status, self.verdict_label, self.details_label, self.licence_label):
            check_layout.addWidget(w)

        body = QWidget()
        body_layout = QVBoxLayout(body)
        for box in (data_box, model_box, check_box):
            body_layout.addWidget(box)
        body_layout.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(body)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        title = view_title("New finetune")
        title.setContentsMargins(9, 9, 9, 0)   # the layout is edge to edge (for the scroll area)
        outer.addWidget(title)
        outer.addWidget(scroll)
        polish_form(self)

        # Any change makes the last check stale.
        self.dataset.drop_zone.paths_changed.connect(self._invalidate)
        self.dataset.validated.connect(lambda _r: self._update_buttons())
        self.dataset.invalid.connect(lambda _m: self._update_buttons())
        for sig in (self.model_combo.currentIndexChanged, self.model_edit.textChanged, self.steps_radio.toggled,
                    self.steps_spin.valueChanged, self.epochs_spin.valueChanged,
                    *(changed_signal(box) for box in self.inputs.values())):
            sig.connect(self._invalidate)

    def _toggle_advanced(self, on: bool) -> None:
        self.advanced.setVisible(on)
        self.advanced_btn.setArrowType(Qt.DownArrow if on else Qt.RightArrow)

    def _on_model_kind(self, *_):
        kind = self.model_combo.currentData()
        self.model_row.setVisible(kind in (LOCAL, HUB))
        self.browse_btn.setVisible(kind == LOCAL)
        self.model_edit.setPlaceholderText("e.g. Qwen/Qwen2.5-0.5B" if kind == HUB else "a folder with config.json")
        # Default method by model kind: full from scratch (LoRA needs a pretrained base), LoRA otherwise.
        self.method_combo.setCurrentIndex(self.method_combo.findData("full" if self._is_scratch() else "lora"))
        self.tokenizer_combo.setEnabled(self._is_scratch())

    def _on_length_kind(self, steps: bool) -> None:
        self.steps_spin.setEnabled(steps)
        self.epochs_spin.setEnabled(not steps)

    def _is_scratch(self) -> bool:
        return str(self.model_combo.currentData()).startswith("scratch:")

    def _browse_model(self) -> None:
        folder = choose_folder(self, self.store, "model", "Choose a model folder (with config.json)")
        if folder:
            self.model_edit.setText(folder)

    def open_picker(self) -> ModelPicker:
        """The model picker, its memory figures made with the form's batch, sequence length and rank."""
        try:
            values = {name: read_input(name, box) for name, box in self.inputs.items()}
            spec = JobSpec.from_dict({**values, "model": "picker", "data": ["-"], "out": "-", "method": None})
        except UserError:
            spec = None   # the picker uses the defaults
        self.picker = ModelPicker(self.store, self, spec=spec)
        self.picker.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        self.picker.chosen.connect(self.set_model)
        self.picker.open()
        return self.picker

    def set_model(self, model: str) -> None:
        """Select a preset ("scratch:NAME"), a local folder or a hub id."""
        index = self.model_combo.findData(model)
        if index >= 0:
            self.model_combo.setCurrentIndex(index)
            return
        kind = LOCAL if Path(model).expanduser().exists() else HUB
        self.model_combo.setCurrentIndex(self.model_combo.findData(kind))
        self.model_edit.setText(model)

    # ---- the spec -----------------------------------------------------------------------
    def model_id(self) -> str:
        kind = self.model_combo.currentData()
        return self.model_edit.text().strip() if kind in (LOCAL, HUB) else kind

    def form_spec(self) -> dict:
        """The job spec the form describes, walked from JobSpec's fields (without `out`: the store picks
        the run folder; nor checkpoint_minutes: the queue fills in the Settings value). Checked by
        training_core.config.validate; raises a UserError (one line, named as the form names the field)."""
        model = self.model_id()
        if not model:
            raise UserError("Model", "choose a model folder or type a hub id")
        if not self.dataset.paths():
            raise UserError("Data", "drop some files or folders first")
        steps = self.steps_radio.isChecked()
        epochs = None if steps or self.epochs_spin.value() == 1.0 else self.epochs_spin.value()
        spec = {"model": model, "data": self.dataset.paths(), "steps": self.steps_spin.value() if steps else None,
                "epochs": epochs}
        try:
            spec.update({name: read_input(name, box) for name, box in self.inputs.items()})
            if not self._is_scratch():
                spec["tokenizer"] = config.default("tokenizer")   # a pretrained model brings its own
            JobSpec.from_dict({**spec, "out": "-"}, where="New finetune")   # the engine's own rules, early
        except UserError as exc:   # `--method: ...` reads `Method: ...` here
            raise UserError(config.label(exc.where), exc.problem) from None
        return spec

    def job_name(self, spec: dict) -> str:
        name = self.name_edit.text().strip()
        if name:
            return name
        data = Path(spec["data"][0]).name or spec["data"][0]
        return f"{data} · {spec['model'].split('/')[-1]}"

    # ---- check and queue ----------------------------------------------------------------
    def check(self) -> None:
        """Run the pre-flight plan for the form's values."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._invalidate()
        for stale in (self.store.path.parent / "checks").glob("check-*.json"):   # of cancelled checks
            stale.unlink(missing_ok=True)
        try:
            spec = self.form_spec()
        except UserError as exc:
            self._show_error(str(exc))
            return
        # The plan is made for the very spec the queue will run, handed over as a file (not as options).
        folder = self.store.path.parent / "checks"
        folder.mkdir(parents=True, exist_ok=True)
        fd, spec_file = tempfile.mkstemp(prefix="check-", suffix=".json", dir=folder)
        os.close(fd)
        queued = self.queue.prepare(spec) if self.queue is not None else spec   # as the queue will store it
        JobSpec.from_dict({**queued, "out": str(self.store.runs_dir / "new-job")}).save(spec_file)
        task = EngineCall(["plan", "--spec", spec_file, "--json"], parent=self)
        task.done.connect(lambda plan, t=task, s=spec: self._plan_done(t, s, plan))
        task.failed.connect(lambda message, t=task: self._plan_failed(t, message))
        for signal in (task.done, task.failed):   # read by then; a cancelled check's file goes with the next
            signal.connect(lambda *_, f=spec_file: Path(f).unlink(missing_ok=True))
        self._task = task
        self.plan_status.setStyleSheet("")
        self.plan_status.setText("Checking memory, time, disk and licence…")
        self._update_buttons()
        task.start()

    def _plan_done(self, task, spec, plan) -> None:
        if task is not self._task:
            return
        self._task = None
        self.show_plan(plan, spec)

    def _plan_failed(self, task, message: str) -> None:
        if task is not self._task:
            return
        self._task = None
        where, sep, problem = message.partition(": ")
        if sep and where.startswith("--"):   # the plan's rules name CLI options; the form names its fields
            message = f"{config.label(where)}: {problem}"
        self._show_error(message)

    def show_plan(self, plan: dict, spec: dict | None = None) -> None:
        """Show a plan (the `plan --json` output). `spec`: the one it was made for; None: the form's now."""
        self.plan, self._plan_spec = plan, spec if spec is not None else self._current_spec()
        verdict = plan.get("verdict", "")
        text, style = VERDICT_TEXT.get(verdict, (verdict, ""))
        mem = plan.get("memory") or {}
        where = "GPU memory" if str(plan.get("device", "")).startswith("cuda") else "memory"
        avail = f" of {format_bytes(mem['available'])} free" if mem.get("available") else ""
        lines = [f"<b>{text}</b>: about {format_bytes(mem.get('total', 0))} of {where}{avail}"]
        lines += [f"• {a}" for a in plan.get("advice") or []]
        self.verdict_label.setStyleSheet(style)
        self.verdict_label.setText("<br>".join(_html(l) if i else l for i, l in enumerate(lines)))

        disk = plan.get("disk") or {}
        eta = plan.get("eta_s")
        details = [f"Model: {plan.get('model')} · {plan.get('method')} · {plan.get('precision')} on {plan.get('device')}",
                   f"Parameters: {plan.get('params_total', 0):,} ({plan.get('params_trainable', 0):,} trained)",
                   f"Steps: {plan.get('steps', '?'):,}" if isinstance(plan.get('steps'), int) else "",
                   (f"Estimated time: {format_duration(eta)}" if eta is not None else "Estimated time: unknown")
                   + (f" ({plan['eta_note']})" if plan.get("eta_note") else ""),
                   f"Disk: needs {format_bytes(disk.get('needed', 0))}, {format_bytes(disk.get('free', 0))} free"
                   + (" (not enough)" if disk.get("verdict") == "wont_fit" else "")]
        details += plan.get("speed_notes") or []   # what becomes of Compile and Fused kernels on this device
        self.details_label.setText("\n".join(d for d in details if d))

        lic = plan.get("licence") or {}
        name = f" ({lic['name']})" if lic.get("name") else ""
        lic_text = f"Licence: {lic.get('klass', 'unknown')}{name}. {lic.get('summary', '')}"
        if lic.get("warning"):
            lic_text += f"\n⚠ {lic['warning']}"
        self.licence_label.setStyleSheet(WARN_STYLE if lic.get("warning") else "")
        self.licence_label.setText(lic_text)
        self.plan_status.setStyleSheet("")
        self.plan_status.setText("Checked. Add it to the queue when you are ready."
                                 if self._plan_spec is not None and self._plan_spec == self._current_spec()
                                 else "Settings changed during the check: check again before queueing.")
        self._update_buttons()

    def _show_error(self, message: str) -> None:
        self.plan, self._plan_spec = None, None
        self.plan_status.setStyleSheet(ERROR_STYLE)
        self.plan_status.setText(message)
        self._update_buttons()

    def _invalidate(self, *_) -> None:
        if self.plan is not None or self._plan_spec is not None:
            self.plan_status.setStyleSheet("")
            self.plan_status.setText("Settings changed: check again before queueing.")
        self.plan, self._plan_spec = None, None
        self.verdict_label.clear()
        self.details_label.clear()
        self.licence_label.clear()
        self._update_buttons()

    def _current_spec(self) -> dict | None:
        try:
            return self.form_spec()
        except UserError:
            return None

    def can_submit(self) -> bool:
        return (self.plan is not None and self._task is None and not self.dataset.busy()
                and self._plan_spec is not None and self._plan_spec == self._current_spec())

    def _update_buttons(self) -> None:
        self.add_btn.setEnabled(self.can_submit())
        self.check_btn.setEnabled(self._task is None)
        self.demo_row.setVisible(not self.dataset.paths())

    def needs_confirmation(self) -> str | None:
        """Why the user should confirm before queueing (won't fit, licence warning), or None."""
        if not self.plan:
            return None
        reasons = []
        if self.plan.get("verdict") == "wont_fit":
            reasons.append("The check says this job won't fit in memory:\n"
                           + "\n".join(f"• {a}" for a in self.plan.get("advice") or []))
        warning = (self.plan.get("licence") or {}).get("warning")
        if warning:
            reasons.append(f"Licence: {warning}")
        return "\n\n".join(reasons) or None

    def add_to_queue(self) -> int | None:
        if not self.can_submit():
            return None
        spec = self._plan_spec   # exactly what was checked (can_submit: the form still says the same)
        reason = self.needs_confirmation()
        if reason:
            answer = QMessageBox.question(self, "Add to queue anyway?", reason + "\n\nAdd it to the queue anyway?",
                                          QMessageBox.Yes | QMessageBox.No, QMessageBox.No)
            if answer != QMessageBox.Yes:
                return None
        job_id = self.queue.submit(spec, self.job_name(spec))
        self.plan_status.setStyleSheet("")
        self.plan_status.setText("Added to the queue.")
        self.submitted.emit(job_id)
        return job_id

    def try_demo(self) -> int:
        job_id = self.queue.submit_demo()   # the queue's own, so every "Try the demo" queues the very same job
        self.demo_submitted.emit(job_id)
        return job_id


def _html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
