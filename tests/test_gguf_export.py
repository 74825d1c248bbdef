"""GGUF export: files transformers' own GGUF loader reads back to the same logits and token ids, a GGUF LoRA
llama.cpp's --lora takes, an Ollama Modelfile, and the CLI's one-line refusals. Tiny models built here."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from gguf import GGUFReader
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, LlamaTokenizer, Qwen2Config, Qwen2ForCausalLM)

from helpers import SAMPLE_TEXT, make_tokenizer
from training_core.cli import main
from training_core.config import JobSpec
from training_core.gguf_export import K_QUANT_HINT, estimate, export_gguf, k_quants_available
from training_core.protocol import decode_event

TEXT = "The lighthouse keeper counted the ships, and every evening she read them aloud."
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LICENCE = {"klass": "permissive", "licence_id": "apache-2.0", "name": "Apache License 2.0",
           "source": "README.md", "summary": "You may use, change and share it, also commercially.", "warning": None}
# Largest logit difference allowed against the source model, per weight type (logits here are about +-1).
TOLERANCE = {"f32": 1e-5, "f16": 5e-3, "bf16": 3e-2, "q8_0": 5e-2}


def write_checkpoint(run: Path, kind: str, model, tokenizer, spec: JobSpec) -> Path:
    ckpt = run / "checkpoints" / "ckpt-00000020"
    ckpt.mkdir(parents=True)
    model.save_pretrained(ckpt / ("adapter" if kind == "lora" else "model"), safe_serialization=True)
    tokenizer.save_pretrained(ckpt / "tokenizer")
    (ckpt / "job.json").write_text(json.dumps(spec.to_dict()), encoding="utf-8")
    (ckpt / "licence.json").write_text(json.dumps(LICENCE), encoding="utf-8")
    (ckpt / "modron_checkpoint.json").write_text(json.dumps(
        {"format": "modron-checkpoint", "version": 1, "step": 20, "kind": kind}), encoding="utf-8")
    spec.save(run / "job.json")
    return ckpt


def spm_tokenizer() -> LlamaTokenizer:
    """A SentencePiece-style (Llama 2) tokenizer: metaspace BPE with byte fallback, trained here."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator([SAMPLE_TEXT], trainer=trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                                      show_progress=False))
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return LlamaTokenizer(vocab=model["vocab"], merges=merges, unk_token="<unk>", bos_token="<s>",
                          eos_token="</s>", add_bos_token=True)


def randomise(model) -> None:
    torch.manual_seed(0)
    with torch.no_grad():   # norms away from 1 and biases away from 0, so a misplaced one shows
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))


def full_run(root: Path, name: str, model, tokenizer) -> Path:
    run = root / name
    write_checkpoint(run, "full", model, tokenizer,
                     JobSpec(model="scratch:tiny", data=[str(root / "stories.txt")], out=str(run)))
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Full runs of three shapes: a scratch-style tied Llama with grouped-query attention and a chat
    template, an untied Qwen2 (q/k/v biases), and a Llama with a SentencePiece tokenizer."""
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    bpe = make_tokenizer()
    bpe.chat_template = CHATML
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(bpe), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, eos_token_id=0,
        bos_token_id=0, pad_token_id=1))
    randomise(llama)
    out["llama"] = (full_run(root, "llama", llama, bpe), llama, bpe)
    qwen = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(bpe) + 4, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False, eos_token_id=0))
    randomise(qwen)
    plain = make_tokenizer()
    out["qwen2"] = (full_run(root, "qwen2", qwen, plain), qwen, plain)
    spm = spm_tokenizer()
    spm_model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(spm), hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2))
    randomise(spm_model)
    out["spm"] = (full_run(root, "spm", spm_model, spm), spm_model, spm)
    return root, out


def read_back(path: Path):
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer


def logits(model, ids: list[int]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


@pytest.mark.parametrize("quant", ["f32", "f16", "bf16", "q8_0"])
def test_llama_gguf_reads_back_to_the_same_logits_and_tokens(runs, quant):
    root, made = runs
    run, source, tokenizer = made["llama"]
    seen = []
    answer = export_gguf(run, root / f"llama-{quant}.gguf", quant, progress=lambda *a: seen.append(a))
    path = Path(answer["gguf"])
    assert answer["quant"] == quant and answer["bytes"] == path.stat().st_size and answer["lora"] is None
    assert seen[0][0] == 0 and seen[-1][0] == seen[-1][1] == 20   # 2 layers x 9 + embedding + final norm
    model, tok = read_back(path)
    ids = tokenizer(TEXT)["input_ids"]
    assert tok(TEXT)["input_ids"] == ids
    assert tok.decode(ids) == TEXT
    diff = (logits(model, ids) - logits(source, ids)).abs().max().item()
    assert diff < TOLERANCE[quant], f"{quant}: logits differ by {diff}"
    assert not [p for p in root.iterdir() if p.name.startswith(".")]   # no temporary files left

    fields = GGUFReader(path).fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert fields["tokenizer.ggml.eos_token_id"].contents() == 0
    assert fields["tokenizer.ggml.padding_token_id"].contents() == 1
    assert fields["tokenizer.chat_template"].contents() == CHATML
    assert fields["general.license"].contents() == "apache-2.0"


def test_qwen2_with_biases_and_an_untied_head(runs):
    root, made = runs
    run, source, tokenizer = made["qwen2"]
    path = Path(export_gguf(run, root / "qwen2.gguf", "f32")["gguf"])
    names = {t.name for t in GGUFReader(path).tensors}
    assert {"output.weight", "blk.0.attn_q.bias", "blk.1.attn_k.bias"} <= names
    model, tok = read_back(path)
    ids = tokenizer(TEXT)["input_ids"]
    assert tok(TEXT)["input_ids"] == ids
    assert (logits(model, ids) - logits(source, ids)).abs().max().item() < TOLERANCE["f32"]
    assert model.config.vocab_size == len(tokenizer) + 4   # padded with unused tokens to the embedding's rows


def test_sentencepiece_tokenizer_reads_back_to_the_same_ids(runs):
    root, made = runs
    run, source, tokenizer = made["spm"]
    path = Path(export_gguf(run, root / "spm.gguf", "f16")["gguf"])
    fields = GGUFReader(path).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True
    model, tok = read_back(path)
    for text in (TEXT, "  two spaces, ünïcode and 42 digits"):
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == 1 and tok(text)["input_ids"] == ids, text
    ids = tokenizer(TEXT)["input_ids"]
    assert (logits(model, ids) - logits(source, ids)).abs().max().item() < TOLERANCE["f16"]


def test_modelfile_has_template_stops_and_licence(runs):
    root, made = runs
    answer = export_gguf(made["llama"][0], root / "sub" / "chat.gguf", "f16")
    modelfile = Path(answer["modelfile"])
    assert modelfile == root / "sub" / "chat.Modelfile"
    text = modelfile.read_text(encoding="utf-8")
    assert text.startswith("FROM ./chat.gguf\n")
    assert "<|im_start|>user\n{{ .Prompt }}<|im_end|>" in text and "{{ .System }}" in text
    assert "PARAMETER stop <|im_end|>" in text and "PARAMETER stop <|endoftext|>" in text
    assert 'LICENSE """Apache License 2.0 (apache-2.0)' in text and "commercially" in text
    # A model without a chat template gets a plain continuation template.
    plain = export_gguf(made["qwen2"][0], root / "sub" / "plain.gguf", "f16")
    assert 'TEMPLATE """{{ .Prompt }}{{ .Response }}"""' in Path(plain["modelfile"]).read_text(encoding="utf-8")


def test_existing_files_are_kept_without_force(runs, capsys):
    root, made = runs
    target = root / "kept.gguf"
    target.write_bytes(b"mine")
    code = main(["export", str(made["llama"][0]), "--gguf", str(target)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"modron-train: error: {target}: already exists; choose another name or pass "
                                 "--force to replace it"]
    assert target.read_bytes() == b"mine"
    assert main(["export", str(made["llama"][0]), "--gguf", str(target), "--force", "--quant", "f32"]) == 0
    assert target.stat().st_size > 100_000


def test_json_speaks_progress_then_result(runs, capsys):
    root, made = runs
    out = root / "json.gguf"
    assert main(["export", str(made["llama"][0]), "--gguf", str(out), "--quant", "q8_0", "--json"]) == 0
    events = [decode_event(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["type"] for e in events][-1] == "result" and {e["type"] for e in events[:-1]} == {"progress"}
    assert events[0]["done"] == 0 and events[-2]["done"] == events[-2]["total"] == 20
    assert all(e["task"] == "export" and e["unit"] == "tensors" and e["message"] for e in events[:-1])
    answer = events[-1]["answer"]
    assert answer == {"gguf": str(out), "quant": "q8_0", "bytes": out.stat().st_size,
                      "modelfile": str(root / "json.Modelfile"), "lora": None, "step": 20, "warnings": []}


def test_sizes_estimate_is_close_to_the_files(runs, capsys):
    root, made = runs
    assert main(["export", str(made["llama"][0]), "--gguf-sizes", "--json"]) == 0
    from training_core.protocol import decode_answer
    doc = decode_answer(capsys.readouterr().out)
    assert doc["architecture"] == "llama" and doc["kind"] == "full" and doc["lora"] is None
    assert list(doc["sizes"]) == ["f32", "f16", "bf16", "q8_0", "q4_k_m", "q5_k_m", "q6_k"]
    assert doc["available"][:4] == ["f32", "f16", "bf16", "q8_0"]
    for quant in ("f32", "q8_0"):
        real = (root / f"llama-{quant}.gguf")
        if real.exists():
            assert abs(doc["sizes"][quant] - real.stat().st_size) < 0.1 * real.stat().st_size
    assert doc["sizes"]["f32"] > doc["sizes"]["f16"] > doc["sizes"]["q8_0"]


def test_an_architecture_it_cannot_write_is_refused_in_one_line(tmp_path, capsys):
    tok = make_tokenizer()
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64))
    run = full_run(tmp_path, "gpt2", gpt2, tok)
    capsys.readouterr()
    code = main(["export", str(run), "--gguf", str(tmp_path / "x.gguf"), "--json"])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("modron-train: error: ") and "GPT2LMHeadModel" in err[0]
    assert "Llama" in err[0] and "Mistral" in err[0] and "Qwen2" in err[0]
    failed = decode_event(captured.out.strip())
    assert failed["type"] == "failed" and failed["code"] == "bad_model"
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.skipif(k_quants_available(), reason="llama-cpp-python is installed here")
def test_k_quants_without_llama_cpp_say_how_to_get_them(runs, capsys):
    root, made = runs
    assert main(["export", str(made["llama"][0]), "--gguf", str(root / "k.gguf"), "--quant", "q4_k_m"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and K_QUANT_HINT in err[0]


def test_the_k_quant_hint_is_a_command_this_interpreter_runs(runs, capsys, monkeypatch):
    """An installed app's user has no `modron` source tree and maybe no `pip` on PATH: the hint names this
    Python and the package itself, and says what building it takes."""
    import shlex
    import subprocess
    import sys
    import training_core.gguf_export as ge
    root, made = runs
    monkeypatch.setattr(ge, "k_quants_available", lambda: False)
    assert main(["export", str(made["llama"][0]), "--gguf", str(root / "k.gguf"), "--quant", "q6_k"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "C compiler and cmake" in err[0], err
    command = shlex.split(err[0].split("quantizer: ", 1)[1].split(" (builds", 1)[0])
    assert command == [sys.executable, "-m", "pip", "install", "llama-cpp-python>=0.3"], command
    assert subprocess.run(command[:3] + ["--version"], capture_output=True).returncode == 0
    assert main(["export", str(made["llama"][0]), "--gguf-sizes"]) == 0
    assert K_QUANT_HINT in capsys.readouterr().out


# ---- LoRA runs ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf_lora")
    tok = make_tokenizer()
    base_dir = root / "base"
    base = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, eos_token_id=0, bos_token_id=0, pad_token_id=1))
    randomise(base)
    base.save_pretrained(base_dir, safe_serialization=True)
    tok.save_pretrained(base_dir)
    (base_dir / "LICENSE").write_text("The full Apache licence text.", encoding="utf-8")
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                                LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(1)
    with torch.no_grad():   # as if trained: lora_B starts at zero
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    run = root / "run"
    spec = JobSpec(model=str(base_dir), data=[str(root / "d.jsonl")], out=str(run), method="lora", lora_r=4,
                   lora_alpha=8)
    write_checkpoint(run, "lora", peft_model, tok, spec)
    return root, run, peft_model, tok


def test_lora_gguf_has_llama_cpp_names_shapes_and_alpha(lora_run):
    root, run, peft_model, _ = lora_run
    answer = export_gguf(run, None, lora_out=root / "adapter.gguf")
    assert answer["gguf"] is None and answer["modelfile"] is None and answer["lora"] == str(root / "adapter.gguf")
    reader = GGUFReader(root / "adapter.gguf")
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == pytest.approx(8.0)
    assert reader.fields["general.architecture"].contents() == "llama"
    tensors = {t.name: t for t in reader.tensors}
    # 7 linear layers per block, 2 blocks, lora_a and lora_b each
    assert len(tensors) == 28
    a, b = tensors["blk.0.attn_k.weight.lora_a"], tensors["blk.0.attn_k.weight.lora_b"]
    # ggml shapes are reversed: lora_a [in, r], lora_b [r, out]; k has 2 heads x 16 = 32 outputs
    assert list(a.shape) == [64, 4] and list(b.shape) == [4, 32]
    assert list(tensors["blk.1.ffn_down.weight.lora_a"].shape) == [96, 4]
    state = peft_model.state_dict()
    lora_a = state["base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight"] \
        if "base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight" in state \
        else state["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"]
    written = tensors["blk.0.ffn_up.weight.lora_a"].data.reshape(4, 64)
    assert torch.allclose(torch.from_numpy(written.copy()), lora_a.float())


def test_lora_run_gguf_is_the_merged_model(lora_run):
    root, run, peft_model, tok = lora_run
    sizes = estimate(run)
    assert sizes["kind"] == "lora" and sizes["lora"] > 0
    answer = export_gguf(run, root / "merged.gguf", "f32", lora_out=root / "both-adapter.gguf")
    assert Path(answer["lora"]).is_file()
    model, _ = read_back(Path(answer["gguf"]))
    ids = tok(TEXT)["input_ids"]
    assert (logits(model, ids) - logits(peft_model, ids)).abs().max().item() < 1e-4
    assert "The full Apache licence text." in Path(answer["modelfile"]).read_text(encoding="utf-8")


def test_gguf_lora_of_a_full_run_is_refused(runs, capsys):
    root, made = runs
    assert main(["export", str(made["llama"][0]), "--gguf-lora", str(root / "no.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "full finetune" in err[0]


def test_mistral_is_written_as_llama(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM
    tok = make_tokenizer()
    model = MistralForCausalLM(MistralConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, sliding_window=None, tie_word_embeddings=False))
    randomise(model)
    # (a run named "...mistral..." would not do: transformers' loader then asks gguf-py for a "mistral"
    # architecture it does not have; llama.cpp reads such a file fine)
    path = Path(export_gguf(full_run(tmp_path, "mist", model, tok), tmp_path / "m.gguf", "f32")["gguf"])
    assert GGUFReader(path).fields["general.architecture"].contents() == "llama"
    back, _ = read_back(path)
    ids = tok(TEXT)["input_ids"]
    assert (logits(back, ids) - logits(model, ids)).abs().max().item() < TOLERANCE["f32"]


def test_modelfile_templates_for_common_chat_formats():
    from training_core.ollama_modelfile import modelfile, template_and_stops
    llama3 = "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    name, template, stops = template_and_stops(llama3, "<|end_of_text|>")
    assert name == "llama3" and "<|eot_id|>" in stops and "<|end_of_text|>" in stops and ".Prompt" in template
    assert template_and_stops("[INST] {{ m }} [/INST]", "</s>")[0] == "llama2"
    text = modelfile("a.gguf", None, "</s>", 'text with """ quotes')
    assert text.count('"""') == 4 and "'''" in text   # the licence's own triple quotes cannot end the value


@pytest.mark.skipif(not k_quants_available(), reason="llama-cpp-python is not installed (pip install 'modron[llama]')")
@pytest.mark.parametrize("quant, tolerance", [("f32", 1e-3), ("q8_0", 0.1), ("q4_k_m", 0.5)])
def test_llama_cpp_runs_the_file_to_the_same_logits(runs, quant, tolerance):
    """The real reader: llama.cpp itself (rotary layout, tokenizer, k-quants by its own quantizer)."""
    import llama_cpp
    import numpy as np
    root, made = runs
    run, source, tokenizer = made["llama"]
    path = Path(export_gguf(run, root / f"cpp-{quant}.gguf", quant, force=True)["gguf"])
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False)
    ids = tokenizer(TEXT)["input_ids"]
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == ids
    llm.eval(ids)
    got = np.asarray(llm.scores[:len(ids)])
    diff = np.abs(got - logits(source, ids)[0].numpy()).max()
    assert diff < tolerance, f"{quant}: llama.cpp logits differ by {diff}"


@pytest.mark.skipif(not k_quants_available(), reason="llama-cpp-python is not installed (pip install 'modron[llama]')")
def test_llama_cpp_applies_the_gguf_lora_to_the_base(lora_run):
    import llama_cpp
    import numpy as np
    root, run, peft_model, tok = lora_run
    base = full_run(root, "base-run", AutoModelForCausalLM.from_pretrained(root / "base"), tok)
    base_gguf = export_gguf(base, root / "base.gguf", "f32", force=True)["gguf"]
    adapter = export_gguf(run, None, lora_out=root / "cpp-adapter.gguf", force=True)["lora"]
    llm = llama_cpp.Llama(model_path=base_gguf, lora_path=adapter, n_ctx=128, logits_all=True, verbose=False)
    ids = tok(TEXT)["input_ids"]
    llm.eval(ids)
    diff = np.abs(np.asarray(llm.scores[:len(ids)]) - logits(peft_model, ids)[0].numpy()).max()
    assert diff < 1e-3, f"llama.cpp with the adapter differs from the PEFT model by {diff}"


@pytest.mark.skipif(not k_quants_available(), reason="llama-cpp-python is not installed (pip install 'modron[llama]')")
@pytest.mark.parametrize("name", ["qwen2", "spm"])
def test_llama_cpp_reads_qwen2_and_sentencepiece_files(runs, name):
    import llama_cpp
    import numpy as np
    root, made = runs
    run, source, tokenizer = made[name]
    path = export_gguf(run, root / f"cpp-{name}.gguf", "f32", force=True)["gguf"]
    llm = llama_cpp.Llama(model_path=path, n_ctx=128, logits_all=True, verbose=False)
    ids = tokenizer(TEXT)["input_ids"]
    assert llm.tokenize(TEXT.encode(), add_bos=name == "spm", special=False) == ids
    llm.eval(ids)
    diff = np.abs(np.asarray(llm.scores[:len(ids)]) - logits(source, ids)[0].numpy()).max()
    assert diff < 1e-3, f"{name}: llama.cpp logits differ by {diff}"


# Run in a child: the export, slowed where the Cancel must land. With llama.cpp, each of its log lines waits a
# little (so SIGTERM arrives while the handler runs inside its ctypes callback, as in real use); without it,
# each tensor written waits.
SLOW_EXPORT = """
import sys, time
import training_core.gguf_export as ge
try:
    import llama_cpp
    make = llama_cpp.llama_log_callback
    llama_cpp.llama_log_callback = lambda fn: make(lambda *a: (time.sleep(0.05), fn(*a))[1])
except ImportError:
    encode = ge._encode
    ge._encode = lambda *a: (time.sleep(0.3), encode(*a))[1]
from training_core.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_during_the_quantizer_leaves_nothing(runs, tmp_path):
    """The app's Cancel during the k-quant step (or, without llama.cpp, while tensors are written): the
    process ends at once, non-zero, and neither the GGUF, its Modelfile nor a temporary file stays."""
    import signal
    import subprocess
    import sys
    import time
    root, made = runs
    run = made["llama"][0]
    out = tmp_path / "cancelled.gguf"
    quant, step = ("q4_k_m", "quantizing") if k_quants_available() else ("f16", "writing")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_EXPORT, "export", str(run), "--gguf", str(out),
                             "--quant", quant, "--json"], cwd=Path(__file__).resolve().parents[1],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        event = decode_event(line)
        if event.get("type") == "progress" and event["message"].startswith(step):
            break
    time.sleep(0.3)
    assert proc.poll() is None, "the export ended before it could be cancelled"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [], err


def test_sigterm_after_publishing_keeps_the_users_file(runs, tmp_path, monkeypatch):
    """A Cancel that comes once the file is renamed into place removes nothing of the user's."""
    import training_core.export as export_mod
    import training_core.fsutil as fsutil
    root, made = runs
    out = tmp_path / "kept.gguf"

    class Left(Exception):
        pass

    def exit_now(status):
        raise Left(status)

    def cancel_now(folder):   # called right after the rename
        monkeypatch.setattr(export_mod.os, "_exit", exit_now)
        with pytest.raises(Left):
            export_mod.leave_on_sigterm(15, None)
    monkeypatch.setattr(fsutil, "fsync_dir", cancel_now)
    export_gguf(made["llama"][0], out, "f16")
    assert out.is_file() and out.stat().st_size > 0
    assert not export_mod._IN_PROGRESS


def test_too_little_free_space_is_refused_before_writing(runs, tmp_path, capsys, monkeypatch):
    """The estimate (with the f16 intermediate of a k-quant) against the disk's free space: one line, exit 2,
    naming the user's file, before anything is loaded or written."""
    import shutil
    import training_core.gguf_export as ge
    root, made = runs
    out = tmp_path / "big.gguf"
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=50_000))
    monkeypatch.setattr(ge, "_write_model", lambda *a: pytest.fail("wrote with no room"))
    for quant in ("f16", "q4_k_m") if k_quants_available() else ("f16",):
        assert main(["export", str(made["llama"][0]), "--gguf", str(out), "--quant", quant]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(out) in err and "free" in err, err
        assert ("f16 intermediate" in err) == (quant == "q4_k_m"), err
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KB tmpfs (needs root, as CI and this machine have); skipped where it cannot be mounted."""
    import subprocess
    folder = tmp_path / "small"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_disk_that_fills_up_is_one_line_naming_the_file(runs, small_disk, capsys, monkeypatch):
    """The check passes (another writer may fill the disk meanwhile) and the write runs out of space: one
    line naming the user's file, exit 2, no temporary file left; the same for a folder no file can go in."""
    import training_core.gguf_export as ge
    root, made = runs
    monkeypatch.setattr(ge, "_check_space", lambda *a: None, raising=False)
    out = small_disk / "full.gguf"
    assert main(["export", str(made["llama"][0]), "--gguf", str(out), "--quant", "f32"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{out}: no space left on the disk" in err, err
    assert "tmp-gguf" not in err and list(small_disk.iterdir()) == []
    if Path("/proc").is_dir():
        assert main(["export", str(made["llama"][0]), "--gguf", "/proc/x.gguf"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "/proc/x.gguf: cannot be written there" in err, err


def test_k_quants_on_narrow_models_say_they_fall_back(runs, capsys, monkeypatch):
    """64-wide rows cannot take llama.cpp's 256-blocks: every matrix falls back (q4_k_m to q5_0 and q8_0,
    q6_k to q8_0). --gguf-sizes estimates that, and the export's warnings say it."""
    import training_core.gguf_export as ge
    root, made = runs
    run = made["llama"][0]
    assert main(["export", str(run), "--gguf-sizes", "--json"]) == 0
    from training_core.protocol import decode_answer
    doc = decode_answer(capsys.readouterr().out)
    sizes = doc["sizes"]
    assert abs(sizes["q6_k"] - sizes["q8_0"]) < 0.01 * sizes["q8_0"]   # q8_0 throughout
    assert sizes["q4_k_m"] < 0.92 * sizes["q8_0"] and sizes["q5_k_m"] < sizes["q8_0"]   # mostly q5_0 / q5_1
    assert set(doc["fallbacks"]) == {"q4_k_m", "q5_k_m", "q6_k"}
    assert "15 of 15 weight matrices" in doc["fallbacks"]["q6_k"] and "same as q8_0" in doc["fallbacks"]["q6_k"]
    assert "q5_0/q8_0" in doc["fallbacks"]["q4_k_m"]
    assert main(["export", str(run), "--gguf-sizes"]) == 0
    assert "note: q6_k: 15 of 15" in capsys.readouterr().out

    monkeypatch.setattr(ge, "k_quants_available", lambda: True)   # the quantizer itself: a copy of its input
    monkeypatch.setattr(ge, "_k_quantize", lambda src, dst, quant, out: dst.write_bytes(src.read_bytes()))
    assert main(["export", str(run), "--gguf", str(root / "fell.gguf"), "--quant", "q6_k", "--force"]) == 0
    out, err = capsys.readouterr()
    assert err.count("warning: q6_k: 15 of 15 weight matrices") == 1, err


@pytest.mark.skipif(not k_quants_available(), reason="llama-cpp-python is not installed (pip install 'modron[llama]')")
@pytest.mark.parametrize("quant", ["q4_k_m", "q5_k_m", "q6_k"])
def test_llama_cpp_falls_back_as_the_estimate_says(runs, quant):
    """The types llama.cpp's quantizer really gives each matrix, and the file's size, against the estimate."""
    from training_core.gguf_export import _k_types, plan_tensors
    root, made = runs
    run = made["llama"][0]
    answer = export_gguf(run, root / f"fb-{quant}.gguf", quant, force=True)
    assert any(w.startswith(f"{quant}: 15 of 15 weight matrices") for w in answer["warnings"]), answer
    written = {t.name: t.tensor_type.name.lower() for t in GGUFReader(answer["gguf"]).tensors if len(t.shape) > 1}
    from transformers import AutoConfig
    from training_core.gguf_export import _shapes
    config = AutoConfig.from_pretrained(run / "checkpoints" / "ckpt-00000020" / "model")
    planned = {p.name: got for p, _, got in _k_types(plan_tensors(config, _shapes(config), "f16"), quant)}
    assert written == planned
    size = estimate(run)["sizes"][quant]
    assert abs(size - answer["bytes"]) < 0.05 * answer["bytes"], (size, answer["bytes"])


@pytest.fixture(scope="module")
def bytes_run(tmp_path_factory):
    """A scratch run trained with `--tokenizer bytes`: one token per byte, no merges at all."""
    from training_core.models.tokenizer import bytes_tokenizer
    root = tmp_path_factory.mktemp("bytes")
    tok = bytes_tokenizer()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256, tie_word_embeddings=True))
    randomise(model)
    return root, full_run(root, "bytes", model, tok), model, tok


def test_bytes_tokenizer_gguf_has_the_merges_key_llama_cpp_requires(bytes_run):
    root, run, _, _ = bytes_run
    path = export_gguf(run, root / "keys.gguf", "f16", force=True)["gguf"]
    merges = GGUFReader(path).fields.get("tokenizer.ggml.merges")
    assert merges is not None and len(merges.data) == 1   # a stand-in that never fires


@pytest.mark.skipif(not k_quants_available(), reason="llama-cpp-python is not installed (pip install 'modron[llama]')")
def test_llama_cpp_loads_a_bytes_tokenizer_run_and_tokenizes_the_same(bytes_run):
    import llama_cpp
    import numpy as np
    root, run, source, tok = bytes_run
    path = export_gguf(run, root / "cpp-bytes.gguf", "f32", force=True)["gguf"]
    llm = llama_cpp.Llama(model_path=path, n_ctx=256, logits_all=True, verbose=False)
    text = TEXT + " ünï 😀 \n\ttabs"
    ids = tok(text)["input_ids"]
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids == list(text.encode())
    assert llm.detokenize(ids).decode() == tok.decode(ids) == text
    llm.eval(ids)
    diff = np.abs(np.asarray(llm.scores[:len(ids)]) - logits(source, ids)[0].numpy()).max()
    assert diff < 1e-3, f"bytes: llama.cpp logits differ by {diff}"


def test_llama3_rope_scaling_becomes_the_divisors_transformers_uses():
    """Llama 3.1/3.2 bases: llama.cpp divides each rotary frequency by `rope_freqs`."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from training_core.gguf_export import _head_dim, _llama3_rope_factors, _rope
    cfg = LlamaConfig(hidden_size=2048, num_attention_heads=32, num_key_value_heads=8,
                      max_position_embeddings=131072,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192})
    theta, kind, params = _rope(cfg)
    assert (theta, kind) == (500000.0, "llama3")
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    d = _head_dim(cfg)
    plain = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    factors = torch.from_numpy(_llama3_rope_factors(params, d, theta)).double()
    assert torch.allclose(plain / factors, expected.double(), rtol=1e-6)
