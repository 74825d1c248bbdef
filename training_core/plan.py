"""A job's plan before it is queued: memory verdict, disk, rough time, licence, dataset.

Reads configs, never weights, so planning a 7 B model costs seconds and no memory. The real
pre-flight (same estimate, measured free memory) runs again in the worker before step one.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

from . import hardware, preflight
from .config import JobSpec, validate as validate_spec
from .errors import ModelError, WontFitError

# Dense 16-bit tensor-core FLOP/s by compute capability (fp32 for cards without fast fp16),
# a rough stand-in for "how fast is this GPU"; the real ETA comes from the first steps.
PEAK_FLOPS_BY_CC = {(5, 2): 7e12, (6, 0): 19e12, (6, 1): 11e12, (7, 0): 112e12, (7, 5): 65e12,
                    (8, 0): 312e12, (8, 6): 71e12, (8, 9): 165e12, (9, 0): 989e12, (10, 0): 2000e12,
                    (12, 0): 210e12}
CPU_FLOPS_PER_CORE = 80e9   # AVX2 FMA fp32 peak of one core at ~2.5 GHz
ASSUMED_MFU = 0.3
HUB_META_FILES = ["config.json", "README.md", "LICENSE*", "LICENCE*", "tokenizer*", "special_tokens_map.json",
                  "vocab*", "merges.txt"]


def _model_config(spec: JobSpec) -> tuple[Any, Path | None, Any]:
    """(config, folder with README/LICENSE/tokenizer or None, tokenizer or None)."""
    from transformers import AutoConfig

    from .models.tokenizer import load_tokenizer
    if spec.is_scratch:   # the run's own tokenizer (trained on the data, as the run will) and config
        from .data import iter_texts
        from .models.loading import scratch_tokenizer_and_config
        tok, config = scratch_tokenizer_and_config(spec, lambda: iter_texts(spec.data))
        return config, None, None if spec.tokenizer == "bytes" else tok   # bytes: counted as characters
    folder = Path(spec.model).expanduser()
    if folder.exists() or "/" not in spec.model or looks_like_path(spec.model):
        from .models.loading import check_model_folder
        check_model_folder(folder, spec.trust_remote_code)
    else:  # a hub id: fetch only the small files
        try:
            from huggingface_hub import snapshot_download
            folder = Path(snapshot_download(spec.model, allow_patterns=HUB_META_FILES))
        except Exception as exc:  # offline, unknown id, gated
            raise ModelError(spec.model, f"could not download its config: {str(exc).splitlines()[0]}") from None
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=spec.trust_remote_code)
    except Exception as exc:
        raise ModelError(folder, f"has a config transformers cannot read: {str(exc).splitlines()[0]}") from None
    return config, folder, load_tokenizer(folder)


def looks_like_path(model: str) -> bool:
    """Whether --model is meant as a folder even though none is there: "./x", "../x", "/x", "~/x", a
    backslash or a drive (Windows), or more than one "/" (a hub id is exactly "org/name"). Such a name
    gets "no such model folder", not a hub download's complaint about the id."""
    return (model.startswith(("./", "../", "/", "~")) or "\\" in model or model.count("/") > 1
            or model[1:2] == ":")


def _peak_flops(gpu: hardware.GpuInfo | None, logical_cores: int) -> float:
    if gpu is None or gpu.compute_capability is None:
        return max(1, logical_cores) * CPU_FLOPS_PER_CORE
    cc = tuple(gpu.compute_capability)
    known = [v for k, v in sorted(PEAK_FLOPS_BY_CC.items()) if k <= cc]
    return known[-1] if known else 5e12


def plan_job(spec: JobSpec) -> dict[str, Any]:
    from .data import validate
    from .licence import read_licence, scratch_licence
    from .models.presets import count_params

    config, folder, tokenizer = _model_config(spec)
    method = spec.resolved_method
    hw = hardware.detect(include_torch=True)
    gpu = None
    if spec.device != "cpu" and hw.torch and hw.torch.get("cuda_available"):
        gpu = hw.best_gpu()
    device = "cuda:0" if gpu else "cpu"
    validate_spec(spec, device=device)   # the engine's own rules, now that the device is known
    precision = hardware.choose_precision(gpu, spec.precision)
    # From the config's numbers alone: counting an absurd model's parameters would build it.
    limit, where_memory = preflight.memory_limit(gpu_name=gpu.name if gpu else None,
                                                 gpu_total=gpu.vram_total if gpu else None, method=method)
    problem = preflight.cannot_fit(config, method=method, precision=precision, limit=limit,
                                   where_memory=where_memory, gpu=gpu is not None)
    if problem:
        raise WontFitError(folder / "config.json" if folder else spec.model, problem)
    report = validate(spec.data, tokenizer=tokenizer)
    tokens_exact = report.tokens is not None
    tokens = report.tokens if tokens_exact else (report.chars if spec.tokenizer == "bytes" else report.chars // 4)

    params_total = count_params(config)
    available = gpu.vram_free if gpu else hw.ram_available
    fused_loss = False
    if spec.fused_kernels:
        import types

        import torch

        from .fused_kernels import fused_loss_expected
        fused_loss = fused_loss_expected(spec, method, torch.device(device), types.SimpleNamespace(config=config))
    fig = preflight.figures(spec, config, params_total=params_total, method=method, precision=precision,
                            device=device, available=available, fused_loss=fused_loss)
    mem, gc_on, trainable, disk_need = fig["memory"], fig["gradient_checkpointing"], fig["params_trainable"], \
        fig["disk_needed"]

    blocks = max(0, tokens // spec.seq_len)
    train_blocks = blocks - (max(1, round(blocks * spec.eval_fraction)) if blocks >= 2 and spec.eval_fraction else 0)
    steps = spec.steps or max(1, math.ceil((spec.epochs or 1.0) * max(1, train_blocks) / spec.batch_size))
    flops_per_token = (6 if method == "full" else 4) * params_total * (4 / 3 if gc_on else 1)
    eta = steps * spec.batch_size * spec.seq_len * flops_per_token / (_peak_flops(gpu, hw.cpu_cores_logical) * ASSUMED_MFU)

    out_parent = Path(spec.out).expanduser().resolve()
    while not out_parent.exists():
        out_parent = out_parent.parent
    disk_free = shutil.disk_usage(out_parent).free
    licence = scratch_licence(spec.model.split(":", 1)[1]) if spec.is_scratch else read_licence(folder, spec.model)
    return {
        "speed_notes": _speed_notes(spec, config, device),
        "model": spec.model, "method": method, "precision": precision, "device": device,
        "gpu": gpu.name if gpu else None, "params_total": fig["params_total"], "params_trainable": trainable,
        "memory": mem.to_dict(), "verdict": mem.verdict, "advice": mem.advice, "gradient_checkpointing": gc_on,
        "disk": {"needed": disk_need, "free": disk_free, "verdict": "fits" if disk_need < disk_free else "wont_fit"},
        "licence": licence.to_dict(), "tokens": tokens, "tokens_exact": tokens_exact, "steps": steps,
        "eta_s": eta, "eta_note": "a rough estimate from the hardware's speed; the real ETA shows after the first steps",
        "dataset": report.to_dict(),
    }


def _speed_notes(spec: JobSpec, config: Any, device: str) -> list[str]:
    """What becomes of the speed options asked for (compile, fused kernels) on this device: the run's own
    reasons, known before it starts (the run still probes what may work)."""
    import types

    import torch
    notes = []
    if spec.compile:
        from .compiling import unsupported_reason
        why = unsupported_reason(torch.device(device))
        notes.append(f"Compile: not used here: {why}" if why else "Compile: tried on a tiny function first, "
                     "then each layer (the first step takes up to a few minutes longer)")
    if spec.fused_kernels:
        from .fused_kernels import unsupported_reason
        why = unsupported_reason(torch.device(device), types.SimpleNamespace(config=config))
        notes.append(f"Fused kernels (Liger): not used here: {why}" if why
                     else "Fused kernels (Liger): checked on a one-layer model of this one when the run starts")
    return notes


def format_plan(plan: dict[str, Any]) -> str:
    from .preflight import verdict_words
    from .textout import disk_line
    fb, fd = preflight.format_bytes, preflight.format_duration
    mem, lic = plan["memory"], plan["licence"]
    lines = [
        f"Model: {plan['model']} ({plan['params_total']:,} parameters, {plan['params_trainable']:,} trainable), "
        f"{plan['method']} in {plan['precision']} on {plan['gpu'] or plan['device']}",
        f"Data: {plan['dataset']['records']:,} records, {'' if plan['tokens_exact'] else 'about '}{plan['tokens']:,} tokens; "
        f"{plan['steps']:,} steps",
        f"Memory: {fb(mem['total'])} estimated"
        + (f" of {fb(mem['available'])} free" if mem.get("available") else "")
        + f": {verdict_words(plan['verdict'])}",
        *[f"  - {a}" for a in plan["advice"]],
        disk_line(plan["disk"]),
        f"Time: about {fd(plan['eta_s'])} ({plan['eta_note']})",
        f"Licence: {lic['klass']}" + (f" ({lic['name']})" if lic.get("name") else "") + f": {lic['summary']}",
    ]
    if lic.get("warning"):
        lines.append(f"  warning: {lic['warning']}")
    lines += plan.get("speed_notes") or []
    return "\n".join(lines)
