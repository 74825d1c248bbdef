"""The job spec: everything a run needs, saved as JSON next to its checkpoints.

`JobSpec` is the one schema of a job's settings: the CLI's options (training_core/cli.py) and the
New-finetune form (app/views/new_finetune.py) are built from its fields' metadata (help, choices,
label), and `validate` holds every rule a spec must pass, for the CLI, the app's Check and the engine.
This module stays torch-free: the app imports it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
import types
import typing
from typing import Any

from .errors import ConfigError

METHODS = ("lora", "full", "qlora")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
ON_DIVERGENCE = ("stop", "lower_lr")

DEFAULT_SAMPLE_PROMPTS = ["Once upon a time", "The most important thing is"]

# Where a field is set: "job" on the CLI and in the New-finetune form; "cli" on the CLI only (the app
# sets it itself, e.g. the run folder); "internal" nowhere (ids, test hooks).
JOB, CLI_ONLY, INTERNAL = "job", "cli", "internal"


def opt(default: Any = dataclasses.MISSING, *, help: str, label: str, choices: tuple | None = None,
        scope: str = JOB, factory: Any = dataclasses.MISSING, minimum: float | None = None,
        maximum: float | None = None) -> Any:
    """A JobSpec field with what the CLI and the form show for it. `maximum`: far above any real job, so that
    a typo (or a spec file from anywhere) is one line here, not hours of estimating or a MemoryError."""
    meta = {"help": help, "label": label, "choices": choices, "scope": scope, "minimum": minimum,
            "maximum": maximum}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def internal(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING) -> Any:
    return opt(default, help="", label="", scope=INTERNAL, factory=factory)


MAX_STEPS = 10 ** 12   # a swarm peer's "until stopped" (swarm/peer.py); no run of steps gets near it


@dataclass
class JobSpec:
    model: str = opt(help="local model folder, hub id, or scratch:tiny|mini|small|base|medium", label="Model")
    data: list[str] = opt(help="files and/or folders", label="Data")
    out: str = opt(help="run folder for checkpoints, job.json and the final model", label="Run folder",
                   scope=CLI_ONLY)   # the app's store picks it
    method: str | None = opt(None, choices=METHODS, label="Method",
                             help="lora: small adapters; full: every weight; qlora: LoRA on a 4-bit base "
                                  "(NVIDIA GPU). Default: lora for a pretrained model, full from scratch")
    steps: int | None = opt(None, minimum=1, maximum=MAX_STEPS, label="Steps", help="optimizer steps (default: from --epochs)")
    epochs: float | None = opt(None, label="Epochs", help="passes over the data (default: 1 when --steps is not given)")
    batch_size: int = opt(8, minimum=1, maximum=1 << 20, label="Batch size", help="sequences per optimizer step (effective batch)")
    micro_batch_size: int | None = opt(None, minimum=1, maximum=1 << 20, label="Micro-batch",
                                       help="sequences per forward pass (default: the batch size); smaller "
                                            "uses less memory through gradient accumulation")
    seq_len: int = opt(256, minimum=1, maximum=1 << 20, label="Sequence length", help="tokens per training sequence")
    lr: float | None = opt(None, label="Learning rate", help="peak learning rate (default: 3e-4 full, 2e-4 LoRA)")
    warmup_steps: int | None = opt(None, minimum=0, maximum=10 ** 9, label="Warm-up steps",
                                   help="steps of rising learning rate (default: 5 % of the steps, at most 100)")
    weight_decay: float = opt(0.0, minimum=0, maximum=10, label="Weight decay", help="AdamW weight decay")
    max_grad_norm: float = opt(1.0, label="Gradient clipping", help="clip the gradient norm to this (0: off)")
    checkpoint_every: int | None = opt(None, minimum=1, maximum=10 ** 9, label="Checkpoint every",
                                       help="steps between checkpoints (default: by time, --checkpoint-minutes)")
    checkpoint_minutes: float = opt(10.0, label="Checkpoint minutes", scope=CLI_ONLY,   # the app: from Settings
                                    help="minutes between checkpoints when --checkpoint-every is not given")
    keep_checkpoints: int = opt(3, minimum=1, maximum=1000, label="Checkpoints kept", help="how many checkpoints to keep")
    eval_every: int | None = opt(None, minimum=1, maximum=10 ** 9, label="Evaluate every",
                                 help="steps between evaluations (default: at each checkpoint and at the end)")
    eval_fraction: float = opt(0.02, label="Held-back data", help="share of the data held back for evaluation")
    seed: int = opt(0, label="Seed", help="random seed (data order, initial weights)")
    precision: str = opt("auto", choices=PRECISIONS, label="Precision",
                         help="number format; auto: bf16 where the GPU has it, else fp16 where fast, else fp32 "
                              "(the CPU always trains in fp32)")
    gradient_checkpointing: bool | None = opt(None, label="Gradient checkpointing",
                                              help="recompute activations to save memory (default: on when the "
                                                   "estimate says it is needed)")
    compile: bool = opt(False, label="Compile (torch.compile)",
                        help="compile each transformer layer with torch.compile: faster steps on an NVIDIA GPU "
                             "of 2017 or newer, after a compile of up to a few minutes at the first step; where "
                             "it cannot compile (an older GPU, no C++ compiler for the CPU) the run goes on "
                             "uncompiled, with a warning. Little gain on the CPU")
    fused_kernels: bool = opt(False, label="Fused kernels (Liger)",
                              help="Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU, and a cross-entropy that "
                                   "never holds the whole batch's logits): less GPU memory and faster steps on an "
                                   "NVIDIA GPU of 2017 or newer with the liger-kernel package; checked on a one-layer "
                                   "copy first; elsewhere the run trains without them, with a warning")
    lora_r: int = opt(16, minimum=1, maximum=4096, label="LoRA rank", help="rank of the LoRA adapters")
    lora_alpha: int = opt(32, minimum=1, maximum=1 << 16, label="LoRA alpha", help="LoRA scaling (alpha / rank)")
    lora_dropout: float = opt(0.05, label="LoRA dropout", help="dropout on the LoRA adapters' input")
    lora_targets: str | list[str] = opt("all-linear", label="LoRA targets",
                                        help="all-linear, or the names of the layers to adapt")
    trust_remote_code: bool = opt(False, label="Trust remote code",
                                  help="run code shipped with a hub model (off by default)")
    tokenizer: str = opt("auto", label="Tokenizer",
                         help="for scratch models: auto | train | bytes | a tokenizer folder or file")
    sample_prompts: list[str] = opt(factory=lambda: list(DEFAULT_SAMPLE_PROMPTS), label="Sample prompts",
                                    help="prompts the model continues at each evaluation")
    sample_max_tokens: int = opt(40, minimum=1, maximum=4096, label="Sample length", help="tokens per sample")
    device: str = opt("auto", label="Device", help="auto | cpu | cuda | cuda:N")
    threads: int | None = opt(None, minimum=1, maximum=1024, label="CPU threads",
                              help="torch CPU threads (default on the CPU: the cores other programs leave free, "
                                   "looked at as it runs)")
    on_divergence: str = opt("stop", choices=ON_DIVERGENCE, label="If training diverges",
                             help="if the loss stops being finite: stop (the last good checkpoint is kept), or "
                                  "go back to it with a third of the learning rate (at most 3 times)")
    job_id: str = internal(factory=lambda: uuid.uuid4().hex[:12])
    test_oom_at_steps: list[int] = internal(factory=list)    # test hook: fake CUDA OOM at these steps
    test_sleep_per_step: float = internal(0.0)               # test hook: slow steps down so tests can interrupt them
    test_sleep_in_checkpoint: float = internal(0.0)          # test hook: pause halfway through checkpoint writes
    test_sleep_in_setup: float = internal(0.0)               # test hook: a slow model load, so tests can stop one
    test_nan_at_steps: list[int] = internal(factory=list)    # test hook: the loss is NaN at these steps

    def __post_init__(self) -> None:
        if isinstance(self.data, (str, Path)):
            self.data = [str(self.data)]
        self.data = [str(p) for p in self.data]
        self.out = str(self.out)
        if isinstance(self.lora_targets, list) and self.lora_targets == ["all-linear"]:
            self.lora_targets = "all-linear"
        validate(self)

    @property
    def is_scratch(self) -> bool:
        return self.model.startswith("scratch:")

    @property
    def resolved_method(self) -> str:
        return self.method or ("full" if self.is_scratch else "lora")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_absolute_paths(self, base: str | Path | None = None) -> "JobSpec":
        """The same job with its data, output, local model and tokenizer paths made absolute (against
        `base`, default the current folder), so job.json means the same from any folder."""
        base = Path(base) if base is not None else Path.cwd()

        def absolute(p: str) -> str:
            path = Path(p).expanduser()
            return os.path.abspath(path if path.is_absolute() else base / path)

        def local(p: str) -> bool:   # a hub id ("org/name") or a preset is not a path
            path = Path(p).expanduser()
            return path.is_absolute() or (base / path).exists()

        model = self.model
        if not self.is_scratch and local(model):
            model = absolute(model)
        tokenizer = self.tokenizer
        if tokenizer not in ("auto", "train", "bytes") and local(tokenizer):
            tokenizer = absolute(tokenizer)
        return dataclasses.replace(self, data=[absolute(d) for d in self.data], out=absolute(self.out),
                                   model=model, tokenizer=tokenizer)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "job spec") -> "JobSpec":
        if not isinstance(data, dict):
            raise ConfigError(where, "is not a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(where, f"unknown field(s) {', '.join(unknown)}")
        missing = [k for k in ("model", "data", "out") if k not in data]
        if missing:
            raise ConfigError(where, f"missing field(s) {', '.join(missing)}")
        hints = typing.get_type_hints(cls)
        for key, value in data.items():
            if not _fits(value, hints[key]):   # "false" for a bool is truthy: trust_remote_code must not be on by it
                raise ConfigError(where, f"{key} must be {_kind(hints[key])}, not {json.dumps(value)[:60]}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(where, str(exc)) from None

    @classmethod
    def load(cls, path: str | Path) -> "JobSpec":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(path, "no such file") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(path, f"is not valid JSON ({exc})") from None
        return cls.from_dict(data, where=str(path))

    def save(self, path: str | Path) -> None:
        from .fsutil import atomic_write_text
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2, ensure_ascii=False))


def _fits(value: Any, tp: Any) -> bool:
    """Whether a JSON value is of a JobSpec field's type (bool is no number here, an int is a float)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    return True


def _kind(tp: Any) -> str:
    """A field's type in words, for the one-line error."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_kind(a) for a in args)
    if origin is list:
        return f"a list of {_kind(args[0]).split(' ', 1)[-1]}s"
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a text",
            type(None): "null"}.get(tp, str(tp))


def flag(name: str) -> str:
    """The CLI option of a JobSpec field: `seq_len` -> `--seq-len`."""
    return "--" + name.replace("_", "-")


def options(*scopes: str) -> list[dataclasses.Field]:
    """The JobSpec fields set on the CLI (JOB, CLI_ONLY) or in the form (JOB), in declaration order."""
    return [f for f in dataclasses.fields(JobSpec) if f.metadata.get("scope") in scopes]


def default(name: str) -> Any:
    """A field's default value (None for model, data and out, which have none)."""
    f = {f.name: f for f in dataclasses.fields(JobSpec)}[name]
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def label(where: str | None) -> str | None:
    """The form's name for a field named by its CLI option (`--method` -> `Method`); else `where` itself."""
    for f in dataclasses.fields(JobSpec):
        if where == flag(f.name) and f.metadata.get("label"):
            return f.metadata["label"]
    return where


def validate(spec: JobSpec, device: str | None = None) -> None:
    """Every rule a job must pass, in one place: the CLI, the app's Check and the engine all call it
    (JobSpec() does too), so what cannot run is refused before it is queued, in words that say what to
    choose instead. `device`: where it will train ("cpu", "cuda:0"), once that is known."""
    for f in dataclasses.fields(JobSpec):
        value, meta = getattr(spec, f.name), f.metadata
        if meta.get("choices") and value is not None and value not in meta["choices"]:
            raise ConfigError(flag(f.name), f"unknown choice {value!r}; use one of {', '.join(meta['choices'])}")
        bounded = meta.get("minimum") is not None or meta.get("maximum") is not None
        if bounded and isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(flag(f.name), f"must be a finite number (got {value})")
        if meta.get("minimum") is not None and value is not None and value < meta["minimum"]:
            raise ConfigError(flag(f.name), f"must be at least {meta['minimum']}")
        if meta.get("maximum") is not None and value is not None and value > meta["maximum"]:
            raise ConfigError(flag(f.name), f"must be at most {meta['maximum']:,}")
    if spec.micro_batch_size is not None and spec.micro_batch_size > spec.batch_size:
        raise ConfigError("--micro-batch-size", "must not be more than the batch size")
    if spec.epochs is not None and not 0 < spec.epochs <= 100_000:
        raise ConfigError("--epochs", "must be more than 0 and at most 100,000")
    if spec.steps is not None and spec.epochs is not None:
        raise ConfigError("--steps", "give --steps or --epochs, not both")
    if spec.lr is not None and not (0 < spec.lr <= 10_000):   # (tests make runs diverge with 1e3)
        raise ConfigError("--lr", f"must be a finite number more than 0 and at most 10,000 (got {spec.lr})")
    if not 0 <= spec.max_grad_norm < math.inf:   # 0: no clipping (strategy.py)
        raise ConfigError("--max-grad-norm", f"must be a finite number, 0 (off) or more (got {spec.max_grad_norm})")
    if not 0 < spec.checkpoint_minutes < math.inf:
        raise ConfigError("--checkpoint-minutes", f"must be a finite number more than 0 (got {spec.checkpoint_minutes})")
    if not 0 <= spec.lora_dropout < 1:
        raise ConfigError("--lora-dropout", "must be at least 0 and below 1")
    if not 0 <= spec.eval_fraction < 0.5:
        raise ConfigError("--eval-fraction", "must be between 0 and 0.5")
    if spec.device not in ("auto", "cpu", "cuda") and not (spec.device.startswith("cuda:")
                                                           and spec.device[5:].isdigit()):
        raise ConfigError("--device", f"unknown device {spec.device!r}; use auto, cpu, cuda or cuda:N")
    # Combinations that cannot run.
    method = spec.resolved_method
    if spec.is_scratch and method != "full":
        name = {"lora": "LoRA", "qlora": "QLoRA"}[method]
        raise ConfigError("--method", f"a from-scratch model has nothing to adapt ({name} trains adapters on "
                                      "a pretrained model); choose Full, or a pretrained model")
    if device == "cpu" and spec.device.startswith("cuda"):   # the engine would refuse the device itself
        raise ConfigError("--device", f"{spec.device} was asked for, but no NVIDIA GPU is usable here; "
                                      "choose auto or cpu")
    where = device or spec.device
    if method == "qlora" and where == "cpu":
        raise ConfigError("--method", "QLoRA needs an NVIDIA GPU and this job would train on the CPU; "
                                      "choose LoRA (or Full)")
    if method == "qlora" and device is not None and not bitsandbytes_installed():
        raise ConfigError("--method", "QLoRA needs the bitsandbytes package, which is not installed here; "
                                      "choose LoRA (or install bitsandbytes)")


def bitsandbytes_installed() -> bool:
    """Whether QLoRA's 4-bit library can be imported (looked up, not imported: no torch here)."""
    import importlib.util
    return importlib.util.find_spec("bitsandbytes") is not None
