"""Load the base model and tokenizer a job starts from: a preset, a local folder or a hub id.

Weights are only ever read from safetensors files: pickled weights (pytorch_model.bin) can run
arbitrary code when loaded, so such folders are refused with a way to convert them.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..config import JobSpec
from ..errors import ModelError
from ..model_files import HUB_IGNORE, PICKLED
from . import methods
from .presets import PRESETS, preset_config
from .tokenizer import TOKENIZER_FILES, bytes_tokenizer, load_tokenizer, train_tokenizer

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
CONVERT_HINT = ("Modron only loads safetensors weights; convert with "
                "`python -c \"from transformers import AutoModelForCausalLM as M; "
                "M.from_pretrained('FOLDER', use_safetensors=False).save_pretrained('NEW_FOLDER')\"` "
                "in a Python you trust, then use NEW_FOLDER")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str                   # "scratch" | "local" | "hub"
    model_dir: Path | None        # folder with config, weights, README.md and LICENSE (None from scratch)
    is_scratch: bool = False
    preset: str | None = None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def scratch_tokenizer_and_config(spec: JobSpec, texts: Callable[[], Iterable[str]] | None):
    """A from-scratch model's tokenizer (trained on the data, bytes, or loaded) and config. Check's plan
    calls this too, so it counts the parameters of the very model the run builds."""
    name = spec.model.split(":", 1)[1]
    preset_config(name)  # unknown names fail before any tokenizer training
    choice = spec.tokenizer
    if choice in ("auto", "train"):
        if texts is None:
            raise ModelError("--tokenizer", "training a tokenizer needs the dataset's texts")
        tokenizer = train_tokenizer(texts(), PRESETS[name].vocab_size)
    elif choice == "bytes":
        tokenizer = bytes_tokenizer()
    else:
        tokenizer = load_tokenizer(choice)
    config = preset_config(name, vocab_size=len(tokenizer), max_positions=max(2048, spec.seq_len))
    config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, config


def _load_scratch(spec: JobSpec, texts: Callable[[], Iterable[str]] | None, dtype) -> LoadedModel:
    from transformers import LlamaForCausalLM

    name = spec.model.split(":", 1)[1]
    tokenizer, config = scratch_tokenizer_and_config(spec, texts)
    torch.manual_seed(spec.seed)  # same seed, same initial weights
    model = LlamaForCausalLM(config)
    if isinstance(dtype, torch.dtype) and dtype != torch.float32:
        model = model.to(dtype)
    return LoadedModel(model, tokenizer, "scratch", None, is_scratch=True, preset=name)


def check_loadable(folder: Path) -> None:
    """Before from_pretrained of a saved model (a checkpoint's `model/`, an exported folder), which loads its
    weights into RAM at 16 or 32 bit: refuse in one line sizes that are no sizes, or that no memory here
    holds. The folder may have come from anyone; an absurd config.json would otherwise be built (and its
    missing weights initialised) for minutes before failing."""
    from .. import preflight
    cfg_path = folder / "config.json"
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ModelError(cfg_path, f"cannot be read ({_first_line(exc)})") from None
    if not isinstance(config, dict):
        raise ModelError(cfg_path, "is not a JSON object")
    problem = preflight.weights_problem(config, bytes_per_param=2)
    if not problem and not isinstance(config.get("model_type"), (str, type(None))):
        problem = "has a model_type that is not a name"
    if problem:
        raise ModelError(cfg_path, problem)
    check_weight_files(folder)


def _weights_fit(config, where: Path) -> None:
    """load_base's check when its caller has none of its own (generate's and export's LoRA base, the swarm
    host): the job.json naming that base may have come from anyone."""
    from .. import preflight
    problem = preflight.weights_problem(config, bytes_per_param=2)
    if problem:
        raise ModelError(where, problem)


def check_weight_files(folder: Path) -> None:
    """The folder's safetensors weights: an index's shards are bare names beside it, all there, their headers
    whole; pickles alone are refused. One plain line each."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            raise ModelError(index, "is damaged (no readable weight_map)") from None
        if not all(isinstance(shard, str) for shard in shards):
            raise ModelError(index, "is damaged (a weight_map entry is not a file name)")
        for shard in sorted(shards):
            # A downloaded index names its shards; one outside the folder (an absolute path, `..`) would load
            # some other file of this computer as the model's weights. (Links are not followed here: the hub
            # cache's snapshot folders are links into its blob store.)
            if not shard or Path(shard).is_absolute() or "\\" in shard or ".." in Path(shard).parts \
                    or Path(shard).name != shard:
                raise ModelError(index, f"names a weight file outside its folder ({shard[:200]!r}); "
                                        "a model's shards sit beside its index")
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise ModelError(folder, f"is missing weight file {missing[0]} (of {len(shards)} shards)")
    elif not (folder / "model.safetensors").is_file():
        if any(any(folder.glob(p)) for p in PICKLED):
            raise ModelError(folder, "has only pickled weights (pytorch_model.bin); "
                                     + CONVERT_HINT.replace("'FOLDER'", repr(str(folder))))
        raise ModelError(folder, "has no model weights (model.safetensors)")
    else:
        shards = {"model.safetensors"}
    from ..checkpoint import safetensors_problem
    for shard in sorted(shards):   # headers only: cheap, and a damaged file fails here in one line
        trouble = safetensors_problem(folder / shard)
        if trouble:
            raise ModelError(folder / shard, f"is damaged or incomplete ({trouble}); download or copy the model again")



def check_model_folder(folder: Path, trust_remote_code: bool = False) -> dict:
    """Refuse folders we cannot or will not load, with one plain line each. Returns config.json."""
    if not folder.exists():
        raise ModelError(folder, "no such model folder")
    if not folder.is_dir():
        raise ModelError(folder, "is not a folder; give the folder that holds config.json and the weights")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelError(folder, "has no config.json; this is not a Hugging Face model folder")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelError(cfg_path, f"is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ModelError(cfg_path, "is not a JSON object")

    check_weight_files(folder)

    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(folder, "has no tokenizer files (tokenizer.json or tokenizer.model)")

    from transformers import CONFIG_MAPPING
    from ..preflight import size_problem
    problem = size_problem(config)
    if problem:
        raise ModelError(cfg_path, problem)
    model_type = config.get("model_type")
    if not isinstance(model_type, (str, type(None))):
        raise ModelError(cfg_path, f"has a model_type that is not a name ({type(model_type).__name__})")
    if config.get("auto_map") and not trust_remote_code and model_type not in CONFIG_MAPPING:
        raise ModelError(folder, "needs the custom code it ships with (auto_map in config.json); "
                                 "if you trust its author, turn on --trust-remote-code")
    if not config.get("auto_map") and model_type not in CONFIG_MAPPING:
        raise ModelError(cfg_path, f"has model type {model_type!r}, which this version of transformers "
                                   "does not know")
    return config


def _load_pretrained(folder: Path, spec: JobSpec, dtype, source: str,
                     check_config: Callable[[object, Path], None] | None = None) -> LoadedModel:
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_model_folder(folder, spec.trust_remote_code)
    kwargs = {"use_safetensors": True, "trust_remote_code": spec.trust_remote_code, "dtype": dtype}
    if check_config is not None:
        # From the config alone, before any weight is allocated (a huge model is refused in a second).
        try:
            config = AutoConfig.from_pretrained(str(folder), trust_remote_code=spec.trust_remote_code)
        except Exception as exc:   # config classes raise many types; all mean "unusable config"
            raise ModelError(folder / "config.json", f"cannot be read as a model config ({_first_line(exc)})") from None
        check_config(config, folder / "config.json")
        kwargs["config"] = config
    if spec.resolved_method == "qlora":
        kwargs.update(methods.qlora_load_kwargs(spec.device))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=spec.trust_remote_code)
    except Exception as exc:  # tokenizer code raises many types; all mean "unusable"
        raise ModelError(folder, f"has a tokenizer that cannot be loaded ({_first_line(exc)})") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    except torch.cuda.OutOfMemoryError:  # the caller turns this into advice, not a model error
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError, SafetensorError) as exc:
        text = str(exc)
        if "trust_remote_code" in text:
            raise ModelError(folder, "needs the custom code it ships with; if you trust its author, "
                                     "turn on --trust-remote-code") from None
        raise ModelError(folder, f"could not be loaded as a causal language model ({_first_line(exc)})") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # Padding positions are masked out of the loss, so reusing eos is safe.
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model, tokenizer, source, folder)


def _download(repo_id: str, trust_remote_code: bool) -> Path:
    from huggingface_hub import snapshot_download

    ignore = list(HUB_IGNORE)
    if not trust_remote_code:
        ignore.append("*.py")
    try:
        # One snapshot (one revision) gives the weights and the README/LICENSE the licence check reads.
        return Path(snapshot_download(repo_id, ignore_patterns=ignore))
    except Exception as exc:  # network, auth, not found and offline errors come in many types
        raise ModelError(None, f"could not download {repo_id!r}: {_first_line(exc)}") from None


def load_base(spec: JobSpec, texts: Callable[[], Iterable[str]] | None = None,
              dtype=torch.float32, check_config: Callable[[object, Path], None] | None = None,
              phase: Callable[[str, str], None] | None = None) -> LoadedModel:
    """The model and tokenizer `spec.model` names, ready for `methods.apply_method`.

    `check_config(config, config_path)` (default: that the weights fit this computer's memory, and the
    config's numbers are numbers) runs on a pretrained model's config before its weights are
    loaded (the engine refuses a model that cannot fit there). `phase(name, message)` is told what
    happens (downloading, loading_model: the engine's `phase` events)."""
    say = phase or (lambda name, message: None)
    check_config = check_config or _weights_fit
    if spec.is_scratch:
        if spec.resolved_method == "qlora":
            raise ModelError("--method", "QLoRA needs a pretrained model; train from scratch with --method full")
        say("loading_model", f"Building the {spec.model} model"
            + (" and training its tokenizer on your data…" if spec.tokenizer in ("auto", "train") else "…"))
        return _load_scratch(spec, texts, dtype)
    if spec.resolved_method == "qlora":
        methods.require_qlora()
    path = Path(spec.model).expanduser()
    if path.exists() or not HUB_ID.match(spec.model):
        say("loading_model", f"Loading the model {path.name or spec.model}…")
        return _load_pretrained(path, spec, dtype, "local", check_config)
    # No byte counts: huggingface_hub's progress bars are not cheap to read (the Download button has them).
    say("downloading", f"Downloading {spec.model} from the Hugging Face hub (or finding it in its cache)…")
    snapshot = _download(spec.model, spec.trust_remote_code)
    say("loading_model", f"Loading the model {spec.model}…")
    try:
        return _load_pretrained(snapshot, spec, dtype, "hub", check_config)
    except ModelError as exc:
        # Name what the user typed, not the cache folder it was downloaded to.
        raise ModelError(spec.model, exc.problem.replace(str(snapshot), spec.model), exc.code) from None
