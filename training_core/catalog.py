"""The model picker's data: a short list of small open base models, Modron's from-scratch presets, what each
training method would need of this computer's memory, and a plain check of a local model folder.

Torch-free (the app imports it): the figures come from each model's config numbers written down here, run
through the same planning code as the engine's pre-flight (preflight.figures), so nothing is downloaded to
show them. Licences are as the models' cards state them (checked when this list was written); the run's
pre-flight reads the downloaded card again.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import preflight
from .hardware import GpuInfo, choose_precision

METHODS = ("full", "lora", "qlora")
# The config model_types the GGUF export writes (gguf_export.ARCHS). That module is not the app's to import,
# so they are written here again; a test keeps the two equal.
GGUF_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})
# A hub model id as typed ("org/name", or a bare legacy name): never a path ("..", slashes beyond one).
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")


def is_hub_id(text: str) -> bool:
    return bool(HUB_ID.match(text)) and ".." not in text


@dataclass(frozen=True)
class CatalogModel:
    hub_id: str                 # "org/name" on the Hugging Face hub, or "scratch:NAME" for a preset
    params: int                 # parameters (tied embeddings counted once)
    download_bytes: int         # the safetensors weights, roughly (0 for a preset)
    licence_id: str | None      # the hub's licence id (None for a preset)
    licence_class: str          # one of licence.CLASSES
    architecture: str
    note: str
    config: dict[str, Any] = field(default_factory=dict)   # the config.json numbers the estimate reads
    model_type: str = "llama"   # config.json's model_type: whether a trained model can be exported to GGUF

    @property
    def is_scratch(self) -> bool:
        return self.hub_id.startswith("scratch:")

    @property
    def gguf_export(self) -> bool:
        """A run from this model can be written as GGUF (llama.cpp, Ollama, LM Studio, KoboldCpp)."""
        return self.model_type in GGUF_MODEL_TYPES

    @property
    def name(self) -> str:
        return self.hub_id.split("/")[-1]


def _llama(hidden: int, ffn: int, layers: int, heads: int, kv_heads: int, vocab: int, tied: bool = True) -> dict:
    return {"hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
            "tie_word_embeddings": tied}


MB, GB = 1000 ** 2, 1000 ** 3
# Small base (not instruction-tuned) models under Apache 2.0: safetensors weights on the hub, no custom code.
CATALOG: tuple[CatalogModel, ...] = (
    CatalogModel("HuggingFaceTB/SmolLM2-135M", 134_515_008, 270 * MB, "apache-2.0", "permissive", "Llama",
                 "Tiny and quick: try a dataset in minutes, even on a small GPU",
                 _llama(576, 1536, 30, 9, 3, 49152)),
    CatalogModel("HuggingFaceTB/SmolLM2-360M", 361_821_120, 724 * MB, "apache-2.0", "permissive", "Llama",
                 "Small but capable English model; fine for LoRA on any GPU",
                 _llama(960, 2560, 32, 15, 5, 49152)),
    CatalogModel("HuggingFaceTB/SmolLM2-1.7B", 1_711_376_384, 3_420 * MB, "apache-2.0", "permissive", "Llama",
                 "The strongest of the SmolLM2 family; LoRA fits in 8-12 GB",
                 _llama(2048, 8192, 24, 32, 32, 49152)),
    CatalogModel("Qwen/Qwen2.5-0.5B", 494_032_768, 988 * MB, "apache-2.0", "permissive", "Qwen2",
                 "Multilingual and good at code for its size; a large vocabulary (152 k tokens)",
                 _llama(896, 4864, 24, 14, 2, 151936), "qwen2"),
    CatalogModel("Qwen/Qwen2.5-1.5B", 1_543_714_304, 3_090 * MB, "apache-2.0", "permissive", "Qwen2",
                 "Multilingual, long context; the largest Qwen2.5 under Apache 2.0 here",
                 _llama(1536, 8960, 28, 12, 2, 151936), "qwen2"),
    CatalogModel("TinyLlama/TinyLlama_v1.1", 1_100_048_384, 4_400 * MB, "apache-2.0", "permissive", "Llama",
                 "Llama 2 architecture trained on 2 T tokens; fp32 weights (a larger download)",
                 _llama(2048, 5632, 22, 32, 4, 32000, tied=False)),
    CatalogModel("EleutherAI/pythia-160m", 162_322_944, 325 * MB, "apache-2.0", "permissive", "GPT-NeoX",
                 "A research classic trained on the Pile, with open data and checkpoints",
                 {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                  "vocab_size": 50304, "tie_word_embeddings": False}, "gpt_neox"),
)

# Modron's from-scratch presets, as training_core/models/presets.py defines them (a test keeps the two
# equal; that module imports torch, so the numbers are written here again for the app).
PRESET_CONFIGS = {
    "tiny": (_llama(128, 344, 4, 4, 4, 4096), "~1 M parameters: tests and demos, trains in minutes on a CPU"),
    "mini": (_llama(256, 688, 8, 8, 8, 8192), "~10 M parameters: toy stories and patterns, fine on a CPU"),
    "small": (_llama(512, 1376, 10, 8, 8, 16000), "~40 M parameters: short coherent text; a small GPU helps"),
    "base": (_llama(768, 2048, 12, 12, 12, 32000), "~125 M parameters (GPT-2 small class): needs a GPU"),
    "medium": (_llama(1024, 2816, 24, 16, 16, 32000), "~350 M parameters (GPT-2 medium class): needs a good GPU"),
}


def llama_params(config: dict[str, Any]) -> int:
    """Parameters of a Llama-style model from its config numbers (exact for Llama, Qwen2 without biases
    and the presets; an estimate for other designs)."""
    get = lambda *names: preflight._config_int(config, *names)   # noqa: E731
    h, layers, vocab = get("hidden_size", "n_embd", "d_model") or 0, get("num_hidden_layers", "n_layer") or 0, \
        get("vocab_size") or 0
    heads = get("num_attention_heads", "n_head") or 1
    head_dim = get("head_dim") or max(1, h // heads)
    q, kv = heads * head_dim, (get("num_key_value_heads") or heads) * head_dim
    ffn = get("intermediate_size", "n_inner", "ffn_dim") or 4 * h
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * ffn + 2 * h
    tied = config.get("tie_word_embeddings", True) is not False
    return layers * per_layer + vocab * h * (1 if tied else 2) + h


PRESETS: tuple[CatalogModel, ...] = tuple(
    CatalogModel(f"scratch:{name}", llama_params(cfg), 0, None, "licence-free", "Llama (new)", note, cfg)
    for name, (cfg, note) in PRESET_CONFIGS.items())


def method_figures(entry_config: dict[str, Any], params: int, *, gpu: GpuInfo | None, ram_available: int,
                   spec: Any = None, scratch: bool = False) -> dict[str, dict[str, Any]]:
    """What each method needs of the memory it would train in (the GPU's free memory, else RAM) and whether
    it fits: {method: {"total", "available", "verdict", "gradient_checkpointing", "why"}}, verdict one of
    preflight's (fits, tight, wont_fit) or "unavailable" (a from-scratch model with LoRA, QLoRA on the CPU).
    `spec`: the job's settings (a JobSpec; default: JobSpec's defaults) for batch, sequence length, rank."""
    from .config import JobSpec
    spec = spec or JobSpec(model="scratch:tiny" if scratch else "picker", data=["-"], out="-")
    device = "cuda:0" if gpu is not None else "cpu"
    precision = choose_precision(gpu, spec.precision)
    available = gpu.vram_free if gpu is not None else ram_available
    out: dict[str, dict[str, Any]] = {}
    for method in METHODS:
        if scratch and method != "full":
            out[method] = {"total": None, "available": available, "verdict": "unavailable",
                           "gradient_checkpointing": False, "why": "a new model has nothing to adapt: full only"}
            continue
        if method == "qlora" and gpu is None:
            out[method] = {"total": None, "available": available, "verdict": "unavailable",
                           "gradient_checkpointing": False, "why": "QLoRA needs an NVIDIA GPU"}
            continue
        fig = preflight.figures(spec, entry_config, params_total=params, method=method, precision=precision,
                                device=device, available=available)
        mem = fig["memory"]
        out[method] = {"total": mem.total, "available": available, "verdict": mem.verdict,
                       "gradient_checkpointing": fig["gradient_checkpointing"], "why": ""}
    return out


# ---- a model folder on this computer -------------------------------------------------------------
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt",
                   "tokenizer.tiktoken", "qwen.tiktoken")
MAX_CONFIG_BYTES = 1 << 20


def check_local_folder(folder: str | Path) -> dict[str, Any]:
    """config.json of a model folder Modron could train from, or a UserError in one plain line (the
    engine's own check, with transformers, runs again at Check)."""
    from .errors import ModelError
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ModelError(folder, "is not a folder" if folder.exists() else "no such folder")
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise ModelError(folder, "has no config.json; choose the folder that holds the model's config.json "
                                 "and weights")
    try:
        raw = cfg.read_bytes()[:MAX_CONFIG_BYTES + 1]
        config = json.loads(raw.decode("utf-8")) if len(raw) <= MAX_CONFIG_BYTES else None
    except (OSError, ValueError) as exc:
        raise ModelError(cfg, f"cannot be read as JSON ({str(exc).splitlines()[0] if str(exc) else exc})") from None
    if not isinstance(config, dict):
        raise ModelError(cfg, "is not a JSON object (or is over 1 MB)")
    weights = list(folder.glob("*.safetensors"))
    if not weights:
        pickled = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
        if pickled:
            raise ModelError(folder, f"has only pickled weights ({pickled[0]}); Modron loads safetensors only")
        raise ModelError(folder, "has no model weights (*.safetensors)")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(folder, "has no tokenizer files (tokenizer.json or tokenizer.model)")
    return config
