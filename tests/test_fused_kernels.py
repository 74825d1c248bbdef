"""JobSpec.fused_kernels (training_core/fused_kernels.py). Liger's kernels are Triton code for NVIDIA GPUs:
they cannot run here (and Triton's CPU interpreter fails on Liger's RMSNorm), so bench/gpu_check.py measures
them on a lent GPU. What runs here: a CPU run says once why it trains without them; the probe that guards
a GPU run passes kernels that agree, and refuses (putting the modeling module back) kernels that differ
or fail; the engine applies what the probe passed, through a LoRA wrapper too."""
import pytest
import torch

from helpers import engine_job, make_local_model
from training_core import fused_kernels
from training_core.config import JobSpec
from training_core.engine import Engine


def _llama(**kw):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = dict(vocab_size=300, hidden_size=96, intermediate_size=200, num_hidden_layers=2, num_attention_heads=6,
               num_key_value_heads=2)
    cfg.update(kw)
    return LlamaForCausalLM(LlamaConfig(**cfg))


def test_a_cpu_run_says_once_why_it_trains_without_them(tmp_path):
    events = []
    engine = Engine(JobSpec.from_dict(engine_job(tmp_path, steps=2, fused_kernels=True, sample_prompts=[])),
                    events.append)
    assert engine.run().status == "finished"
    warned = [e["message"] for e in events if e["type"] == "warning" and e["code"] == "fused_kernels"]
    assert len(warned) == 1 and "NVIDIA" in warned[0] and "without them" in warned[0], warned
    assert not engine.fused


def test_the_probe_passes_kernels_that_agree_and_refuses_ones_that_differ_or_fail(monkeypatch):
    from transformers.models.llama import modeling_llama
    model, cpu = _llama(), torch.device("cpu")
    applied = []
    monkeypatch.setattr(fused_kernels, "apply", lambda m: applied.append(m))   # kernels equal to the plain code
    state = torch.random.get_rng_state()
    assert fused_kernels.probe(model, cpu) is None
    assert torch.equal(torch.random.get_rng_state(), state)        # the run's random stream is untouched
    (small,) = applied
    assert fused_kernels.probe(model, cpu, torch.bfloat16) is None  # and a step under the run's autocast
    assert small is not model and small.config.num_hidden_layers == 1 and small.config.num_key_value_heads == 2

    def off_by_a_little(m):   # a head kernel that computes wrong: the loss moves more than the probe allows
        with torch.no_grad():
            m.lm_head.weight.mul_(1.3)
    monkeypatch.setattr(fused_kernels, "apply", off_by_a_little)
    why = fused_kernels.probe(model, cpu)
    assert why and "differ" in why, why

    plain_norm = modeling_llama.LlamaRMSNorm

    def half_applied_then_failed(m):
        modeling_llama.LlamaRMSNorm = torch.nn.Identity   # as Liger patches the module before a kernel runs
        raise RuntimeError("Triton: no kernel image is available\nmore lines")
    monkeypatch.setattr(fused_kernels, "apply", half_applied_then_failed)
    why = fused_kernels.probe(model, cpu)
    assert why == "RuntimeError: Triton: no kernel image is available", why
    assert modeling_llama.LlamaRMSNorm is plain_norm        # put back: the run's own model is unpatched


def test_the_engine_applies_what_the_probe_passed_through_a_lora_wrapper(tmp_path, monkeypatch):
    applied = []
    monkeypatch.setattr(fused_kernels, "unsupported_reason", lambda device, model: None)
    monkeypatch.setattr(fused_kernels, "apply", lambda m: applied.append(fused_kernels._hf_model(m)))
    events = []
    model_dir = make_local_model(tmp_path / "model")
    spec = engine_job(tmp_path, steps=2, fused_kernels=True, sample_prompts=[], method="lora", model=str(model_dir),
                      tokenizer="auto")
    engine = Engine(JobSpec.from_dict(spec), events.append)
    assert engine.run().status == "finished"
    assert engine.fused and not [e for e in events if e["type"] == "warning" and e["code"] == "fused_kernels"]
    # The probe's one-layer model, then the run's: the transformers model under the LoRA wrapper.
    assert len(applied) == 2 and applied[0].config.num_hidden_layers == 1
    assert applied[1] is engine.model.get_base_model() and type(applied[1]).__name__ == "LlamaForCausalLM"
    assert any(e["type"] == "phase" and "Liger" in e["message"] for e in events)


@pytest.mark.parametrize("targets", [None, ["q_proj", "lm_head"]])
def test_a_lora_adapter_on_the_output_layer_keeps_the_plain_loss(tmp_path, monkeypatch, targets):
    applied = []
    monkeypatch.setattr(fused_kernels, "unsupported_reason", lambda device, model: None)
    monkeypatch.setattr(fused_kernels, "probe", lambda model, device, dtype=None: None)
    monkeypatch.setattr(fused_kernels, "apply", lambda m: applied.append(fused_kernels.adapted_output_layer(m)))
    events = []
    extra = {"lora_targets": targets} if targets else {}
    spec = engine_job(tmp_path, steps=1, fused_kernels=True, sample_prompts=[], method="lora",
                      model=str(make_local_model(tmp_path / "model")), tokenizer="auto", **extra)
    engine = Engine(JobSpec.from_dict(spec), events.append)
    assert engine.run().status == "finished"
    warned = [e["message"] for e in events if e["type"] == "warning" and e["code"] == "fused_kernels"]
    assert applied == [bool(targets)] and engine.fused
    # The pre-flight estimate counts the logits exactly where the plain loss stays (an adapter on lm_head).
    from training_core import preflight
    pre = next(e for e in events if e["type"] == "preflight")

    def activations(fused_loss: bool) -> int:
        return preflight.figures(engine.spec, engine.model.get_base_model().config, params_total=pre["params_total"],
                                 method="lora", precision=pre["precision"], device="cpu", available=None,
                                 micro_batch=engine.micro_batch, fused_loss=fused_loss)["memory"].activations
    assert pre["memory"]["activations"] == activations(not targets) and activations(True) < activations(False)
    assert (len(warned) == 1 and "output layer" in warned[0]) if targets else not warned, warned


@pytest.mark.parametrize("kv", [6, 2])
def test_the_one_layer_model_keeps_the_attention_kind(kv):
    cfg = fused_kernels._one_layer_config(_llama(num_key_value_heads=kv).config)
    assert cfg.num_hidden_layers == 1 and cfg.hidden_size == 64 and cfg.vocab_size == 300
    assert (cfg.num_key_value_heads < cfg.num_attention_heads) == (kv < 6)


def test_the_one_layer_model_builds_when_the_pad_id_lies_past_its_vocabulary():
    """Qwen2.5's pad id is 151643: the small vocabulary (1024) must not keep it."""
    from transformers import AutoModelForCausalLM, Qwen2Config
    big = Qwen2Config(vocab_size=5000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=4999)
    cfg = fused_kernels._one_layer_config(big)
    assert cfg.vocab_size == 1024 and cfg.model_type == "qwen2"
    AutoModelForCausalLM.from_config(cfg)


def test_gpu_reasons_other_model_types_and_a_liger_that_does_not_load(monkeypatch):
    """On a (pretend) Volta-or-newer GPU with liger-kernel (pretend) installed: a model type Modron does
    not train is refused by name, and a package that fails to import (here: it is not really there) is
    a reason, not a crash."""
    import importlib.util
    from transformers import GPT2Config, GPT2LMHeadModel
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (5, 2))
    assert "5.2" in fused_kernels.unsupported_reason(cuda, _llama())          # a Tesla M40
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "liger_kernel" else real_find_spec(name, *a))
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    assert "this one is gpt2" in fused_kernels.unsupported_reason(cuda, gpt2)
    why = fused_kernels.unsupported_reason(cuda, _llama())
    assert why.startswith("liger-kernel does not load here (ModuleNotFoundError"), why
