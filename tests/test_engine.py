"""The training loop in-process: loss falls, checkpoints, OOM recovery, data order."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import engine_job
from training_core import checkpoint as ckpt_io
from training_core.config import JobSpec
from training_core.engine import Engine
from training_core.protocol import EVENTS


def tiny_spec(tmp_path, name="run", **kw):
    return JobSpec(**engine_job(tmp_path, name, **kw))


def run(spec, resume=False):
    events = []
    result = Engine(spec, events.append, resume=resume).run()
    return result, events


def final_weights(run_dir):
    ckpt = ckpt_io.latest(Path(run_dir))
    return load_file(str(ckpt / "model" / "model.safetensors"))


def test_scratch_run_trains_checkpoints_and_reports(tmp_path):
    spec = tiny_spec(tmp_path, steps=40, checkpoint_every=20, eval_every=10, keep_checkpoints=1)
    result, events = run(spec)
    types = [e["type"] for e in events]
    assert types.index("preflight") < types.index("started") < types.index("step")
    assert types[-1] == "finished" and result.status == "finished" and result.step == 40
    for e in events:  # every event carries its required fields
        assert all(f in e for f in EVENTS[e["type"]]), e
    steps = [e for e in events if e["type"] == "step"]
    assert steps[0]["step"] == 1 and steps[-1]["step"] == 40
    assert steps[-1]["loss"] < steps[0]["loss"] - 1.0, (steps[0]["loss"], steps[-1]["loss"])
    assert all(s["tokens_per_s"] > 0 and s["eta_s"] >= 0 for s in steps)
    evals = [e for e in events if e["type"] == "eval"]
    assert [e["step"] for e in evals][:2] == [10, 20] and evals[-1]["perplexity"] > 1
    ckpts = [e for e in events if e["type"] == "checkpoint"]
    assert [(c["step"], c["reason"]) for c in ckpts] == [(20, "periodic"), (40, "final")]
    assert any(e["type"] == "sample" for e in events)
    pre = next(e for e in events if e["type"] == "preflight")
    assert pre["licence"]["klass"] == "licence-free" and pre["verdict"] == "fits"
    # keep_checkpoints=1: only the newest survives, complete and self-describing
    kept = ckpt_io.list_checkpoints(Path(spec.out))
    assert [p.name for p in kept] == ["ckpt-00000040"]
    manifest = ckpt_io.read_manifest(kept[0])
    assert manifest["step"] == 40 and manifest["kind"] == "full"
    for f in ("model/model.safetensors", "model/config.json", "tokenizer/tokenizer.json", "optimizer.safetensors",
              "rng.safetensors", "trainer_state.json", "job.json", "licence.json", "eval.json", "samples.json"):
        assert (kept[0] / f).is_file(), f
        assert f in manifest["files"]
    assert ckpt_io.read_json(kept[0], "trainer_state.json")["data_position"] == 40 * 8


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path):
    ref, _ = run(tiny_spec(tmp_path, "ref", steps=12))
    # Same job, checkpointed at 6: cut it short there, then resume to 12.
    part = tiny_spec(tmp_path, "part", steps=12, checkpoint_every=6)
    eng = Engine(part, lambda e: None)
    eng._setup()
    eng._t0, eng._paused_total = 0.0, 0.0
    assert eng.optimizer.defaults["fused"] is True   # fused AdamW on the CPU too (issue 15)
    for _ in range(6):
        eng.train_step()
    eng.save_checkpoint("periodic", with_eval=False)
    del eng
    torch.manual_seed(1234)  # the resumed run must restore RNG itself, not inherit it
    result, events = run(part, resume=True)
    assert next(e for e in events if e["type"] == "started")["resumed_from"] == 6
    assert result.step == 12
    a, b = final_weights(tmp_path / "ref"), final_weights(tmp_path / "part")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_oom_recovery_halves_micro_batch_and_keeps_the_batch(tmp_path):
    plain, _ = run(tiny_spec(tmp_path, "plain", steps=5))
    result, events = run(tiny_spec(tmp_path, "oom", steps=5, test_oom_at_steps=[2]))
    rec = [e for e in events if e["type"] == "oom_recovered"]
    assert len(rec) == 1
    assert (rec[0]["step"], rec[0]["old_micro_batch"], rec[0]["new_micro_batch"], rec[0]["grad_accum"]) == (2, 8, 4, 2)
    assert result.status == "finished" and result.step == 5
    state = ckpt_io.read_json(ckpt_io.latest(tmp_path / "oom"), "trainer_state.json")
    assert state["micro_batch"] == 4
    a, b = final_weights(tmp_path / "plain"), final_weights(tmp_path / "oom")
    for k in a:  # same effective batch, so the same training up to summation order
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_oom_at_micro_batch_one_fails_in_plain_words(tmp_path):
    from training_core.errors import WontFitError
    spec = tiny_spec(tmp_path, steps=3, batch_size=1, test_oom_at_steps=[1])
    with pytest.raises(WontFitError) as err:
        run(spec)
    assert "micro-batch of 1" in str(err.value) and "\n" not in str(err.value)


def test_data_order_is_a_function_of_seed_and_step(tmp_path):
    spec = tiny_spec(tmp_path)
    a = Engine(spec, lambda e: None)
    a._setup()
    b = Engine(tiny_spec(tmp_path, "other"), lambda e: None)
    b._setup()
    n = a.data.num_train
    seen = []
    for step in range(0, (2 * n) // 8 + 1):
        ia, ib = a.batch_indices(step), b.batch_indices(step)
        assert (ia == ib).all()
        seen.extend(ia.tolist())
    assert sorted(seen[:n]) == list(range(n))  # the first epoch visits every block once


def test_pause_then_stop_queued_together_are_both_obeyed(tmp_path):
    from training_core.controls import Controls
    controls = Controls()
    controls.put("pause")
    controls.put("stop")   # arrives before the worker has even seen the pause
    events = []
    result = Engine(tiny_spec(tmp_path, steps=50), events.append, controls).run()
    assert result.status == "stopped"
    assert [e["type"] for e in events if e["type"] in ("paused", "stopped")] == ["paused", "stopped"]


def test_a_pause_is_left_out_of_speed_and_eta(tmp_path, monkeypatch):
    """An hour-long pause (on the engine's clock) neither lowers tokens_per_s nor inflates eta_s in the
    first step event after the resume, and elapsed_s does not count it."""
    import time as real_time
    import types

    from training_core import engine as engine_mod
    from training_core.controls import Controls

    clock = {"offset": 0.0}
    monkeypatch.setattr(engine_mod, "time", types.SimpleNamespace(
        monotonic=lambda: real_time.monotonic() + clock["offset"], sleep=real_time.sleep, time=real_time.time))

    class AnHourLater(Controls):
        def wait(self, timeout=None):
            clock["offset"] += 3600.0
            return "resume"

    controls = AnHourLater()
    events, pauses = [], []

    def emit(ev):
        events.append(ev)
        if ev["type"] == "step" and ev["step"] >= 4 and not pauses:
            pauses.append(ev["step"])
            controls.put("pause")

    result = Engine(tiny_spec(tmp_path, steps=16), emit, controls).run()
    assert result.status == "finished"
    types_ = [e["type"] for e in events]
    resumed = types_.index("resumed")
    before = [e for e in events[:resumed] if e["type"] == "step"]
    after = next(e for e in events[resumed:] if e["type"] == "step")
    assert before[-1]["step"] == pauses[0] and after["step"] > pauses[0]
    slowest_before = min(e["tokens_per_s"] for e in before)
    # Counting the hour would give a few tokens a second (512 a step) and an ETA of hours.
    assert after["tokens_per_s"] > slowest_before / 5, (after, slowest_before)
    assert after["eta_s"] < 60 and after["eta_s"] <= 5 * max(before[-1]["eta_s"], 0.1), (after, before[-1])
    assert after["elapsed_s"] - before[-1]["elapsed_s"] < 60


@pytest.mark.parametrize("controls_sent", [("stop",), ("pause", "stop"), ("checkpoint", "stop")])
def test_a_stop_pause_or_request_during_a_periodic_checkpoint_does_not_write_it_again(tmp_path, controls_sent):
    """Nothing trains between a periodic checkpoint and a stop, pause or checkpoint request that came
    while it was written: they name that checkpoint instead of writing the same step a second time."""
    import os
    from training_core.controls import Controls
    controls = Controls()
    events, inode = [], []

    def emit(ev):
        events.append(ev)
        if ev["type"] == "checkpoint" and ev["reason"] == "periodic":
            inode.append(os.stat(ev["path"]).st_ino)
            for msg in controls_sent:
                controls.put(msg)

    result = Engine(tiny_spec(tmp_path, steps=50, checkpoint_every=4), emit, controls).run()
    assert result.status == "stopped" and result.step == 4
    writes = [e for e in events if e["type"] == "checkpoint"]
    requested = [(4, "requested")] if "checkpoint" in controls_sent else []
    assert [(e["step"], e["reason"]) for e in writes] == [(4, "periodic")] + requested
    assert len({e["path"] for e in writes}) == 1 and os.stat(writes[0]["path"]).st_ino == inode[0]   # not rewritten
    told = [e for e in events if e["type"] in ("paused", "stopped")]
    assert [e["type"] for e in told] == [("paused" if m == "pause" else "stopped") for m in controls_sent
                                         if m != "checkpoint"]
    assert all(e["checkpoint"] == writes[0]["path"] for e in told), told
    assert ckpt_io.latest(tmp_path / "run") == Path(writes[0]["path"])


def test_a_sequence_longer_than_the_models_positions_is_said_or_refused():
    """--seq-len past a pretrained model's positions: a warning for rotary ones (they extend, untrained),
    refused for learned ones (GPT-2 has no embedding past its last position: an index error mid-run)."""
    from types import SimpleNamespace

    from training_core.config import JobSpec
    from training_core.engine import Engine
    from training_core.errors import ConfigError
    warned = []
    engine = Engine.__new__(Engine)
    engine.warn = lambda code, message: warned.append((code, message))

    def check(model_type, positions, seq_len, model="org/name"):
        engine.spec = JobSpec(model=model, data=["x"], out="o", seq_len=seq_len)
        engine.model = SimpleNamespace(config=SimpleNamespace(model_type=model_type, max_position_embeddings=positions))
        engine._check_positions()
    check("llama", 512, 512)
    assert warned == []
    check("llama", 512, 1024)
    assert warned[0][0] == "seq_len" and "choose at most 512" in warned[0][1]
    with pytest.raises(ConfigError, match="--seq-len: 2048 is longer than this model's 1024 positions"):
        check("gpt2", 1024, 2048)
    check("llama", 128, 4096, model="scratch:tiny")   # a from-scratch model is sized for the run
    assert len(warned) == 1
