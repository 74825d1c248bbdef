"""The model side of the engine: scratch presets, tokenizers, loading a base model, training methods."""
from .loading import LoadedModel, check_model_folder, load_base
from .methods import apply_method, count_trainable, qlora_available, qlora_load_kwargs
from .presets import PRESETS, Preset, count_params, preset_config
from .tokenizer import bytes_tokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "PRESETS", "Preset", "count_params", "preset_config",
    "bytes_tokenizer", "load_tokenizer", "train_tokenizer",
    "LoadedModel", "check_model_folder", "load_base",
    "apply_method", "count_trainable", "qlora_available", "qlora_load_kwargs",
]
