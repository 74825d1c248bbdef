"""A run's model as one GGUF file for llama.cpp, Ollama, LM Studio and KoboldCpp (`export RUN --gguf OUT`).

f32, f16, bf16 and q8_0 are written here with the `gguf` package; the k-quants (q4_k_m, q5_k_m, q6_k) are
made by llama.cpp's own quantizer (llama-cpp-python) from an f16 file written first. A LoRA run's adapter
can also be written as a GGUF LoRA (`--gguf-lora`) for `--lora` in llama.cpp/KoboldCpp; its `--gguf` is
the merged model. Beside the .gguf goes an Ollama Modelfile (ollama_modelfile.py).

Every file is written under a temporary sibling name and renamed into place; an existing file is only
replaced with `force`. The architecture, quant and outputs are checked before any weight is loaded.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import CheckpointError, ConfigError, DiskError, ModelError, UserError

QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_k_m", "q5_k_m", "q6_k")
PYTHON_QUANTS = ("f32", "f16", "bf16", "q8_0")
K_QUANTS = {"q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}   # llama.cpp's llama_ftype numbers


def _k_quant_hint() -> str:
    """How to get llama.cpp's quantizer, runnable as it stands: into this interpreter (an installed app's own
    Python, which a bare `pip` would miss), with the requirement of pyproject's `llama` extra."""
    import shlex
    import subprocess
    exe = subprocess.list2cmdline([sys.executable]) if os.name == "nt" else shlex.quote(sys.executable)
    return (f"k-quants need llama.cpp's quantizer: {exe} -m pip install 'llama-cpp-python>=0.3' "
            "(builds llama.cpp from source: needs a C compiler and cmake, several minutes)")


K_QUANT_HINT = _k_quant_hint()
# llama.cpp's k-quants work in blocks of 256 along a row; a matrix whose rows are not a multiple of that
# wide gets another type (llama-quant.cpp): q4_K -> q5_0, q5_K -> q5_1, q6_K -> q8_0, f16 when even the
# 32-blocks do not divide. Small models (Modron's scratch presets, 64-192 wide) fall back throughout.
K_BLOCK = 256
K_FALLBACK = {"q4_K": "q5_0", "q5_K": "q5_1", "q6_K": "q8_0"}
TYPE_BITS = {"q4_K": 4.5, "q5_K": 5.5, "q6_K": 6.5625, "q5_0": 5.5, "q5_1": 6.0, "q8_0": 8.5, "f16": 16.0}
# HF model_type -> (GGUF architecture, whether q/k rows go into llama.cpp's rotary layout). llama.cpp runs
# HF Llama/Mistral weights with interleaved rotary pairs; Qwen2 uses the halves layout HF has.
ARCHS = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}
SUPPORTED = "Llama (Modron's scratch presets, SmolLM, TinyLlama), Mistral and Qwen2"
MODELFILE_SUFFIX = ".Modelfile"
_LOG_CALLBACKS: list = []   # llama.cpp log callbacks handed to C, kept alive for the process

Progress = Callable[[int, int, str], None]


def _quiet(done: int, total: int, message: str) -> None:
    pass


@dataclass
class Planned:
    name: str           # GGUF tensor name
    source: str         # HF state-dict key
    shape: tuple        # numpy order (rows, columns)
    ggml: int           # GGMLQuantizationType
    nbytes: int
    heads: int | None   # rotary rows to reorder for this many heads, or None


# ---- what the checkpoint is --------------------------------------------------------------------
def k_quants_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except Exception:   # not installed, or its shared library does not load here
        return False
    return True


def _source(source: Path, warnings: list[str] | None = None):
    """(checkpoint folder, its job spec, kind); a damaged newest checkpoint passed over goes in `warnings`."""
    from .checkpoint import read_manifest
    from .export import _job, _resolve
    ckpt = _resolve(Path(source), warnings)
    kind = read_manifest(ckpt).get("kind", "full")
    return ckpt, _job(ckpt), kind


def _model_config(ckpt: Path, spec, kind: str):
    """The config of the model the GGUF holds (a LoRA run's base), read without loading weights."""
    from transformers import AutoConfig

    from .export import _base_dir
    where = ckpt / "model" if kind == "full" else (_base_dir(spec) or spec.model)
    try:
        config = AutoConfig.from_pretrained(str(where), trust_remote_code=False)
    except Exception as exc:   # transformers' own validation errors too: one line, not its several
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()] or [type(exc).__name__]
        first = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]   # "Validation error for field 'x':"
        raise ModelError(where, f"has no config GGUF export can read ({first[:300]})") from None
    _check_numbers(config, Path(where) / "config.json")
    return config, where


def _check_numbers(config, where: Path) -> None:
    """The config's numbers that go into the GGUF's metadata as they are: sizes whole and positive, the
    rotary base, norm epsilon and scaling factor finite and above 0 (a 1e400 theta became inf in the file)."""
    from .preflight import size_problem
    problem = size_problem(config.to_dict())
    if problem:
        raise ModelError(where, problem)
    params = dict(getattr(config, "rope_parameters", None) or {})
    params.update(getattr(config, "rope_scaling", None) or {})
    numbers = {"rope_theta": params.get("rope_theta", getattr(config, "rope_theta", None) or 10000.0),
               "rms_norm_eps": getattr(config, "rms_norm_eps", 1e-6), "rope factor": params.get("factor", 1.0)}
    for name, value in numbers.items():
        try:
            ok = not isinstance(value, bool) and math.isfinite(float(value)) and float(value) > 0
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok:
            raise ModelError(where, f"has {name} {str(value)[:40]}; it must be a finite number above 0")


def _arch(config, where) -> tuple[str, bool]:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        name = (getattr(config, "architectures", None) or [model_type])[0]
        raise ModelError(where, f"is a {name} model ({model_type}), which GGUF export cannot write; "
                                f"it writes {SUPPORTED}")
    return ARCHS[model_type]


def _rope(config) -> tuple[float, str, dict]:
    params = dict(getattr(config, "rope_parameters", None) or {})
    params.update(getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    kind = params.get("rope_type") or params.get("type") or "default"
    return float(theta), kind, params


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _shapes(config) -> dict[str, tuple]:
    """State-dict key -> shape of the model `config` describes, on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _ggml_type(shape: tuple, quant: str):
    from gguf import GGMLQuantizationType as T
    if len(shape) == 1 or quant == "f32":
        return T.F32   # norms and biases stay full precision, as llama.cpp expects
    if quant == "bf16":
        return T.BF16
    if quant == "q8_0" and shape[-1] % 32 == 0:
        return T.Q8_0
    return T.F16        # f16, the k-quants' f16 base, and rows q8_0 blocks do not divide


def _nbytes(shape: tuple, ggml) -> int:
    from gguf import GGML_QUANT_SIZES
    block, size = GGML_QUANT_SIZES[ggml]
    return math.prod(shape[:-1]) * (shape[-1] // block) * size


def plan_tensors(config, shapes: dict[str, tuple], quant: str) -> list[Planned]:
    import gguf
    arch, rotary = _arch(config, "the model")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    heads = {"attn_q": config.num_attention_heads,
             "attn_k": getattr(config, "num_key_value_heads", None) or config.num_attention_heads}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    plan = []
    for key, shape in shapes.items():
        if key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
            continue   # recomputed by llama.cpp / the output matrix is the embedding when tied
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ModelError(key, f"is a tensor GGUF's {arch} layout has no place for")
        leaf = name.split(".")[-2]
        ggml = _ggml_type(shape, quant)
        plan.append(Planned(name, key, shape, ggml, _nbytes(shape, ggml), heads.get(leaf) if rotary else None))
    return plan


def _llama3_rope_factors(params: dict, head_dim: int, theta: float):
    """The per-frequency divisors of Llama 3.1's rope scaling (its published formula), as `rope_freqs`."""
    import numpy as np
    factor = params["factor"]
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old = params.get("original_max_position_embeddings", 8192)
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _rotary_rows(arr, heads: int):
    """HF's halves layout of a q/k projection's rows (per head: all x, then all y) -> interleaved pairs."""
    rows = arr.shape[0]
    return arr.reshape(heads, 2, rows // heads // 2, *arr.shape[1:]).swapaxes(1, 2).reshape(arr.shape)


def _encode(arr, planned: Planned):
    import numpy as np
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize
    if planned.heads:
        arr = _rotary_rows(arr, planned.heads)
    if planned.ggml == T.F32:
        return np.ascontiguousarray(arr, dtype=np.float32)
    if planned.ggml == T.F16:
        return np.ascontiguousarray(arr, dtype=np.float16)
    return quantize(np.ascontiguousarray(arr, dtype=np.float32), planned.ggml)


# ---- output files -------------------------------------------------------------------------------
def _check_free(paths: list[Path], force: bool) -> None:
    for p in paths:
        if p.is_dir():
            raise UserError(p, "is a folder; give a file name ending in .gguf")
        if p.exists() and not force:
            raise UserError(p, "already exists; choose another name or pass --force to replace it")


def _tmp_name(out: Path) -> Path:
    return out.parent / f".{out.name}.tmp-gguf-{os.getpid()}"


def _sweep(out: Path) -> None:
    """Remove temporary files a killed export to the same name left behind."""
    for p in out.parent.glob(f".{out.name}.tmp-gguf-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _temporary(path: Path) -> Path:
    """`path`, registered for removal by a SIGTERM (export.leave_on_sigterm) until it is published."""
    from .export import _IN_PROGRESS
    _IN_PROGRESS.add(path)
    return path


def _done(*paths: Path | None) -> None:
    from .export import _IN_PROGRESS
    for p in paths:
        if p is not None:
            _IN_PROGRESS.discard(p)
            p.unlink(missing_ok=True)


def _publish(tmp: Path, out: Path) -> None:
    from .export import _IN_PROGRESS
    from .fsutil import fsync_dir
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    # A SIGTERM between leaving the registry and the rename would strand the temporary file; one held
    # until after it finds the file published, and the user's file stays.
    mask = getattr(signal, "pthread_sigmask", None)
    if mask is not None:
        mask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        _IN_PROGRESS.discard(tmp)
        os.replace(tmp, out)
    finally:
        if mask is not None:
            mask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    fsync_dir(out.parent)


def _write_text(out: Path, text: str) -> None:
    tmp = _temporary(_tmp_name(out))
    try:
        tmp.write_text(text, encoding="utf-8")
        _publish(tmp, out)
    finally:
        _done(tmp)


def _general(writer, spec, ckpt: Path, licence: dict, kind: str) -> None:
    run_name = ckpt.parent.parent.name or "model"
    writer.add_name(run_name)
    if not spec.is_scratch:
        base = spec.model if not Path(spec.model).expanduser().is_dir() else Path(spec.model).name
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, base)
    if licence.get("licence_id"):
        writer.add_license(str(licence["licence_id"]))
    writer.add_string("modron.checkpoint_kind", kind)   # our own namespace: general.* is the format's


def _hparams(writer, config, arch: str) -> None:
    from gguf import RopeScalingType
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    head_dim = _head_dim(config)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    theta, kind, params = _rope(config)
    writer.add_rope_freq_base(theta)
    if kind == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))


def _check_rope(config, where) -> None:
    _, kind, _ = _rope(config)
    if kind not in ("default", "linear", "llama3"):
        raise ModelError(where, f"uses rope scaling {kind!r}, which GGUF export does not write yet "
                                "(it writes none, linear and llama3)")


def _file_type(quant: str) -> int:
    from gguf import LlamaFileType as F
    types = {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0}
    return types.get(quant, F.MOSTLY_F16)


def _write_model(path: Path, model, config, vocab, plan: list[Planned], quant: str, spec, ckpt, licence, kind,
                 progress: Progress, total: int) -> None:
    import gguf
    import numpy as np
    from gguf import GGMLQuantizationType as T

    from .gguf_vocab import write_vocab
    arch, _ = _arch(config, ckpt)
    writer = gguf.GGUFWriter(str(path), arch)
    try:
        _general(writer, spec, ckpt, licence, kind)
        _hparams(writer, config, arch)
        writer.add_file_type(_file_type(quant))
        if quant in ("q8_0",):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_vocab(writer, vocab)
        extra = []
        theta, rope_kind, params = _rope(config)
        if rope_kind == "llama3":
            factors = _llama3_rope_factors(params, _head_dim(config), theta)
            extra.append(("rope_freqs.weight", factors))
        for name, arr in extra:
            writer.add_tensor_info(name, arr.shape, np.float32, arr.nbytes, raw_dtype=T.F32)
        for p in plan:
            writer.add_tensor_info(p.name, p.shape, np.float32, p.nbytes, raw_dtype=T(p.ggml))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, arr in extra:
            writer.write_tensor_data(arr)
        state = model.state_dict()
        for i, p in enumerate(plan):
            arr = state[p.source].detach().float().cpu().numpy()
            writer.write_tensor_data(_encode(arr, p))
            progress(i + 1, total, f"writing {p.name}")
        writer.flush()
    finally:
        writer.close()


def _k_quantize(src: Path, dst: Path, quant: str, out: Path) -> None:
    import ctypes

    import llama_cpp

    # llama.cpp logs a line per tensor; keep its last words for an error instead of flooding the terminal.
    said: list[str] = []

    def keep(level, text, user_data):
        said.append(text.decode("utf-8", "replace") if text else "")
        del said[:-20]
    # The C side holds the callback's pointer: it must outlive this call (a module global), and the
    # library's own logger comes back afterwards.
    _LOG_CALLBACKS.append(llama_cpp.llama_log_callback(keep))
    llama_cpp.llama_log_set(_LOG_CALLBACKS[-1], ctypes.c_void_p(0))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = K_QUANTS[quant]
    params.nthread = max(1, os.cpu_count() or 1)
    try:
        code = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    finally:
        own = getattr(getattr(llama_cpp, "_logger", None), "llama_log_callback", None)
        if own is not None:
            llama_cpp.llama_log_set(own, ctypes.c_void_p(0))
    if code != 0:
        import shutil
        last = next((t.strip() for t in reversed(said) if t.strip()), f"status {code}")
        try:
            full = shutil.disk_usage(dst.parent).free < _FREE_MARGIN
        except OSError:
            full = False
        if full or "No space left" in " ".join(said):
            raise _disk_error(out, OSError(28, "No space left on device"))
        raise ModelError(out, f"llama.cpp could not quantize it to {quant} ({last})")


def _licence(ckpt: Path, spec) -> tuple[dict, str | None]:
    from .export import LICENCE_FILES, _base_dir, _read_json
    licence = _read_json(ckpt / "licence.json")
    base = _base_dir(spec)
    if base is not None:
        for pattern in LICENCE_FILES[:2]:
            for f in sorted(base.glob(pattern)):
                if f.is_file():
                    try:
                        return licence, f.read_text(encoding="utf-8", errors="replace")
                    except OSError:
                        pass
    return licence, None


# ---- the LoRA adapter -----------------------------------------------------------------------------
def _lora_alpha(cfg: dict, where) -> float:
    if cfg.get("use_dora"):
        raise CheckpointError(where, "is a DoRA adapter, which GGUF LoRA files cannot hold; export the merged model")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise CheckpointError(where, "gives layers their own ranks, which GGUF LoRA files cannot hold; "
                                     "export the merged model")
    alpha, r = float(cfg.get("lora_alpha") or cfg.get("r") or 8), int(cfg.get("r") or 8)
    # llama.cpp scales by alpha / rank; rank-stabilised LoRA scales by alpha / sqrt(rank).
    return alpha * math.sqrt(r) if cfg.get("use_rslora") else alpha


def _write_lora(path: Path, ckpt: Path, config, spec, progress: Progress) -> None:
    import gguf
    import numpy as np
    from gguf import GGMLQuantizationType as T
    from safetensors import safe_open
    adapter = ckpt / "adapter"
    try:
        cfg = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise CheckpointError(adapter, "has no readable adapter_config.json") from None
    alpha = _lora_alpha(cfg, adapter)
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        raise CheckpointError(adapter, "has no adapter_model.safetensors")
    arch, rotary = _arch(config, ckpt)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    heads = {"attn_q": config.num_attention_heads,
             "attn_k": getattr(config, "num_key_value_heads", None) or config.num_attention_heads}
    pairs = []
    with safe_open(str(weights), framework="pt") as fh:
        keys = sorted(fh.keys())
        for key in keys:
            if ".lora_A." not in key:
                if ".lora_B." not in key:
                    raise CheckpointError(weights, f"holds {key}, which a GGUF LoRA cannot carry (only lora_A/"
                                                   "lora_B of linear layers); export the merged model")
                continue
            module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
            name = names.get_name(module + ".weight", try_suffixes=(".weight",))
            b_key = key.replace(".lora_A.", ".lora_B.")
            if name is None or b_key not in keys:
                raise CheckpointError(weights, f"has {module}, which GGUF's {arch} layout has no place for")
            a = fh.get_tensor(key).float().numpy()
            b = fh.get_tensor(b_key).float().numpy()
            leaf = name.split(".")[-2]
            if rotary and leaf in heads:
                b = _rotary_rows(b, heads[leaf])   # the output rows follow the base weight's reordering
            pairs.append((name, np.ascontiguousarray(a), np.ascontiguousarray(b)))
    writer = gguf.GGUFWriter(str(path), arch)
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(ckpt.parent.parent.name or "adapter")
        for name, a, b in pairs:
            writer.add_tensor_info(name + ".lora_a", a.shape, np.float32, a.nbytes, raw_dtype=T.F32)
            writer.add_tensor_info(name + ".lora_b", b.shape, np.float32, b.nbytes, raw_dtype=T.F32)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for i, (name, a, b) in enumerate(pairs):
            writer.write_tensor_data(a)
            writer.write_tensor_data(b)
            progress(i + 1, len(pairs), f"writing {name} (LoRA)")
        writer.flush()
    finally:
        writer.close()


# ---- sizes and the disk -----------------------------------------------------------------------------
def _k_type(p: Planned, quant: str, layers: int, has_output: bool) -> str:
    """The type llama.cpp's quantizer gives a matrix for `quant` (its llama_tensor_get_type, the parts
    that matter here), before any fallback."""
    if quant == "q6_k":
        return "q6_K"
    if p.name == "output.weight" or (p.name == "token_embd.weight" and not has_output):
        return "q6_K"
    leaf = p.name.split(".")[-2]
    if leaf in ("attn_v", "ffn_down"):
        i = int(p.name.split(".")[1])
        if i < layers // 8 or i >= 7 * layers // 8 or (i - layers // 8) % 3 == 2:   # its use_more_bits (C ints)
            return "q6_K"
    return "q4_K" if quant == "q4_k_m" else "q5_K"


def _k_types(plan: list[Planned], quant: str) -> list[tuple[Planned, str, str]]:
    """(matrix, intended k type, the type it gets) for each matrix of a k-quant file."""
    layers = 1 + max((int(p.name.split(".")[1]) for p in plan if p.name.startswith("blk.")), default=0)
    has_output = any(p.name == "output.weight" for p in plan)
    out = []
    for p in plan:
        if len(p.shape) < 2:
            continue
        want = _k_type(p, quant, layers, has_output)
        got = want if p.shape[-1] % K_BLOCK == 0 else K_FALLBACK[want] if p.shape[-1] % 32 == 0 else "f16"
        out.append((p, want, got))
    return out


def k_fallbacks(plan: list[Planned], quant: str) -> str | None:
    """A line saying how many matrices llama.cpp cannot give `quant`'s k-types, and what they get."""
    types = _k_types(plan, quant)
    fell = [(p, got) for p, want, got in types if got != want]
    if not fell:
        return None
    widths = sorted({p.shape[-1] for p, _ in fell})
    got = sorted({g for _, g in fell})
    same = " (the file is the same as q8_0's)" if quant == "q6_k" and set(got) == {"q8_0"} and \
        len(fell) == len(types) else ""
    return (f"{quant}: {len(fell)} of {len(types)} weight matrices have rows {', '.join(map(str, widths))} wide, "
            f"not a multiple of the {K_BLOCK} llama.cpp's k-quants need; they are {'/'.join(got)} instead{same}")


def _expected_size(plan: list[Planned], quant: str, meta: int) -> int:
    """About how many bytes the `quant` file of `plan` (planned as f16 for a k-quant) takes."""
    if quant not in K_QUANTS:
        return sum(p.nbytes for p in plan) + meta
    total = sum(4 * math.prod(p.shape) for p in plan if len(p.shape) < 2)
    total += sum(int(math.prod(p.shape) * TYPE_BITS[got] / 8) for p, _, got in _k_types(plan, quant))
    return total + meta


_FREE_MARGIN = 1 << 20


def _check_space(out: Path, need: int, what: str) -> None:
    """Refuse before writing when the output's disk cannot hold `need` bytes."""
    import shutil

    from .preflight import format_bytes
    try:
        usage = shutil.disk_usage(out.parent)
    except OSError:
        return   # the write itself says what is wrong
    if usage.total == 0:
        return   # /proc and other pseudo file systems report nothing; the write fails in its own words
    if usage.free < need + need // 50 + _FREE_MARGIN:
        raise DiskError(out, f"needs about {format_bytes(need)} free for {what}, but its disk has "
                             f"{format_bytes(usage.free)}; free some space or choose a folder on another disk")


@contextmanager
def _writing(out: Path):
    """An OS error while writing `out` or its temporary files, as one line naming `out` (not the hidden
    temporary name): a full disk, a read-only or forbidden folder, a folder no file can go in (/proc)."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None and Path(exc.filename).parent != out.parent and Path(exc.filename) != out.parent:
            raise   # about another file (the checkpoint being read)
        raise _disk_error(out, exc) from None


def _disk_error(out: Path, exc: OSError) -> DiskError:
    import errno

    from .errors import _OS_ADVICE
    name = errno.errorcode.get(exc.errno or 0, "")
    # numpy's tofile reports a short write ("524288 requested and 458192 written") with no errno: the disk
    # filled up under it.
    if exc.errno is None and "requested and" in str(exc) and "written" in str(exc):
        name = "ENOSPC"
    advice = _OS_ADVICE.get(name)
    if advice is None:
        return DiskError(out, f"cannot be written there ({exc.strerror or exc})")
    return DiskError(out, advice.removesuffix(", then resume"))


# ---- the commands ---------------------------------------------------------------------------------
def estimate(source: Path) -> dict:
    """Expected file size per quant (and of the GGUF LoRA), for the export dialog; loads no weights."""
    from .gguf_vocab import vocab_from_tokenizer
    from .models.tokenizer import load_tokenizer
    ckpt, spec, kind = _source(source)
    config, where = _model_config(ckpt, spec, kind)
    arch, _ = _arch(config, where)
    shapes = _shapes(config)
    meta = vocab_from_tokenizer(load_tokenizer(ckpt / "tokenizer"), config.vocab_size, ckpt / "tokenizer") \
        .metadata_bytes()
    sizes, fallbacks = {}, {}
    for quant in QUANTS:
        plan = plan_tensors(config, shapes, "f16" if quant in K_QUANTS else quant)
        sizes[quant] = _expected_size(plan, quant, meta)
        if quant in K_QUANTS and k_fallbacks(plan, quant):
            fallbacks[quant] = k_fallbacks(plan, quant)
    lora = None
    weights = ckpt / "adapter" / "adapter_model.safetensors"
    if kind == "lora" and weights.is_file():   # written as f32, whatever training stored
        from safetensors import safe_open
        with safe_open(str(weights), framework="pt") as fh:
            lora = sum(4 * math.prod(fh.get_slice(k).get_shape()) for k in fh.keys()) + 4096
    k_ok = k_quants_available()
    return {"architecture": arch, "kind": kind, "checkpoint": str(ckpt), "sizes": sizes,
            "available": [q for q in QUANTS if q in PYTHON_QUANTS or k_ok], "lora": lora, "fallbacks": fallbacks,
            "k_quants_hint": None if k_ok else K_QUANT_HINT}


def export_gguf(source: Path, gguf_out: Path | None, quant: str = "f16", lora_out: Path | None = None,
                force: bool = False, progress: Progress = _quiet) -> dict:
    """Write the GGUF (and/or the GGUF LoRA) of a run or checkpoint; the `result` answer."""
    from .gguf_vocab import vocab_from_tokenizer
    from .models.tokenizer import load_tokenizer
    from .ollama_modelfile import licence_text, modelfile
    if quant not in QUANTS:
        raise ConfigError("--quant", f"must be one of {', '.join(QUANTS)}")
    found: list[str] = []
    ckpt, spec, kind = _source(source, found)
    config, where = _model_config(ckpt, spec, kind)
    _arch(config, where)
    _check_rope(config, where)
    if lora_out is not None and kind != "lora":
        raise CheckpointError(ckpt, "is a full finetune, which has no adapter; export --gguf instead of --gguf-lora")
    if gguf_out is not None and quant in K_QUANTS and not k_quants_available():
        raise ConfigError("--quant", f"{quant}: {K_QUANT_HINT}; or choose one of {', '.join(PYTHON_QUANTS)}")
    gguf_out = Path(gguf_out) if gguf_out is not None else None
    lora_out = Path(lora_out) if lora_out is not None else None
    modelfile_out = gguf_out.with_name(gguf_out.stem + MODELFILE_SUFFIX) if gguf_out else None
    outputs = [p for p in (gguf_out, modelfile_out, lora_out) if p is not None]
    if len({p.resolve() for p in outputs}) != len(outputs):
        raise UserError(outputs[-1], "is named twice; give --gguf and --gguf-lora different files")
    _check_free(outputs, force)
    for p in outputs:
        with _writing(p):
            p.parent.mkdir(parents=True, exist_ok=True)
            _sweep(p)

    from .export import checkpoint_step
    answer = {"gguf": None, "quant": quant if gguf_out else None, "bytes": 0, "modelfile": None, "lora": None,
              "step": checkpoint_step(ckpt), "warnings": found}
    if lora_out is not None:
        tmp = _temporary(_tmp_name(lora_out))
        try:
            with _writing(lora_out):
                _write_lora(tmp, ckpt, config, spec, progress)
                _publish(tmp, lora_out)
        finally:
            _done(tmp)
        answer.update(lora=str(lora_out), bytes=lora_out.stat().st_size)
    if gguf_out is None:
        return answer

    tokenizer = load_tokenizer(ckpt / "tokenizer")
    vocab = vocab_from_tokenizer(tokenizer, config.vocab_size, ckpt / "tokenizer")
    answer["warnings"] += vocab.warnings
    plan = plan_tensors(config, _shapes(config), "f16" if quant in K_QUANTS else quant)
    meta = vocab.metadata_bytes()
    need = _expected_size(plan, quant, meta)
    if quant in K_QUANTS and k_fallbacks(plan, quant):
        answer["warnings"].append(k_fallbacks(plan, quant))
    if quant in K_QUANTS:   # the f16 file llama.cpp quantizes from sits beside it until the end
        need += _expected_size(plan, "f16", meta)
    _check_space(gguf_out, need, f"the {quant} file" + (" and its f16 intermediate" if quant in K_QUANTS else ""))
    total = len(plan) + (1 if quant in K_QUANTS else 0)
    progress(0, total, "merging the adapter into the base model" if kind == "lora" else "loading the model")
    from .export import _merged_model
    model, _ = _merged_model(ckpt, spec, kind)
    licence, licence_file = _licence(ckpt, spec)
    tmp = _temporary(_tmp_name(gguf_out))
    base = _temporary(gguf_out.with_name(f".{gguf_out.name}.tmp-gguf-f16-{os.getpid()}")) \
        if quant in K_QUANTS else None
    try:
        with _writing(gguf_out):
            _write_model(base or tmp, model, config, vocab, plan, quant, spec, ckpt, licence, kind, progress, total)
            del model
            if base is not None:
                progress(len(plan), total, f"quantizing to {quant} with llama.cpp")
                _k_quantize(base, tmp, quant, gguf_out)
                progress(total, total, f"quantized to {quant}")
            _publish(tmp, gguf_out)
    finally:
        _done(tmp, base)
    with _writing(modelfile_out):
        _write_text(modelfile_out, modelfile(gguf_out.name, vocab.chat_template, vocab.token_text("eos"),
                                             licence_text(licence, licence_file)))
    answer.update(gguf=str(gguf_out), bytes=gguf_out.stat().st_size, modelfile=str(modelfile_out))
    return answer


def cmd_gguf(args) -> int:
    """`modron-train export SOURCE --gguf OUT [--quant Q] [--gguf-lora OUT] [--gguf-sizes] [--force] [--json]`."""
    from .errors import user_error_from
    from .protocol import encode, encode_answer, make_event
    if args.merged or args.adapter:
        raise UserError("export", "write GGUF files in a command of their own (not with --merged/--adapter)")
    if args.gguf_sizes:
        sizes = estimate(Path(args.source))
        if args.json:
            print(encode_answer(sizes))
        else:
            from .preflight import format_bytes
            for q, n in sizes["sizes"].items():
                note = "" if q in sizes["available"] else "  (needs llama.cpp's quantizer, see below)"
                print(f"{q:7} {format_bytes(n)}{note}")
            if sizes["lora"] is not None:
                print(f"lora    {format_bytes(sizes['lora'])}")
            if sizes["k_quants_hint"]:
                print(sizes["k_quants_hint"])
            for line in sizes["fallbacks"].values():
                print(f"note: {line}")
        return 0
    if not args.gguf and not args.gguf_lora:
        raise UserError("export", "say what to write: --gguf OUT.gguf and/or --gguf-lora OUT.gguf")

    from .export import leave_on_sigterm
    # Cancel in the app: remove the temporary files and leave at once. Not an exception: during the
    # k-quant step the handler runs inside llama.cpp's ctypes log callback, which swallows one.
    signal.signal(signal.SIGTERM, leave_on_sigterm)
    last = [0.0]

    def progress(done: int, total: int, message: str) -> None:
        now = time.monotonic()
        if done not in (0, total) and now - last[0] < 0.1 and message.startswith("writing"):
            return   # a few tensor events a second are plenty for a progress bar
        last[0] = now
        if args.json:
            sys.stdout.write(encode(make_event("progress", task="export", done=done, total=total,
                                               unit="tensors", message=message)))
            sys.stdout.flush()
        elif sys.stderr.isatty():
            sys.stderr.write(f"\r[{done}/{total}] {message[:60]:60}")
    try:
        answer = export_gguf(Path(args.source), Path(args.gguf) if args.gguf else None, args.quant,
                             Path(args.gguf_lora) if args.gguf_lora else None, args.force, progress)
    except Exception as exc:
        err = user_error_from(exc)
        if args.json and err is not None:
            sys.stdout.write(encode(make_event("failed", code=err.code, message=str(err), step=None)))
            sys.stdout.flush()
        raise
    if args.json:
        sys.stdout.write(encode(make_event("result", task="export", answer=answer)))
    else:
        if sys.stderr.isatty():
            sys.stderr.write("\n")
        for w in answer["warnings"]:
            sys.stderr.write(f"warning: {w}\n")
        if answer["gguf"]:
            print(f"GGUF ({answer['quant']}, {answer['bytes']:,} bytes, step {answer['step']}) written to "
                  f"{answer['gguf']}")
            print(f"Ollama Modelfile written to {answer['modelfile']}")
        if answer["lora"]:
            print(f"GGUF LoRA adapter (step {answer['step']}) written to {answer['lora']}")
    return 0
