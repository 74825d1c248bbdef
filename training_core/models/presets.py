"""Llama-style architectures for training from scratch ("scratch:NAME").

Small models tie the input and output embeddings: at these sizes the embedding matrix is a
large share of all weights, and tying saves memory without hurting quality.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ..errors import ModelError


@dataclass(frozen=True)
class Preset:
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int          # default vocabulary (the tokenizer trained for it aims at this size)
    description: str


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("tiny", 128, 4, 4, 344, 4096, "~1 M parameters: tests and demos, trains in minutes on a CPU"),
    Preset("mini", 256, 8, 8, 688, 8192, "~10 M parameters: toy stories and patterns, fine on a CPU"),
    Preset("small", 512, 10, 8, 1376, 16000, "~40 M parameters: short coherent text; a small GPU helps"),
    Preset("base", 768, 12, 12, 2048, 32000, "~125 M parameters (GPT-2 small class): needs a GPU"),
    Preset("medium", 1024, 24, 16, 2816, 32000, "~350 M parameters (GPT-2 medium class): needs a good GPU"),
)}

# Nominal sizes, used in the descriptions above and checked by the tests.
NOMINAL_PARAMS = {"tiny": 1e6, "mini": 10e6, "small": 40e6, "base": 125e6, "medium": 350e6}


def preset_config(name: str, vocab_size: int | None = None, max_positions: int = 2048) -> LlamaConfig:
    preset = PRESETS.get(name)
    if preset is None:
        raise ModelError("--model", f"unknown preset 'scratch:{name}'; use one of "
                                    + ", ".join(f"scratch:{n}" for n in PRESETS))
    return LlamaConfig(
        vocab_size=vocab_size or preset.vocab_size,
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_heads,
        num_key_value_heads=preset.num_heads,
        max_position_embeddings=max(max_positions, 2048),
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
    )


def count_params(config) -> int:
    """Parameter count of a causal LM built from `config`, without allocating its weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        if isinstance(config, LlamaConfig):
            model = LlamaForCausalLM(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    # parameters() yields tied weights once, which is the count that matters for memory.
    return sum(p.numel() for p in model.parameters())
