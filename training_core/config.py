"""The job spec: everything a run needs, saved as JSON next to its checkpoints."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

METHODS = ("lora", "full", "qlora")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
ON_DIVERGENCE = ("stop", "lower_lr")

DEFAULT_SAMPLE_PROMPTS = ["Once upon a time", "The most important thing is"]


@dataclass
class JobSpec:
    model: str                              # local folder, hub id, or "scratch:NAME"
    data: list[str]                         # files and/or folders
    out: str                                # run directory (checkpoints, job.json, export)
    method: str | None = None               # None: lora for pretrained, full from scratch
    steps: int | None = None                # optimizer steps; None: derived from epochs
    epochs: float | None = None             # None and steps None: 1 epoch
    batch_size: int = 8                     # sequences per optimizer step (effective batch)
    micro_batch_size: int | None = None     # per forward pass; None: = batch_size
    seq_len: int = 256
    lr: float | None = None                 # None: 3e-4 full/scratch, 2e-4 LoRA
    warmup_steps: int | None = None         # None: 5 % of steps, at most 100
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    checkpoint_every: int | None = None     # steps; None: every checkpoint_minutes
    checkpoint_minutes: float = 10.0
    keep_checkpoints: int = 3
    eval_every: int | None = None           # steps; None: at each checkpoint and at the end
    eval_fraction: float = 0.02
    seed: int = 0
    precision: str = "auto"
    gradient_checkpointing: bool | None = None   # None: on when the estimate says it is needed
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: str | list[str] = "all-linear"
    trust_remote_code: bool = False
    tokenizer: str = "auto"                 # auto | train | bytes | path to a tokenizer folder/file
    sample_prompts: list[str] = field(default_factory=lambda: list(DEFAULT_SAMPLE_PROMPTS))
    sample_max_tokens: int = 40
    device: str = "auto"                    # auto | cpu | cuda | cuda:N
    threads: int | None = None              # torch CPU threads; None: torch's default
    on_divergence: str = "stop"             # loss not finite: "stop" (exit 2, last good checkpoint kept) or
                                            # "lower_lr" (back to the last good checkpoint, a third of the LR)
    job_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    test_oom_at_steps: list[int] = field(default_factory=list)  # test hook: fake CUDA OOM at these steps
    test_sleep_per_step: float = 0.0        # test hook: slow steps down so tests can interrupt them
    test_sleep_in_checkpoint: float = 0.0   # test hook: pause halfway through checkpoint writes and deletions
    test_sleep_in_setup: float = 0.0        # test hook: a slow model load, so tests can stop one
    test_nan_at_steps: list[int] = field(default_factory=list)  # test hook: the loss is NaN at these steps

    def __post_init__(self) -> None:
        if isinstance(self.data, (str, Path)):
            self.data = [str(self.data)]
        self.data = [str(p) for p in self.data]
        self.out = str(self.out)
        if self.method is not None and self.method not in METHODS:
            raise ConfigError("--method", f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.precision not in PRECISIONS:
            raise ConfigError("--precision", f"unknown precision {self.precision!r}; use one of {', '.join(PRECISIONS)}")
        for name in ("batch_size", "seq_len", "keep_checkpoints", "sample_max_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}", "must be at least 1")
        if self.micro_batch_size is not None and not 1 <= self.micro_batch_size <= self.batch_size:
            raise ConfigError("--micro-batch-size", "must be between 1 and the batch size")
        if self.steps is not None and self.steps < 1:
            raise ConfigError("--steps", "must be at least 1")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError("--epochs", "must be more than 0")
        if self.steps is not None and self.epochs is not None:
            raise ConfigError("--steps", "give --steps or --epochs, not both")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ConfigError("--checkpoint-every", "must be at least 1")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError("--lr", f"must be a finite number more than 0 (got {self.lr})")
        if self.on_divergence not in ON_DIVERGENCE:
            raise ConfigError("--on-divergence", f"unknown choice {self.on_divergence!r}; use one of "
                                                 f"{', '.join(ON_DIVERGENCE)}")
        if not 0 <= self.eval_fraction < 0.5:
            raise ConfigError("--eval-fraction", "must be between 0 and 0.5")

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
