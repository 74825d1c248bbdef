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


@pytest.mark.parametrize("change", [{"num_hidden_layers": 10 ** 6}, {"hidden_size": -64}, {"hidden_size": 10 ** 400}])
def test_an_absurd_checkpoint_config_is_one_line_before_anything_is_built(tmp_path, capsys, change):
    run = full_run(tmp_path / "run")
    config_file = run / "checkpoints" / "ckpt-00000012" / "model" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **change}))
    for args in (["generate", str(run), "--prompt", "hi", "--max-new-tokens", "2"],
                 ["export", str(run), "--merged", str(tmp_path / "merged")]):
        start = time.monotonic()
        assert cli.main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(config_file) in err[0] and time.monotonic() - start < 10, err
