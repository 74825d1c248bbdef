"""Model side: presets, tokenizers, loading a base model, training methods. No network."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from helpers import SAMPLE_TEXT, make_tokenizer
from training_core.config import JobSpec
from training_core.errors import ModelError
from training_core.models import (PRESETS, apply_method, bytes_tokenizer, count_params, count_trainable,
                                  load_base, load_tokenizer, preset_config, train_tokenizer)
from training_core.models.methods import QLORA_UNAVAILABLE, qlora_available
from training_core.models.presets import NOMINAL_PARAMS


def spec_for(model: str, **kw) -> JobSpec:
    return JobSpec(model=str(model), data=["unused.txt"], out="unused-run", **kw)


def tiny_config(vocab: int = 300) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)


def make_model_folder(folder: Path, *, tokenizer=True, pad=True) -> Path:
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config()).save_pretrained(folder, safe_serialization=True)
    if tokenizer:
        tok = make_tokenizer()
        if not pad:
            tok.pad_token = None
        tok.save_pretrained(folder)
    return folder


# --- presets -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_size_is_near_nominal(name):
    n = count_params(preset_config(name))
    assert 0.65 * NOMINAL_PARAMS[name] <= n <= 1.35 * NOMINAL_PARAMS[name], (name, n)
    assert preset_config(name).max_position_embeddings >= 2048


def test_count_params_matches_a_real_model():
    config = preset_config("tiny", vocab_size=512)
    real = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    assert count_params(config) == real


def test_tiny_preset_shape_and_vocab_override():
    c = preset_config("tiny")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (128, 4, 4, 344)
    assert c.vocab_size == 4096 and c.tie_word_embeddings
    assert preset_config("tiny", vocab_size=258).vocab_size == 258
    assert preset_config("base").hidden_size == 768 and preset_config("medium").num_hidden_layers == 24


def test_unknown_preset_lists_the_names():
    with pytest.raises(ModelError) as err:
        preset_config("huge")
    msg = str(err.value)
    assert "huge" in msg and all(name in msg for name in PRESETS) and "\n" not in msg


# --- tokenizers ----------------------------------------------------------------------------

TRICKY = "Héllo wörld 👋\n\ttabs  and   spaces, 日本語 <not special>"


def test_bytes_tokenizer_is_one_token_per_byte_and_round_trips():
    tok = bytes_tokenizer()
    ids = tok(TRICKY)["input_ids"]
    assert ids == list(TRICKY.encode("utf-8"))
    assert tok.decode(ids) == TRICKY
    assert len(tok) == 258
    assert tok.eos_token == tok.bos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert {tok.eos_token_id, tok.pad_token_id} == {256, 257}
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == TRICKY


def test_trained_tokenizer_round_trips_and_compresses():
    tok = train_tokenizer([SAMPLE_TEXT] * 5, vocab_size=400)
    assert 258 < len(tok) <= 400
    ids = tok(TRICKY)["input_ids"]
    assert tok.decode(ids) == TRICKY
    # Learned merges: common text takes far fewer tokens than bytes.
    assert len(tok(SAMPLE_TEXT)["input_ids"]) < len(SAMPLE_TEXT.encode()) / 2
    assert tok.eos_token == tok.bos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert tok.convert_tokens_to_ids("<|endoftext|>") == tok.eos_token_id


def test_train_tokenizer_stops_reading_after_max_chars():
    pulled = 0

    def endless():
        nonlocal pulled
        while True:
            pulled += 1
            yield "abcdefghij" * 10  # 100 chars

    tok = train_tokenizer(endless(), vocab_size=300, max_chars=1_000)
    assert pulled <= 11
    assert tok.decode(tok("abcabc")["input_ids"]) == "abcabc"


def test_load_tokenizer_from_folder_and_file(tmp_path):
    train_tokenizer([SAMPLE_TEXT], vocab_size=320).save_pretrained(tmp_path / "tok")
    bytes_tokenizer().save_pretrained(tmp_path / "bytes")
    assert load_tokenizer(tmp_path / "bytes")(TRICKY)["input_ids"] == list(TRICKY.encode("utf-8"))
    for path in (tmp_path / "tok", tmp_path / "tok" / "tokenizer.json", tmp_path / "bytes"):
        tok = load_tokenizer(path)
        assert tok.decode(tok(TRICKY)["input_ids"]) == TRICKY
        assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>" and tok.bos_token


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ModelError, match="no such"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no tokenizer files"):
        load_tokenizer(tmp_path / "empty")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ModelError, match="not a usable tokenizer") as err:
        load_tokenizer(bad)
    assert "\n" not in str(err.value)


# --- loading: scratch ----------------------------------------------------------------------

def test_scratch_with_bytes_tokenizer_is_seeded():
    a = load_base(spec_for("scratch:tiny", tokenizer="bytes", seed=3))
    b = load_base(spec_for("scratch:tiny", tokenizer="bytes", seed=3))
    c = load_base(spec_for("scratch:tiny", tokenizer="bytes", seed=4))
    assert a.source == "scratch" and a.is_scratch and a.preset == "tiny" and a.model_dir is None
    assert a.model.config.vocab_size == len(a.tokenizer) == 258
    assert a.model.config.hidden_size == 128
    assert a.model.config.eos_token_id == a.tokenizer.eos_token_id == 256
    assert a.model.config.pad_token_id == a.tokenizer.pad_token_id == 257
    pa, pb, pc = (dict(m.model.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not torch.equal(pa["model.layers.0.mlp.up_proj.weight"], pc["model.layers.0.mlp.up_proj.weight"])
    out = a.model(input_ids=torch.tensor([a.tokenizer("hi")["input_ids"]]))
    assert out.logits.shape[-1] == 258


def test_scratch_trains_a_tokenizer_from_the_texts():
    calls = []

    def texts():
        calls.append(1)
        return iter([SAMPLE_TEXT] * 3)

    loaded = load_base(spec_for("scratch:tiny", tokenizer="auto"), texts=texts)
    assert calls == [1]
    assert 258 < len(loaded.tokenizer) <= PRESETS["tiny"].vocab_size
    assert loaded.model.get_input_embeddings().weight.shape[0] == len(loaded.tokenizer)
    assert loaded.tokenizer.decode(loaded.tokenizer(TRICKY)["input_ids"]) == TRICKY
    with pytest.raises(ModelError, match="texts"):
        load_base(spec_for("scratch:tiny", tokenizer="train"))


def test_scratch_with_tokenizer_path_and_unknown_preset(tmp_path):
    make_tokenizer(vocab_size=300).save_pretrained(tmp_path / "tok")
    loaded = load_base(spec_for("scratch:tiny", tokenizer=str(tmp_path / "tok")))
    assert loaded.model.config.vocab_size == len(loaded.tokenizer) == 300
    with pytest.raises(ModelError, match="scratch:tiny"):
        load_base(spec_for("scratch:gigantic", tokenizer="bytes"))


# --- loading: local folders ----------------------------------------------------------------

def test_local_folder_with_unicode_and_spaces_loads(tmp_path):
    folder = make_model_folder(tmp_path / "mödels and things" / "my tiny ✨ model")
    loaded = load_base(spec_for(folder))
    assert loaded.source == "local" and not loaded.is_scratch and loaded.model_dir == folder
    assert loaded.model.dtype == torch.float32
    torch.manual_seed(0)
    expected = LlamaForCausalLM(tiny_config()).state_dict()
    got = loaded.model.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    ids = torch.tensor([loaded.tokenizer("The lighthouse keeper")["input_ids"]])
    out = loaded.model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=loaded.tokenizer.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 3


def test_local_tokenizer_without_pad_gets_eos(tmp_path):
    folder = make_model_folder(tmp_path / "m", pad=False)
    assert json.loads((folder / "tokenizer_config.json").read_text()).get("pad_token") is None
    loaded = load_base(spec_for(folder))
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token == "<|endoftext|>"


def _one_line_model_error(spec, match):
    with pytest.raises(ModelError, match=match) as err:
        load_base(spec)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_local_folder_errors(tmp_path):
    afile = tmp_path / "weights.safetensors"
    afile.write_bytes(b"x")
    _one_line_model_error(spec_for(afile), "is not a folder")
    _one_line_model_error(spec_for(tmp_path / "nowhere"), "no such model folder")

    empty = tmp_path / "empty dir"
    empty.mkdir()
    msg = _one_line_model_error(spec_for(empty), "no config.json")
    assert str(empty) in msg

    badjson = make_model_folder(tmp_path / "badjson")
    (badjson / "config.json").write_text("{oops", encoding="utf-8")
    _one_line_model_error(spec_for(badjson), "not valid JSON")

    noweights = make_model_folder(tmp_path / "noweights")
    (noweights / "model.safetensors").unlink()
    _one_line_model_error(spec_for(noweights), "no model weights")

    notok = make_model_folder(tmp_path / "notok", tokenizer=False)
    _one_line_model_error(spec_for(notok), "no tokenizer files")


def test_pickled_weights_are_refused_and_never_read(tmp_path, monkeypatch):
    folder = make_model_folder(tmp_path / "pickled")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04junk that must never be unpickled")

    def forbidden(*a, **k):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", forbidden)
    msg = _one_line_model_error(spec_for(folder), "pickled")
    assert "safetensors" in msg and str(folder) in msg


def test_sharded_safetensors_need_all_shards(tmp_path):
    folder = make_model_folder(tmp_path / "sharded")
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")
    _one_line_model_error(spec_for(folder), "missing weight file model-00002-of-00002")


@pytest.mark.parametrize("shard", ["OUTSIDE", "../outside.safetensors", "sub/../../outside.safetensors"])
def test_an_index_never_names_weights_outside_its_folder(tmp_path, shard):
    """A downloaded index must not make the run load another file of this computer (e.g. a private model)."""
    folder = make_model_folder(tmp_path / "sharded")
    outside = tmp_path / "outside.safetensors"
    (folder / "model.safetensors").rename(outside)
    shard = str(outside) if shard == "OUTSIDE" else shard
    index = {"metadata": {"total_size": 0}, "weight_map": {"a": shard}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")
    _one_line_model_error(spec_for(folder), "names a weight file outside its folder")


def test_a_model_type_that_is_not_a_name_is_one_line(tmp_path):
    folder = make_model_folder(tmp_path / "odd")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": ["llama"]}), encoding="utf-8")
    _one_line_model_error(spec_for(folder), "model_type that is not a name")


def test_remote_code_needs_trust(tmp_path):
    folder = make_model_folder(tmp_path / "custom")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "modron_custom_thing"
    cfg["auto_map"] = {"AutoConfig": "modeling_custom.CustomConfig",
                       "AutoModelForCausalLM": "modeling_custom.CustomModel"}
    (folder / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    msg = _one_line_model_error(spec_for(folder), "trust-remote-code")
    assert "custom code" in msg


def test_unknown_hub_id_offline_is_a_model_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _one_line_model_error(spec_for("modron-test/does-not-exist"), "could not download 'modron-test/does-not-exist'")


# --- methods -------------------------------------------------------------------------------

def _tiny_model():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config())


def _train_step(model):
    ids = torch.randint(0, 300, (2, 16))
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss


def test_full_method_trains_everything():
    model = _tiny_model()
    for p in model.parameters():
        p.requires_grad_(False)
    out = apply_method(model, spec_for("x"), "full", gradient_checkpointing=True)
    total, trainable = count_trainable(out)
    assert total == trainable == sum(p.numel() for p in model.parameters())
    assert out.config.use_cache is False
    assert any(getattr(m, "gradient_checkpointing", False) is True for m in out.modules())
    _train_step(out)
    assert all(p.grad is not None for p in out.parameters())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_trains_only_the_adapter(checkpointing):
    model = _tiny_model()
    base_total = sum(p.numel() for p in model.parameters())
    spec = spec_for("x", lora_r=4, lora_alpha=8)
    out = apply_method(model, spec, "lora", gradient_checkpointing=checkpointing)
    total, trainable = count_trainable(out)
    assert 0 < trainable < total and total > base_total
    names = [n for n, p in out.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    # all-linear: attention and MLP projections, but not the output head.
    assert any("q_proj" in n for n in names) and any("down_proj" in n for n in names)
    assert not any("lm_head" in n for n in names)
    assert out.config.use_cache is False
    _train_step(out)
    # lora_B starts at zero, so it is the half that gets a gradient on the first step.
    grads = [p.grad for n, p in out.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_lora_explicit_targets_and_bad_targets():
    out = apply_method(_tiny_model(), spec_for("x", lora_targets=["q_proj", "v_proj"]), "lora", False)
    names = {n.split(".")[-4] for n, p in out.named_parameters() if p.requires_grad}
    assert names == {"q_proj", "v_proj"}
    with pytest.raises(ModelError, match="--lora-targets"):
        apply_method(_tiny_model(), spec_for("x", lora_targets=["no_such_layer"]), "lora", False)


def test_qlora_without_gpu_says_what_to_do():
    if qlora_available():  # pragma: no cover - only on a CUDA machine with bitsandbytes
        pytest.fail("this test expects a machine without CUDA + bitsandbytes")
    with pytest.raises(ModelError) as err:
        apply_method(_tiny_model(), spec_for("x"), "qlora", False)
    assert str(err.value) == f"--method: {QLORA_UNAVAILABLE}"


def test_hub_id_loads_from_one_snapshot_without_pickles(tmp_path, monkeypatch):
    import huggingface_hub

    snapshot = make_model_folder(tmp_path / "hub-cache" / "snapshots" / "abc123")
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    loaded = load_base(spec_for("some-org/some-model"))
    assert loaded.source == "hub" and loaded.model_dir == snapshot
    assert calls[0][0] == "some-org/some-model"
    ignored = calls[0][1]["ignore_patterns"]
    assert "*.bin" in ignored and "*.py" in ignored  # no pickles; no code unless trusted

    (snapshot / "model.safetensors").unlink()
    msg = _one_line_model_error(spec_for("some-org/some-model"), "no model weights")
    assert msg.startswith("some-org/some-model: ") and str(snapshot) not in msg
