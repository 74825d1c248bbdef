"""JobSpec.compile (training_core/compiling.py): the layers run through torch.compile on the CPU here (Inductor's
C++ code, gcc), train the model the eager run trains, checkpoint under the eager names; where compiling
cannot work, the run says so once and trains uncompiled. Its speed is a benchmark's business
(bench/engine_throughput.py --compile), not this test's."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import engine_job
from training_core.config import JobSpec
from training_core.engine import Engine

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path, name, **kw):
    events = []
    spec = JobSpec.from_dict(engine_job(tmp_path, name, steps=4, checkpoint_every=2, sample_prompts=["Once"], **kw))
    engine = Engine(spec, events.append)
    engine.run()
    return engine, events


@pytest.mark.skipif(sys.platform == "win32", reason="Inductor's CPU code needs MSVC on Windows")
def test_a_compiled_run_trains_the_eager_runs_model_and_checkpoints_under_the_same_names(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch.set_num_threads(1)
    eager, _ = _run(tmp_path, "eager")
    compiled, events = _run(tmp_path, "compiled", compile=True)
    assert compiled.compiled, [e for e in events if e["type"] == "warning"]
    assert not [e for e in events if e["type"] == "warning" and e["code"] == "compile"]
    from training_core.compiling import compiled_graphs, layer_modules
    assert compiled_graphs() > 0 and len(layer_modules(compiled.model)) == compiled.model.config.num_hidden_layers
    assert any(e["type"] == "phase" and "compiling" in e["message"] for e in events)
    assert [e["text"] for e in events if e["type"] == "sample"]       # sampling ran (eagerly) at checkpoints
    # Same seed, same data: the compiled kernels train the same model up to float rounding. (Not the last
    # `step` loss: that is the mean since the previous event, and the events fall on other steps.)
    assert compiled.last_eval["eval_loss"] == pytest.approx(eager.last_eval["eval_loss"], rel=1e-4)
    assert compiled.last_eval["eval_loss"] < 0.95 * next(e for e in events if e["type"] == "step")["loss"]
    from safetensors import safe_open
    ckpt = Path(next(e["path"] for e in reversed(events) if e["type"] == "checkpoint"))
    with safe_open(str(ckpt / "model" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    eager_ckpt = sorted((tmp_path / "eager" / "checkpoints").glob("ckpt-*"))[-1]
    with safe_open(str(eager_ckpt / "model" / "model.safetensors"), "pt") as f:
        assert keys == set(f.keys())                                   # no `_orig_mod.` anywhere


def test_without_a_working_compiler_the_run_says_so_once_and_trains_uncompiled(tmp_path):
    spec = tmp_path / "job.json"
    JobSpec.from_dict(engine_job(tmp_path, steps=2, compile=True, sample_prompts=[])).save(spec)
    env = {**os.environ, "CXX": "/bin/false", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
           "MODRON_DATA_DIR": str(tmp_path / "data")}
    out = subprocess.run([sys.executable, "-m", "training_core.cli", "run", "--spec", str(spec)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    events = [json.loads(line) for line in out.stdout.splitlines()]
    warned = [e["message"] for e in events if e["type"] == "warning" and e["code"] == "compile"]
    assert len(warned) == 1 and "uncompiled" in warned[0] and "compiler" in warned[0].lower(), warned
    assert events[-1]["type"] == "finished"
