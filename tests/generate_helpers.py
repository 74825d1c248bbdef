"""Tiny runs to generate from, written straight in the checkpoint format (no training: milliseconds)."""
from __future__ import annotations

import json
from pathlib import Path

from helpers import make_local_model, make_tokenizer

# A ChatML-like template, so chat mode's use of it can be seen in the prompt.
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _finish(run: Path, ckpt: Path, spec: dict, kind: str, step: int) -> Path:
    for name, data in (("job.json", spec), ("licence.json", {}), ("eval.json", {})):
        (ckpt / name).write_text(json.dumps(data), encoding="utf-8")
    (ckpt / "modron_checkpoint.json").write_text(json.dumps(
        {"format": "modron-checkpoint", "version": 1, "step": step, "kind": kind}), encoding="utf-8")
    (run / "job.json").write_text(json.dumps(spec), encoding="utf-8")
    return run


def full_run(folder: Path, tokenizer=None, step: int = 12, endless: bool = False) -> Path:
    """A from-scratch run whose checkpoint is a random tiny Llama over a one-token-per-byte tokenizer:
    left to itself it picks stray bytes of multi-byte characters all the time. `endless`: it never
    samples its eos (its generation config suppresses it), so a generation runs until stopped or its
    length: with a random seed, eos (~1 in 260 tokens) could otherwise end it before a stop landed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from training_core.models.tokenizer import bytes_tokenizer
    tok = tokenizer or bytes_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    if endless:
        model.generation_config.suppress_tokens = [tok.eos_token_id]
    ckpt = folder / "checkpoints" / f"ckpt-{step:08d}"
    model.save_pretrained(ckpt / "model", safe_serialization=True)
    tok.save_pretrained(ckpt / "tokenizer")
    spec = {"model": "scratch:tiny", "data": [str(folder / "stories.txt")], "out": str(folder), "method": "full"}
    return _finish(folder, ckpt, spec, "full", step)


def lora_run(folder: Path, step: int = 12) -> Path:
    """A LoRA run on a tiny local base model (with a chat template); the adapter's B is non-zero, so
    trained and base differ."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir = folder.parent / f"{folder.name}-base"
    tok = make_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    make_local_model(base_dir)
    tok.save_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           task_type="CAUSAL_LM"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ckpt = folder / "checkpoints" / f"ckpt-{step:08d}"
    peft.save_pretrained(ckpt / "adapter", safe_serialization=True)
    tok.save_pretrained(ckpt / "tokenizer")
    spec = {"model": str(base_dir), "data": [str(folder / "stories.txt")], "out": str(folder), "method": "lora",
            "lora_r": 4, "lora_alpha": 8}
    return _finish(folder, ckpt, spec, "lora", step)


def finetuned_run(folder: Path, step: int = 12) -> Path:
    """A full finetune of a tiny local base model: the checkpoint holds the base's weights, nudged."""
    import torch
    from transformers import AutoModelForCausalLM

    base_dir = make_local_model(folder.parent / f"{folder.name}-base")
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(2)
    with torch.no_grad():
        model.lm_head.weight.add_(torch.randn_like(model.lm_head.weight))
    ckpt = folder / "checkpoints" / f"ckpt-{step:08d}"
    model.save_pretrained(ckpt / "model", safe_serialization=True)
    make_tokenizer().save_pretrained(ckpt / "tokenizer")
    spec = {"model": str(base_dir), "data": [str(folder / "stories.txt")], "out": str(folder), "method": "full"}
    return _finish(folder, ckpt, spec, "full", step)
