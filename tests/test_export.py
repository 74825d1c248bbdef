"""Export: checkpoints (built here in the documented format) to folders plain transformers loads."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from helpers import make_tokenizer
from training_core import checkpoint as ckpt_io
from training_core.config import JobSpec
from training_core.errors import CheckpointError, UserError
from training_core.export import export_adapter, export_merged, latest_checkpoint
from training_core.modelcard import model_card

LICENCE = {"klass": "permissive", "licence_id": "apache-2.0", "name": "Apache License 2.0",
           "source": "README.md", "summary": "You may use, change and share it, also commercially.",
           "warning": None}
PROMPT = "The lighthouse keeper"


def tiny_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                       eos_token_id=0, bos_token_id=0, pad_token_id=1)


def write_checkpoint(run: Path, step: int, kind: str, model, tokenizer, spec: JobSpec,
                     eval_result: dict | None = None) -> Path:
    ckpt = run / "checkpoints" / f"ckpt-{step:08d}"
    ckpt.mkdir(parents=True)
    model.save_pretrained(ckpt / ("adapter" if kind == "lora" else "model"), safe_serialization=True)
    tokenizer.save_pretrained(ckpt / "tokenizer")
    for name, data in (("job.json", spec.to_dict()), ("licence.json", LICENCE),
                       ("eval.json", eval_result or {"eval_loss": 2.5, "perplexity": 12.18})):
        (ckpt / name).write_text(json.dumps(data), encoding="utf-8")
    (ckpt / "modron_checkpoint.json").write_text(json.dumps(
        {"format": "modron-checkpoint", "version": 1, "step": step, "kind": kind}), encoding="utf-8")
    spec.save(run / "job.json")
    return ckpt


def logits(model, tokenizer) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokenizer(PROMPT)["input_ids"]])).logits


def load_plain(folder: Path):
    """What a user's own script would do: plain transformers, nothing from Modron."""
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(PROMPT, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] == ids["input_ids"].shape[1] + 4
    return model, tokenizer


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def base_folder(tmp_path, tokenizer) -> Path:
    folder = tmp_path / "base models" / "tïny base"
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config()).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    (folder / "LICENSE").write_text("Apache License 2.0 text", encoding="utf-8")
    return folder


@pytest.fixture
def lora_run(tmp_path, base_folder, tokenizer):
    spec = JobSpec(model=str(base_folder), data=[str(tmp_path / "data" / "stories.jsonl")],
                   out=str(tmp_path / "run"), method="lora", lora_r=4, lora_alpha=8, steps=50, lr=2e-4)
    base = AutoModelForCausalLM.from_pretrained(base_folder)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(1)
    with torch.no_grad():  # as if trained: lora_B starts at zero, which would merge to nothing
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    run = Path(spec.out)
    write_checkpoint(run, 40, "lora", peft_model, tokenizer, spec)
    return run, peft_model


def test_lora_merged_export_matches_the_adapter_model(tmp_path, lora_run, base_folder, tokenizer):
    run, peft_model = lora_run
    expected = logits(peft_model, tokenizer)
    out = export_merged(run, tmp_path / "exports" / "merged ✓")
    assert out == tmp_path / "exports" / "merged ✓"
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "LICENSE").read_text(encoding="utf-8") == "Apache License 2.0 text"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # temp folder gone

    model, tok = load_plain(out)
    assert not any("lora" in n for n, _ in model.named_parameters())
    merged = logits(model, tok)
    assert torch.allclose(merged, expected, atol=1e-4)
    base = logits(AutoModelForCausalLM.from_pretrained(base_folder), tokenizer)
    assert not torch.allclose(merged, base, atol=1e-2)

    card = (out / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\nlicense: apache-2.0\n")
    assert 'base_model: "tïny base"' in card and "- modron" in card
    assert "permissive" in card and "Apache License 2.0" in card and "commercially" in card
    assert "| lora_r | 4 |" in card and "| lora_alpha | 8 |" in card and "| trained_steps | 40 |" in card
    assert "| lr | 0.0002 |" in card and "stories.jsonl" in card
    assert "2.5000" in card and "12.18" in card
    assert str(tmp_path) not in card  # no local paths leak into a card meant for sharing


def test_adapter_export_loads_with_peft(tmp_path, lora_run, base_folder, tokenizer):
    run, peft_model = lora_run
    expected = logits(peft_model, tokenizer)
    out = export_adapter(run / "checkpoints" / "ckpt-00000040", tmp_path / "adapter-out")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json"} <= \
        {p.name for p in out.iterdir()}
    assert "Apache License 2.0" in (out / "README.md").read_text(encoding="utf-8")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_folder), out)
    assert torch.allclose(logits(reloaded, tokenizer), expected, atol=1e-5)


def test_full_export_uses_the_latest_checkpoint(tmp_path, tokenizer):
    spec = JobSpec(model="scratch:tiny", data=["a.txt", "b.txt"], out=str(tmp_path / "run"), tokenizer="bytes")
    run = Path(spec.out)
    models = {}
    for step in (10, 30, 20):
        torch.manual_seed(step)
        models[step] = LlamaForCausalLM(tiny_config())
        write_checkpoint(run, step, "full", models[step], tokenizer, spec,
                         eval_result={"eval_loss": None, "perplexity": None})
    # A checkpoint still being written, and one without its manifest, never count.
    tmp_ckpt = run / "checkpoints" / ".tmp-ckpt-00000099-123"
    tmp_ckpt.mkdir()
    (tmp_ckpt / "modron_checkpoint.json").write_text("{}", encoding="utf-8")
    (run / "checkpoints" / "ckpt-00000050").mkdir()
    odd = run / "checkpoints" / "ckpt-old"            # a folder a user renamed: not a step, not counted
    odd.mkdir()
    (odd / "modron_checkpoint.json").write_text("{}", encoding="utf-8")
    assert latest_checkpoint(run) == run / "checkpoints" / "ckpt-00000030"
    assert [p.name for p in ckpt_io.list_checkpoints(run)] == ["ckpt-00000010", "ckpt-00000020", "ckpt-00000030"]
    assert latest_checkpoint(tmp_path / "nothing here") is None

    out = export_merged(run, tmp_path / "out")
    model, tok = load_plain(out)
    assert torch.allclose(logits(model, tok), logits(models[30], tokenizer), atol=1e-6)
    assert model.config.use_cache is True
    assert not (out / "adapter").exists() and not (out / "LICENSE").exists()
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "licence-free (choose your own)" in card and "base_model:" not in card
    assert "No evaluation was recorded" in card and "a.txt" in card and "b.txt" in card

    with pytest.raises(CheckpointError, match="no adapter"):
        export_adapter(run, tmp_path / "adapter-out")
    assert not (tmp_path / "adapter-out").exists()


def test_export_refuses_a_non_empty_folder(tmp_path, lora_run):
    run, _ = lora_run
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine", encoding="utf-8")
    for export in (export_merged, export_adapter):
        with pytest.raises(UserError) as err:
            export(run, out)
        assert "not empty" in str(err.value) and str(out) in str(err.value) and "\n" not in str(err.value)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    assert (export_adapter(run, tmp_path / "empty") / "adapter_config.json").is_file()


def test_export_source_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such run"):
        export_merged(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no finished checkpoint"):
        export_merged(tmp_path / "run", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_model_card_front_matter_and_sections():
    card = model_card(base_model="org/Some-Model", licence={**LICENCE, "licence_id": "Llama3.1",
                                                            "klass": "restricted", "warning": "Check the AUP."},
                      datasets=["chat.jsonl"], hyperparameters={"lr": 1e-4, "lora_targets": ["q_proj", "v_proj"]},
                      eval={"eval_loss": 1.23456, "perplexity": 3.437}, method="qlora", created="2025-01-02")
    front, body = card.split("\n---\n", 1)
    assert "license: llama3.1" in front and 'base_model: "org/Some-Model"' in front and "- modron" in front
    assert "restricted" in body and "Check the AUP." in body and "| lora_targets | q_proj, v_proj |" in body
    assert "1.2346" in body and "3.44" in body and "qlora" in body and "2025-01-02" in body
    unknown = model_card(base_model="org/x", licence={"klass": "unknown", "licence_id": None}, datasets=[],
                         hyperparameters={}, eval={}, method="lora", created="today")
    assert "license: other" in unknown


def test_a_killed_exports_temporary_folder_is_swept_by_the_next(tmp_path, lora_run):
    """A Cancel that came to a kill (or a crash) leaves `.OUT.tmp-export-PID`; the next export to OUT removes
    it once its process is gone, and leaves one whose process still runs."""
    import subprocess
    import sys
    run, _ = lora_run
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = tmp_path / "out"
        stale, busy = (tmp_path / f".out.tmp-export-{gone.pid}"), (tmp_path / f".out.tmp-export-{alive.pid}")
        for folder in (stale, busy):
            folder.mkdir()
            (folder / "model.safetensors").write_bytes(b"half")
        export_adapter(run, out)
        assert not stale.exists() and busy.is_dir() and (out / "adapter_config.json").is_file()
    finally:
        alive.kill()


def test_sigterm_during_a_merged_export_leaves_nothing(tmp_path, lora_run):
    """The app's Cancel sends SIGTERM: the export leaves through its cleanup, no temporary folder stays."""
    import signal
    import subprocess
    import sys
    import time
    run, _ = lora_run
    out = tmp_path / "merged"
    proc = subprocess.Popen([sys.executable, "-m", "training_core.cli", "export", str(run), "--merged", str(out),
                             "--json"], cwd=Path(__file__).resolve().parents[1],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".merged.tmp-export-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the export ended before it could be cancelled"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert list(tmp_path.glob(".merged.tmp-export-*")) == [] and not out.exists(), err


def test_a_damaged_newest_checkpoint_is_passed_over_with_a_word(tmp_path, tokenizer, capsys):
    """Every export (merged, adapter-less full run, GGUF) of a run whose newest checkpoint is damaged says so,
    and which step it exported instead: a warning line (text) or the answer's warnings (--json)."""
    from training_core.cli import main
    from training_core.protocol import decode_answer, decode_event
    spec = JobSpec(model="scratch:tiny", data=["a.txt"], out=str(tmp_path / "run"), tokenizer="bytes")
    run = Path(spec.out)
    for step in (75, 150):
        torch.manual_seed(step)
        ckpt = write_checkpoint(run, step, "full", LlamaForCausalLM(tiny_config()), tokenizer, spec)
    weights = ckpt / "model" / "model.safetensors"
    (ckpt / "modron_checkpoint.json").write_text(json.dumps(
        {"format": "modron-checkpoint", "version": 1, "step": 150, "kind": "full",
         "files": ["model/model.safetensors"]}), encoding="utf-8")
    weights.write_bytes(weights.read_bytes()[:100])   # cut short, as by a crash mid-write
    said = "the newest checkpoint ckpt-00000150 is damaged ("
    capsys.readouterr()   # the set-up's own output

    assert main(["export", str(run), "--merged", str(tmp_path / "m1")]) == 0
    out, err = capsys.readouterr()
    assert err.startswith("warning: " + said) and "exported ckpt-00000075 (step 75) instead" in err, err
    assert "merged model (step 75) written to" in out
    assert main(["export", str(run), "--merged", str(tmp_path / "m2"), "--json"]) == 0
    doc = decode_answer(capsys.readouterr().out)
    assert doc["step"] == 75 and len(doc["warnings"]) == 1 and doc["warnings"][0].startswith(said)

    assert main(["export", str(run), "--gguf", str(tmp_path / "m.gguf")]) == 0
    out, err = capsys.readouterr()
    assert err.startswith("warning: " + said) and "step 75" in out, (out, err)
    assert main(["export", str(run), "--gguf", str(tmp_path / "j.gguf"), "--json"]) == 0
    answer = decode_event(capsys.readouterr().out.splitlines()[-1])["answer"]
    assert answer["step"] == 75 and answer["warnings"][0].startswith(said)


def test_exports_print_no_progress_bar_or_deprecation_warning(tmp_path, lora_run, capsys):
    """transformers' 'Loading weights' bar and PEFT's read of the deprecated is_gradient_checkpointing said
    nothing to an export's user on every run."""
    import warnings as warnings_mod

    from training_core.cli import main
    run, _ = lora_run
    capsys.readouterr()
    with warnings_mod.catch_warnings(record=True) as caught:
        warnings_mod.simplefilter("always")
        assert main(["export", str(run), "--merged", str(tmp_path / "m")]) == 0
        assert main(["export", str(run), "--gguf", str(tmp_path / "m.gguf")]) == 0
    err = capsys.readouterr().err
    assert "Loading weights" not in err and "it/s" not in err, err
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
