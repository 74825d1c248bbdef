"""Training methods: full finetuning, LoRA, and QLoRA (LoRA on a 4-bit base, NVIDIA only)."""
from __future__ import annotations

import contextlib
import importlib.util
import warnings

import torch

from ..config import JobSpec
from ..errors import ModelError



@contextlib.contextmanager
def quiet_peft():
    """Around peft's model building: it asks transformers' deprecated `is_gradient_checkpointing`, a
    FutureWarning on every LoRA run, export and comparison about code that is not the user's to change."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield

QLORA_UNAVAILABLE = "QLoRA needs an NVIDIA GPU and the bitsandbytes package; use --method lora"


def qlora_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None


def require_qlora() -> None:
    if not qlora_available():
        raise ModelError("--method", QLORA_UNAVAILABLE)


def _compute_dtype() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float16


def qlora_load_kwargs(device: str | int | None = None) -> dict:
    """Extra from_pretrained arguments that load the base in 4-bit NF4 on one GPU."""
    require_qlora()
    from transformers import BitsAndBytesConfig

    if device is None or device in ("auto", "cuda"):
        index = torch.cuda.current_device()
    elif isinstance(device, str):
        index = int(device.split(":", 1)[1]) if ":" in device else int(device)
    else:
        index = int(device)
    compute = _compute_dtype()
    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute),
        # 4-bit weights are quantized as they are placed, so the whole model goes straight to the GPU.
        "device_map": {"": index},
        "dtype": compute,
    }


def _lora_config(spec: JobSpec):
    from peft import LoraConfig

    return LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
                      target_modules=spec.lora_targets, task_type="CAUSAL_LM")


def enable_checkpointing(model) -> None:
    """Recompute activations in the backward pass instead of keeping them (less memory, ~30 % slower)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name; the old one warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def apply_method(model, spec: JobSpec, method: str, gradient_checkpointing: bool) -> torch.nn.Module:
    """Make `model` trainable by `method`; returns the model to train (a PeftModel for LoRA/QLoRA)."""
    if method not in ("full", "lora", "qlora"):
        raise ModelError("--method", f"unknown method {method!r}; use one of full, lora, qlora")
    # The key/value cache only helps generation; while training it costs memory.
    model.config.use_cache = False

    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        if gradient_checkpointing:
            enable_checkpointing(model)
        return model

    from peft import get_peft_model

    if method == "qlora":
        require_qlora()
        from peft import prepare_model_for_kbit_training
        # Casts norms to fp32, freezes the 4-bit base, and turns on checkpointing when asked.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gradient_checkpointing:
        enable_checkpointing(model)
    if gradient_checkpointing:
        # With a frozen base, inputs must carry grad or checkpointed blocks would get none.
        model.enable_input_require_grads()
    try:
        with quiet_peft():
            peft_model = get_peft_model(model, _lora_config(spec))
    except ValueError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid LoRA settings"
        raise ModelError("--lora-targets", f"cannot apply LoRA to this model ({first})") from None
    peft_model.config.use_cache = False
    return peft_model


def count_trainable(model) -> tuple[int, int]:
    """(total, trainable) parameters; tied weights count once, 4-bit weights by their real size."""
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
        return int(total), int(trainable)
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
