"""Estimates made before the first step: memory, disk, time.

Pure arithmetic, no torch: the GUI and the CLI call these before any model is loaded.
The memory estimate is deliberately a sum of peaks (weights + gradients + optimizer
state + activations all at once), so it errs on the safe side: a run it calls
"fits" should fit, one it calls "tight" may still fit.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable

GB = 1024 ** 3
CUDA_CONTEXT_BYTES = 400 * 1024 ** 2     # CUDA context and kernels (an H200 showed ~620 MB at init, 770 MB later)
OVERHEAD_FRACTION = 0.10                 # allocator fragmentation, temporary buffers
FITS_FRACTION = 0.85                     # above this share of free memory a run is "tight"
ADAMW_BYTES = 8                          # two fp32 moments per trainable parameter
TRAINABLE_BYTES = 4                      # trainable parameters and their grads are fp32 in every method
QLORA_BYTES = 0.5 * 1.03                 # 4-bit NF4 plus its quantisation constants
# Activation bytes kept per token·hidden unit per layer at 16 bit. Korthikanti et al. (2022) count 34
# for a GPT block; Llama-style blocks (SwiGLU, RMSNorm upcast to fp32, RoPE) kept 41-49 in one
# bf16 training step measured on an H200 (torch 2.11, transformers 5.17), so 44 is used.
ACT_BYTES_PER_TOKEN_HIDDEN = 44
LORA_DROPOUT_BYTES = 8                   # LoRA dropout's copies and masks: measured ~8 more per s·b·h
CUDA_ALLOCATOR_SLACK = 256 * 1024 ** 2   # PyTorch's caching allocator reserved 0.3-0.9 GB above its peak there
POSITIVE_NUMBERS = ("rope_theta", "rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "factor")
FLAGS = ("tie_word_embeddings",)
MAX_LAYERS = 1000                        # the deepest open models have ~130
# Model types whose position embeddings are weights (n_positions x hidden); rotary and ALiBi ones have none.
LEARNED_POSITIONS = ("gpt2", "gpt_bigcode", "opt", "biogpt")
SIZE_FIELDS = ("hidden_size", "n_embd", "d_model", "num_hidden_layers", "n_layer", "vocab_size", "num_attention_heads",
               "n_head", "num_key_value_heads", "head_dim", "intermediate_size", "n_inner", "moe_intermediate_size",
               "n_positions", "max_position_embeddings")
FUSED_LOSS_ELEMENTS = 4                  # per token x hidden, with Liger's fused loss (see _activation_bytes)


@dataclass
class MemoryEstimate:
    weights: int
    grads: int
    optimizer: int
    activations: int
    overhead: int
    total: int
    available: int | None
    device: str
    verdict: str                       # "fits" | "tight" | "wont_fit"
    advice: list[str] = field(default_factory=list)
    gradient_checkpointing: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _weight_bytes(params_total: int, params_trainable: int, vocab_size: int, hidden_size: int,
                  precision: str, method: str) -> float:
    frozen = max(params_total - params_trainable, 0)
    half = precision in ("fp16", "bf16")
    if method == "full":
        # Mixed precision keeps fp32 master weights; autocast makes half copies on the fly.
        return params_total * 4
    if method == "qlora":
        # Embeddings (and a tied head) stay in 16 bit; every other frozen matrix is 4-bit.
        embed = min(vocab_size * hidden_size, frozen)
        return (frozen - embed) * QLORA_BYTES + embed * 2 + params_trainable * TRAINABLE_BYTES
    # LoRA: the frozen base is stored in half precision when training in half; adapters in fp32.
    return frozen * (2 if half else 4) + params_trainable * TRAINABLE_BYTES


def _activation_bytes(num_layers: int, hidden_size: int, num_heads: int, vocab_size: int,
                      seq_len: int, micro_batch: int, precision: str, checkpointing: bool,
                      method: str = "full", fused_loss: bool = False) -> float:
    # One layer keeps s·b·h·(44 + 5·a·s/h) bytes at 16 bit (see ACT_BYTES_PER_TOKEN_HIDDEN); the
    # 5·a·s/h term is the attention matrix, which fused (SDPA/flash) attention never stores.
    half = precision in ("fp16", "bf16")
    sbh = seq_len * micro_batch * hidden_size
    scale = 1 if half else 2
    per_layer_16 = ACT_BYTES_PER_TOKEN_HIDDEN + 5 * num_heads * seq_len / hidden_size
    if method in ("lora", "qlora"):
        per_layer_16 += LORA_DROPOUT_BYTES    # LoRA dropout is on by default
    per_layer = sbh * per_layer_16 * scale
    if checkpointing:
        # Only each layer's input is kept; one layer's activations are rebuilt at a time.
        layers = num_layers * 2 * sbh * scale + per_layer
    else:
        layers = num_layers * per_layer
    if fused_loss:
        # Liger's fused linear cross-entropy (fused_kernels.py) never holds the logits: it works through
        # the tokens in chunks sized to keep a chunk's logits near tokens x hidden elements (rounded up to a
        # power of two: up to twice that), and keeps the input's gradient (tokens x hidden) from forward
        # to backward. So ~4 x tokens x hidden elements at the run's precision, whatever the vocabulary.
        return layers + micro_batch * seq_len * hidden_size * FUSED_LOSS_ELEMENTS * (2 if half else 4)
    # Logits (a 16-bit copy when training in half), their fp32 upcast, log-softmax and gradient.
    logits = micro_batch * seq_len * vocab_size * (14 if half else 12)
    return layers + logits


def _check(method: str, precision: str) -> None:
    if method not in ("lora", "full", "qlora"):
        raise ValueError(f"unknown method {method!r}")
    if precision not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"precision must be resolved to fp32/fp16/bf16 first, got {precision!r}")


def _totals(*, params_total: int, params_trainable: int, num_layers: int, hidden_size: int,
            num_heads: int, vocab_size: int, seq_len: int, micro_batch: int, precision: str,
            method: str, gradient_checkpointing: bool, device: str, fused_loss: bool = False) -> dict[str, int]:
    weights = _weight_bytes(params_total, params_trainable, vocab_size, hidden_size, precision, method)
    grads = params_trainable * TRAINABLE_BYTES
    optimizer = params_trainable * ADAMW_BYTES
    activations = _activation_bytes(num_layers, hidden_size, num_heads, vocab_size, seq_len,
                                    micro_batch, precision, gradient_checkpointing, method, fused_loss)
    base = weights + grads + optimizer + activations
    overhead = base * OVERHEAD_FRACTION
    if device.startswith("cuda"):
        overhead += CUDA_CONTEXT_BYTES + CUDA_ALLOCATOR_SLACK
    parts = dict(weights=weights, grads=grads, optimizer=optimizer, activations=activations,
                 overhead=overhead)
    parts = {k: int(math.ceil(v)) for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


def _verdict(total: int, available: int | None) -> str:
    if available is None or total <= FITS_FRACTION * available:
        return "fits"
    return "tight" if total <= available else "wont_fit"


def lora_params(*, num_layers: int, hidden_size: int, r: int = 16, intermediate_size: int | None = None,
                kv_size: int | None = None, q_size: int | None = None, experts: int = 1,
                targets: str | list[str] = "all-linear", vocab_size: int | None = None) -> int:
    """Trainable parameters of rank-r LoRA adapters on a Llama-style model: r·(in + out) for each adapted
    linear layer. `targets` as JobSpec.lora_targets: all-linear is q, k, v, o and the MLP's gate, up and
    down of every block, the head excluded (as peft's all-linear); a list names the layers (`lm_head`:
    the head, once; a name this formula does not know counts as all-linear). The only LoRA formula:
    Check, the engine's pre-flight and the memory advice all use it."""
    h = hidden_size
    q = q_size or h
    kv = kv_size or h
    ffn = intermediate_size or 4 * h
    sizes = {"q_proj": h + q, "k_proj": h + kv, "v_proj": h + kv, "o_proj": q + h,
             "gate_proj": (h + ffn) * experts, "up_proj": (h + ffn) * experts, "down_proj": (ffn + h) * experts}
    names = [targets] if isinstance(targets, str) else list(targets)
    if any(n not in sizes and n != "lm_head" for n in names):
        names = list(sizes)
    head = (h + vocab_size) if "lm_head" in names and vocab_size else 0
    return r * (num_layers * sum(sizes[n] for n in set(names) if n in sizes) + head)


def _config_int(config: Any, *names: str) -> int | None:
    """The first of `names` that `config` (a transformers config or a dict) holds as a positive int."""
    for name in names:
        value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def lora_params_from_config(config: Any, r: int, targets: str | list[str] = "all-linear") -> int:
    """`lora_params` for a model config (a transformers config or a dict)."""
    num = functools.partial(_config_int, config)
    hidden = num("hidden_size", "n_embd", "d_model") or 0
    heads = num("num_attention_heads", "n_head") or 1
    head_dim = num("head_dim") or max(1, hidden // heads)
    return lora_params(num_layers=num("num_hidden_layers", "n_layer") or 0, hidden_size=hidden, r=r,
                       intermediate_size=num("intermediate_size", "n_inner", "ffn_dim"),
                       kv_size=(num("num_key_value_heads") or heads) * head_dim, q_size=heads * head_dim,
                       experts=num("num_local_experts", "num_experts") or 1, targets=targets,
                       vocab_size=num("vocab_size"))


def _advice(kw: dict[str, Any], total: int, available: int, lora_trainable: int | None = None,
            can_adapt: bool = True) -> list[str]:
    """What to change, each with the memory it would need; the most effective first. `lora_trainable`:
    the model's LoRA parameters (default: `lora_params` of a block of its width, r=16).

    When no single change is enough, the first line is the least invasive combination that fits.
    """
    fits = FITS_FRACTION * available
    lora_trainable = min(lora_trainable or lora_params(num_layers=kw["num_layers"], hidden_size=kw["hidden_size"]),
                         kw["params_total"])

    def total_with(changes: dict[str, Any]) -> int:
        return _totals(**{**kw, **changes})["total"]

    def largest_fitting(name: str, base: dict[str, Any], values) -> int:
        # The first (largest) value that fits with `base`, else the smallest offered. The estimate falls with
        # each value, so a binary search: the micro-batches below a large one are many.
        lo, hi = 0, len(values) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if total_with({**base, name: values[mid]}) <= fits:
                hi = mid
            else:
                lo = mid + 1
        return values[lo]

    micro_values = range(kw["micro_batch"] - 1, 0, -1)
    seq_values = [kw["seq_len"] // 2 ** k for k in range(1, 12) if kw["seq_len"] // 2 ** k >= 128]
    # name -> (how invasive, how to apply it on top of other changes, its words)
    options: dict[str, tuple[int, Any, Any]] = {}
    if not kw["gradient_checkpointing"]:
        options["ckpt"] = (0, lambda b: {"gradient_checkpointing": True},
                           lambda c: "turn on gradient checkpointing (steps get about 30 % slower)")
    if micro_values:
        options["micro"] = (1, lambda b: {"micro_batch": largest_fitting("micro_batch", b, micro_values)},
                            lambda c: f"lower the micro-batch size to {c['micro_batch']} (the effective "
                                      f"batch stays the same through gradient accumulation)")
    if kw["method"] == "full" and can_adapt:   # (a from-scratch model has nothing to adapt)
        options["lora"] = (2, lambda b: {"method": "lora", "params_trainable": lora_trainable},
                           lambda c: "train LoRA adapters instead of the full model")
    if kw["device"].startswith("cuda") and kw["method"] != "qlora" and can_adapt:
        options["qlora"] = (3, lambda b: {"method": "qlora", "params_trainable": lora_trainable},
                            lambda c: "use QLoRA (the base model loaded in 4 bit)")
    if seq_values:
        options["seq"] = (4, lambda b: {"seq_len": largest_fitting("seq_len", b, seq_values)},
                          lambda c: f"use a shorter sequence length, e.g. {c['seq_len']} tokens")

    def apply(names: tuple[str, ...]) -> dict[str, Any]:
        changes: dict[str, Any] = {}
        for name in sorted(names, key=lambda n: options[n][0]):
            changes.update(options[name][1](changes))
        return changes

    singles = []
    for name in options:
        changes = apply((name,))
        singles.append((total_with(changes), options[name][0], options[name][2](changes)))
    singles.sort()
    advice = [f"{text[0].upper()}{text[1:]}: needs about {format_bytes(t)}." for t, _, text in singles]
    if singles and singles[0][0] <= fits:
        return advice
    # No single change is enough: find the least invasive combination that fits.
    combos = [c for r in range(2, len(options) + 1) for c in itertools.combinations(options, r)
              if not {"lora", "qlora"} <= set(c)]
    combos.sort(key=lambda c: (len(c), sum(options[n][0] for n in c)))
    for combo in combos:
        changes = apply(combo)
        t = total_with(changes)
        if t <= fits:
            words = [options[n][2](changes) for n in sorted(combo, key=lambda n: options[n][0])]
            joined = ", ".join(words[:-1]) + " and " + words[-1]
            return [f"No single change is enough; together: {joined}. That needs about "
                    f"{format_bytes(t)}."] + advice
    return advice + ["Even with all of these changes it would not fit: choose a smaller model."]


def estimate_memory(*, params_total: int, params_trainable: int, num_layers: int, hidden_size: int,
                    num_heads: int, vocab_size: int, seq_len: int, micro_batch: int, precision: str,
                    method: str, gradient_checkpointing: bool, available: int | None,
                    device: str, lora_trainable: int | None = None, fused_loss: bool = False,
                    can_adapt: bool = True) -> MemoryEstimate:
    """Peak training memory on `device` (bytes), compared with `available` free bytes there. `fused_loss`:
    the loss is Liger's fused linear cross-entropy (no logits held; JobSpec.fused_kernels)."""
    _check(method, precision)
    kw = dict(params_total=params_total, params_trainable=params_trainable, num_layers=num_layers,
              hidden_size=hidden_size, num_heads=num_heads, vocab_size=vocab_size, seq_len=seq_len,
              micro_batch=micro_batch, precision=precision, method=method,
              gradient_checkpointing=gradient_checkpointing, device=device, fused_loss=fused_loss)
    parts = _totals(**kw)
    verdict = _verdict(parts["total"], available)
    if available is None:
        advice = ["Free memory on this device is unknown, so the estimate could not be checked."]
    elif verdict == "fits":
        advice = []
    else:
        advice = _advice(kw, parts["total"], available, lora_trainable, can_adapt)
    return MemoryEstimate(**parts, available=available, device=device, verdict=verdict,
                          advice=advice, gradient_checkpointing=gradient_checkpointing)


def plan_gradient_checkpointing(requested: bool | None, **kwargs: Any) -> tuple[bool, MemoryEstimate]:
    """Honour an explicit choice; otherwise turn checkpointing on only if the run won't fit without it."""
    if requested is not None:
        return bool(requested), estimate_memory(gradient_checkpointing=bool(requested), **kwargs)
    off = estimate_memory(gradient_checkpointing=False, **kwargs)
    if off.verdict == "fits":
        return False, off
    return True, estimate_memory(gradient_checkpointing=True, **kwargs)


def figures(spec: Any, config: Any, *, params_total: int, method: str, precision: str, device: str,
            available: int | None, micro_batch: int | None = None, fused_loss: bool = False) -> dict[str, Any]:
    """The pre-flight figures of job `spec` (a JobSpec) on a model `config`: trainable parameters, memory
    (turning gradient checkpointing on when needed) and disk. Check (training_core/plan.py) and the
    engine's pre-flight both call this, so the figures Check shows are the ones the run reports.
    `fused_loss`: fused_kernels.fused_loss_expected's answer for this run."""
    get = (lambda k: config.get(k)) if isinstance(config, dict) else (lambda k: getattr(config, k))
    lora = min(lora_params_from_config(config, spec.lora_r, spec.lora_targets), params_total)
    trainable = params_total if method == "full" else lora
    gc_on, mem = plan_gradient_checkpointing(
        spec.gradient_checkpointing, params_total=params_total, params_trainable=trainable,
        num_layers=get("num_hidden_layers"), hidden_size=get("hidden_size"), num_heads=get("num_attention_heads"),
        vocab_size=get("vocab_size"), seq_len=spec.seq_len, micro_batch=micro_batch or spec.micro_batch_size
        or spec.batch_size, precision=precision, method=method, available=available, device=device,
        lora_trainable=lora, fused_loss=fused_loss, can_adapt=not spec.is_scratch)
    disk = estimate_disk(params_total=params_total, params_trainable=trainable, method=method,
                         keep=spec.keep_checkpoints)
    # The run's parameters: with LoRA, the base and its adapters (as the run's `started` event counts them).
    total = params_total + (trainable if method != "full" else 0)
    return {"params_total": total, "params_trainable": trainable, "memory": mem, "verdict": mem.verdict,
            "advice": mem.advice, "gradient_checkpointing": gc_on, "disk_needed": disk}


def min_params_from_config(config: Any) -> int | None:
    """A lower bound on the parameters of the decoder-only model `config` describes, from its numbers
    alone (no model is built, so an absurd config costs nothing). None when the numbers are missing.

    Per layer at least the query and output projections (2·h·heads·head_dim), keys and values (2·h·kv) and
    a two-matrix MLP (2·h·ffn, times the experts of a mixture-of-experts, at their own width); plus one
    embedding matrix, and the position embeddings of the model types that learn them."""
    num = functools.partial(_config_int, config)
    hidden, layers, vocab = num("hidden_size", "n_embd", "d_model"), num("num_hidden_layers", "n_layer"), \
        num("vocab_size")
    if hidden is None or layers is None or vocab is None:
        return None
    heads = num("num_attention_heads", "n_head") or 1
    head_dim = num("head_dim") or max(1, hidden // heads)
    kv = (num("num_key_value_heads") or heads) * head_dim
    experts = num("num_local_experts", "num_experts", "n_routed_experts") or 1
    ffn = (num("moe_intermediate_size") if experts > 1 else None) or num("intermediate_size", "n_inner", "ffn_dim") \
        or 4 * hidden
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    positions = num("n_positions", "max_position_embeddings") if get("model_type") in LEARNED_POSITIONS else None
    return (layers * (2 * hidden * heads * head_dim + 2 * hidden * kv + 2 * hidden * ffn * experts)
            + vocab * hidden + (positions or 0) * hidden)


def size_problem(config: Any) -> str | None:
    """A size in `config` that is not a positive whole number (a model cannot be built from it), or None."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    for name in SIZE_FIELDS:
        value = get(name)   # (lists, as some models give per-layer sizes, are left to transformers)
        if isinstance(value, (bool, str, float)) or (isinstance(value, int) and value <= 0):
            return f"has {name} {str(value)[:40]}; sizes must be positive whole numbers"
    return None


def number_problem(config: Any) -> str | None:
    """A config number that is no number (a text, NaN, infinity) where transformers computes with it as one
    (it failed mid-build, or sampled from NaN), or a flag that is no flag; None when all are fine."""
    data = config if isinstance(config, dict) else config.to_dict()
    rope = [v for v in (data.get("rope_parameters"), data.get("rope_scaling")) if isinstance(v, dict)]
    for name, value in [*data.items(), *((k, v) for r in rope for k, v in r.items())]:
        if isinstance(value, float) and not math.isfinite(value):
            return f"has {name} {value}; numbers must be finite"
        if name in POSITIVE_NUMBERS and value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            return f"has {name} {str(value)[:40]}; it must be a number above 0"
        if name in FLAGS and value is not None and not isinstance(value, bool):
            return f"has {name} {str(value)[:40]}; it must be true or false"
    return None


def _too_deep(config: Any) -> str | None:
    layers = _config_int(config, "num_hidden_layers", "n_layer")
    if layers and layers > MAX_LAYERS:
        # Building each layer is Python work: a million thin layers fit in memory yet take hours to build.
        return f"has {layers:,} layers; Modron builds models of at most {MAX_LAYERS:,}"
    return None


def weights_problem(config: Any, bytes_per_param: float) -> str | None:
    """Why the weights `config` describes cannot even be loaded into this computer's memory (RAM and swap)
    at `bytes_per_param`, or None. For folders whose config was not checked by a run's pre-flight: a
    checkpoint to resume, generate from or export, which may have come from anyone."""
    limit, where_memory = memory_limit()
    said, params, need_text = _over(config, lambda n: int(n * bytes_per_param), limit)
    if said is not None:
        return said or None
    return (f"describes a model of at least {_count(params)} parameters, whose weights alone need at least "
            f"{need_text}, more than all of {where_memory} ({format_bytes(limit)})")


def _over(config: Any, bytes_of: Callable[[int], int], limit: int) -> tuple[str | None, int, str]:
    """(what to say, or None when the config's weights need more than `limit`; its parameters; that need in
    words). What to say: a size that is no size, or too many layers; "" when it may fit."""
    problem = size_problem(config) or number_problem(config)
    if problem:
        return problem, 0, ""
    params = min_params_from_config(config)
    need = bytes_of(params) if params is not None else 0
    if params is None or need <= limit:
        return _too_deep(config) or "", 0, ""
    return None, params, format_bytes(need) if need < 1000 * 1024 ** 5 else f"{_count(need)} bytes"


def _count(n: int) -> str:
    """A parameter or byte count in words, however big (a float conversion overflows past ~1e308)."""
    return f"{n:,.3g}" if n < 10 ** 15 else f"about 10^{len(str(n)) - 1}"


def min_training_bytes(params: int, method: str, precision: str) -> int:
    """Bytes no run of `method` on a model of `params` parameters can go below, whatever the batch:
    full: fp32 weights, gradients and AdamW's two moments; LoRA: the frozen base; QLoRA: the 4-bit base."""
    if method == "full":
        return params * (4 + TRAINABLE_BYTES + ADAMW_BYTES)
    if method == "qlora":
        return int(params * QLORA_BYTES)
    return params * (2 if precision in ("fp16", "bf16") else 4)


def memory_limit(*, gpu_name: str | None = None, gpu_total: int | None = None,
                 method: str = "full") -> tuple[int, str]:
    """All the memory a run could ever use here, and its name: the GPU's when training there (the base is
    loaded to the GPU, and weights that do not fit in it cannot train on it), else RAM plus swap."""
    import psutil
    limit = psutil.virtual_memory().total + psutil.swap_memory().total
    if gpu_total and (method == "qlora" or gpu_total < limit):
        return gpu_total, f"the GPU's memory ({gpu_name or 'GPU'})"
    return limit, "this computer's memory (RAM and swap)"


def cannot_fit(config: Any, *, method: str, precision: str, limit: int, where_memory: str,
               gpu: bool = False) -> str | None:
    """Why a model cannot train here at all (its weights alone exceed `limit`, all the memory there is),
    in plain words with what to change; None when it might fit (the full estimate decides then)."""
    said, params, need_text = _over(config, lambda n: min_training_bytes(n, method, precision), limit)
    if said is not None:
        return said or None
    get = (lambda k: config.get(k)) if isinstance(config, dict) else (lambda k: getattr(config, k, None))
    shape = ", ".join(f"{k} {get(k):,}" for k in ("hidden_size", "intermediate_size", "num_hidden_layers")
                      if isinstance(get(k), int))
    text = (f"a model of at least {_count(params)} parameters ({shape}) needs at least {need_text} "
            f"for {method} training, more than all of {where_memory} ({format_bytes(limit)})")
    lighter = [m for m in {"full": ["lora", "qlora"], "lora": ["qlora"]}.get(method, [])
               if (m != "qlora" or gpu) and min_training_bytes(params, m, "bf16") <= limit]
    if lighter:
        return text + f"; use --method {lighter[0]} or a smaller model"
    return text + "; choose a smaller model"


def estimate_disk(*, params_total: int, params_trainable: int, method: str, keep: int,
                  weight_bytes: int = 4) -> int:
    """Peak bytes a run writes: the kept checkpoints plus one merged export.

    A new checkpoint is written before the oldest is deleted, so keep + 1 exist for a moment.
    """
    if method == "full":
        weights = params_total * weight_bytes
    else:
        weights = params_trainable * TRAINABLE_BYTES     # adapters only
    per_checkpoint = weights + params_trainable * ADAMW_BYTES
    export = params_total * weight_bytes
    return int((keep + 1) * per_checkpoint + export)


def eta_seconds(steps_done: int, total_steps: int, seconds_per_step: float) -> float:
    """Seconds left; inf when the speed is not known yet."""
    remaining = max(total_steps - steps_done, 0)
    if remaining == 0:
        return 0.0
    if not (seconds_per_step > 0 and math.isfinite(seconds_per_step)):
        return math.inf
    return remaining * seconds_per_step


def verdict_words(verdict: str) -> str:
    """A memory or disk verdict as the README words it: `wont_fit` -> "won't fit"."""
    return {"wont_fit": "won't fit"}.get(verdict, verdict.replace("_", " "))


def format_bytes(n: int | float) -> str:
    """'1.4 GB'. Powers of 1024, named as people read them on a GPU's box (a 24 GB card is 24.0 GB)."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    if n < 1024:
        return f"{sign}{int(n)} B"
    for unit in ("KB", "MB", "GB", "TB", "PB"):
        n /= 1024
        if n < 1024 or unit == "PB":
            break
    return f"{sign}{n:.1f} {unit}" if n < 100 else f"{sign}{n:.0f} {unit}"


def format_duration(seconds: float) -> str:
    """'45 s', '3 min 20 s', '2 h 5 min', '3 d 4 h'; 'unknown' when not finite."""
    if seconds is None or not math.isfinite(seconds):
        return "unknown"
    s = max(int(round(seconds)), 0)
    if s < 60:
        return f"{s} s"
    units = [(86400, "d"), (3600, "h"), (60, "min"), (1, "s")]
    for i, (size, name) in enumerate(units):
        if s >= size:
            small_size, small_name = units[i + 1]
            big, rest = divmod(s, size)
            small = rest // small_size
            return f"{big} {name} {small} {small_name}" if small else f"{big} {name}"
    return f"{s} s"  # not reached
