"""Memory, disk and time estimates before the first step."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest

from training_core.preflight import (
    CUDA_ALLOCATOR_SLACK, CUDA_CONTEXT_BYTES, MemoryEstimate, estimate_disk, estimate_memory, eta_seconds, format_bytes,
    format_duration, plan_gradient_checkpointing,
)

GB = 1024 ** 3
MB = 1024 ** 2

TINY = dict(params_total=1_000_000, params_trainable=1_000_000, num_layers=2, hidden_size=128, num_heads=4,
            vocab_size=300, seq_len=256, micro_batch=8, precision="fp32", method="full", device="cpu")
LLAMA_7B = dict(params_total=6_738_000_000, params_trainable=6_738_000_000, num_layers=32, hidden_size=4096,
                num_heads=32, vocab_size=32000, seq_len=2048, micro_batch=4, precision="fp16", method="full",
                device="cuda:0")


def est(base, **over) -> MemoryEstimate:
    kw = {"gradient_checkpointing": False, "available": 24 * GB, **base, **over}
    return estimate_memory(**kw)


def test_tiny_model_fits_in_24_gb():
    e = est(TINY)
    assert e.verdict == "fits" and e.advice == []
    assert e.weights == 4_000_000 and e.grads == 4_000_000 and e.optimizer == 8_000_000
    assert e.total == e.weights + e.grads + e.optimizer + e.activations + e.overhead
    assert e.total < 200 * MB
    assert e.device == "cpu" and e.gradient_checkpointing is False
    assert json.loads(json.dumps(e.to_dict()))["verdict"] == "fits"


def test_7b_full_finetune_in_fp16_wont_fit_in_24_gb():
    e = est(LLAMA_7B)
    assert e.verdict == "wont_fit"
    assert e.weights == 4 * LLAMA_7B["params_total"]          # fp32 master weights
    assert e.optimizer == 8 * LLAMA_7B["params_trainable"]
    assert e.total > 100 * GB
    text = " ".join(e.advice)
    assert "LoRA" in text and "gradient checkpointing" in text and "micro-batch size to" in text
    # No single change is enough, so the first line is a combination that does fit.
    assert e.advice[0].startswith("No single change is enough")
    needed = float(e.advice[0].split("needs about ")[1].split(" GB")[0])
    assert needed * GB <= 0.85 * 24 * GB


def test_lora_and_qlora_store_less():
    lora = est(LLAMA_7B, method="lora", params_trainable=40_000_000)
    qlora = est(LLAMA_7B, method="qlora", params_trainable=40_000_000)
    full = est(LLAMA_7B)
    assert qlora.weights < lora.weights < full.weights
    assert lora.weights == pytest.approx(2 * 6_698_000_000 + 4 * 40_000_000)   # half base, fp32 adapters
    assert lora.optimizer == 8 * 40_000_000


def test_advice_says_what_to_change_and_sorts_by_effect():
    # LoRA on a 7B model at 16 GB: lowering the micro-batch or sequence length helps.
    e = est(LLAMA_7B, method="lora", params_trainable=40_000_000, available=16 * GB, gradient_checkpointing=True)
    assert e.verdict in ("tight", "wont_fit")
    needs = [float(a.split("needs about ")[1].split(" GB")[0]) for a in e.advice if "needs about" in a
             and not a.startswith("No single")]
    assert needs == sorted(needs)
    assert not any("gradient checkpointing" in a for a in e.advice)   # it is on already
    assert not any("instead of the full model" in a for a in e.advice)
    # On the CPU QLoRA is not offered.
    cpu = est(LLAMA_7B, device="cpu", precision="fp32")
    assert not any("QLoRA" in a for a in cpu.advice)
    assert cpu.advice[-1].endswith("choose a smaller model.")


def test_checkpointing_lowers_activations():
    off, on = est(LLAMA_7B), est(LLAMA_7B, gradient_checkpointing=True)
    assert on.activations < off.activations / 3
    assert on.weights == off.weights and on.gradient_checkpointing


def test_verdicts_and_unknown_memory():
    total = est(TINY).total
    assert est(TINY, available=int(total / 0.85) + 1).verdict == "fits"
    assert est(TINY, available=total).verdict == "tight"
    assert est(TINY, available=total - 1).verdict == "wont_fit"
    unknown = est(TINY, available=None)
    assert unknown.verdict == "fits" and "unknown" in unknown.advice[0]


def test_gpu_adds_cuda_context_and_allocator_slack():
    extra = est(TINY, device="cuda:0").overhead - est(TINY).overhead
    assert extra == CUDA_CONTEXT_BYTES + CUDA_ALLOCATOR_SLACK


def _llama_params(h, layers, ffn, vocab, r=16):
    total = 2 * vocab * h + layers * (4 * h * h + 3 * h * ffn + 2 * h) + h
    lora = layers * r * (4 * 2 * h + 3 * (h + ffn))          # r·(in + out) for q, k, v, o, gate, up, down
    return total, lora


# Measured on an NVIDIA H200 (torch 2.11 + CUDA 13, transformers 5.17, peft; bf16 autocast, AdamW,
# two steps of a randomly initialised Llama): torch.cuda.max_memory_reserved() in GB.
# (hidden, layers, ffn, heads, batch, seq, method, checkpointing, attention, reserved)
H200_RESERVED = [
    (2048, 16, 5632, 16, 4, 1024, "full", False, "sdpa", 21.8),
    (2048, 16, 5632, 16, 4, 1024, "full", True, "sdpa", 19.3),
    (2048, 16, 5632, 16, 4, 1024, "full", False, "eager", 27.5),
    (2048, 16, 5632, 16, 4, 1024, "lora", True, "sdpa", 5.4),
    (2048, 16, 5632, 16, 4, 1024, "lora", False, "eager", 17.4),
    (2048, 16, 5632, 16, 1, 2048, "full", False, "sdpa", 20.1),
    (768, 12, 2048, 12, 8, 512, "lora", True, "sdpa", 2.4),
    (768, 12, 2048, 12, 2, 256, "lora", True, "sdpa", 0.83),
]


@pytest.mark.parametrize("h,layers,ffn,heads,b,s,method,ckpt,attn,reserved", H200_RESERVED)
def test_estimate_covers_measured_gpu_memory(h, layers, ffn, heads, b, s, method, ckpt, attn, reserved):
    """The estimate (less the CUDA context, which the allocator does not see) stays an upper bound
    of what PyTorch reserved, within a few per cent, and is never more than about twice it."""
    total, lora = _llama_params(h, layers, ffn, 32000)
    e = estimate_memory(params_total=total, params_trainable=total if method == "full" else lora, num_layers=layers,
                        hidden_size=h, num_heads=heads, vocab_size=32000, seq_len=s, micro_batch=b, precision="bf16",
                        method=method, gradient_checkpointing=ckpt, available=None, device="cuda:0")
    ratio = reserved * GB / (e.total - CUDA_CONTEXT_BYTES)
    assert 0.5 < ratio < 1.05, ratio


def test_plan_gradient_checkpointing():
    kw = {**LLAMA_7B, "method": "lora", "params_trainable": 40_000_000, "micro_batch": 1, "seq_len": 1024}
    off = estimate_memory(gradient_checkpointing=False, available=None, **kw).total
    on = estimate_memory(gradient_checkpointing=True, available=None, **kw).total
    assert on < off
    roomy = int(off / 0.85) + GB                    # fits without checkpointing
    squeezed = int((on + off) / 2)                  # fits only with it
    assert plan_gradient_checkpointing(None, available=roomy, **kw)[0] is False
    used, e = plan_gradient_checkpointing(None, available=squeezed, **kw)
    assert used is True and e.gradient_checkpointing and e.total == on
    assert plan_gradient_checkpointing(True, available=roomy, **kw)[0] is True      # explicit choice honoured
    used, e = plan_gradient_checkpointing(False, available=squeezed, **kw)
    assert used is False and e.verdict != "fits"
    assert plan_gradient_checkpointing(None, available=None, **kw)[0] is False


@pytest.mark.parametrize("name,values", [("micro_batch", [1, 2, 4, 8, 16]), ("seq_len", [128, 256, 512, 1024])])
def test_estimate_grows_with_batch_and_seq_len(name, values):
    for ckpt in (False, True):
        totals = [est(LLAMA_7B, gradient_checkpointing=ckpt, **{name: v}).total for v in values]
        assert totals == sorted(totals) and len(set(totals)) == len(totals)


def test_rejects_unresolved_precision_and_unknown_method():
    with pytest.raises(ValueError):
        est(TINY, precision="auto")
    with pytest.raises(ValueError):
        est(TINY, method="prefix-tuning")


def test_estimate_disk():
    full = estimate_disk(params_total=10_000, params_trainable=10_000, method="full", keep=3)
    assert full == 4 * (10_000 * 4 + 10_000 * 8) + 10_000 * 4
    lora = estimate_disk(params_total=10_000, params_trainable=100, method="lora", keep=3, weight_bytes=2)
    assert lora == 4 * (100 * 4 + 100 * 8) + 10_000 * 2
    assert estimate_disk(params_total=10_000, params_trainable=100, method="lora", keep=5) > lora


def test_eta():
    assert eta_seconds(10, 110, 0.5) == 50.0
    assert eta_seconds(110, 110, 0.5) == 0.0 and eta_seconds(120, 110, 0.5) == 0.0
    assert math.isinf(eta_seconds(0, 10, 0.0)) and math.isinf(eta_seconds(0, 10, float("nan")))


def test_format_bytes():
    assert format_bytes(0) == "0 B" and format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KB"
    assert format_bytes(int(1.4 * GB)) == "1.4 GB"
    assert format_bytes(24 * GB) == "24.0 GB"
    assert format_bytes(350 * MB) == "350 MB"
    assert format_bytes(3 * 1024 * GB) == "3.0 TB"
    assert format_bytes(-2 * MB) == "-2.0 MB"


def test_format_duration():
    assert format_duration(0) == "0 s" and format_duration(45.4) == "45 s"
    assert format_duration(200) == "3 min 20 s"
    assert format_duration(180) == "3 min"
    assert format_duration(2 * 3600 + 5 * 60 + 10) == "2 h 5 min"
    assert format_duration(59.6) == "1 min"
    assert format_duration(3 * 86400 + 4 * 3600) == "3 d 4 h"
    assert format_duration(float("inf")) == "unknown" and format_duration(float("nan")) == "unknown"


MEASURE = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    from transformers import LlamaConfig, LlamaForCausalLM

    def rss():  # (current, peak) resident memory of this process
        if sys.platform.startswith("linux"):
            with open("/proc/self/status") as fh:
                d = dict(line.split(":", 1) for line in fh if ":" in line)
            return int(d["VmRSS"].split()[0]) * 1024, int(d["VmHWM"].split()[0]) * 1024
        import psutil
        info = psutil.Process().memory_info()
        if hasattr(info, "peak_wset"):                      # Windows
            return info.rss, info.peak_wset
        import resource                                      # macOS: ru_maxrss is in bytes
        return info.rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    cfg = json.loads(sys.argv[1])
    ckpt = sys.argv[2] == "1"
    x = torch.randint(0, cfg["vocab_size"], (4, 256))
    # Warm torch's kernels and thread pools up on a toy model so they are in the baseline.
    toy = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=2, vocab_size=64))
    toy(input_ids=x[:, :8] % 64, labels=x[:, :8] % 64).loss.backward()
    del toy
    base, _ = rss()
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(input_ids=x, labels=x, use_cache=False).loss.backward()
    opt.step()
    print(json.dumps({"params": sum(p.numel() for p in model.parameters()), "used": rss()[1] - base}))
""")


def test_estimate_matches_a_real_cpu_training_step(tmp_path):
    """One real fp32 training step of a ~17 M-parameter Llama on the CPU, peak RSS vs the estimate.

    The estimate adds every peak together, so it should be a bit above what is measured, never far off.
    """
    cfg = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=6,
               intermediate_size=1024, vocab_size=8000, max_position_embeddings=512, tie_word_embeddings=False)
    script = tmp_path / "measure.py"
    script.write_text(MEASURE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    procs = {ckpt: subprocess.Popen([sys.executable, str(script), json.dumps(cfg), ckpt], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for ckpt in ("0", "1")}   # both at once: one per core
    measured = {}
    for ckpt, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        measured[ckpt] = json.loads(out.strip().splitlines()[-1])
    assert measured["1"]["used"] < measured["0"]["used"]          # checkpointing really saves memory
    for ckpt, m in measured.items():
        e = estimate_memory(params_total=m["params"], params_trainable=m["params"], num_layers=6, hidden_size=384,
                            num_heads=6, vocab_size=8000, seq_len=256, micro_batch=4, precision="fp32",
                            method="full", gradient_checkpointing=ckpt == "1", available=None, device="cpu")
        ratio = m["used"] / e.total
        assert 0.4 < ratio < 1.15, (ckpt, m, e.total, ratio)


@pytest.mark.parametrize("make", [
    lambda t: t.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                            head_dim=16, num_key_value_heads=2, vocab_size=300),        # head_dim x heads > hidden
    lambda t: t.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=4096, vocab_size=300),  # learned positions
    lambda t: t.Qwen2MoeConfig(hidden_size=64, intermediate_size=512, moe_intermediate_size=32, num_experts=8,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                               shared_expert_intermediate_size=32),                     # experts at their own width
])
def test_the_lower_bound_is_one_and_is_close(make):
    """min_params_from_config never exceeds the model's real count (a legal model must not be refused),
    and counts what a hostile config could hide weights in: heads wider than the hidden size, learned
    position tables (2e9 positions passed it once), experts."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from training_core.preflight import min_params_from_config
    config = make(transformers)
    with torch.device("meta"):
        real = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    low = min_params_from_config(config)
    assert 0.5 * real <= low <= real, (low, real)


@pytest.mark.parametrize("field, value, problem", [
    ("hidden_size", -64, "hidden_size -64; sizes must be positive"),
    ("num_hidden_layers", "12", "num_hidden_layers 12; sizes must be positive"),
    ("vocab_size", 3.5, "vocab_size 3.5"),
    ("hidden_size", 10 ** 400, "about 10^"),
    ("n_positions", 2_000_000_000, "parameters"),
])
def test_absurd_sizes_are_one_line_before_anything_is_built(field, value, problem):
    from training_core.preflight import cannot_fit, weights_problem
    config = {"model_type": "gpt2" if field == "n_positions" else "llama", "hidden_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "vocab_size": 300, field: value}
    said = cannot_fit(config, method="lora", precision="bf16", limit=8 * 1024 ** 3, where_memory="RAM")
    assert said and problem in said and "\n" not in said, said
    assert problem in weights_problem(config, bytes_per_param=2)
