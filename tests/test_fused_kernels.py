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
    assert fused_kernels.probe(model, cpu) is None
    (small,) = applied
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


@pytest.mark.parametrize("kv", [6, 2])
def test_the_one_layer_model_keeps_the_attention_kind(kv):
    cfg = fused_kernels._one_layer_config(_llama(num_key_value_heads=kv).config)
    assert cfg.num_hidden_layers == 1 and cfg.hidden_size == 64 and cfg.vocab_size == 300
    assert (cfg.num_key_value_heads < cfg.num_attention_heads) == (kv < 6)
