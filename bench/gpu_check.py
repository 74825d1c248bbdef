"""GPU check for a lent machine: one prepared script, one JSON line per section, then a summary line.

Issue 15's GPU half, each section in its own try/except (a failing section prints its error's first line
and the others still run), each with its elapsed seconds, its figures, and pass/fail against its target:

 1. base_bf16      the `base` (~125 M) scratch preset in bf16, a few hundred steps: tokens/s, MFU (target
                   >= 40 %), peak VRAM, the engine's own pre-flight estimate (its `preflight` event, i.e.
                   preflight.figures) and estimate / measured peak (target within 20 %), fused AdamW on.
 2. precisions     the `small` preset in bf16, fp16 (GradScaler) and fp32: finite, falling loss, the
                   precision the engine chose, tokens/s and peak VRAM, fp16 and fp32 each against bf16.
 3. lora_1b        a ~1.1 B Llama (TinyLlama's shape: hidden 2048, 22 layers, 32 heads, 4 KV heads, FFN
                   5632) written to a local folder (save_pretrained + a tokenizer; no hub): LoRA finetune
                   peak VRAM, then a full finetune of the same model, each with its estimate / measured.
 4. pause_handback the finetune worker (LoRA on that model, LocalStrategy: checkpoints on pause) and a
                   swarm-like peer (the `base` preset, no checkpoint on pause, as SwarmStrategy): time from
                   sending `pause` (at a random moment of a step) to the `paused` event, and the allocator's
                   memory_reserved once paused, over a few trials (p50/p95). Target p95 <= 0.3 s (issue
                   15's yield target) and the memory actually freed.
 5. real_oom       a micro-batch of 512 x 1024 through `base` (does not fit on any card): the engine
                   recovers by halving and finishes.
 6. packed_sdpa    JSONL records packed into 1024-token blocks (position ids restart per document,
                   docs/packing.md) trained with sdpa on CUDA; then, on the trained model, a document's
                   logits inside a packed block against the same document run alone (fp32 and bf16).
 7. fused_adamw    the engine's optimizer is torch's fused AdamW on the device; its step time against the
                   for-each AdamW on the `base` model's parameters.
 8. compile        section 1's run eager and with `compile` on (target >= 1.05x).
 9. liger          section 1's run and the 1 B LoRA finetune without and with `fused_kernels` (Liger):
                   tokens/s, peak VRAM (target: LoRA peak <= 0.6x), the same losses. It imports liger_kernel
                   from the image or from a carried wheel (bench/wheels/); Liger's patches to transformers
                   are undone at the section's end.

The sections run in the order given; the default (DEFAULT_ORDER) puts issue 15's targets first, since the
budget skips whatever is left after 480 s.

On a lent GPU (no venv there: the image's python3 has torch, transformers, peft; ~4-6 min on an H200):

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 bench/gpu_check.py
    PYTHONPATH=. python3 bench/gpu_check.py --sections 1,3 --steps 200

Here, on the CPU, to check the script's logic (tiny presets, a handful of steps, a small stand-in for the
1 B model; GPU-only figures print as null with the reason; ~1-3 min on 2 cores):

    .venv/bin/python bench/gpu_check.py --smoke
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
import types
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# No hub, no network (the device machine reaches nothing); caches in a throwaway folder.
_HOME = Path(tempfile.mkdtemp(prefix="modron-gpu-check-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MODRON_CACHE_DIR", str(_HOME / "cache"))
os.environ.setdefault("MODRON_DATA_DIR", str(_HOME / "data"))


def _platformdirs_stand_in() -> None:
    """training_core/paths.py imports platformdirs; the device image has none (KINDS.md's package list).
    The MODRON_*_DIR variables above decide the folders anyway, so a stand-in module is enough."""
    if importlib.util.find_spec("platformdirs") is not None:
        return
    mod = types.ModuleType("platformdirs")
    mod.user_data_dir = lambda *a, **k: str(_HOME / "data")        # type: ignore[attr-defined]
    mod.user_cache_dir = lambda *a, **k: str(_HOME / "cache")      # type: ignore[attr-defined]
    sys.modules["platformdirs"] = mod


_platformdirs_stand_in()

import torch  # noqa: E402

from training_core.config import JobSpec  # noqa: E402
from training_core.controls import Controls  # noqa: E402
from training_core.engine import Engine  # noqa: E402
from training_core.strategy import LocalStrategy  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}   # dense tensor-core FLOP/s (datasheets)
MFU_TARGET = 0.40
ESTIMATE_TOLERANCE = 0.20          # pre-flight estimate within 20 % of the measured peak
PAUSE_P95_TARGET_S = 0.3           # issue 15's yield target (bench/README.md, yield_latency.py)
GB = 1e9

# Sizes: on a GPU (sized for ~4-6 min on an H200) and --smoke (the CPU, seconds per section).
FULL = dict(
    corpus_mb=20, vocab=32000, tok_chars=6_000_000, threads=None, sample_tokens=20,
    s1=dict(preset="base", steps=300, batch=32, seq=1024),
    s2=dict(preset="small", steps=60, batch=16, seq=1024),
    big=dict(hidden=2048, inter=5632, layers=22, heads=32, kv=4),     # TinyLlama-1.1B's shape
    s3=dict(lora_steps=30, full_steps=20, batch=8, seq=1024),
    s4=dict(trials=5, batch=8, seq=1024, swarm_preset="base", swarm_batch=16),
    s5=dict(preset="base", batch=512, seq=1024, steps=3),
    s6=dict(preset="small", steps=40, batch=16, seq=1024, records=6000),
    s7=dict(preset="base", steps=20),
    s8=dict(preset="base", steps=100, batch=32, seq=1024),
    s9=dict(preset="base", steps=100, batch=32, seq=1024, lora_steps=30, lora_batch=8),
)
SMOKE = dict(
    corpus_mb=0.3, vocab=1000, tok_chars=300_000, threads=2, sample_tokens=4,
    s1=dict(preset="tiny", steps=6, batch=4, seq=64),
    s2=dict(preset="tiny", steps=4, batch=4, seq=128),
    big=dict(hidden=64, inter=172, layers=2, heads=4, kv=2),
    s3=dict(lora_steps=4, full_steps=4, batch=4, seq=64),
    s4=dict(trials=2, batch=4, seq=64, swarm_preset="tiny", swarm_batch=4),
    s5=dict(preset="tiny", batch=8, seq=64, steps=3),
    s6=dict(preset="tiny", steps=4, batch=4, seq=128, records=150),
    s7=dict(preset="tiny", steps=7),
    s8=dict(preset="tiny", steps=6, batch=4, seq=64),
    s9=dict(preset="tiny", steps=4, batch=4, seq=64, lora_steps=3, lora_batch=4),
)
NOT_CUDA = "no CUDA device (smoke run on the CPU)"


# ---- small helpers ----------------------------------------------------------------------------
def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def gb(n: float | None) -> float | None:
    return None if n is None else round(n / GB, 3)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def verdict(checks: dict[str, bool | None]) -> bool | None:
    """False if any check failed; True if every applicable one passed; None if none applied here."""
    applied = [v for v in checks.values() if v is not None]
    if any(v is False for v in applied):
        return False
    return True if applied else None


def within(ratio: float | None, tol: float = ESTIMATE_TOLERANCE) -> bool | None:
    return None if ratio is None else abs(ratio - 1.0) <= tol


class QuietStrategy(LocalStrategy):
    """The local strategy, but a stop keeps no checkpoint (as a swarm peer's), so a run of a 1 B model can
    be ended after N steps without writing 13 GB; `checkpoint_on_pause=False` pauses as a swarm peer does."""

    def __init__(self, checkpoint_on_pause: bool = True):
        self.checkpoint_on_pause = checkpoint_on_pause

    def stop_checkpoint(self, engine) -> str | None:
        return None


class Ctx:
    """What the sections share: sizes, the device, the corpus, a trained tokenizer, the 1 B model folder."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.smoke = args.smoke
        self.cfg = SMOKE if args.smoke else FULL
        if args.steps:
            self.cfg["s1"]["steps"] = args.steps
        self.cuda = torch.cuda.is_available() and not args.smoke
        self.device = "cuda" if self.cuda else "cpu"
        self.tmp = _HOME
        self.corpus = big_corpus(self.tmp, self.cfg["corpus_mb"])
        self._tokdir: Path | None = None
        self._big: Path | None = None
        self.runs = 0
        self.plain_tokens_per_s: dict[tuple, float] = {}   # (preset, batch, seq, precision) -> section 2's speed

    def tokenizer_dir(self) -> Path:
        """One BPE tokenizer (vocab 32000 on a GPU, the `base` preset's and TinyLlama's), saved; every run
        loads it. The demo stories alone hold words for ~4.4 k tokens, so made-up words fill the rest:
        the models then have their real vocabulary (the logits are a large share of `base`'s work)."""
        if self._tokdir is None:
            from training_core.models.tokenizer import train_tokenizer
            t0 = time.monotonic()
            texts = demo_paragraphs() + made_up_paragraphs(self.cfg["tok_chars"])
            tok = train_tokenizer(texts, self.cfg["vocab"], max_chars=self.cfg["tok_chars"] + 200_000)
            self._tokdir = self.tmp / "tokenizer"
            tok.save_pretrained(str(self._tokdir))
            log(f"tokenizer: {len(tok)} tokens trained in {time.monotonic() - t0:.1f} s")
        return self._tokdir

    def big_model(self) -> Path:
        """A ~1.1 B Llama (TinyLlama's shape, random weights, bf16 safetensors) in a local model folder with
        the shared tokenizer and a licence card, as a downloaded model would be; built once."""
        if self._big is None:
            from transformers import LlamaConfig, LlamaForCausalLM
            from transformers.utils import logging as hf_logging
            from training_core.models.tokenizer import load_tokenizer
            hf_logging.disable_progress_bar()
            t0 = time.monotonic()
            tok = load_tokenizer(self.tokenizer_dir())
            b = self.cfg["big"]
            cfg = LlamaConfig(vocab_size=max(len(tok), self.cfg["vocab"]), hidden_size=b["hidden"],
                              intermediate_size=b["inter"],
                              num_hidden_layers=b["layers"], num_attention_heads=b["heads"],
                              num_key_value_heads=b["kv"], max_position_embeddings=2048, rms_norm_eps=1e-5,
                              tie_word_embeddings=False, eos_token_id=tok.eos_token_id,
                              bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
            torch.manual_seed(0)
            with torch.device(self.device):      # random init on the GPU: seconds, not a minute of CPU
                model = LlamaForCausalLM(cfg)
            folder = self.tmp / "llama-1b"
            model.to(device="cpu", dtype=torch.bfloat16).save_pretrained(str(folder), safe_serialization=True)
            del model
            free_memory()
            tok.save_pretrained(str(folder))
            (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# random-weight TinyLlama-shaped "
                                              "model for bench/gpu_check.py\n", encoding="utf-8")
            self._big = folder
            log(f"1B stand-in folder written in {time.monotonic() - t0:.1f} s")
        return self._big

    def spec(self, name: str, **kw: Any) -> JobSpec:
        """A job on this device: no periodic checkpoints, short samples, the shared tokenizer for scratch."""
        self.runs += 1
        base = dict(data=[str(self.corpus)], out=str(self.tmp / "runs" / f"{self.runs:02d}-{name}"),
                    checkpoint_every=10**6, sample_max_tokens=self.cfg["sample_tokens"], device=self.device,
                    threads=self.cfg["threads"])
        base.update(kw)
        if str(base["model"]).startswith("scratch:") and "tokenizer" not in kw:
            base["tokenizer"] = str(self.tokenizer_dir())
        return JobSpec(**base)


def log(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


def big_corpus(folder: Path, mb: float) -> Path:
    """The demo stories repeated to `mb` MB, shuffled by paragraph, so the token cache has real work."""
    paras = demo_paragraphs()
    rng = random.Random(0)
    out = folder / "corpus.txt"
    size = 0
    with open(out, "w", encoding="utf-8") as fh:
        while size < mb * 1_000_000:
            rng.shuffle(paras)
            chunk = "\n\n".join(paras) + "\n\n"
            fh.write(chunk)
            size += len(chunk)
    return out


def demo_paragraphs() -> list[str]:
    paras = []
    for f in sorted((ROOT / "resources" / "demo" / "stories").glob("*.txt")):
        paras += [p.strip() for p in f.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    return paras


def made_up_paragraphs(chars: int, seed: int = 0) -> list[str]:
    """Text of made-up words (Zipf-distributed over ~48 k syllable words): enough distinct words for a
    32000-token BPE vocabulary."""
    rng = random.Random(seed)
    syl = ["ka", "lo", "mi", "ren", "tha", "es", "or", "un", "bri", "sto", "we", "ly", "an", "de", "qu", "ix",
           "po", "zen", "gar", "fel", "mor", "tis", "val", "shu", "nep", "rad", "cho", "bel", "sim", "tor"]
    lexicon = sorted({"".join(rng.choice(syl) for _ in range(rng.randint(1, 4))) for _ in range(120_000)})
    cum, total = [], 0.0
    for i in range(len(lexicon)):
        total += 1.0 / (i + 1) ** 0.9
        cum.append(total)
    words = rng.choices(lexicon, cum_weights=cum, k=max(80, chars // 8))
    return [" ".join(words[i:i + 80]) for i in range(0, len(words), 80)]


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ---- one engine run, measured ---------------------------------------------------------------------
class Run:
    """Engine(spec, emit, controls, strategy).run() with its events, wall time and CUDA memory figures.
    `stop_after`: send `stop` at the first step event at or past that step (no final eval/checkpoint)."""

    def __init__(self, ctx: Ctx, spec: JobSpec, *, stop_after: int | None = None,
                 strategy: LocalStrategy | None = None, controls: Controls | None = None,
                 on_event: Callable[[dict], None] | None = None, keep_engine: bool = False):
        self.events: list[dict] = []
        controls = controls or Controls()
        stopping = []

        self.train_peak_reserved = None   # the allocator's peak at the last step event: training, before the final eval

        def emit(ev: dict) -> None:
            ev["_t"] = time.monotonic()
            self.events.append(ev)
            if ev["type"] == "step" and ctx.cuda:
                self.train_peak_reserved = torch.cuda.max_memory_reserved()
            if on_event is not None:
                on_event(ev)
            if stop_after is not None and ev["type"] == "step" and ev["step"] >= stop_after and not stopping:
                stopping.append(ev["step"])
                controls.put("stop")

        free_memory()
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.monotonic()
        eng = Engine(spec, emit, controls, strategy=strategy)
        self.result = eng.run()
        self.wall_s = time.monotonic() - t0
        self.peak_allocated = self.peak_reserved = self.context = None
        if ctx.cuda:
            torch.cuda.synchronize()
            free, total = torch.cuda.mem_get_info()
            self.peak_allocated = torch.cuda.max_memory_allocated()
            self.peak_reserved = torch.cuda.max_memory_reserved()
            # What the device holds beyond the allocator's segments: the CUDA context, kernels, cuBLAS.
            self.context = (total - free) - torch.cuda.memory_reserved()
        self.config = eng.model.config if hasattr(eng, "model") else None
        self.optimizer_fused = bool(getattr(eng, "optimizer", None) and eng.optimizer.defaults.get("fused"))
        self.engine = eng if keep_engine else None
        del eng
        shutil.rmtree(spec.out, ignore_errors=True)   # checkpoints of a 1 B model fill a disk quickly
        if not keep_engine:
            free_memory()

    def of(self, type_: str) -> list[dict]:
        return [e for e in self.events if e["type"] == type_]

    def one(self, type_: str) -> dict:
        found = self.of(type_)
        if not found:
            raise RuntimeError(f"no {type_!r} event (events: {sorted({e['type'] for e in self.events})})")
        return found[0]

    @property
    def steps(self) -> list[dict]:
        return self.of("step")

    def tokens_per_s(self) -> float | None:
        """Median speed over the step events after the first fifth of the run (warm-up left out)."""
        steps = self.steps
        if not steps:
            return None
        last = steps[-1]["step"]
        tail = [s["tokens_per_s"] for s in steps if s["step"] > max(1, last // 5)] or [s["tokens_per_s"] for s in steps]
        return statistics.median(tail)

    def losses(self) -> tuple[float | None, float | None]:
        steps = self.steps
        return (steps[0]["loss"], steps[-1]["loss"]) if steps else (None, None)

    def finite(self) -> bool:
        return bool(self.steps) and all(math.isfinite(s["loss"]) for s in self.steps)

    def measured_peak(self) -> int | None:
        """The device's memory at the run's peak: the allocator's peak reservation plus the context."""
        if self.peak_reserved is None:
            return None
        return self.peak_reserved + max(0, self.context or 0)

    def memory_figures(self) -> dict[str, Any]:
        pf = self.one("preflight")
        mem = pf["memory"]
        peak = self.measured_peak()
        ratio = mem["total"] / peak if peak else None
        return {
            "peak_allocated_gb": gb(self.peak_allocated), "peak_reserved_gb": gb(self.peak_reserved),
            "context_gb": gb(self.context), "measured_peak_gb": gb(peak),
            "estimate_gb": gb(mem["total"]),
            "estimate_parts_gb": {k: gb(mem[k]) for k in ("weights", "grads", "optimizer", "activations", "overhead")},
            "estimate_verdict": pf["verdict"], "gradient_checkpointing": pf["gradient_checkpointing"],
            "estimate_over_measured": round(ratio, 3) if ratio else None,
        }

    def basics(self) -> dict[str, Any]:
        started = self.one("started")
        first, last = self.losses()
        tps = self.tokens_per_s()
        return {"precision": started["precision"], "method": started["method"], "params_total": started["params_total"],
                "params_trainable": started["params_trainable"], "micro_batch": started["micro_batch"],
                "batch": started["batch_size"], "seq_len": started["seq_len"], "steps_run": self.result.step,
                "status": self.result.status, "tokens_per_s": round(tps) if tps else None,
                "first_loss": first, "last_loss": last, "wall_s": round(self.wall_s, 1)}


def flops_per_token(config: Any, params_total: int, seq: int) -> float:
    """6 N + 12 L h s (PaLM's count, causal masking not subtracted); an untied input embedding is no
    matmul, so it is left out of N."""
    n = params_total
    if not getattr(config, "tie_word_embeddings", True):
        n -= config.vocab_size * config.hidden_size
    return 6 * n + 12 * config.num_hidden_layers * config.hidden_size * seq


def peak_flops() -> tuple[float | None, str | None]:
    if not torch.cuda.is_available():
        return None, None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None), name


# ---- the sections -----------------------------------------------------------------------------
def s1_base_bf16(ctx: Ctx) -> dict[str, Any]:
    c = ctx.cfg["s1"]
    run = Run(ctx, ctx.spec("base", model=f"scratch:{c['preset']}", steps=c["steps"], batch_size=c["batch"],
                            seq_len=c["seq"], lr=6e-4, precision="bf16"))
    out = run.basics() | run.memory_figures()
    peak, name = peak_flops()
    fpt = flops_per_token(run.config, out["params_total"], c["seq"])
    mfu = fpt * out["tokens_per_s"] / peak if (ctx.cuda and peak and out["tokens_per_s"]) else None
    out.update(preset=c["preset"], gpu=name, flops_per_token=round(fpt), mfu=round(mfu, 4) if mfu else None,
               optimizer_fused=run.optimizer_fused, final_eval_loss=run.result.final_eval_loss)
    null = {}
    if not ctx.cuda:
        null = {k: NOT_CUDA for k in ("mfu", "peak_vram", "estimate_over_measured", "bf16")}
    elif peak is None:
        null["mfu"] = f"no datasheet peak for {name!r} in PEAK_BF16"
    checks = {
        "finite_loss": run.finite(),
        "loss_falls": out["last_loss"] < out["first_loss"] if run.finite() else False,
        "bf16_used": out["precision"] == "bf16" if ctx.cuda else None,
        "mfu_ge_40pct": None if mfu is None else mfu >= MFU_TARGET,
        "estimate_within_20pct": within(out["estimate_over_measured"]) if ctx.cuda else None,
        "fused_adamw": out["optimizer_fused"],
    }
    return dict(figures=out, checks=checks, null=null,
                targets={"mfu": f">= {MFU_TARGET}", "estimate_over_measured": f"1 +- {ESTIMATE_TOLERANCE}"})


def s2_precisions(ctx: Ctx) -> dict[str, Any]:
    c = ctx.cfg["s2"]
    figs: dict[str, dict[str, Any]] = {}
    checks: dict[str, bool | None] = {}
    errors = {}
    for prec in ("bf16", "fp16", "fp32"):
        try:
            run = Run(ctx, ctx.spec(f"prec-{prec}", model=f"scratch:{c['preset']}", steps=c["steps"],
                                    batch_size=c["batch"], seq_len=c["seq"], lr=6e-4, precision=prec),
                      keep_engine=True)
            f = run.basics()
            f["peak_allocated_gb"] = gb(run.peak_allocated)
            eng = run.engine
            f["grad_scaler"] = eng.scaler.is_enabled()
            f["loss_scale"] = eng.scaler.get_scale() if eng.scaler.is_enabled() else None
            run.engine = eng = None
            free_memory()
            figs[prec] = f
            if f["tokens_per_s"]:
                ctx.plain_tokens_per_s[(c["preset"], c["batch"], c["seq"], prec)] = f["tokens_per_s"]
            checks[f"{prec}_finite_loss"] = run.finite()
            checks[f"{prec}_loss_falls"] = run.finite() and f["last_loss"] < f["first_loss"]
            checks[f"{prec}_used"] = (f["precision"] == prec) if ctx.cuda else None
            if prec == "fp16":
                checks["fp16_grad_scaler_on"] = f["grad_scaler"] if ctx.cuda else None
        except Exception as exc:   # one precision failing must not hide the others
            errors[prec] = first_line(exc)
            traceback.print_exc(limit=-4)
            checks[f"{prec}_ran"] = False
    ref = figs.get("bf16")
    for prec in ("fp16", "fp32"):
        f = figs.get(prec)
        if f and ref:
            f["tokens_per_s_vs_bf16"] = (round(f["tokens_per_s"] / ref["tokens_per_s"], 3)
                                         if f["tokens_per_s"] and ref["tokens_per_s"] else None)
            f["peak_vram_vs_bf16"] = (round(f["peak_allocated_gb"] / ref["peak_allocated_gb"], 3)
                                      if f["peak_allocated_gb"] and ref["peak_allocated_gb"] else None)
            f["last_loss_minus_bf16"] = round(f["last_loss"] - ref["last_loss"], 4)
    null = {"precision_used": "the engine trains in fp32 on the CPU", "peak_vram": NOT_CUDA} if not ctx.cuda else {}
    return dict(figures={"preset": c["preset"], **figs}, checks=checks, null=null, errors=errors or None,
                targets={"loss": "finite and falling in each precision", "precision_used": "as requested"})


def s3_lora_1b(ctx: Ctx) -> dict[str, Any]:
    c = ctx.cfg["s3"]
    folder = ctx.big_model()
    figs: dict[str, Any] = {"model": ctx.cfg["big"] | {"stand_in": ctx.smoke}}
    checks: dict[str, bool | None] = {}
    errors = {}
    for method, steps in (("lora", c["lora_steps"]), ("full", c["full_steps"])):
        try:
            run = Run(ctx, ctx.spec(f"1b-{method}", model=str(folder), method=method, precision="bf16",
                                    steps=steps * 10, batch_size=c["batch"], seq_len=c["seq"],
                                    lr=2e-4 if method == "lora" else 5e-5,
                                    tokenizer="auto"),
                      stop_after=steps, strategy=QuietStrategy())
            f = run.basics() | run.memory_figures()
            figs[method] = f
            checks[f"{method}_finite_loss"] = run.finite()
            checks[f"{method}_estimate_within_20pct"] = within(f["estimate_over_measured"]) if ctx.cuda else None
        except Exception as exc:
            errors[method] = first_line(exc)
            traceback.print_exc(limit=-4)
            checks[f"{method}_ran"] = False
    lora, full = figs.get("lora"), figs.get("full")
    if lora and full and ctx.cuda:
        figs["lora_peak_over_full_peak"] = round(lora["peak_allocated_gb"] / full["peak_allocated_gb"], 3)
        checks["lora_uses_less_than_full"] = lora["peak_allocated_gb"] < full["peak_allocated_gb"]
    null = {"peak_vram": NOT_CUDA, "model": "a tiny stand-in for the 1 B model"} if not ctx.cuda else {}
    return dict(figures=figs, checks=checks, null=null, errors=errors or None,
                targets={"estimate_over_measured": f"1 +- {ESTIMATE_TOLERANCE}", "lora_peak": "< full peak"})


def pause_trials(ctx: Ctx, spec: JobSpec, strategy: LocalStrategy, trials: int, seed: int) -> dict[str, Any]:
    """Train; `trials` times, at a random moment of a step, send `pause`, time it to the `paused` event and
    read the memory there, hold a moment, `resume`; then `stop`. A driver thread sends the controls."""
    controls = Controls()
    rng = random.Random(seed)
    state = {"step": 0, "done": False}
    paused, resumed = threading.Event(), threading.Event()
    trial: dict[str, Any] = {}
    records: list[dict[str, Any]] = []
    problems: list[str] = []

    def on_event(ev: dict) -> None:
        if ev["type"] == "step":
            state["step"] = ev["step"]
        elif ev["type"] == "paused":
            trial["pause_s"] = ev["_t"] - trial["sent"]
            trial["event_vram_reserved"] = ev.get("vram_reserved")
            trial["checkpoint"] = ev.get("checkpoint") is not None
            if ctx.cuda:
                free, total = torch.cuda.mem_get_info()
                trial["reserved_after"] = torch.cuda.memory_reserved()
                trial["allocated_after"] = torch.cuda.memory_allocated()
                trial["device_used_after"] = total - free
            paused.set()
        elif ev["type"] == "resumed":
            trial["resume_s"] = ev["_t"] - trial["resume_sent"]
            resumed.set()
        elif ev["type"] in ("stopped", "finished"):
            state["done"] = True

    def wait_for(cond: Callable[[], bool], timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end and not state["done"]:
            if cond():
                return True
            time.sleep(0.005)
        return cond()

    def driver() -> None:
        try:
            if not wait_for(lambda: state["step"] >= 2, 300):
                problems.append("training never reached step 2")
                return
            for i in range(trials):
                at = state["step"]
                if not wait_for(lambda: state["step"] >= at + 2, 120):
                    problems.append(f"trial {i}: no progress after step {at}")
                    return
                time.sleep(rng.uniform(0.0, 0.2))          # arrive at a random moment of a step
                trial.clear()
                paused.clear()
                resumed.clear()
                if ctx.cuda:
                    trial["reserved_before"] = torch.cuda.memory_reserved()
                trial["sent"] = time.monotonic()
                controls.put("pause")
                if not paused.wait(120):
                    problems.append(f"trial {i}: no paused event within 120 s")
                    return
                time.sleep(0.2)                             # the GPU stays free a moment, as when lent
                trial["resume_sent"] = time.monotonic()
                controls.put("resume")
                if not resumed.wait(120):
                    problems.append(f"trial {i}: no resumed event within 120 s")
                    return
                records.append(dict(trial))
        except Exception as exc:   # reported, and the run still gets its stop
            problems.append(first_line(exc))
        finally:
            controls.put("stop")

    th = threading.Thread(target=driver, name="pause-driver", daemon=True)
    th.start()
    try:
        run = Run(ctx, spec, strategy=strategy, controls=controls, on_event=on_event)
    finally:
        state["done"] = True     # the driver stops waiting (a failed set-up sends no event)
        th.join(10)
    pause_s = [r["pause_s"] for r in records]
    resume_s = [r["resume_s"] for r in records]
    out: dict[str, Any] = {
        "trials": len(records), "pause_s": [round(x, 4) for x in pause_s],
        "pause_p50_s": round(statistics.median(pause_s), 4) if pause_s else None,
        "pause_p95_s": round(pct(pause_s, 0.95), 4) if pause_s else None,
        "resume_p50_s": round(statistics.median(resume_s), 4) if resume_s else None,
        "checkpoint_on_pause": strategy.checkpoint_on_pause,
        "checkpoints_written": sum(1 for r in records if r.get("checkpoint")), "method": run.one("started")["method"],
        "params_total": run.one("started")["params_total"], "status": run.result.status,
        "steps_run": run.result.step, "problems": problems or None,
    }
    if ctx.cuda and records:
        out["reserved_before_gb"] = [gb(r["reserved_before"]) for r in records]
        out["reserved_after_gb"] = [gb(r["reserved_after"]) for r in records]
        out["allocated_after_gb"] = [gb(r["allocated_after"]) for r in records]
        out["device_used_after_gb"] = [gb(r["device_used_after"]) for r in records]
        out["event_vram_reserved_gb"] = [gb(r["event_vram_reserved"]) for r in records]
    return out


def s4_pause_handback(ctx: Ctx) -> dict[str, Any]:
    c = ctx.cfg["s4"]
    figs: dict[str, Any] = {}
    checks: dict[str, bool | None] = {}
    errors = {}
    workers = (
        ("finetune_lora_1b", lambda: ctx.spec("pause-finetune", model=str(ctx.big_model()), method="lora",
                                              precision="bf16", steps=10**6, batch_size=c["batch"], seq_len=c["seq"],
                                              tokenizer="auto"), QuietStrategy(checkpoint_on_pause=True)),
        ("swarm_like_base", lambda: ctx.spec("pause-swarm", model=f"scratch:{c['swarm_preset']}", precision="bf16",
                                             steps=10**6, batch_size=c["swarm_batch"], seq_len=c["seq"]),
         QuietStrategy(checkpoint_on_pause=False)),
    )
    for k, (name, make_spec, strategy) in enumerate(workers):
        try:
            f = pause_trials(ctx, make_spec(), strategy, c["trials"], seed=k)
            figs[name] = f
            checks[f"{name}_all_trials"] = f["trials"] == c["trials"] and not f["problems"]
            # On the CPU nothing is handed back and a shared machine's timings are noise: figures only.
            checks[f"{name}_p95_le_{PAUSE_P95_TARGET_S}s"] = ((f["pause_p95_s"] is not None
                                                               and f["pause_p95_s"] <= PAUSE_P95_TARGET_S)
                                                              if ctx.cuda else None)
            if ctx.cuda and f.get("reserved_after_gb"):
                worst = max(f["reserved_after_gb"])
                before = min(f["reserved_before_gb"])
                checks[f"{name}_vram_freed"] = worst <= max(0.256, 0.05 * before)
            else:
                checks[f"{name}_vram_freed"] = None
        except Exception as exc:
            errors[name] = first_line(exc)
            traceback.print_exc(limit=-4)
            checks[f"{name}_ran"] = False
    null = {} if ctx.cuda else {"vram": NOT_CUDA + ": nothing to hand back",
                                "pause_p95_check": NOT_CUDA + ": the times are printed, the target is a GPU's"}
    return dict(figures=figs, checks=checks, null=null, errors=errors or None,
                targets={"pause_p95_s": f"<= {PAUSE_P95_TARGET_S} (pause sent -> paused event)",
                         "reserved_after": "<= max(256 MB, 5 % of before)"})


def s5_real_oom(ctx: Ctx) -> dict[str, Any]:
    c = ctx.cfg["s5"]
    kw = dict(model=f"scratch:{c['preset']}", steps=c["steps"], batch_size=c["batch"], seq_len=c["seq"],
              precision="bf16", gradient_checkpointing=False)
    if not ctx.cuda:
        kw["test_oom_at_steps"] = [1]     # no real OOM on the CPU: the engine's test hook raises one
    run = Run(ctx, ctx.spec("oom", **kw))
    rec = run.of("oom_recovered")
    out = {"real_oom": ctx.cuda, "recoveries": [(e["old_micro_batch"], e["new_micro_batch"]) for e in rec],
           "finished": run.result.status == "finished", "steps": run.result.step, "wall_s": round(run.wall_s, 1),
           "peak_allocated_gb": gb(run.peak_allocated),
           "final_micro_batch": rec[-1]["new_micro_batch"] if rec else None,
           "estimate_verdict": run.one("preflight")["verdict"]}
    checks = {"recovered": bool(rec), "finished": out["finished"], "finite_loss": run.finite()}
    null = {"real_oom": NOT_CUDA + ": the test hook's fake OOM instead"} if not ctx.cuda else {}
    return dict(figures=out, checks=checks, null=null, targets={"finished": "after halving the micro-batch"})


def write_records(path: Path, n: int, seed: int = 0) -> list[int]:
    """JSONL {"text": ...} records of 1-12 demo paragraphs each: documents of very different lengths."""
    paras = demo_paragraphs()
    rng = random.Random(seed)
    lengths = []
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(n):
            text = "\n\n".join(rng.choice(paras) for _ in range(rng.choice((1, 1, 2, 3, 5, 8, 12))))
            lengths.append(len(text))
            fh.write(json.dumps({"text": text}) + "\n")
    return lengths


def s6_packed_sdpa(ctx: Ctx) -> dict[str, Any]:
    import numpy as np
    from training_core.data.packed import has_documents, packed_inputs
    c = ctx.cfg["s6"]
    data = ctx.tmp / "records.jsonl"
    chars = write_records(data, c["records"])
    run = Run(ctx, ctx.spec("packed", model=f"scratch:{c['preset']}", data=[str(data)], steps=c["steps"],
                            batch_size=c["batch"], seq_len=c["seq"], lr=6e-4, precision="bf16"), keep_engine=True)
    eng = run.engine
    try:
        out = run.basics()
        attn = getattr(eng.model.config, "_attn_implementation", None)
        n = min(eng.data.num_train, 512)
        pos = eng.data.train_positions(np.arange(n))
        with_docs = [i for i in range(n) if has_documents(pos[i:i + 1])]
        out.update(attn_implementation=attn, blocks_sampled=n, blocks_with_document_starts=len(with_docs),
                   record_chars_median=statistics.median(chars), peak_allocated_gb=gb(run.peak_allocated))
        # A document inside a packed block must get the logits it gets alone (block-diagonal mask).
        best = None
        for i in with_docs:
            starts = [j for j in range(1, c["seq"]) if pos[i, j] == 0]
            for k, s in enumerate(starts):
                e = starts[k + 1] if k + 1 < len(starts) else c["seq"]
                if e - s >= 16 and (best is None or e - s > best[2] - best[1]):
                    best = (i, s, e)
            if best and best[2] - best[1] >= 64:
                break
        if best is None:
            raise RuntimeError("no block holds a document of 16+ tokens after a document start")
        i, s, e = best
        dev = eng.device
        ids = torch.from_numpy(eng.data.train_batch(np.array([i]))).to(dev)
        p = torch.from_numpy(pos[i:i + 1]).to(dev)
        model = eng.model
        model.eval()
        diffs = {}
        with torch.no_grad():
            for kind, ac in (("fp32", torch.autocast(dev.type, enabled=False)),
                             ("bf16", torch.autocast(dev.type, dtype=torch.bfloat16))):
                with ac:
                    inputs = {k: v for k, v in packed_inputs(ids, p).items() if k != "labels"}
                    packed = model(**inputs).logits[0, s:e].float()
                    alone = model(input_ids=ids[:, s:e], use_cache=False).logits[0].float()
                    crossing = model(input_ids=ids, use_cache=False).logits[0, s:e].float()
                diffs[kind] = {"packed_vs_alone": float((packed - alone).abs().max()),
                               "crossing_vs_alone": float((crossing - alone).abs().max())}
        model.train()
        out.update(document_tokens=e - s, logit_max_abs_diff=diffs)
        plain = ctx.plain_tokens_per_s.get((c["preset"], c["batch"], c["seq"], "bf16"))
        # Against section 2's bf16 run of the same shape on one long text (no document starts: causal sdpa).
        out["tokens_per_s_vs_unpacked"] = (round(out["tokens_per_s"] / plain, 3)
                                           if plain and out["tokens_per_s"] else None)
        checks = {
            "sdpa": attn == "sdpa",
            "documents_packed": len(with_docs) > 0,
            "finite_loss": run.finite(),
            "fp32_document_isolated": (diffs["fp32"]["packed_vs_alone"]
                                       <= max(2e-3, 1e-3 * diffs["fp32"]["crossing_vs_alone"])),
            "bf16_document_isolated": diffs["bf16"]["packed_vs_alone"] <= 0.2 * diffs["bf16"]["crossing_vs_alone"],
            "bf16_used": out["precision"] == "bf16" if ctx.cuda else None,
        }
    finally:
        run.engine = eng = None
        free_memory()
    return dict(figures=out, checks=checks, null={"bf16": NOT_CUDA + ": trained in fp32"} if not ctx.cuda else {},
                targets={"packed_vs_alone": "fp32 <= 2e-3 (or 1e-3 x crossing); bf16 <= 0.2 x crossing"})


def s7_fused_adamw(ctx: Ctx) -> dict[str, Any]:
    from transformers import LlamaForCausalLM
    from training_core.models.presets import preset_config
    c = ctx.cfg["s7"]
    dev = torch.device(ctx.device)
    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaForCausalLM(preset_config(c["preset"]))
    params = [p for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    engine_like = types.SimpleNamespace(device=dev, spec=types.SimpleNamespace(weight_decay=0.0))
    engine_opt = LocalStrategy().make_optimizer(engine_like, params, 3e-4)
    fused_flag = bool(engine_opt.defaults.get("fused"))
    del engine_opt

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    times = {}
    for impl in ("fused", "foreach"):
        opt = torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.0,
                                **({"fused": True} if impl == "fused" else {"foreach": True}))
        for _ in range(3):
            opt.step()
        each = []
        for _ in range(c["steps"]):     # the median step: bursts of other load (a shared CPU) left out
            sync()
            t0 = time.perf_counter()
            opt.step()
            sync()
            each.append(time.perf_counter() - t0)
        times[impl] = statistics.median(each)
        del opt
    n = sum(p.numel() for p in params)
    del model, params
    free_memory()
    out = {"preset": c["preset"], "params": n, "engine_optimizer_fused": fused_flag,
           "step_ms": {k: round(v * 1e3, 3) for k, v in times.items()},
           "fused_speedup_vs_foreach": round(times["foreach"] / times["fused"], 2)}
    checks = {"engine_uses_fused": fused_flag,
              "fused_not_slower": times["fused"] <= times["foreach"] * 1.05 if ctx.cuda else None}
    return dict(figures=out, checks=checks, null={"fused_not_slower": NOT_CUDA} if not ctx.cuda else {},
                targets={"fused": "the engine's AdamW is fused and no slower than for-each"})


def s8_compile(ctx: Ctx) -> dict[str, Any]:
    """JobSpec.compile (training_core/compiling.py) against the same run eager: tokens/s after warm-up, MFU,
    peak memory, and the seconds the compile adds to the first step."""
    c = ctx.cfg["s8"]
    figs: dict[str, Any] = {"preset": c["preset"]}
    runs = {}
    for mode in ("eager", "compiled"):
        runs[mode] = run = Run(ctx, ctx.spec(f"compile-{mode}", model=f"scratch:{c['preset']}", steps=c["steps"],
                                             batch_size=c["batch"], seq_len=c["seq"], lr=6e-4, precision="bf16",
                                             compile=mode == "compiled"), keep_engine=True)
        first = run.steps[0]["_t"] - run.one("started")["_t"] if run.steps else None
        figs[mode] = run.basics() | run.memory_figures() | {"first_step_s": round(first, 1) if first else None,
                                                            "compiled": bool(getattr(run.engine, "compiled", False))}
        run.engine = None
        free_memory()
    eager, comp = figs["eager"], figs["compiled"]
    speedup = (comp["tokens_per_s"] / eager["tokens_per_s"]) if comp["tokens_per_s"] and eager["tokens_per_s"] else None
    peak, name = peak_flops()
    if ctx.cuda and peak and comp["tokens_per_s"]:
        fpt = flops_per_token(runs["compiled"].config, comp["params_total"], c["seq"])
        figs["compiled_mfu"] = round(fpt * comp["tokens_per_s"] / peak, 4)
    figs["speedup"] = round(speedup, 3) if speedup else None
    warnings = [e["message"] for e in runs["compiled"].events if e["type"] == "warning" and e.get("code") == "compile"]
    figs["compile_warnings"] = warnings
    checks = {"compiled": comp["compiled"] and not warnings,
              "finite_loss": runs["compiled"].finite(),
              "faster_than_eager": speedup >= 1.05 if (ctx.cuda and speedup) else None}
    return dict(figures=figs, checks=checks, null={} if ctx.cuda else {"faster_than_eager": NOT_CUDA},
                targets={"speedup": ">= 1.05 on a GPU (else compile is not worth its first-step wait)"})


LIGER_WHEELS = ROOT / "bench" / "wheels"   # carried to the device machine (it reaches no package index)
LORA_VRAM_TARGET = 0.60                     # issue 15: LoRA peak at least 40 % below today's engine


def liger_importable() -> str | None:
    """liger_kernel's version, importing it from a carried wheel (bench/wheels/liger_kernel-*.whl,
    unpacked into the scratch folder) when the image has none; None when neither is there."""
    if importlib.util.find_spec("liger_kernel") is None:
        wheels = sorted(LIGER_WHEELS.glob("liger_kernel-*.whl"))
        if not wheels:
            return None
        import zipfile
        target = _HOME / "liger"
        with zipfile.ZipFile(wheels[-1]) as whl:
            whl.extractall(target)
        sys.path.insert(0, str(target))
        importlib.invalidate_caches()
    from importlib import metadata
    try:
        version = metadata.version("liger-kernel")
    except metadata.PackageNotFoundError:
        version = "unknown"
    try:   # it refuses an older transformers, or a Triton that does not match torch, at import
        importlib.import_module("liger_kernel.transformers.monkey_patch")
    except Exception as exc:
        return f"{version} (does not load: {first_line(exc)})"
    return version


def s9_liger(ctx: Ctx) -> dict[str, Any]:
    """JobSpec.fused_kernels (Liger; training_core/fused_kernels.py): section 1's run and the 1 B LoRA
    finetune, each without and then with the kernels. Tokens/s, training peak VRAM, losses alike. Liger
    patches transformers' llama module for the rest of the process: the section puts its names (and
    torch's cross-entropy) back at its end, so the sections after it train unfused."""
    from transformers.models.llama import modeling_llama

    from training_core.fused_kernels import patch_undoer
    undo = patch_undoer(modeling_llama)
    try:
        return _s9_liger(ctx)
    finally:
        undo()


def _s9_liger(ctx: Ctx) -> dict[str, Any]:
    c = ctx.cfg["s9"]
    version = liger_importable()
    figs: dict[str, Any] = {"preset": c["preset"], "liger_kernel": version}
    runs: dict[str, Run] = {}
    folder = ctx.big_model()
    plans = [("base", dict(model=f"scratch:{c['preset']}", steps=c["steps"], batch_size=c["batch"], lr=6e-4)),
             ("lora", dict(model=str(folder), method="lora", steps=c["lora_steps"], batch_size=c["lora_batch"],
                           lr=2e-4, tokenizer="auto"))]
    for fused in (False, True):
        for what, kw in plans:
            key = f"{what}_{'fused' if fused else 'plain'}"
            runs[key] = run = Run(ctx, ctx.spec(f"liger-{key}", seq_len=c["seq"], precision="bf16",
                                                fused_kernels=fused, **kw), keep_engine=True)
            train_peak = run.train_peak_reserved + max(0, run.context or 0) if run.train_peak_reserved else None
            figs[key] = run.basics() | run.memory_figures() | {
                "train_peak_gb": gb(train_peak),     # eval builds the whole logits, fused or not: left out
                "first_step_loss": run.steps[0]["loss"] if run.steps else None,
                "final_eval_loss": run.result.final_eval_loss,
                "fused": bool(getattr(run.engine, "fused", False)),
                "warnings": [e["message"] for e in run.events if e["type"] == "warning"
                             and e.get("code") == "fused_kernels"]}
            run.engine = None
            free_memory()
    checks: dict[str, bool | None] = {}
    for what, _ in plans:
        plain, fused = figs[f"{what}_plain"], figs[f"{what}_fused"]
        checks[f"{what}_fused_used"] = fused["fused"] if ctx.cuda else None
        checks[f"{what}_finite_loss"] = runs[f"{what}_fused"].finite()
        if ctx.cuda and plain["tokens_per_s"] and fused["tokens_per_s"]:
            figs[f"{what}_speedup"] = round(fused["tokens_per_s"] / plain["tokens_per_s"], 3)
            if fused["train_peak_gb"] and plain["train_peak_gb"]:
                figs[f"{what}_peak_ratio"] = round(fused["train_peak_gb"] / plain["train_peak_gb"], 3)
        # Same seed and data: the first step's loss (the same forward) and the final eval loss (the same
        # training) within 2 % (bf16 kernels round differently). Not the last step event's loss: that is a
        # mean since the event before, and events fall on other steps when the speeds differ.
        for loss in ("first_step_loss", "final_eval_loss"):
            if plain[loss] is not None and fused[loss] is not None:
                checks[f"{what}_same_{loss}"] = abs(fused[loss] - plain[loss]) <= 0.02 * plain[loss]
    if ctx.cuda and "lora_peak_ratio" in figs:
        checks["lora_peak_40pct_lower"] = figs["lora_peak_ratio"] <= LORA_VRAM_TARGET
    if ctx.cuda and "base_speedup" in figs:
        checks["base_faster"] = figs["base_speedup"] >= 1.0
    null = {} if ctx.cuda else {"fused": NOT_CUDA + ": the kernels need an NVIDIA GPU"}
    if ctx.cuda and version is None:
        null["liger_kernel"] = f"not installed on this image and no wheel in {LIGER_WHEELS}"
    return dict(figures=figs, checks=checks, null=null,
                targets={"lora_peak_ratio": f"<= {LORA_VRAM_TARGET} (issue 15: LoRA VRAM -40 %)",
                         "base_speedup": ">= 1.0",
                         "same_first_step_loss, same_final_eval_loss": "within 2 %"})


DEFAULT_ORDER = "1,3,9,4,8,2,6,7,5"
SECTIONS: dict[int, tuple[str, Callable[[Ctx], dict[str, Any]]]] = {
    1: ("base_bf16", s1_base_bf16), 2: ("precisions", s2_precisions), 3: ("lora_1b", s3_lora_1b),
    4: ("pause_handback", s4_pause_handback), 5: ("real_oom", s5_real_oom), 6: ("packed_sdpa", s6_packed_sdpa),
    7: ("fused_adamw", s7_fused_adamw), 8: ("compile", s8_compile), 9: ("liger", s9_liger),
}


def hardware_line(ctx: Ctx) -> dict[str, Any]:
    out: dict[str, Any] = {"check": "hardware", "smoke": ctx.smoke, "device": ctx.device, "torch": torch.__version__,
                           "python": sys.version.split()[0]}
    try:
        import transformers
        out["transformers"] = transformers.__version__
        import peft
        out["peft"] = peft.__version__
    except Exception as exc:
        out["import_error"] = first_line(exc)
    try:
        from training_core.hardware import detect
        hw = detect()
        out.update(gpus=[g.name for g in hw.gpus], driver=hw.driver_version, cuda=hw.cuda_driver_version)
    except Exception as exc:
        out["detect_error"] = first_line(exc)
    if ctx.cuda:
        try:
            props = torch.cuda.get_device_properties(0)
            out.update(gpu=props.name, memory_gb=gb(props.total_memory), sms=props.multi_processor_count)
            a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
            b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
            for _ in range(3):
                a @ b
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(10):
                a @ b
            torch.cuda.synchronize()
            out["bf16_matmul_tflops"] = round(10 * 2 * 8192 ** 3 / (time.perf_counter() - t0) / 1e12, 1)
            del a, b
            free_memory()
        except Exception as exc:
            out["matmul_error"] = first_line(exc)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny presets, a handful of steps: checks the logic")
    ap.add_argument("--sections", default=DEFAULT_ORDER,
                    help=f"comma-separated section numbers, run in that order (default all: {DEFAULT_ORDER}, "
                         "issue 15's targets first, as the budget may skip the last)")
    ap.add_argument("--steps", type=int, default=None, help="section 1's steps (default 300; smoke 6)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="skip the sections left once this many seconds have passed (default 480; none in smoke)")
    args = ap.parse_args()
    try:
        wanted = [int(s) for s in args.sections.split(",") if s.strip()]
    except ValueError:
        ap.error("--sections takes numbers, e.g. 1,3")
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {unknown}; there are {sorted(SECTIONS)}")
    if not args.smoke and not torch.cuda.is_available():
        print(json.dumps({"check": "summary", "error": "no CUDA GPU here; use --smoke on a CPU"}), flush=True)
        return 2
    budget = args.budget_s if args.budget_s is not None else (None if args.smoke else 480.0)
    t_all = time.monotonic()
    ctx = Ctx(args)
    print(json.dumps(hardware_line(ctx)), flush=True)
    summary = []
    for n in wanted:
        name, fn = SECTIONS[n]
        line: dict[str, Any] = {"section": n, "check": name}
        if budget is not None and time.monotonic() - t_all > budget:
            line.update(ok=False, passed=None, error=f"skipped: the {budget:.0f} s budget was spent")
        else:
            log(f"section {n} ({name})…")
            t0 = time.monotonic()
            try:
                res = fn(ctx)
                line.update(ok=not res.get("errors"), passed=verdict(res["checks"]), **res)
            except Exception as exc:
                traceback.print_exc(limit=-4)
                line.update(ok=False, passed=False, error=first_line(exc))
            finally:
                free_memory()
            line["elapsed_s"] = round(time.monotonic() - t0, 1)
        print(json.dumps(line, default=str), flush=True)
        summary.append({k: line.get(k) for k in ("section", "check", "ok", "passed", "elapsed_s", "error")})
    print(json.dumps({"check": "summary", "smoke": ctx.smoke, "device": ctx.device,
                      "ran_ok": sum(1 for s in summary if s["ok"]), "sections": len(summary),
                      "passed": [s["check"] for s in summary if s["passed"] is True],
                      "failed": [s["check"] for s in summary if s["passed"] is False],
                      "not_applicable": [s["check"] for s in summary if s["passed"] is None and s["ok"]],
                      "errors": {s["check"]: s["error"] for s in summary if s.get("error")} or None,
                      "total_s": round(time.monotonic() - t_all, 1)}), flush=True)
    return 0 if all(s["ok"] for s in summary) else 1


if __name__ == "__main__":
    try:
        code = main()
    finally:
        shutil.rmtree(_HOME, ignore_errors=True)   # corpus, token caches, the 1 B model folder, run folders
    sys.exit(code)
