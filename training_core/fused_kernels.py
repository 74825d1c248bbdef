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
runs one job, so that is fine; a failed probe puts the module's names (and torch's cross-entropy) back
as they were. Only the model types Modron trains are let through (MODEL_TYPES): Liger's functions for
others change more than that module (granite swaps torch's cross-entropy, multimodal types patch
several modules).

The fused cross-entropy reads the output layer's weight itself: a LoRA adapter on `lm_head` (possible
with the user's own `lora_targets`) would get no gradient, so such a run keeps the plain loss and
fuses the rest.
"""
from __future__ import annotations

import copy
import importlib.util
import math
import sys
from typing import Callable

import torch

from .errors import exception_line

TRITON_MIN_CAPABILITY = (7, 0)   # Triton's oldest GPUs (Volta); a Tesla M40 (5.2) cannot run the kernels
LOSS_RTOL = 1e-3                 # fp32 fused vs unfused loss on the probe (Liger's own tests: ~1e-5)
GRAD_RTOL = 2e-2                 # largest gradient difference, relative to the largest gradient
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")   # what Modron trains (the scratch presets are llama)


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
    model_type = getattr(getattr(_hf_model(model), "config", None), "model_type", None)
    if model_type not in MODEL_TYPES:
        return f"they are used for {', '.join(MODEL_TYPES)} models only, and this one is {model_type}"
    try:   # Liger refuses an older transformers at import; a Triton that does not match torch fails there too
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except Exception as exc:
        return f"liger-kernel does not load here ({exception_line(exc)})"
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return f"this liger-kernel release has no kernels for {model_type} models"
    return None


def fused_loss_expected(spec, method: str, device: torch.device, model) -> bool:
    """Whether the run's loss will be Liger's fused one, as far as is known before its probe (the memory
    estimate counts no logits then): asked for, possible here, and no LoRA adapter on the output layer.
    `model`: the model, or anything with its `config` (Check has no model)."""
    if not spec.fused_kernels or unsupported_reason(device, model) is not None:
        return False
    targets = spec.lora_targets
    return not (method in ("lora", "qlora") and not isinstance(targets, str) and "lm_head" in targets)


def adapted_output_layer(model: torch.nn.Module) -> bool:
    """A LoRA adapter sits on the output layer (peft's wrapper keeps the frozen one as `base_layer`)."""
    get = getattr(_hf_model(model), "get_output_embeddings", None)
    return hasattr(get() if callable(get) else None, "base_layer")


def apply(model: torch.nn.Module) -> None:
    """Liger's kernels into `model` (and its modeling module), in place; the plain loss where the
    output layer carries an adapter (see the module doc)."""
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance
    _apply_liger_kernel_to_instance(model=_hf_model(model), fused_linear_cross_entropy=not adapted_output_layer(model))


def patch_undoer(modeling) -> Callable[[], None]:
    """What Liger may replace, noted now: the names in a transformers modeling module (None: none) and
    torch's cross-entropy. Calling the result puts them back."""
    saved = dict(vars(modeling)) if modeling is not None else {}
    cross_entropy = torch.nn.functional.cross_entropy

    def undo() -> None:
        for name, value in saved.items():
            if getattr(modeling, name, None) is not value:
                setattr(modeling, name, value)
        torch.nn.functional.cross_entropy = cross_entropy
    return undo


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
    cfg.pad_token_id = None   # the model's may lie past the small vocabulary (Qwen2.5: 151643)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = list(cfg.layer_types)[:1]
    return cfg


def _step(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def probe(model: torch.nn.Module, device: torch.device, autocast_dtype: torch.dtype | None = None) -> str | None:
    """One training step of a one-layer model of `model`'s architecture, unfused then fused (fp32), then
    a fused one under the run's autocast (`autocast_dtype`, None: fp32 only); why the fused one failed,
    differs or went non-finite, in one line (None: the kernels work and agree). The global RNG is left
    as it was."""
    from transformers import AutoModelForCausalLM
    hf = _hf_model(model)
    undo = patch_undoer(sys.modules.get(type(hf).__module__))
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
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
            if autocast_dtype is not None:   # the run's precision takes other branches (AMP casts in the loss)
                fused.zero_grad()
                with torch.autocast(device.type, dtype=autocast_dtype):
                    half, half_grads = _step(fused, ids)
                if not (math.isfinite(half) and all(bool(g.isfinite().all()) for g in half_grads.values())):
                    raise ValueError(f"under {autocast_dtype} the fused step is not finite (loss {half})")
    except Exception as exc:
        undo()   # Liger replaced names in the modeling module: put them back
        return exception_line(exc)
    return None
