"""The Playground view and its service (app/generation.py): finished runs listed, text streamed from a real
`modron-train generate` subprocess, Stop, the GPU rule, and base-vs-trained panes."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from generate_helpers import full_run, lora_run

pytest.importorskip("PySide6")

from app.generation import GPU_TAKEN  # noqa: E402
from app.job_queue import JobQueue  # noqa: E402
from app.views.playground import PlaygroundView, parse_stops  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("play")
    # endless: the stop tests need a generation still running when their stop lands
    return {"full": full_run(base / "full", endless=True), "lora": lora_run(base / "lora")}


def add_finished(store, name: str, run_dir, model: str, state: str = "finished") -> int:
    job = store.add_job({"model": model, "data": ["x.txt"], "out": str(run_dir)}, name)
    store.update_job(job.id, state=state, finished=1.0 + job.id)
    return job.id


@pytest.fixture
def view(qtbot, store, runs, tmp_path):
    add_finished(store, "scratch story", runs["full"], "scratch:tiny")
    add_finished(store, "lora chat", runs["lora"], str(runs["lora"]) + "-base")
    add_finished(store, "broken", tmp_path / "gone", "scratch:tiny", state="failed")
    add_finished(store, "no checkpoints", tmp_path / "empty", "scratch:tiny")
    queue = JobQueue(store, autostart=False)
    v = PlaygroundView(store, queue)
    qtbot.addWidget(v)
    v.resize(900, 700)
    v.show()
    yield v
    if v.generating():
        v.generation.kill()
        qtbot.waitUntil(lambda: not v.generating(), timeout=10_000)


def pick(view, name: str) -> None:
    index = next(i for i, t in enumerate(view.source_texts()) if t.startswith(name))
    view.source.setCurrentIndex(index)


def test_stop_sequences_reach_the_engine_as_typed(tmp_path):
    r"""The field and `generate --stop` read `\n`, `\t` and `\\` alike (training_core.escapes), and the app
    writes them back escaped on the command line, so the engine stops at exactly what the field meant."""
    from app.generation import generate_args
    from training_core import cli
    from training_core.generate import request_from
    stops = parse_stops(r"\nUser:, \tEND, a\\nb, C:\path")
    assert stops == ["\nUser:", "\tEND", "a\\nb", "C:\\path"]
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Once", encoding="utf-8")
    args = cli.build_parser().parse_args(generate_args(str(tmp_path), prompt, stops=stops))
    assert list(request_from(args).stop) == stops


def test_lists_finished_runs_with_checkpoints_newest_first(view):
    assert view.source_texts() == [f"lora chat ({view.store.list_jobs()[1].spec['model']})",
                                   "scratch story (scratch:tiny)"]
    pick(view, "scratch story")
    assert not view.compare.isEnabled()                     # from scratch: no base model
    pick(view, "lora chat")
    assert view.compare.isEnabled() and view.generate_btn.isEnabled() and not view.stop_btn.isEnabled()
    assert parse_stops(r"\nUser:, THE END,") == ["\nUser:", "THE END"]


def test_the_wheel_never_changes_a_setting(view, qtbot):
    from PySide6.QtWidgets import QAbstractSpinBox, QComboBox

    from test_app_form_ux import show, value, wheel
    show(qtbot, view, 900, 700)
    boxes = view.findChildren(QAbstractSpinBox) + [view.mode]
    assert len(boxes) >= 5 and all(box.toolTip() for box in boxes + view.findChildren(QComboBox))
    for box in boxes:
        for notches in (-1, 1):
            before = value(box)
            wheel(box, notches)
            assert value(box) == before, box.toolTip()


def test_refuses_while_a_training_job_holds_the_gpu(view, monkeypatch):
    monkeypatch.setattr(view.queue, "running_job", lambda: SimpleNamespace(state="running", name="big run"))
    assert view.generate() is False and not view.generating()
    assert "big run" in view.status.text() and "GPU" in view.status.text()
    monkeypatch.setattr(view.queue, "running_job", lambda: SimpleNamespace(state="paused", name="big run"))
    assert view.generation.busy_reason() is None                   # a paused job has given the GPU back


def test_streams_trained_and_base_side_by_side(view, qtbot):
    pick(view, "lora chat")
    assert not view._boxes[1].isVisible()
    view.compare.setChecked(True)
    assert view._boxes[1].isVisible()
    view.prompt.setPlainText("Once")
    view.temperature.setValue(0)
    view.max_tokens.setValue(12)
    tokens = []
    view.generation.text.connect(lambda stream, text: tokens.append(stream))
    assert view.generate()
    assert not view.generate_btn.isEnabled() and view.stop_btn.isEnabled()
    qtbot.waitUntil(lambda: not view.generating(), timeout=90_000)
    assert view.status.text().startswith("Done"), view.status.text()
    answer = view.generation.answer
    for stream in ("trained", "base"):
        assert view.panes[stream].toPlainText() == answer["streams"][stream]["text"]
    assert view.panes["trained"].toPlainText() and tokens.count("trained") > 1
    assert view.panes["trained"].toPlainText() != view.panes["base"].toPlainText()
    assert view.generate_btn.isEnabled() and not view.stop_btn.isEnabled()


def test_stop_ends_a_generation_at_once(view, qtbot):
    pick(view, "scratch story")
    view.prompt.setPlainText("Once upon a time")
    view.max_tokens.setValue(4096)
    view.generate()
    qtbot.waitUntil(lambda: len(view.panes["trained"].toPlainText()) >= 3, timeout=90_000)
    view.stop_btn.click()
    qtbot.waitUntil(lambda: not view.generating(), timeout=5_000)
    answer = view.generation.answer
    assert answer["stopped"] is True and answer["streams"]["trained"]["reason"] == "stopped"
    assert view.status.text().startswith("Stopped"), view.status.text()
    assert view.panes["trained"].toPlainText() == answer["streams"]["trained"]["text"]


def test_a_training_job_that_starts_stops_a_generation(view, qtbot):
    """The service's GPU rule, its other half: a queue job that starts during a generation stops it."""
    pick(view, "scratch story")
    view.prompt.setPlainText("Once upon a time")
    view.max_tokens.setValue(4096)
    said = []
    view.generation.stopping.connect(said.append)
    assert view.generate()
    qtbot.waitUntil(lambda: len(view.panes["trained"].toPlainText()) >= 3, timeout=90_000)
    view.queue.gpu_job_started.emit(1)
    assert said == [GPU_TAKEN] and view.status.text() == GPU_TAKEN
    qtbot.waitUntil(lambda: not view.generating(), timeout=5_000)
    assert view.generation.answer["stopped"] is True and view.generate_btn.isEnabled()


def test_chat_mode_is_a_conversation_until_new_chat(view, qtbot, runs):
    """Each message goes to the engine with the exchanges before it: the second reply is what the model
    says after the first exchange (greedy, checked in-process), not what it says to the message alone."""
    import torch

    from training_core.generate import Request, load_trained, resolve, run_one
    pick(view, "lora chat")
    view.mode.setCurrentIndex(view.mode.findData("chat"))
    assert view.new_chat_btn.isVisible() and not view.new_chat_btn.isEnabled()
    view.temperature.setValue(0)
    view.max_tokens.setValue(8)
    view.repetition.setValue(1.0)
    replies = []
    for message in ("hello there", "and then?"):
        view.prompt.setPlainText(message)
        assert view.generate()
        qtbot.waitUntil(lambda: not view.generating(), timeout=90_000)
        assert view.status.text().startswith("Done"), view.status.text()
        replies.append(view.generation.answer["streams"]["trained"]["text"])
        assert view.prompt.toPlainText() == ""                       # the box is free for the next message
    assert view.conversation == [{"role": "user", "content": "hello there"},
                                 {"role": "assistant", "content": replies[0]},
                                 {"role": "user", "content": "and then?"},
                                 {"role": "assistant", "content": replies[1]}]
    assert view.panes["trained"].toPlainText() == (f"You: hello there\n\nModel: {replies[0]}\n\n"
                                                   f"You: and then?\n\nModel: {replies[1]}")

    model, tok = load_trained(resolve(runs["lora"]), torch.float32)
    settings = dict(mode="chat", temperature=0, max_new_tokens=8, repetition_penalty=1.0, seed=0)
    with_history = run_one(model, tok, Request(prompt="and then?", history=(("hello there", replies[0]),),
                                               **settings), lambda *_: None, lambda: False, torch.device("cpu"))
    alone = run_one(model, tok, Request(prompt="and then?", **settings), lambda *_: None, lambda: False,
                    torch.device("cpu"))
    assert replies[1] == with_history["text"] and with_history["text"] != alone["text"]

    view.queue.queue_changed.emit()                    # the list of runs refreshed: the same model, same chat
    assert len(view.conversation) == 4 and view.new_chat_btn.isEnabled()
    view.new_chat_btn.click()
    assert view.conversation == [] and view.panes["trained"].toPlainText() == ""
    assert not view.new_chat_btn.isEnabled()
    view.conversation = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    pick(view, "scratch story")                        # another model: a new conversation
    assert view.conversation == []
    view.conversation = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    view.mode.setCurrentIndex(view.mode.findData("story"))
    assert view.conversation == [] and not view.new_chat_btn.isVisible()


def test_remote_code_is_passed_only_for_a_job_the_user_started_with_it(view):
    """generate never takes trust_remote_code from a run folder (tests/test_checkpoint_trust.py): the
    Playground says it for the user's own job that has it on, never for a folder picked by hand."""
    from app.generation import generate_args
    pick(view, "lora chat")
    assert not view._trusts_remote_code()
    job = next(j for j in view.store.list_jobs() if j.name == "lora chat")
    view.store.update_job(job.id, spec={**job.spec, "trust_remote_code": True})
    assert view._trusts_remote_code()
    view.select_folder(str(job.run_dir))
    assert not view._trusts_remote_code()
    assert generate_args("run", "p.txt", trust_remote_code=True)[-1] == "--trust-remote-code"
    assert "--trust-remote-code" not in generate_args("run", "p.txt")


def test_the_engines_warnings_reach_the_status_line(view, qtbot, runs, tmp_path):
    """A damaged newest checkpoint: the text comes from the one before it, and the Playground says so."""
    import shutil
    run = shutil.copytree(runs["lora"], tmp_path / "lora-copy")
    newest = run / "checkpoints" / "ckpt-00000013"
    shutil.copytree(run / "checkpoints" / "ckpt-00000012", newest)
    manifest = json.loads((newest / "modron_checkpoint.json").read_text())
    (newest / "modron_checkpoint.json").write_text(json.dumps({**manifest, "step": 13,
                                                               "files": ["adapter/adapter_model.safetensors"]}))
    (newest / "adapter" / "adapter_model.safetensors").write_bytes(b"garbage")   # cut short by a crash
    view.select_folder(str(run))
    view.prompt.setPlainText("Once")
    view.max_tokens.setValue(4)
    assert view.generate(), view.status.text()
    qtbot.waitUntil(lambda: not view.generating(), timeout=90_000)
    assert view.status.text().startswith("Done") and "ckpt-00000013 is damaged" in view.status.text(), \
        view.status.text()


def test_the_run_log_says_wont_fit_as_the_readme_does():
    from app.views.run_view import describe_event
    line = describe_event({"type": "preflight", "memory": {"total": 10}, "verdict": "wont_fit", "advice": []})
    assert "won't fit" in line


def test_the_choice_stays_when_the_list_of_runs_is_refreshed(view):
    """Any queue change refreshes the list: the run (or folder) picked stays picked (it jumped to the first)."""
    pick(view, "scratch story")
    assert view.source.currentIndex() == 1
    view.queue.queue_changed.emit()
    assert view.source.currentText().startswith("scratch story")
    view.select_folder("/some/folder")
    view.queue.queue_changed.emit()
    assert view.source.currentData() == ("folder", "/some/folder")
