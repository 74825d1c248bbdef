"""A run folder or checkpoint may come from anyone. Its job.json never turns `trust_remote_code` on:
`generate`, `export --merged` and `resume` run a model's own code only when the user says so on the command
line (the app says so for the jobs the user started with it on). Its model's config.json is checked before
anything is built from it."""
from __future__ import annotations

import json
import time

import pytest

from generate_helpers import full_run
from training_core import cli

EVIL = ("import pathlib\n"
        "pathlib.Path({marker!r}).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    pass\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n")


@pytest.fixture
def hostile_run(tmp_path):
    """A checkpoint whose job.json turns remote code on and whose model folder ships code that leaves a mark."""
    run = full_run(tmp_path / "run")
    ckpt = run / "checkpoints" / "ckpt-00000012"
    for job_file in (run / "job.json", ckpt / "job.json"):
        job = json.loads(job_file.read_text())
        job_file.write_text(json.dumps({**job, "trust_remote_code": True}))
    config_file = ckpt / "model" / "config.json"
    config = json.loads(config_file.read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    config_file.write_text(json.dumps(config))
    marker = tmp_path / "remote-code-ran"
    (ckpt / "model" / "evil.py").write_text(EVIL.format(marker=str(marker)))
    return run, marker


def test_generate_and_export_never_take_remote_code_from_the_checkpoint(hostile_run, tmp_path, capsys):
    run, marker = hostile_run
    gen = ["generate", str(run), "--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu"]
    assert cli.main(gen) in (0, 2) and not marker.exists()
    assert cli.main(["export", str(run), "--merged", str(tmp_path / "merged")]) in (0, 2) and not marker.exists()
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err, err
    # The guard is what kept it out: with the user's word, the same command runs the model's code.
    assert cli.main(gen + ["--trust-remote-code"]) == 0 and marker.read_text() == "ran"


def test_resume_asks_the_user_again(hostile_run, capsys):
    run, _ = hostile_run
    assert cli.main(["resume", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(run / "job.json") in err[0] and "--trust-remote-code" in err[0], err
    cli.main(["resume", str(run), "--trust-remote-code"])       # goes on (to fail later: no data here)
    assert "trust_remote_code" not in capsys.readouterr().err


@pytest.mark.parametrize("change", [
    {"num_hidden_layers": 10 ** 6}, {"hidden_size": -64}, {"hidden_size": 10 ** 400}, {"rms_norm_eps": float("nan")},
    {"rope_parameters": {"rope_theta": "10000", "rope_type": "default"}}, {"tie_word_embeddings": "yes"},
    {"model_type": ["llama"]}, {"num_attention_heads": 7}])
def test_an_absurd_checkpoint_config_is_one_line_before_anything_is_built(tmp_path, capsys, change):
    run = full_run(tmp_path / "run")
    config_file = run / "checkpoints" / "ckpt-00000012" / "model" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **change}))
    for args in (["generate", str(run), "--prompt", "hi", "--max-new-tokens", "2"],
                 ["export", str(run), "--merged", str(tmp_path / "merged")]):
        start = time.monotonic()
        assert cli.main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(config_file.parent) in err[0] and time.monotonic() - start < 10, err   # (the folder, or its config.json)


# ---- a tampered checkpoint to resume ---------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real 2-step run (its last checkpoint has every file a resume reads)."""
    from helpers import engine_job
    from training_core.config import JobSpec
    from training_core.engine import Engine
    base = tmp_path_factory.mktemp("trained")
    spec = engine_job(base, steps=2, sample_prompts=[], eval_fraction=0)
    assert Engine(JobSpec.from_dict(spec), lambda ev: None).run().status == "finished"
    return base / "run"


def _json_edit(path, change):
    data = json.loads(path.read_text())
    path.write_text(json.dumps(change(data)))


TAMPER = {
    "manifest_version_text": ("modron_checkpoint.json", lambda d: {**d, "version": "9"}),
    "manifest_list": ("modron_checkpoint.json", lambda d: [d]),
    "state_list": ("trainer_state.json", lambda d: [d]),
    "micro_batch_huge": ("trainer_state.json", lambda d: {**d, "micro_batch": 10 ** 9}),
    "micro_batch_zero": ("trainer_state.json", lambda d: {**d, "micro_batch": 0}),
    "step_negative": ("trainer_state.json", lambda d: {**d, "step": -1}),
    "step_huge": ("trainer_state.json", lambda d: {**d, "step": 10 ** 30}),
    "total_steps_huge": ("trainer_state.json", lambda d: {**d, "total_steps": 10 ** 18}),
    "tokens_text": ("trainer_state.json", lambda d: {**d, "tokens_seen": "many"}),
    "scheduler_extra_key": ("trainer_state.json", lambda d: {**d, "scheduler": {**d["scheduler"], "base_lrs": "x"}}),
    "scheduler_injected": ("trainer_state.json", lambda d: {**d, "scheduler": {**d["scheduler"], "evil": 1}}),
    "optimizer_key": ("optimizer.json", lambda d: {**d, "state": {"x": {}}}),
    "optimizer_groups": ("optimizer.json", lambda d: {**d, "param_groups": d["param_groups"] * 2}),
    "optimizer_lr_text": ("optimizer.json", lambda d: {**d, "param_groups": [{**g, "lr": "evil"}
                                                                              for g in d["param_groups"]]}),
}


@pytest.mark.parametrize("case", sorted(TAMPER))
def test_a_tampered_checkpoint_is_one_line_on_resume(trained, tmp_path, capsys, case):
    import shutil
    run = shutil.copytree(trained, tmp_path / "run")
    ckpt = max((run / "checkpoints").iterdir())
    name, change = TAMPER[case]
    _json_edit(ckpt / name, change)
    job = json.loads((run / "job.json").read_text())
    (run / "job.json").write_text(json.dumps({**job, "out": str(run), "steps": 4}))
    code = cli.main(["resume", str(run)])
    err = capsys.readouterr().err.strip().splitlines()
    # Refused in one line naming the file, or (the manifest) the checkpoint passed over as damaged.
    assert code in (0, 2) and not any("internal error" in line or "Traceback" in line for line in err), err
    if code == 2:   # (the lines before it are the run's progress)
        assert err[-1].startswith("modron-train: error: ") and str(ckpt) in err[-1], err
    else:
        assert name == "modron_checkpoint.json" and any("damaged" in line or ckpt.name in line for line in err), err
    assert not (run / "checkpoints" / f"ckpt-{10 ** 30}").exists()


@pytest.mark.parametrize("change, problem", [
    ({"rope_parameters": {"rope_theta": 1e400, "rope_type": "default"}}, "rope_theta inf; it must be a finite"),
    ({"rms_norm_eps": -1.0}, "rms_norm_eps -1.0; it must be a finite number above 0"),
    ({"rms_norm_eps": "x"}, "has no config GGUF export can read"),
    ({"rope_parameters": {"rope_theta": "abc", "rope_type": "default"}}, "rope_theta abc"),
])
def test_gguf_export_refuses_config_numbers_it_would_write_as_they_are(tmp_path, capsys, change, problem):
    run = full_run(tmp_path / "run")
    capsys.readouterr()                           # (saving the model printed its progress)
    config_file = run / "checkpoints" / "ckpt-00000012" / "model" / "config.json"
    text = json.dumps({**json.loads(config_file.read_text()), **change}).replace("Infinity", "1e400")
    config_file.write_text(text)
    assert cli.main(["export", str(run), "--gguf", str(tmp_path / "out.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and problem in err[0], err
    assert not (tmp_path / "out.gguf").exists()



@pytest.mark.parametrize("damage, problem", [
    (lambda a: _json_edit(a / "adapter_config.json", lambda d: {**d, "r": 10 ** 9}), "has r 1000000000"),
    (lambda a: _json_edit(a / "adapter_config.json", lambda d: {**d, "rank_pattern": {"q_proj": 10 ** 8}}),
     "has r 100000000 (for q_proj)"),
    (lambda a: (a / "adapter_model.safetensors").write_bytes(b"garbage"), "does not fit the base model"),
])
def test_a_hostile_lora_adapter_is_one_line(tmp_path, capsys, damage, problem):
    from generate_helpers import lora_run
    run = lora_run(tmp_path / "lora")
    capsys.readouterr()
    damage(run / "checkpoints" / "ckpt-00000012" / "adapter")
    for args in (["generate", str(run), "--prompt", "hi", "--max-new-tokens", "2"],
                 ["export", str(run), "--merged", str(tmp_path / "merged")]):
        assert cli.main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and problem in err[0] and "internal error" not in err[0], err


def test_a_checkpoints_index_never_names_weights_outside_it(tmp_path, capsys):
    """A checkpoint's model/ is checked as a model folder is: its index names files beside it only."""
    run = full_run(tmp_path / "run")
    model = run / "checkpoints" / "ckpt-00000012" / "model"
    outside = tmp_path / "outside.safetensors"
    (model / "model.safetensors").rename(outside)
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        "model.embed_tokens.weight": str(outside)}}))
    capsys.readouterr()
    for args in (["generate", str(run), "--prompt", "hi", "--max-new-tokens", "2"],
                 ["export", str(run), "--merged", str(tmp_path / "merged")]):
        assert cli.main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "names a weight file outside its folder" in err[0], err


def test_a_lora_checkpoints_base_is_checked_before_it_is_built(tmp_path, capsys):
    """The base a LoRA checkpoint's job.json names (a folder here) gets the same check as any model folder."""
    from generate_helpers import lora_run
    from helpers import make_local_model
    run = lora_run(tmp_path / "lora")
    base = make_local_model(tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10 ** 6}))
    for job_file in (run / "job.json", run / "checkpoints" / "ckpt-00000012" / "job.json"):
        _json_edit(job_file, lambda d: {**d, "model": str(base)})
    capsys.readouterr()
    start = time.monotonic()
    assert cli.main(["generate", str(run), "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(base / "config.json") in err[0] and time.monotonic() - start < 20, err
