"""`modron-train plan`: the check before queueing, without loading weights."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import make_local_model, write_text_dataset
from training_core.config import JobSpec
from training_core.plan import format_plan, plan_job

ROOT = Path(__file__).resolve().parents[1]


def test_plan_scratch_counts_params_steps_and_is_licence_free(tmp_path):
    data = tmp_path / "d.txt"
    write_text_dataset(data)
    plan = plan_job(JobSpec(model="scratch:tiny", data=[str(data)], out=str(tmp_path / "o"), epochs=2,
                            batch_size=4, seq_len=64, tokenizer="bytes"))
    size = data.stat().st_size
    assert plan["tokens"] == size and not plan["tokens_exact"]
    blocks = size // 64
    assert plan["steps"] == -(-2 * (blocks - round(blocks * 0.02)) // 4)
    assert plan["params_total"] == plan["params_trainable"] > 500_000
    assert plan["verdict"] == "fits" and plan["licence"]["klass"] == "licence-free"
    assert plan["eta_s"] > 0 and plan["disk"]["needed"] > 0
    assert "licence-free" in format_plan(plan)


def test_plan_lora_on_a_local_model_counts_exact_tokens(tmp_path):
    data = tmp_path / "d.txt"
    write_text_dataset(data)
    base = make_local_model(tmp_path / "base")
    plan = plan_job(JobSpec(model=str(base), data=[str(data)], out=str(tmp_path / "o"), steps=10, seq_len=32))
    assert plan["method"] == "lora" and plan["tokens_exact"] and plan["tokens"] > 0
    assert 0 < plan["params_trainable"] < plan["params_total"]
    assert plan["licence"]["klass"] == "permissive"


def test_plan_cli_json_and_bad_model_folder(tmp_path):
    data = tmp_path / "d.txt"
    write_text_dataset(data)
    ok = subprocess.run([sys.executable, "-m", "training_core.cli", "plan", "--model", "scratch:mini", "--data",
                         str(data), "--steps", "5", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["steps"] == 5
    (tmp_path / "nomodel").mkdir()
    bad = subprocess.run([sys.executable, "-m", "training_core.cli", "plan", "--model", str(tmp_path / "nomodel"),
                          "--data", str(data)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "nomodel" in bad.stderr


def test_plan_says_what_becomes_of_the_speed_options_here(tmp_path):
    data = tmp_path / "d.txt"
    write_text_dataset(data)
    base = dict(model="scratch:tiny", data=[str(data)], out=str(tmp_path / "o"), steps=5, tokenizer="bytes")
    assert plan_job(JobSpec(**base))["speed_notes"] == []
    plan = plan_job(JobSpec(**base, compile=True, fused_kernels=True))
    compile_note, fused_note = plan["speed_notes"]
    assert compile_note.startswith("Compile: tried on a tiny function first")          # the CPU can compile
    assert fused_note.startswith("Fused kernels (Liger): not used here") and "NVIDIA" in fused_note
    assert fused_note in format_plan(plan)
    assert plan["memory"]["total"] == plan_job(JobSpec(**base))["memory"]["total"]   # unfused here: the same


def test_check_counts_no_logits_where_the_fused_loss_will_run(tmp_path, monkeypatch):
    """Liger's fused cross-entropy never holds batch x sequence x vocabulary logits: where it can run,
    Check's estimate has a tokens x hidden term instead (a stand-in says it can run on this CPU)."""
    from training_core import fused_kernels, preflight
    monkeypatch.setattr(fused_kernels, "unsupported_reason", lambda device, model: None)
    data = tmp_path / "d.txt"
    write_text_dataset(data)
    base = dict(model="scratch:tiny", data=[str(data)], out=str(tmp_path / "o"), steps=5, tokenizer="bytes",
                batch_size=4, seq_len=128)
    plain, fused = plan_job(JobSpec(**base)), plan_job(JobSpec(**base, fused_kernels=True))
    from training_core.models.loading import scratch_tokenizer_and_config
    _, cfg = scratch_tokenizer_and_config(JobSpec(**base), lambda: iter([]))
    tokens = 4 * 128                               # fp32 on the CPU: logits 12 bytes a vocabulary entry
    saved = tokens * (cfg.vocab_size * 12 - cfg.hidden_size * preflight.FUSED_LOSS_ELEMENTS * 4)
    assert plain["memory"]["activations"] - fused["memory"]["activations"] == saved > 0
    assert fused["memory"]["total"] < plain["memory"]["total"]


@pytest.mark.parametrize("targets", [None, ["q_proj", "lm_head"], ["q_proj", "v_proj", "down_proj"]])
def test_plan_counts_the_lora_parameters_the_run_trains(tmp_path, targets):
    """Check's trainable parameters are the run's, for the LoRA targets asked (it once counted all-linear)."""
    from training_core.models import apply_method, load_base
    data = tmp_path / "d.txt"
    write_text_dataset(data)
    spec = JobSpec(model=str(make_local_model(tmp_path / "m")), data=[str(data)], out=str(tmp_path / "o"),
                   method="lora", steps=5, **({"lora_targets": targets} if targets else {}))
    model = apply_method(load_base(spec).model, spec, "lora", False)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    plan = plan_job(spec)
    assert plan["params_trainable"] == trained
    # ...and its parameters are the run's too, the base with its adapters (Check said the base alone).
    assert plan["params_total"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("model", ["./nonexistent_folder", "../gone/model", "~/no-such-model-here",
                                   "models\\llama", "a/b/c", "C:\\models\\x"])
def test_plan_takes_a_path_like_model_for_a_folder_not_a_hub_id(tmp_path, monkeypatch, model):
    """As finetune does: "no such model folder", never the hub's complaint about a repo id (and no download)."""
    import huggingface_hub

    from training_core.errors import ModelError
    from training_core.plan import looks_like_path

    def no_download(*a, **k):
        raise AssertionError("a path-like --model must not go to the hub")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_download)
    monkeypatch.chdir(tmp_path)
    assert looks_like_path(model)
    with pytest.raises(ModelError, match="no such model folder"):
        plan_job(JobSpec(model=model, data=["d.txt"], out=str(tmp_path)))


def test_plan_still_takes_org_name_for_a_hub_id():
    from training_core.plan import looks_like_path
    assert not looks_like_path("HuggingFaceTB/SmolLM2-135M")


def test_the_plans_text_says_wont_fit_as_the_readme_does():
    plan = {"model": "m", "params_total": 10, "params_trainable": 10, "method": "full", "precision": "fp32",
            "gpu": None, "device": "cpu", "dataset": {"records": 1}, "tokens_exact": True, "tokens": 5, "steps": 1,
            "memory": {"total": 2 * 1024 ** 3, "available": 1024 ** 3}, "verdict": "wont_fit", "advice": [],
            "disk": {"needed": 2048, "free": 1024, "verdict": "wont_fit"}, "eta_s": 1, "eta_note": "rough",
            "licence": {"klass": "permissive", "summary": "fine"}}
    text = format_plan(plan)
    assert "free: won't fit" in text and "wont fit" not in text, text
    assert "Disk: 2.0 KB for checkpoints and the export (1.0 KB free): won't fit" in text, text
