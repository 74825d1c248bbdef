"""Where a swarm peer's model and tokenizer come from, what joining would download, and whether the
swarm's training fits in this machine's memory: checked before anything is downloaded or allocated.

Imports nothing heavy (no torch, no hivemind, no transformers; huggingface_hub only inside the
download functions): `swarm join` runs these checks before torch is imported, and the desktop app
uses `describe_downloads` for its consent dialog.

The rules:
- A hub model or tokenizer named by an invite is downloaded only with the user's consent: on the
  command line `--accept-download ORG/NAME` (one per hub id), in the app a confirmation dialog.
  What can be said honestly before any network request is said: the hub id, its page, that it will
  be downloaded from the Hugging Face hub, and its licence class when an earlier download left the
  model card in the local cache; otherwise the licence is "unknown until downloaded".
- A peer that joins by invite downloads a hub id from the hub, always: a folder of the same name in
  the current folder is never read instead.
- The memory a swarm's training needs is estimated from the manifest (a preset's shape, or the hub
  model's config.json, fetched alone first) and the manifest's micro_batch and seq_len, with
  gradient checkpointing on (the least the engine can use). When that exceeds all the memory of the
  device it would train on, joining is refused in one line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ModelError, WontFitError
from .. import config as config_defaults
from .. import preflight
from ..model_files import HUB_IGNORE
from .manifest import HUB_URL, SwarmManifest, hub_downloads

# The scratch presets' shapes (hidden, layers, heads, intermediate, vocabulary), kept here because
# training_core.models.presets imports torch; a test checks these equal presets.PRESETS.
PRESET_SHAPES: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (128, 4, 4, 344, 4096),
    "mini": (256, 8, 8, 688, 8192),
    "small": (512, 10, 8, 1376, 16000),
    "base": (768, 12, 12, 2048, 32000),
    "medium": (1024, 24, 16, 2816, 32000),
}
BYTES_VOCAB = 258          # len(models.tokenizer.bytes_tokenizer()): 256 bytes and two specials
TOKENIZER_PATTERNS = ["tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                      "vocab.json", "merges.txt", "spiece.model", "vocab.txt", "added_tokens.json"]
CONSENT_FLAG = "--accept-download"


# --- consent ---------------------------------------------------------------------------------

@dataclass
class HubDownload:
    """One hub repository joining a swarm would download, as the user is shown it."""
    what: str                   # "model" | "tokenizer"
    repo: str                   # ORG/NAME
    licence_class: str          # one of licence.CLASSES; "unknown" until the model card is on this computer
    licence_name: str | None
    licence_text: str           # the licence in words, honest about where it comes from
    cached: bool                # an earlier download left it in the local cache: nothing new to fetch

    @property
    def url(self) -> str:
        return HUB_URL + self.repo


def describe_downloads(manifest: SwarmManifest) -> list[HubDownload]:
    """What joining would download from the hub, with what is known here about each, no network used."""
    from ..licence import read_licence
    out = []
    for what, repo in hub_downloads(manifest):
        readme = _cached_file(repo, "README.md")
        cached = readme is not None or _cached_file(repo, "config.json" if what == "model"
                                                   else "tokenizer.json") is not None
        if readme is not None:
            info = read_licence(readme.parent, repo)
            name = f" ({info.name})" if info.name else ""
            text = (f"{info.klass}{name}, from the model card in your download cache"
                    if info.klass != "unknown" else f"unknown: check it on {HUB_URL}{repo}")
            out.append(HubDownload(what, repo, info.klass, info.name, text, cached))
        else:
            out.append(HubDownload(what, repo, "unknown", None,
                                   f"unknown until downloaded: check it on {HUB_URL}{repo}", cached))
    return out


def consent_problem(manifest: SwarmManifest, accepted: list[str] | tuple[str, ...] | set[str]) -> str | None:
    """Why a peer may not join yet (a hub download nobody agreed to), in one line; None when agreed."""
    missing = [d for d in describe_downloads(manifest) if d.repo not in set(accepted or ())]
    if not missing:
        return None
    d = missing[0]
    if d.cached:
        how = "already in your download cache"
    else:
        how = "which would be downloaded from the Hugging Face hub"
    flags = " ".join(f"{CONSENT_FLAG} {m.repo}" for m in missing)
    return (f"this swarm trains with the {d.what} {d.repo!r}, {how} (licence: {d.licence_text}); "
            f"to agree, join again with {flags}")


def require_consent(manifest: SwarmManifest, accepted, where: str) -> None:
    problem = consent_problem(manifest, accepted)
    if problem:
        raise ConfigError(where, problem)


# --- memory ------------------------------------------------------------------------------------

def scratch_params(preset: str, vocab: int) -> int:
    """Parameters of a scratch preset (Llama, tied embeddings) with a `vocab`-token vocabulary."""
    h, layers, _heads, ffn, _ = PRESET_SHAPES[preset]
    # Per layer: q, k, v, o (4h²), the SwiGLU MLP (3·h·ffn), two RMSNorms; plus embeddings and the final norm.
    return layers * (4 * h * h + 3 * h * ffn + 2 * h) + vocab * h + h


def scratch_vocab(manifest: SwarmManifest) -> int:
    """The vocabulary a scratch model of this swarm gets: the byte tokenizer's, else about the preset's
    (bundled and hub tokenizers are made for their preset's size)."""
    return BYTES_VOCAB if manifest.tokenizer == "bytes" else PRESET_SHAPES[manifest.model.split(":", 1)[1]][4]


def manifest_memory(manifest: SwarmManifest, *, device: str, precision: str,
                    config: dict[str, Any] | None = None) -> preflight.MemoryEstimate | None:
    """Peak training memory of one peer of this swarm (gradient checkpointing on: the least the engine
    can use), from the manifest alone (a scratch preset) or a base model's config.json; None when the
    config lacks the numbers."""
    if manifest.is_scratch:
        preset = manifest.model.split(":", 1)[1]
        h, layers, heads, _, _ = PRESET_SHAPES[preset]
        vocab = scratch_vocab(manifest)
        total = trainable = scratch_params(preset, vocab)
        method = "full"
    else:
        if not config:
            return None
        total = preflight.min_params_from_config(config)
        h, layers, heads, vocab = (_int(config, "hidden_size", "n_embd", "d_model"),
                                   _int(config, "num_hidden_layers", "n_layer"),
                                   _int(config, "num_attention_heads", "n_head") or 1, _int(config, "vocab_size"))
        if total is None or not (h and layers and vocab):
            return None
        method = "lora"            # a swarm peer adapts a base model with LoRA (peer.swarm_spec)
        # swarm_spec leaves lora_r at JobSpec's default; the one LoRA formula (preflight.lora_params)
        trainable = min(preflight.lora_params_from_config(config, config_defaults.default("lora_r")), total)
    return preflight.estimate_memory(
        params_total=total, params_trainable=trainable, num_layers=layers, hidden_size=h, num_heads=heads,
        vocab_size=vocab, seq_len=manifest.seq_len, micro_batch=manifest.micro_batch, precision=precision,
        method=method, gradient_checkpointing=True, available=None, device=device)


def _int(config: dict[str, Any], *names: str) -> int | None:
    for name in names:
        value = config.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def largest_memory(device: str, vram_fraction: float | None = None) -> tuple[int, str, str, str]:
    """Before torch is imported: the most memory training could have here, as (bytes, its name, device,
    precision). For "cpu" the RAM; otherwise the larger of the RAM and the biggest GPU NVML sees (torch
    decides later which one is used; peer.device_memory checks that one)."""
    import psutil
    ram = psutil.virtual_memory().total
    best = (ram, "this computer's RAM", "cpu", "fp32")
    if device == "cpu":
        return best
    from ..hardware import detect
    gpus = detect(include_torch=False).gpus
    gpu = max(gpus, key=lambda g: g.vram_total, default=None)
    if gpu is not None:
        vram = int(gpu.vram_total * (vram_fraction or 1.0))
        if vram > ram:
            share = f" that --vram-fraction {vram_fraction:g} leaves" if vram_fraction and vram_fraction < 1 else ""
            best = (vram, f"the memory of the {gpu.name}{share}", "cuda", "bf16" if gpu.bf16 else "fp32")
    return best


def check_fits(manifest: SwarmManifest, where: str, *, limit: int, where_memory: str, device: str,
               precision: str, config: dict[str, Any] | None = None) -> preflight.MemoryEstimate | None:
    """WontFitError (one line) when this swarm's training needs more than `limit` bytes here."""
    est = manifest_memory(manifest, device=device, precision=precision, config=config)
    if est is None or est.total <= limit:
        return est
    need = preflight.format_bytes(est.total) if est.total < 1000 * 1024 ** 5 else f"{est.total:.2g} bytes"
    raise WontFitError(where, f"this swarm needs about {need} of memory to train ({manifest.model}, micro_batch "
                              f"{manifest.micro_batch} x seq_len {manifest.seq_len}, even with gradient "
                              f"checkpointing), more than all of {where_memory} "
                              f"({preflight.format_bytes(limit)}); this computer cannot join it")


# --- downloads (after consent) ---------------------------------------------------------------

def _cached_file(repo: str, filename: str) -> Path | None:
    """A file of `repo` that an earlier download left in the local hub cache; no network."""
    try:
        from huggingface_hub import try_to_load_from_cache
        found = try_to_load_from_cache(repo, filename)
    except Exception:    # no huggingface_hub, or a cache it cannot read: treat as not cached
        return None
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def fetch_config(repo: str) -> dict[str, Any]:
    """config.json alone (a few KB), so the memory check can run before the weights are downloaded."""
    try:
        from huggingface_hub import hf_hub_download
        path = Path(hf_hub_download(repo, "config.json"))
    except Exception as exc:     # offline, not found, gated, network: many types, all one line
        raise ModelError(repo, f"could not download its config.json from the Hugging Face hub "
                               f"({_first_line(exc)})") from None
    try:
        with open(path, "rb") as fh:
            raw = fh.read(1024 * 1024 + 1)
        if len(raw) > 1024 * 1024:
            raise ValueError("over 1 MB")
        config = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(repo, f"has a config.json that is not a readable JSON file ({_first_line(exc)})") from None
    if not isinstance(config, dict):
        raise ModelError(repo, "has a config.json that is not a JSON object")
    return config


def fetch_model(repo: str) -> Path:
    """The model's snapshot folder (safetensors weights, config, tokenizer, model card), never code."""
    return _snapshot(repo, ignore_patterns=[*HUB_IGNORE, "*.py"])


def fetch_tokenizer(repo: str) -> Path:
    """A tokenizer's files only (no weights, no code)."""
    return _snapshot(repo, allow_patterns=TOKENIZER_PATTERNS)


def _snapshot(repo: str, **patterns) -> Path:
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo, **patterns))
    except Exception as exc:
        raise ModelError(repo, f"could not be downloaded from the Hugging Face hub ({_first_line(exc)})") from None
