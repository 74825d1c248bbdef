"""History's Export dialog: formats for the run's kind, sizes from the engine, a GGUF export fed by progress
events (a real engine), Cancel (a stand-in engine that never finishes), and a failure's one line."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PySide6.QtCore import Qt

from app.views.export_dialog import ExportDialog, checkpoint_kind

TIMEOUT_MS = 90_000

# A stand-in for `python -m training_core.cli`: answers --gguf-sizes, and for an export writes its pid, then
# sends progress events until it is stopped (or fails at once when the target's name says so).
FAKE_ENGINE = r"""
import json, os, sys, time
args = sys.argv[1:]
def event(t, **f):
    print(json.dumps({"v": 1, "type": t, "time": time.time(), **f}), flush=True)
if "--gguf-sizes" in args:
    print(json.dumps({"v": 1, "architecture": "llama", "kind": "lora", "lora": 4096, "k_quants_hint": "pip it",
                      "available": ["f32", "f16", "bf16", "q8_0"],
                      "sizes": {"f32": 4000000, "f16": 2000000, "bf16": 2000000, "q8_0": 1100000,
                                "q4_k_m": 700000, "q5_k_m": 800000, "q6_k": 900000}}))
    sys.exit(0)
target = args[args.index("--gguf") + 1] if "--gguf" in args else args[3]
if "exists-meanwhile" in target:   # the file came after the dialog looked: the engine's own refusal
    event("failed", code="bad_input", step=None,
          message=f"{target}: already exists; choose another name or pass --force to replace it")
    sys.exit(2)
if "broken" in target:
    event("failed", code="bad_model", step=None,
          message="ckpt/model: is a GPT2LMHeadModel model, which it cannot write")
    sys.stderr.write("modron-train: error: ckpt/model: is a GPT2LMHeadModel model\n")
    sys.exit(2)
open(os.environ["FAKE_PID_FILE"], "w").write(str(os.getpid()))
open(os.environ["FAKE_PID_FILE"] + ".args", "w").write(json.dumps(args))
for i in range(100000):
    event("progress", task="export", done=min(i, 40), total=40, unit="tensors", message=f"writing tensor {i}")
    time.sleep(0.05)
"""


def make_checkpoint(run: Path, kind: str) -> Path:
    ckpt = run / "checkpoints" / "ckpt-00000010"
    ckpt.mkdir(parents=True)
    (ckpt / "modron_checkpoint.json").write_text(json.dumps({"format": "modron-checkpoint", "version": 1,
                                                             "step": 10, "kind": kind}), encoding="utf-8")
    return ckpt


@pytest.fixture
def fake_engine(tmp_path, monkeypatch):
    script = tmp_path / "fake_engine.py"
    script.write_text(FAKE_ENGINE, encoding="utf-8")
    pid_file = tmp_path / "engine.pid"
    monkeypatch.setenv("FAKE_PID_FILE", str(pid_file))
    monkeypatch.setattr("app.engine_client.engine_command",
                        lambda args: (sys.executable, [str(script), *map(str, args)]))
    return pid_file


def test_the_dialog_offers_the_engines_quants():
    from training_core.gguf_export import QUANTS as ENGINE_QUANTS
    from app.views.export_dialog import QUANTS, QUANT_NOTES
    assert sorted(QUANTS) == sorted(ENGINE_QUANTS) == sorted(QUANT_NOTES)


def test_formats_follow_the_run_kind(qtbot, tmp_path, fake_engine):
    make_checkpoint(tmp_path / "full", "full")
    make_checkpoint(tmp_path / "lora", "lora")
    assert checkpoint_kind(tmp_path / "full") == "full" and checkpoint_kind(tmp_path / "nothing") is None
    full = ExportDialog("full run", str(tmp_path / "full"))
    qtbot.addWidget(full)
    assert [full.format_box.itemData(i) for i in range(full.format_box.count())] == ["gguf", "merged"]
    lora = ExportDialog("lora run", str(tmp_path / "lora"))
    qtbot.addWidget(lora)
    assert [lora.format_box.itemData(i) for i in range(lora.format_box.count())] == \
        ["gguf", "gguf_lora", "merged", "adapter"]
    # Sizes arrive from the engine; the k-quants it cannot write are greyed out with how to get them.
    qtbot.waitUntil(lambda: lora.sizes is not None, timeout=TIMEOUT_MS)
    assert lora.size_label.text() == "Expected size: about 1.0 MB" or "MB" in lora.size_label.text()
    k = lora.quant_box.findData("q4_k_m")
    assert not lora.quant_box.model().item(k).isEnabled() and lora.quant_box.model().item(k).toolTip() == "pip it"
    lora.choose("gguf_lora")
    assert not lora.quant_box.isEnabled() and lora.target_edit.text().endswith("lora-run-lora.gguf")
    assert "4.0 KB" in lora.size_label.text() or "KB" in lora.size_label.text()
    lora.choose("gguf", "f16")
    assert lora.target_edit.text().endswith("lora-run-f16.gguf")
    assert lora.command()[-2:] == ["--quant", "f16"] and "--gguf" in lora.command()
    qtbot.waitUntil(lambda: not full.busy(), timeout=TIMEOUT_MS)


def test_cancel_stops_the_export(qtbot, tmp_path, fake_engine):
    make_checkpoint(tmp_path / "run", "full")
    dialog = ExportDialog("run", str(tmp_path / "run"))
    qtbot.addWidget(dialog)
    dialog.choose("gguf", "q8_0")
    dialog.target_edit.setText(str(tmp_path / "out.gguf"))
    finished = []
    dialog.exported.connect(finished.append)
    qtbot.mouseClick(dialog.export_btn, Qt.LeftButton)
    assert dialog.exporting() and dialog.cancel_btn.text() == "Cancel" and not dialog.export_btn.isEnabled()
    qtbot.waitUntil(lambda: dialog.progress.maximum() == 40 and dialog.progress.value() >= 3, timeout=TIMEOUT_MS)
    assert dialog.status.text().startswith("writing tensor")
    task = dialog.task
    qtbot.mouseClick(dialog.cancel_btn, Qt.LeftButton)
    assert not dialog.exporting() and dialog.cancel_btn.text() == "Close" and dialog.export_btn.isEnabled()
    assert dialog.status.text() == "Export cancelled; nothing was written."
    qtbot.waitUntil(lambda: not task.running() and not dialog.busy(), timeout=10_000)
    qtbot.wait(200)
    assert finished == [] and dialog.status.text() == "Export cancelled; nothing was written."


def test_a_failure_shows_the_engine_line(qtbot, tmp_path, fake_engine):
    make_checkpoint(tmp_path / "run", "full")
    dialog = ExportDialog("run", str(tmp_path / "run"))
    qtbot.addWidget(dialog)
    dialog.target_edit.setText(str(tmp_path / "broken.gguf"))
    dialog.start_export()
    qtbot.waitUntil(lambda: not dialog.exporting(), timeout=TIMEOUT_MS)
    assert dialog.status.text() == "ckpt/model: is a GPT2LMHeadModel model, which it cannot write"
    qtbot.waitUntil(lambda: not dialog.busy(), timeout=TIMEOUT_MS)
    assert "c62828" in dialog.status.styleSheet()


def test_history_opens_the_dialog_for_the_selected_run(qtbot, tmp_path, store, fake_engine):
    from app.job_queue import JobQueue
    from app.views.history import HistoryView
    job = store.add_job({"model": "scratch:tiny", "data": ["x.txt"], "out": str(tmp_path / "run")}, "tiny run")
    make_checkpoint(tmp_path / "run", "lora")
    store.update_job(job.id, state="finished", finished=1.0)
    view = HistoryView(store, JobQueue(store, autostart=False))
    qtbot.addWidget(view)
    view.select_job(job.id)
    assert view.export_btn.isEnabled() and view.export_btn.text() == "Export…"
    dialog = view.open_export_dialog()
    assert isinstance(dialog, ExportDialog) and dialog.isVisible() and dialog.kind == "lora"
    qtbot.waitUntil(lambda: not dialog.busy(), timeout=TIMEOUT_MS)
    dialog.choose("merged")
    assert "--trust-remote-code" not in dialog.command()
    dialog.reject()
    # A job the user started with remote code on: its merged export says so (the engine never reads it from
    # the run folder, which may have come from anyone).
    store.update_job(job.id, spec={**job.spec, "trust_remote_code": True})
    trusted = view.open_export_dialog()
    qtbot.waitUntil(lambda: not trusted.busy(), timeout=TIMEOUT_MS)
    trusted.choose("merged")
    assert trusted.command()[-1] == "--trust-remote-code"
    trusted.choose("adapter")
    assert "--trust-remote-code" not in trusted.command()
    trusted.reject()
    first, dialog = trusted, view.open_export_dialog()
    assert dialog is not first and view._dialogs == [dialog]   # the closed one, its processes gone, is deleted
    qtbot.waitUntil(lambda: not dialog.busy(), timeout=TIMEOUT_MS)
    # While it exports (the stand-in never finishes), no second export can start from History.
    dialog.target_edit.setText(str(tmp_path / "out.gguf"))
    qtbot.mouseClick(dialog.export_btn, Qt.LeftButton)
    assert view.exporting() and not view.export_btn.isEnabled()
    assert view.open_export_dialog() is dialog and view._dialogs == [dialog]
    qtbot.mouseClick(dialog.cancel_btn, Qt.LeftButton)
    assert not view.exporting() and view.export_btn.isEnabled() and view.export_status.text() == ""
    qtbot.waitUntil(lambda: not dialog.busy(), timeout=10_000)
    dialog.reject()


def test_history_export_needs_a_checkpoint(qtbot, tmp_path, store):
    from app.job_queue import JobQueue
    from app.views.history import HistoryView
    job = store.add_job({"model": "scratch:tiny", "data": ["x.txt"], "out": str(tmp_path / "run")}, "tiny run")
    (tmp_path / "run").mkdir()   # an output folder, but the run failed before its first checkpoint
    store.update_job(job.id, state="failed", finished=1.0)
    view = HistoryView(store, JobQueue(store, autostart=False))
    qtbot.addWidget(view)
    view.select_job(job.id)
    assert view.open_btn.isEnabled() and not view.export_btn.isEnabled()
    make_checkpoint(tmp_path / "run", "full")
    view.select_job(job.id)
    assert view.export_btn.isEnabled()


def test_proposed_names_follow_the_run_and_never_an_earlier_export(qtbot, tmp_path, store, fake_engine):
    from app import settings
    from app.views.export_dialog import folder_target
    make_checkpoint(tmp_path / "run", "full")
    exports = tmp_path / "exports"
    exports.mkdir()
    settings.last_dir("export").set(store, str(exports))
    (exports / "tiny-run-merged").mkdir()
    (exports / "tiny-run-merged" / "config.json").write_text("{}")
    dialog = ExportDialog("tiny run", str(tmp_path / "run"), store)
    qtbot.addWidget(dialog)
    dialog.choose("gguf", "q8_0")
    assert dialog.target_edit.text() == str(exports / "tiny-run-q8_0.gguf")
    dialog.choose("merged")
    assert dialog.target_edit.text() == str(exports / "tiny-run-merged-2")
    # A picked folder: itself when empty, else a new subfolder named after the run.
    assert folder_target(tmp_path / "empty", "tiny-run-merged") == tmp_path / "empty"
    assert folder_target(exports, "tiny-run-merged") == exports / "tiny-run-merged-2"
    dialog.reject()
    qtbot.waitUntil(lambda: not dialog.busy(), timeout=TIMEOUT_MS)


def test_an_existing_file_is_replaced_only_when_the_user_says_so(qtbot, tmp_path, store, fake_engine,
                                                                   monkeypatch):
    """GGUF names are proposed free (the Modelfile beside it too); a file that is there is replaced only after
    "Replace it?" (then with the engine's --force), and the dialog never tells its user about --force."""
    from PySide6.QtWidgets import QMessageBox

    from app import settings
    make_checkpoint(tmp_path / "run", "full")
    exports = tmp_path / "exports"
    exports.mkdir()
    settings.last_dir("export").set(store, str(exports))
    (exports / "tiny-run-q8_0.gguf").write_bytes(b"GGUF")
    (exports / "tiny-run-f16.Modelfile").write_text("FROM ./tiny-run-f16.gguf")   # its GGUF since deleted
    dialog = ExportDialog("tiny run", str(tmp_path / "run"), store)
    qtbot.addWidget(dialog)
    qtbot.waitUntil(lambda: dialog.sizes is not None, timeout=TIMEOUT_MS)   # no quant fallback later on
    dialog.choose("gguf", "q8_0")
    assert dialog.target_edit.text() == str(exports / "tiny-run-q8_0-2.gguf")
    dialog.choose("gguf", "f16")
    assert dialog.target_edit.text() == str(exports / "tiny-run-f16-2.gguf")
    dialog.choose("gguf", "q8_0")

    asked, answer = [], [QMessageBox.No]
    monkeypatch.setattr(QMessageBox, "question", lambda parent, title, text, *a: asked.append((title, text))
                        or answer[0])
    existing = str(exports / "tiny-run-q8_0.gguf")
    dialog.target_edit.setText(existing)
    assert dialog.start_export() is None and not dialog.exporting()
    assert asked == [("Replace it?", f"tiny-run-q8_0.gguf already exists in {exports}. Replace it?")]
    assert (exports / "tiny-run-q8_0.gguf").read_bytes() == b"GGUF"
    assert dialog.target_edit.text() == str(exports / "tiny-run-q8_0-2.gguf")     # a free name beside it
    assert dialog.status.text() == "tiny-run-q8_0.gguf is kept. Export saves as tiny-run-q8_0-2.gguf instead."

    answer[0] = QMessageBox.Yes
    dialog.target_edit.setText(existing)
    assert dialog.start_export() is not None and len(asked) == 2
    qtbot.waitUntil(lambda: Path(str(fake_engine) + ".args").is_file(), timeout=TIMEOUT_MS)
    args = json.loads(Path(str(fake_engine) + ".args").read_text())
    assert args[args.index("--gguf") + 1] == existing and "--force" in args
    dialog.cancel_export()
    qtbot.waitUntil(lambda: not dialog.busy(), timeout=TIMEOUT_MS)

    # A file that came after the dialog looked: the engine refuses, and the line speaks of Export, not --force.
    dialog.target_edit.setText(str(exports / "exists-meanwhile.gguf"))
    dialog.start_export()
    qtbot.waitUntil(lambda: not dialog.exporting(), timeout=TIMEOUT_MS)
    assert dialog.status.text().endswith("already exists; choose another name or Export again to replace it")
    assert "--force" not in dialog.status.text() and len(asked) == 2
    qtbot.waitUntil(lambda: not dialog.busy(), timeout=TIMEOUT_MS)

    # After an export the proposal moves on: a second Export does not land on the file just written.
    dialog._typed_target = False
    dialog.choose("gguf", "bf16")
    written = exports / "tiny-run-bf16.gguf"
    assert dialog.target_edit.text() == str(written)
    written.write_bytes(b"GGUF")
    dialog._on_done({"gguf": str(written), "quant": "bf16", "bytes": 4})
    assert dialog.target_edit.text() == str(exports / "tiny-run-bf16-2.gguf")
    assert dialog.status.text().startswith("GGUF (bf16, ")
    dialog.reject()


def test_a_real_gguf_export_from_the_dialog(qtbot, tmp_path):
    """The real engine: sizes, then a q8_0 GGUF with progress events, then the Modelfile."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from helpers import make_tokenizer
    from training_core.config import JobSpec
    tok = make_tokenizer()
    run = tmp_path / "run"
    ckpt = make_checkpoint(run, "full")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=128, tie_word_embeddings=True)
                     ).save_pretrained(ckpt / "model")
    tok.save_pretrained(ckpt / "tokenizer")
    spec = JobSpec(model="scratch:tiny", data=[str(tmp_path / "d.txt")], out=str(run))
    (ckpt / "job.json").write_text(json.dumps(spec.to_dict()), encoding="utf-8")

    dialog = ExportDialog("tiny run", str(run))
    qtbot.addWidget(dialog)
    qtbot.waitUntil(lambda: dialog.sizes is not None, timeout=TIMEOUT_MS)
    assert dialog.sizes["architecture"] == "llama" and dialog.sizes["sizes"]["q8_0"] > 0
    dialog.choose("gguf", "q8_0")
    out = tmp_path / "exports" / "tiny.gguf"
    dialog.target_edit.setText(str(out))
    maxima = []
    dialog.progress.valueChanged.connect(lambda v: maxima.append((v, dialog.progress.maximum())))
    answers = []
    dialog.exported.connect(answers.append)
    dialog.start_export()
    qtbot.waitUntil(lambda: not dialog.exporting(), timeout=TIMEOUT_MS)
    assert answers, dialog.status.text()
    assert answers[0]["gguf"] == str(out) and answers[0]["bytes"] == out.stat().st_size
    assert (20, 20) in maxima   # the bar followed the engine's tensors
    assert dialog.status.text().startswith("GGUF (q8_0, ") and "ollama create tiny-run" in dialog.status.text()
    assert (tmp_path / "exports" / "tiny.Modelfile").is_file()
