"""Liger's fused Triton kernels for a training run (JobSpec.fused_kernels): RMSNorm, RoPE, SwiGLU and the
fused linear cross-entropy, which never holds the whole batch's logits (batch x sequence x vocabulary).

The kernels are the maintained `liger-kernel` package's (linkedin/Liger-Kernel); this module only
decides whether they can run here and proves it before a run relies on them. They need an NVIDIA GPU
that Triton supports, the package, and a model type Liger knows. `probe()` builds a one-layer model of
the run's own architecture, trains one step of it unfused and fused, and compares the losses and
gradients: a Liger release that does not match the installed transformers fails there, not at the
run's first step. On any "no" the run gives one `fused_kernels` warning and trains unfused.

Liger patches the transformers modeling module of the model's type (its RMSNorm, MLP and rotary
function, for models built later in this process too) and the instance's modules and forward. A worker
runs one job, so that is fine; a failed probe puts the module's names back as they were.
"""
from __future__ import annotations

import copy
import importlib.util
import sys

import torch

TRITON_MIN_CAPABILITY = (7, 0)   # Triton's oldest GPUs (Volta); a Tesla M40 (5.2) cannot run the kernels
LOSS_RTOL = 1e-3                 # fp32 fused vs unfused loss on the probe (Liger's own tests: ~1e-5)
GRAD_RTOL = 2e-2                 # largest gradient difference, relative to the largest gradient


def _hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper (LoRA, QLoRA), or the model itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def unsupported_reason(device: torch.device, model: torch.nn.Module) -> str | None:
    """Why Liger's kernels cannot run for this model on `device` (None: probe them)."""
    if device.type != "cuda":
        return "they are Triton kernels for NVIDIA GPUs, and this run trains on the " + device.type
    cc = tuple(torch.cuda.get_device_capability(device))
    if cc < TRITON_MIN_CAPABILITY:
        return (f"this GPU (compute capability {cc[0]}.{cc[1]}) is older than Triton supports "
                f"({TRITON_MIN_CAPABILITY[0]}.{TRITON_MIN_CAPABILITY[1]} or newer)")
    if importlib.util.find_spec("liger_kernel") is None:
        return "the liger-kernel package is not installed (pip install liger-kernel)"
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    model_type = getattr(getattr(_hf_model(model), "config", None), "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return f"Liger has no kernels for this model type ({model_type})"
    return None


def apply(model: torch.nn.Module) -> None:
    """Liger's kernels into `model` (and its modeling module), in place."""
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance
    _apply_liger_kernel_to_instance(model=_hf_model(model))


def _one_layer_config(config):
    """The model's configuration at one small layer: same model type and code paths, seconds to run."""
    cfg = copy.deepcopy(config)
    heads = getattr(config, "num_attention_heads", 4)
    grouped = getattr(config, "num_key_value_heads", heads) not in (None, heads)   # GQA stays GQA
    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, head_dim=16,
                 num_key_value_heads=2 if grouped else 4, vocab_size=min(config.vocab_size, 1024))
    for name, value in small.items():
        if hasattr(cfg, name):
            setattr(cfg, name, value)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = list(cfg.layer_types)[:1]
    return cfg


def _step(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def probe(model: torch.nn.Module, device: torch.device) -> str | None:
    """One training step of a one-layer model of `model`'s architecture, unfused then fused (fp32);
    why the fused one failed or differs, in one line (None: the kernels work and agree)."""
    from transformers import AutoModelForCausalLM
    hf = _hf_model(model)
    modeling = sys.modules.get(type(hf).__module__)
    saved = dict(vars(modeling)) if modeling is not None else {}
    try:
        cfg = _one_layer_config(hf.config)
        torch.manual_seed(0)
        plain = AutoModelForCausalLM.from_config(cfg).to(device=device, dtype=torch.float32)
        fused = copy.deepcopy(plain)
        ids = torch.randint(0, cfg.vocab_size, (2, 32), device=device)
        want, want_grads = _step(plain, ids)
        apply(fused)
        got, got_grads = _step(fused, ids)
        if abs(got - want) > LOSS_RTOL * abs(want):
            raise ValueError(f"the fused loss {got:.6g} differs from the plain {want:.6g}")
        if set(got_grads) != set(want_grads):
            raise ValueError("the fused model trains other parameters than the plain one")
        scale = max(g.abs().max().item() for g in want_grads.values())
        worst = max((got_grads[n] - g).abs().max().item() for n, g in want_grads.items())
        if not worst <= GRAD_RTOL * scale:
            raise ValueError(f"fused gradients differ by {worst:.3g} (largest gradient {scale:.3g})")
    except Exception as exc:
        for name, value in saved.items():   # Liger replaced names in the modeling module: put them back
            if getattr(modeling, name, None) is not value:
                setattr(modeling, name, value)
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]
    return None
