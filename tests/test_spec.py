"""One spec (issue 13, point 1): JobSpec's fields reach the CLI and the New-finetune form with the same
defaults; Check plans what the engine's pre-flight reports; what cannot run is refused before it is queued."""
from __future__ import annotations

import dataclasses

import pytest

from app.job_queue import JobQueue
from app.views.new_finetune import SPECIAL, NewFinetuneView
from app.views.spec_inputs import read_input, write_input
from tests.helpers import make_local_model, write_text_dataset
from training_core import cli, config
from training_core.config import JobSpec

CLI_TIMEOUT_MS = 60_000
PRETRAINED = "some-org/some-model"   # neither parsing nor the form reads the model


def _other(name: str):
    """A valid value for field `name` other than its default."""
    f = JobSpec.__dataclass_fields__[name]
    value, kind = config.default(name), str(f.type)
    if f.metadata["choices"]:
        return next(c for c in reversed(f.metadata["choices"]) if c != value)
    special = {"tokenizer": "bytes", "device": "cpu", "lora_targets": ["q_proj", "v_proj"],
               "sample_prompts": ["Once", "Twice"], "eval_fraction": 0.1, "micro_batch_size": 2,
               "gradient_checkpointing": True, "data": ["a.txt", "b.txt"], "model": PRETRAINED, "out": "elsewhere"}
    if name in special:
        return special[name]
    if kind.startswith("bool"):
        return not value
    if kind.startswith("int"):
        return (value or 1) + 2
    return round((value or 0.5) * 1.5, 4)


def _argv(name: str, value) -> list[str]:
    opt = config.flag(name)
    if isinstance(value, bool):
        return [opt if value else "--no-" + opt[2:]]
    return [opt, *map(str, value)] if isinstance(value, list) else [opt, str(value)]


def test_every_field_reaches_the_cli_and_the_form_with_the_same_default(qtbot, store):
    base = ["plan", "--model", PRETRAINED, "--data", "a.txt"]
    from_cli = cli.job_spec(cli.build_parser().parse_args(base))
    view = NewFinetuneView(store, None)
    qtbot.addWidget(view)
    view.set_model(PRETRAINED)
    view.dataset.drop_zone.set_paths(["a.txt"])
    from_form = JobSpec.from_dict({**view.form_spec(), "out": from_cli.out})
    fields = [f.name for f in dataclasses.fields(JobSpec) if f.metadata["scope"] != config.INTERNAL]
    assert {f.name for f in config.options(config.JOB)} <= set(fields)
    for name in fields:
        # The CLI: the default when left out, and a value given on the command line reaches the spec.
        assert getattr(from_cli, name) == (config.default(name) if name not in ("model", "data", "out")
                                           else getattr(from_cli, name)), name
        value = _other(name)
        argv = base + _argv(name, value)
        if name in ("model", "data"):
            argv = ["plan", *_argv("model", value if name == "model" else PRETRAINED),
                    *_argv("data", value if name == "data" else ["a.txt"])]
        assert getattr(cli.job_spec(cli.build_parser().parse_args(argv)), name) == value, name
        if name not in {f.name for f in config.options(config.JOB)}:
            continue   # `out` and checkpoint_minutes are the app's own (the store's run folder, Settings)
        # The form: the same default, and an input that sets the field.
        if name == "method":   # None means "by the model"; the form shows what that is
            assert from_form.resolved_method == from_cli.resolved_method
        elif name not in ("model", "data"):
            assert getattr(from_form, name) == getattr(from_cli, name), name
        if name in SPECIAL:
            continue   # model, data and the length have inputs of their own (other tests drive them)
        box = view.findChild(type(view.inputs[name]), name)
        assert box is view.inputs[name], name
        view.set_model("scratch:tiny" if name == "tokenizer" else PRETRAINED)   # only a new model trains one
        write_input(name, box, value)
        assert read_input(name, box) == value and view.form_spec()[name] == value, name
        write_input(name, box, getattr(from_cli, name))
        view.set_model(PRETRAINED)


def _preflight_of_engine(spec: JobSpec) -> dict:
    from training_core.engine import Engine
    events: list[dict] = []
    Engine(spec, events.append).run()
    return next(e for e in events if e["type"] == "preflight")


def test_check_plans_the_figures_the_engines_preflight_reports(qtbot, tmp_path, store):
    data = tmp_path / "stories.txt"
    write_text_dataset(data, n_paragraphs=20)
    model = make_local_model(tmp_path / "model")
    view = NewFinetuneView(store, JobQueue(store, autostart=False))
    qtbot.addWidget(view)
    view.set_model(str(model))
    view.dataset.drop_zone.set_paths([str(data)])
    view.steps_radio.setChecked(True)
    for name, value in (("method", "lora"), ("lora_r", 8), ("device", "cpu"), ("threads", 1), ("seq_len", 32),
                        ("batch_size", 2), ("sample_max_tokens", 2), ("sample_prompts", ["Once"])):
        write_input(name, view.inputs[name], value)
    view.steps_spin.setValue(1)
    view.check()
    qtbot.waitUntil(lambda: view.plan is not None or "c62828" in view.plan_status.styleSheet(),
                    timeout=CLI_TIMEOUT_MS)
    plan = view.plan
    assert plan is not None, view.plan_status.text()
    assert not list((store.path.parent / "checks").glob("*.json"))   # the check's spec file is gone

    run = _preflight_of_engine(JobSpec.from_dict({**view.form_spec(), "out": str(tmp_path / "run")}))
    assert (run["params_total"], run["params_trainable"]) == (plan["params_total"], plan["params_trainable"])
    assert run["memory"]["total"] == plan["memory"]["total"] and run["disk"]["needed"] == plan["disk"]["needed"]
    assert (run["precision"], run["device"], run["gradient_checkpointing"]) == \
        (plan["precision"], plan["device"], plan["gradient_checkpointing"])


def test_a_scratch_model_is_planned_with_the_tokenizer_the_run_trains(tmp_path):
    from training_core.plan import plan_job
    data = tmp_path / "stories.txt"
    write_text_dataset(data, n_paragraphs=20)
    spec = JobSpec(model="scratch:tiny", data=[str(data)], out=str(tmp_path / "run"), tokenizer="train", steps=1,
                   batch_size=2, seq_len=32, device="cpu", threads=1, sample_max_tokens=2, sample_prompts=["Once"])
    plan, run = plan_job(spec), _preflight_of_engine(spec)
    assert (run["params_total"], run["memory"]["total"]) == (plan["params_total"], plan["memory"]["total"])
    assert plan["tokens_exact"]   # counted with that tokenizer


@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_scratch_with_adapters_is_refused_by_check_and_by_the_cli(qtbot, store, tmp_path, capsys, method):
    data = tmp_path / "d.txt"
    data.write_text("hello world " * 50, encoding="utf-8")
    view = NewFinetuneView(store, JobQueue(store, autostart=False))
    qtbot.addWidget(view)
    view.set_model("scratch:tiny")
    view.dataset.drop_zone.set_paths([str(data)])
    view.method_combo.setCurrentIndex(view.method_combo.findData(method))
    view.check_btn.click()
    text = view.plan_status.text()
    assert text.startswith("Method: a from-scratch model has nothing to adapt") and "choose Full" in text
    assert view._task is None and not view.add_btn.isEnabled() and view.plan is None

    for command in ("plan", "finetune"):
        code = cli.main([command, "--model", "scratch:tiny", "--data", str(data), "--out", str(tmp_path / "o"),
                         "--method", method])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith("modron-train: error: --method: a from-scratch model has nothing to adapt"), err
    assert not (tmp_path / "o").exists()   # refused before a run folder was made


def test_qlora_where_the_job_would_train_on_the_cpu_is_refused_with_what_to_choose(monkeypatch):
    spec = JobSpec(model=PRETRAINED, data=["a.txt"], out="o", method="qlora")
    monkeypatch.setattr(config, "bitsandbytes_installed", lambda: False)
    with pytest.raises(config.ConfigError, match="needs the bitsandbytes package.*choose LoRA"):
        config.validate(spec, device="cuda:0")   # a GPU, but not the library: refused by Check, not the worker
    monkeypatch.setattr(config, "bitsandbytes_installed", lambda: True)
    config.validate(spec, device="cuda:0")
    with pytest.raises(config.ConfigError, match="QLoRA needs an NVIDIA GPU.*choose LoRA"):
        config.validate(spec, device="cpu")   # what plan_job and the engine pass once the device is known
    with pytest.raises(config.ConfigError, match="QLoRA needs an NVIDIA GPU"):
        JobSpec(model=PRETRAINED, data=["a.txt"], out="o", method="qlora", device="cpu")
    cuda = JobSpec(model=PRETRAINED, data=["a.txt"], out="o", device="cuda")
    with pytest.raises(config.ConfigError, match="no NVIDIA GPU is usable here; choose auto or cpu"):
        config.validate(cuda, device="cpu")   # plan_job found no GPU: Check refuses what the engine would


def test_a_refusal_from_the_plan_names_the_field_as_the_form_does(qtbot, store):
    view = NewFinetuneView(store, None)
    qtbot.addWidget(view)
    view._task = task = object()   # as if a check were running
    view._plan_failed(task, "--method: QLoRA needs an NVIDIA GPU and this job would train on the CPU; choose LoRA")
    assert view.plan_status.text().startswith("Method: QLoRA needs an NVIDIA GPU")


@pytest.mark.parametrize("field,value,words", [
    ("trust_remote_code", "false", "trust_remote_code must be true or false, not \"false\""),   # truthy text
    ("steps", "10", "steps must be a whole number or null"),
    ("keep_checkpoints", 2.5, "keep_checkpoints must be a whole number, not 2.5"),
    ("data", "stories.txt", "data must be a list of texts"),
    ("lora_targets", ["q_proj", 3], "lora_targets must be a text or a list of texts"),
])
def test_a_job_file_with_a_wrong_type_is_one_line_naming_the_file_and_field(tmp_path, capfd, field, value, words):
    import json
    spec = dict(model="scratch:tiny", data=[str(tmp_path / "stories.txt")], out=str(tmp_path / "o"))
    spec[field] = value
    path = tmp_path / "job.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    code = cli.main(["finetune", "--spec", str(path)])
    err = capfd.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert str(path) in err and words in err, err
    code = cli.main(["run", "--spec", str(path)])          # the app's worker: the same words as a `failed` event
    out = capfd.readouterr()
    event = [json.loads(line) for line in out.out.splitlines()][-1]
    assert code == 2 and event["type"] == "failed" and event["code"] == "bad_config", out
    assert str(path) in event["message"] and words in event["message"], event
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("field, value, words", [
    ("batch_size", 10 ** 12, "--batch-size: must be at most 1,048,576"),
    ("steps", 10 ** 30, "--steps: must be at most"),
    ("epochs", 1e9, "--epochs: must be more than 0 and at most"),
    ("max_grad_norm", -1.0, "--max-grad-norm: must be a finite number, 0 (off) or more"),
    ("weight_decay", -1.0, "--weight-decay: must be at least 0"),
    ("weight_decay", float("nan"), "--weight-decay: must be a finite number"),
    ("checkpoint_minutes", -1.0, "--checkpoint-minutes: must be a finite number more than 0"),
    ("threads", 10 ** 6, "--threads: must be at most 1,024"),
    ("lr", 1e5, "--lr: must be a finite number more than 0 and at most 10,000"),
    ("lora_dropout", 1.0, "--lora-dropout: must be at least 0 and below 1"),
])
def test_numbers_far_past_any_real_job_are_one_line(field, value, words):
    """A typo or a spec file from anywhere: refused before any estimate (a batch of 10^12 made plan's
    advice list every smaller micro-batch: a MemoryError)."""
    with pytest.raises(config.ConfigError) as err:
        config.JobSpec(model="scratch:tiny", data=["x.txt"], out="o", **{field: value})
    assert words in str(err.value) and "\n" not in str(err.value)


def test_the_advice_for_the_largest_batch_comes_at_once():
    import time

    from training_core.preflight import estimate_memory
    start = time.monotonic()
    e = estimate_memory(params_total=10 ** 6, params_trainable=10 ** 6, num_layers=4, hidden_size=128, num_heads=4,
                        vocab_size=4096, seq_len=256, micro_batch=1 << 20, precision="fp32", method="full",
                        gradient_checkpointing=False, available=8 * 1024 ** 3, device="cpu")
    assert time.monotonic() - start < 5
    assert any(a.startswith("Lower the micro-batch size to 191 ") for a in e.advice), e.advice


def test_a_from_scratch_job_is_never_advised_to_train_adapters():
    from training_core.preflight import figures
    spec = JobSpec(model="scratch:tiny", data=["x.txt"], out="o", seq_len=20000, batch_size=1)
    config = {"num_hidden_layers": 4, "hidden_size": 128, "num_attention_heads": 4, "vocab_size": 4096}
    advice = figures(spec, config, params_total=10 ** 6, method="full", precision="fp32", device="cuda:0",
                     available=1024 ** 3)["advice"]
    assert advice and not any("LoRA" in a for a in advice), advice


def test_gradient_clipping_may_be_off():
    assert config.JobSpec(model="scratch:tiny", data=["x.txt"], out="o", max_grad_norm=0.0).max_grad_norm == 0
