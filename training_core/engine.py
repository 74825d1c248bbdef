"""The training loop shared by local finetunes and swarm contribution.

`Engine(spec, emit, controls, strategy=...).run()` sets up in steps (device, restore, model, data,
pre-flight, optimizer), then runs one loop, emitting protocol events through `emit`. What differs
between a local run and a swarm peer (the optimizer step, the schedule, pause, what a checkpoint
holds) is a strategy object (training_core/strategy.py); data order, checkpoints, pause, OOM
recovery and events are this same code for both.
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import psutil
import torch

from . import checkpoint as ckpt_io
from . import hardware, preflight
from .config import JobSpec, validate
from .controls import Controls, StopRequested
from .errors import (CheckpointError, ConfigError, DiskError, DivergedError, WontFitError, exception_line,
                     user_error_from)
from .protocol import make_event
from .strategy import LocalStrategy

Emit = Callable[[dict], None]

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
MAX_EVAL_BLOCKS = 64          # eval cost stays bounded on big eval splits
EMIT_INTERVAL_S = 0.25        # step events at most 4 per second (plus first and last)
LR_RETRY_FACTOR = 3.0         # on_divergence="lower_lr": each retry divides the learning rate by this
MAX_LR_RETRIES = 3


class StopRun(Exception):
    """Raised inside the loop when a `stop` control was obeyed."""


@dataclass
class RunResult:
    status: str                # "finished" | "stopped"
    step: int
    checkpoint: str | None
    final_loss: float | None
    final_eval_loss: float | None


def _oom_errors() -> tuple[type[BaseException], ...]:
    return (torch.OutOfMemoryError,)


class Engine:
    def __init__(self, spec: JobSpec, emit: Emit, controls: Controls | None = None, resume: bool = False,
                 strategy: LocalStrategy | None = None):
        self.spec = spec = spec.with_absolute_paths()   # job.json means the same from any folder
        self.strategy = strategy or LocalStrategy()
        self.emit_event = emit
        self.controls = controls or Controls()
        self.resume = resume
        self.run_dir = Path(spec.out)
        self.step = 0
        self.tokens_seen = 0
        self.elapsed_before = 0.0     # training seconds from earlier sessions of this run
        self.last_loss: float | None = None
        self.last_eval: dict[str, Any] = {}
        self.paused = False
        self._pause_began: float | None = None   # monotonic time the pause in progress began
        self.compute_s = 0.0           # seconds in forward, backward and optimizer steps, this session
        self.compiled = False          # the layers run through torch.compile (JobSpec.compile)
        self.fused = False             # Liger's kernels are in the model (JobSpec.fused_kernels)
        self._fake_oom_done: set[int] = set()
        self._fake_nan_done: set[int] = set()
        self._lr_retries = 0
        self._run_dir_lock = None
        self._saved: tuple[int, Path] | None = None   # (step, folder) of the checkpoint this session wrote last
        self._phase: tuple[str, str] | None = None   # the (phase, message) last sent
        self._phase_done: int | None = None           # and its progress
        self._phase_sent = 0.0                        # when (monotonic), for progress at most 4 a second

    # ---- events ---------------------------------------------------------------------------
    def emit(self, type_: str, **fields: Any) -> None:
        self.strategy.event_fields(type_, fields)
        self.emit_event(make_event(type_, **fields))

    def warn(self, code: str, message: str) -> None:
        self.emit("warning", code=code, message=message)

    def phase(self, name: str, message: str, done: int | None = None, total: int | None = None,
              unit: str | None = None) -> None:
        """Say what the run is doing (a `phase` event) when that changes, and its progress at most every
        EMIT_INTERVAL_S (plus the end). In set-up each call is also where a stop is obeyed."""
        self.controls.check()
        now = time.monotonic()
        recent = now - self._phase_sent < EMIT_INTERVAL_S
        if (name, message) == self._phase and (done == self._phase_done or (done != total and recent)):
            return
        if name == "training" and recent and self._phase[0] != "first_step":
            return   # back to training after a quick eval: sent on a later step, so frequent evals don't flood
        self._phase, self._phase_done, self._phase_sent = (name, message), done, now
        extra = {k: v for k, v in (("done", done), ("total", total), ("unit", unit)) if v is not None}
        self.emit("phase", phase=name, message=message, **extra)

    # ---- set-up ---------------------------------------------------------------------------
    def _pick_device(self, hw: hardware.HardwareReport) -> tuple[torch.device, Any]:
        want = self.spec.device
        if want == "cpu":
            return torch.device("cpu"), None
        if torch.cuda.is_available():
            idx = int(want.split(":", 1)[1]) if want.startswith("cuda:") else torch.cuda.current_device()
            if idx >= torch.cuda.device_count():
                raise ConfigError("--device", f"there is no GPU number {idx} (found {torch.cuda.device_count()})")
            gpu = hardware.gpu_for_torch_device(hw, idx)
            return torch.device("cuda", idx), gpu
        if want.startswith("cuda"):
            raise ConfigError("--device", "no CUDA GPU is usable here: " + "; ".join(hw.messages or [hw.nvml]))
        return torch.device("cpu"), None

    def _setup(self) -> None:
        """Set up, then say so (`started`). A local run sets up in a helper thread while this one waits
        (Controls.run_setup), so a stop (SIGTERM, the `stop` control) ends set-up at once however long a
        library call takes; a swarm peer's set-up (its network) stays in this thread."""
        if self.spec.threads:   # per thread (OpenMP): here, where the loop runs, and in set-up's own thread
            torch.set_num_threads(self.spec.threads)
        if self.strategy.name == "local":
            base_source, gc_on = self.controls.run_setup(self._set_up)
        else:
            base_source, gc_on = self._set_up()
        self.emit("started", job_id=self.spec.job_id, run_dir=str(self.run_dir), device=str(self.device),
                  precision=self.precision, method=self.method, model=self.spec.model, base_source=base_source,
                  params_total=self.params_total, params_trainable=self.params_trainable,
                  total_steps=self.total_steps, resumed_from=self.step if self.resume_ckpt else None,
                  micro_batch=self.micro_batch, batch_size=self.spec.batch_size, seq_len=self.spec.seq_len,
                  train_blocks=self.data.num_train, eval_blocks=self.data.num_eval,
                  gradient_checkpointing=gc_on, pid=os.getpid())
        self.strategy.started(self)

    def _set_up(self) -> tuple[str, bool]:
        """The set-up steps, in order; each reads what the ones before it left on self. Returns where the
        weights came from and whether gradient checkpointing is on."""
        self._prepare()
        state = self._restore()
        base_source = self._load_model()
        self._check_positions()
        self._load_data(state)
        gc_on = self._preflight()
        self._place_model(gc_on)
        self._make_optimizer(state)
        return base_source, gc_on

    def _prepare(self) -> None:
        """Threads, the method, the run folder, the device and the precision."""
        spec = self.spec
        self.phase("loading_model", "Preparing the run folder and the device…")
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()   # our events are the progress; keep stderr readable
        if spec.threads:
            torch.set_num_threads(spec.threads)
        self._claim_run_dir()
        hw = hardware.detect(include_torch=True, exclude_pids={os.getpid()})
        self.device, gpu = self._pick_device(hw)
        validate(spec, device=self.device.type)   # the rules Check applied, now that the device is known
        if self.device.type == "cpu":
            self.precision = "fp32"
            if spec.precision not in ("auto", "fp32"):
                self.warn("precision", f"{spec.precision} was asked for, but training runs on the CPU in fp32")
        else:
            self.precision = hardware.choose_precision(gpu, spec.precision)
            note = hardware.precision_note(gpu, spec.precision, self.precision)
            if note:
                self.warn("precision", note)
        self.method = spec.resolved_method

    def _claim_run_dir(self) -> None:
        """Make the run folder and hold it for this job alone: a folder whose job.json or checkpoints
        belong to another job is refused (a job never continues another's weights), and so is one that
        another process trains in. Debris of killed saves is cleared; job.json is written at once, so
        even a run stopped before its first checkpoint can be resumed."""
        run_dir, spec = self.run_dir, self.spec
        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError(run_dir, "is a file, not a folder; choose a new or empty folder for the run")
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            err = user_error_from(exc)
            if err is None:
                raise
            raise DiskError(run_dir, f"cannot hold the run: {err.problem}") from None
        self._run_dir_lock = _lock_folder(run_dir)
        owner = _job_id_in(run_dir / "job.json")
        newest = ckpt_io.latest(run_dir)
        if owner is None and newest is not None:
            owner = ckpt_io.job_id_of(newest)
        if owner is not None and owner != spec.job_id and (self.resume or ckpt_io.list_checkpoints(run_dir)):
            raise ConfigError(run_dir, f"belongs to another job (job id {owner}, this job is {spec.job_id}); "
                                       "a run folder holds one job's checkpoints: choose another folder")
        removed = ckpt_io.clean_debris(run_dir)
        if removed:
            self.warn("debris", f"{ckpt_io.checkpoints_dir(run_dir)}: removed {len(removed)} unfinished "
                                "checkpoint folder(s) left by an earlier session")
        spec.save(run_dir / "job.json")

    def _restore(self) -> dict[str, Any] | None:
        """The latest whole checkpoint (found through its manifest) and its trainer state, when resuming."""
        self.resume_ckpt = None
        if self.resume:
            self.resume_ckpt, damaged = ckpt_io.latest_good(self.run_dir)
            for path, trouble in damaged:
                self.warn("damaged_checkpoint", f"{path}: {trouble}; skipped")
        if self.resume_ckpt is not None and ckpt_io.job_id_of(self.resume_ckpt) not in (None, self.spec.job_id):
            raise ConfigError(self.resume_ckpt, "was written by another job; a run continues only its own "
                                                "checkpoints: choose another folder")
        if self.resume and self.resume_ckpt is None:
            self.warn("no_checkpoint", f"{self.run_dir}: no checkpoint yet, starting from the beginning")
        return ckpt_io.read_trainer_state(self.resume_ckpt) if self.resume_ckpt else None

    def _load_model(self) -> str:
        """Model, tokenizer and licence; returns where the weights came from."""
        self.phase("loading_model", "Loading the model libraries…")   # seconds of imports on a first run
        from . import data as data_mod
        from .licence import read_licence, scratch_licence
        from .models import load_base
        from .models.tokenizer import load_tokenizer

        spec = self.spec
        # Half-precision base weights only where they stay frozen (LoRA).
        load_dtype = HALF.get(self.precision, torch.float32) if self.method in ("lora", "qlora") else torch.float32
        texts = lambda: data_mod.iter_texts(spec.data)  # noqa: E731 - only read when a tokenizer is trained
        model_dir = None
        if spec.test_sleep_in_setup:
            time.sleep(spec.test_sleep_in_setup)
        if self.resume_ckpt is not None and self.method == "full":
            from transformers import AutoModelForCausalLM
            self.phase("loading_model", f"Loading the model from checkpoint {self.resume_ckpt.name}…")
            from .models.loading import check_loadable
            check_loadable(self.resume_ckpt / "model")
            self._refuse_if_cannot_fit(ckpt_io.read_json(self.resume_ckpt / "model", "config.json"),
                                       self.resume_ckpt / "model" / "config.json")
            try:
                self.model = AutoModelForCausalLM.from_pretrained(self.resume_ckpt / "model", use_safetensors=True,
                                                                  dtype=torch.float32)
            except Exception as exc:   # transformers' own validation of a config it builds nothing from
                raise CheckpointError(self.resume_ckpt / "model", f"cannot be loaded ({exception_line(exc)})") \
                    from None
            self.tokenizer = load_tokenizer(self.resume_ckpt / "tokenizer")
            base_source = "checkpoint"
        else:
            loaded = load_base(spec, texts=texts, dtype=load_dtype, check_config=self._refuse_if_cannot_fit,
                               phase=self.phase)
            self.model, self.tokenizer, model_dir, base_source = (loaded.model, loaded.tokenizer, loaded.model_dir,
                                                                  loaded.source)
        if spec.is_scratch:
            self.licence = scratch_licence(spec.model.split(":", 1)[1])
        elif self.resume_ckpt is not None:
            self.licence = _licence_from_dict(ckpt_io.read_json(self.resume_ckpt, "licence.json"))
        else:
            self.licence = read_licence(model_dir, spec.model)
        return base_source

    def _check_positions(self) -> None:
        """--seq-len past the positions a pretrained model knows: refused where each position is a learned
        embedding (there is none past the last), else a warning (rotary positions extend, but the model
        never saw texts that long)."""
        config, seq_len = self.model.config, self.spec.seq_len
        positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if self.spec.is_scratch or not isinstance(positions, int) or seq_len <= positions:
            return
        if getattr(config, "model_type", None) in preflight.LEARNED_POSITIONS:
            raise ConfigError("--seq-len", f"{seq_len} is longer than this model's {positions} positions (it has "
                                           f"one learned embedding per position); choose at most {positions}")
        self.warn("seq_len", f"--seq-len {seq_len} is longer than the {positions} positions this model was trained "
                             f"for; it usually trains worse on texts longer than it knows (choose at most {positions})")

    def _refuse_if_cannot_fit(self, config: Any, where: Path) -> None:
        """Before any weight is allocated: a model whose weights alone exceed all the memory here is
        refused in one line (allocating it would thrash, then fail minutes later)."""
        gpu = self.device.type == "cuda"
        limit, where_memory = preflight.memory_limit(
            gpu_name=torch.cuda.get_device_name(self.device) if gpu else None,
            gpu_total=torch.cuda.get_device_properties(self.device).total_memory if gpu else None,
            method=self.method)
        problem = preflight.cannot_fit(config, method=self.method, precision=self.precision, limit=limit,
                                       where_memory=where_memory, gpu=self.device.type == "cuda")
        if problem:
            raise WontFitError(where, problem)

    def _load_data(self, state: dict[str, Any] | None) -> None:
        """The dataset (validated and tokenized before anything heavy lands on the GPU), the step count."""
        from . import data as data_mod
        spec = self.spec

        def progress(done: int, total: int) -> None:
            self.phase("tokenizing", "Tokenizing the data…", done, total, "bytes")
        self.data = data_mod.build_dataset(spec.data, self.tokenizer, spec.seq_len, eval_fraction=spec.eval_fraction,
                                           seed=spec.seed, progress=progress)
        for w in self.data.warnings:
            self.warn("data", w)
        if state and state.get("data_fingerprint") not in (None, self.data.fingerprint):
            self.warn("data_changed", "the dataset changed since the checkpoint; the data order will differ")
        if state:
            self.total_steps = int(state["total_steps"])
        elif spec.steps:
            self.total_steps = spec.steps
        else:
            epochs = spec.epochs or 1.0
            self.total_steps = max(1, math.ceil(epochs * self.data.num_train / spec.batch_size))
        self.micro_batch = int(state["micro_batch"]) if state else (spec.micro_batch_size or spec.batch_size)

    def _preflight(self) -> bool:
        """Memory, disk and licence verdicts before the first step; returns gradient checkpointing on/off."""
        spec = self.spec
        if self.device.type == "cuda":
            available = torch.cuda.mem_get_info(self.device)[0]
        else:
            available = psutil.virtual_memory().available + psutil.Process().memory_info().rss
        fused_loss = False
        if spec.fused_kernels:
            from .fused_kernels import fused_loss_expected
            fused_loss = fused_loss_expected(spec, self.method, self.device, self.model)
        # The very figures Check showed (training_core/plan.py calls the same function).
        fig = preflight.figures(spec, self.model.config, params_total=sum(p.numel() for p in self.model.parameters()),
                                method=self.method, precision=self.precision, device=str(self.device),
                                available=available, micro_batch=self.micro_batch, fused_loss=fused_loss)
        gc_on, mem, disk_need = fig["gradient_checkpointing"], fig["memory"], fig["disk_needed"]
        disk_free = shutil.disk_usage(self.run_dir).free
        self.emit("preflight", memory=mem.to_dict(), verdict=mem.verdict, advice=mem.advice,
                  params_total=fig["params_total"], params_trainable=fig["params_trainable"],
                  disk={"needed": disk_need, "free": disk_free, "verdict": "fits" if disk_need < disk_free else "wont_fit"},
                  licence=self.licence.to_dict(), gradient_checkpointing=gc_on, precision=self.precision,
                  device=str(self.device))
        if self.licence.warning:
            self.warn("licence", self.licence.warning)
        if disk_need >= disk_free:
            self.warn("disk", f"{self.run_dir}: checkpoints need about {preflight.format_bytes(disk_need)} "
                              f"but only {preflight.format_bytes(disk_free)} is free")
        if mem.verdict == "wont_fit":
            self.warn("wont_fit", "the estimate says this will not fit: " + "; ".join(mem.advice))
        return gc_on

    def _place_model(self, gc_on: bool) -> None:
        """The finetuning method (LoRA adapters...), resumed adapter weights, then the device."""
        from .models import apply_method, count_trainable
        adapters = " with its LoRA adapters" if self.method in ("lora", "qlora") else ""
        self.phase("placing", f"Placing the model{adapters} on {self.device.type}…")
        model = apply_method(self.model, self.spec, self.method, gc_on)
        if self.resume_ckpt is not None and self.method != "full":
            ckpt_io.load_weights(model, self.resume_ckpt, self.method)
        model.to(self.device)
        model.train()
        self.model = model
        self.params_total, self.params_trainable = count_trainable(model)
        if self.spec.fused_kernels:
            self._fuse_kernels()
        if self.spec.compile:
            self._compile()

    def _fuse_kernels(self) -> None:
        """JobSpec.fused_kernels: Liger's kernels, once a one-layer probe agrees (training_core/fused_kernels.py)."""
        from . import fused_kernels
        why = fused_kernels.unsupported_reason(self.device, self.model)
        if why is None:
            self.phase("placing", "Checking Liger's fused kernels on a one-layer model…")
            failed = fused_kernels.probe(self.model, self.device, HALF.get(self.precision))
            why = f"its one-layer check failed ({failed})" if failed else None
        if why is None:
            try:
                fused_kernels.apply(self.model)
            except Exception as exc:   # the probe passed on the same code: not expected, but never fatal
                why = f"applying them failed ({exception_line(exc)})"
        if why is not None:
            self.warn("fused_kernels", f"Liger's fused kernels are not used: {why}; training goes on without them")
            return
        self.fused = True
        if fused_kernels.adapted_output_layer(self.model):
            self.warn("fused_kernels", "the output layer has a LoRA adapter, which Liger's fused cross-entropy "
                                       "would leave untrained: the loss is computed the plain way")

    def _compile(self) -> None:
        """JobSpec.compile: each transformer layer through torch.compile (training_core/compiling.py)."""
        from . import compiling
        why = compiling.unsupported_reason(self.device)
        if why is None:
            self.phase("placing", "Checking that torch.compile works here…")
            failed = compiling.probe(self.device)
            why = f"torch.compile does not work here ({failed})" if failed else None
        if why is None and compiling.compile_layers(self.model) == 0:
            why = "this model has no transformer layers torch.compile knows how to find"
        if why is not None:
            self.warn("compile", f"not compiled: {why}; training goes on uncompiled")
            return
        self.compiled = True

    def _load_optimizer_state(self, state: dict[str, Any]) -> None:
        """The optimizer, schedule, loss scaler and RNG states of the checkpoint resumed, each checked against
        this run's own (the files may have come from anyone): one line naming the file when they do not fit."""
        from safetensors import SafetensorError
        ckpt = self.resume_ckpt
        where = ckpt / "trainer_state.json"
        if not ckpt_io.same_shape(state["scheduler"], self.scheduler.state_dict()):
            raise CheckpointError(where, "is damaged (its scheduler state does not fit this run)")
        scaler = state.get("grad_scaler") if self.scaler.is_enabled() else None
        if scaler and not ckpt_io.same_shape(scaler, self.scaler.state_dict()):
            raise CheckpointError(where, "is damaged (its loss scaler state does not fit this run)")
        try:
            ckpt_io.load_optimizer(self.strategy.checkpoint_optimizer(self), ckpt)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError, SafetensorError) as exc:
            raise CheckpointError(ckpt / "optimizer.json", f"does not fit this model's optimizer "
                                                           f"({exception_line(exc)})") from None
        self.scheduler.load_state_dict(state["scheduler"])
        if scaler:
            self.scaler.load_state_dict(scaler)
        try:
            ckpt_io.load_rng(ckpt)
        except (OSError, KeyError, TypeError, RuntimeError, SafetensorError) as exc:
            raise CheckpointError(ckpt / "rng.safetensors", f"is damaged ({exception_line(exc)})") from None

    def _make_optimizer(self, state: dict[str, Any] | None) -> None:
        """Optimizer, schedule and loss scaler from the strategy; their state when resuming."""
        spec = self.spec
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        lr = spec.lr or (2e-4 if self.method in ("lora", "qlora") else 3e-4)
        self.optimizer = self.strategy.make_optimizer(self, trainable, lr)
        self.scheduler = self.strategy.make_scheduler(self)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        if self.resume_ckpt is not None:
            self._load_optimizer_state(state)
            self.step = int(state["step"])
            self.tokens_seen = int(state.get("tokens_seen", 0))
            self.elapsed_before = float(state.get("elapsed_s", 0.0))
            self.last_loss = state.get("last_loss")
            self.last_eval = ckpt_io.read_json(self.resume_ckpt, "eval.json")
            self._change_lr(lr)
        else:
            torch.manual_seed(spec.seed)
            spec.save(self.run_dir / "job.json")

    def _change_lr(self, lr: float) -> None:
        """Resuming with another peak learning rate than the checkpoint's (`resume --lr`, or lowered
        after the loss diverged): rescale the schedule, so it goes on from here at the new height."""
        base = getattr(self.scheduler, "base_lrs", None)
        if not base or math.isclose(base[0], lr, rel_tol=1e-9):
            return
        factor = lr / base[0]
        self.scheduler.base_lrs = [b * factor for b in base]
        for group in self.optimizer.param_groups:
            group["lr"] *= factor
            if "initial_lr" in group:
                group["initial_lr"] *= factor
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        self.warn("lr_changed", f"learning rate {base[0]:.3g} -> {lr:.3g} from step {self.step}")

    def peak_lr(self) -> float:
        return self.spec.lr or (2e-4 if self.method in ("lora", "qlora") else 3e-4)

    # ---- one step -------------------------------------------------------------------------
    def batch_indices(self, step: int) -> np.ndarray:
        """Train block indices for optimizer step `step`: a pure function of (seed, step)."""
        bs, n = self.spec.batch_size, self.data.num_train
        start = (step + self.strategy.data_offset(self)) * bs
        out = []
        while len(out) < bs:
            epoch, pos = divmod(start + len(out), n)
            order = self._epoch_order(epoch)
            out.extend(order[pos:pos + bs - len(out)].tolist())
        return np.asarray(out, dtype=np.int64)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if getattr(self, "_order_epoch", None) != epoch:
            self._order, self._order_epoch = self.data.epoch_order(epoch), epoch
        return self._order

    def _autocast(self):
        if self.precision in HALF:
            return torch.autocast(self.device.type, dtype=HALF[self.precision])
        return torch.autocast(self.device.type, enabled=False)

    def _forward_backward(self, batch: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Forward and backward over the whole batch in micro-batches; returns the mean loss (a tensor).
        `positions`: the blocks' position ids, restarting at each document (None: no document starts
        inside a block); with them attention stays within each document (data/packed.py)."""
        from .data.packed import packed_inputs
        total = batch.shape[0]
        loss_sum = torch.zeros((), device=self.device)
        for start in range(0, total, self.micro_batch):
            chunk = batch[start:start + self.micro_batch]
            pos = positions[start:start + self.micro_batch] if positions is not None else None
            if self.step in self.spec.test_oom_at_steps and self.step not in self._fake_oom_done:
                self._fake_oom_done.add(self.step)
                raise torch.OutOfMemoryError("CUDA out of memory (test hook)")
            with self._autocast():
                loss = self.model(**packed_inputs(chunk, pos)).loss
            if self.step in self.spec.test_nan_at_steps and self.step not in self._fake_nan_done:
                self._fake_nan_done.add(self.step)
                loss = loss * float("nan")
            weight = chunk.shape[0] / total
            self.scaler.scale(loss * weight).backward()
            loss_sum += loss.detach().float() * weight
        return loss_sum

    def _recover_from_oom(self, error: str) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self.micro_batch <= 1:
            raise WontFitError("model", "ran out of GPU memory even with a micro-batch of 1; try --method lora "
                                        "or qlora, a shorter --seq-len, or a smaller model")
        old = self.micro_batch
        self.micro_batch = max(1, old // 2)
        accum = math.ceil(self.spec.batch_size / self.micro_batch)
        self.emit("oom_recovered", step=self.step, old_micro_batch=old, new_micro_batch=self.micro_batch,
                  grad_accum=accum, message=f"Out of GPU memory: micro-batch {old} -> {self.micro_batch}, "
                                            f"{accum} accumulation steps keep the batch at {self.spec.batch_size}")

    def _positions_on_device(self, positions: np.ndarray) -> torch.Tensor | None:
        """Position ids for the model, or None where no document starts inside a block (decided here, on
        the host: no device sync)."""
        from .data.packed import has_documents
        if not has_documents(positions):
            return None
        return torch.from_numpy(positions).to(self.device, non_blocking=True)

    def train_step(self) -> torch.Tensor:
        idx = self.batch_indices(self.step)
        batch = torch.from_numpy(self.data.train_batch(idx))
        batch = batch.to(self.device, non_blocking=True)
        positions = self._positions_on_device(self.data.train_positions(idx))
        t0 = time.monotonic()
        while True:
            try:
                loss = self._forward_backward(batch, positions)
                break
            except _oom_errors() as exc:
                # Recover outside the except block: its traceback pins the failed step's tensors.
                oom_message = str(exc).splitlines()[0]
            self._recover_from_oom(oom_message)
        self.strategy.optimizer_step(self)
        self.compute_s += time.monotonic() - t0   # a strategy that waits on the network says so itself
        self.step += 1
        self.tokens_seen += batch.numel()
        if self.spec.test_sleep_per_step:
            time.sleep(self.spec.test_sleep_per_step)
        return loss

    # ---- eval, samples, checkpoints -------------------------------------------------------
    def evaluate(self) -> dict[str, Any]:
        with self._eager():
            return self._evaluate()

    @torch.no_grad()
    def _evaluate(self) -> dict[str, Any]:
        n = min(self.data.num_eval, MAX_EVAL_BLOCKS)
        if n == 0:
            return {"eval_loss": None, "perplexity": None}
        self.phase("evaluating", f"Evaluating on {n} held-out blocks…")
        from .data.packed import packed_inputs
        self.model.eval()
        total = 0.0
        for start in range(0, n, self.micro_batch):
            idx = list(range(start, min(n, start + self.micro_batch)))
            batch = torch.from_numpy(self.data.eval_batch(idx)).to(self.device)
            positions = self._positions_on_device(self.data.eval_positions(idx))
            with self._autocast():
                total += self.model(**packed_inputs(batch, positions)).loss.float().item() * len(idx)
        self.model.train()
        loss = total / n
        result = {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}
        self.emit("eval", step=self.step, **result)
        return result

    def _check_compiled(self) -> None:
        from . import compiling
        if compiling.compiled_graphs() == 0:   # every frame fell back to eager (compiling.compile_layers)
            self.compiled = False
            self.warn("compile", "torch.compile could not compile this model here (the reason is in worker.log); "
                                 "training goes on uncompiled")

    def samples(self) -> list[dict[str, str]]:
        with self._eager():   # generation grows its input a token at a time: a recompile for each length
            return self._samples()

    def _eager(self):
        """Compiled layers run their eager code in here: evaluation and sampling, a small share of a run's
        time, are not worth a compile each (eval's graph differs from training's; a first one took 6 s
        on the CPU, counted in the next step event's speed)."""
        if not self.compiled:
            return contextlib.nullcontext()
        from .compiling import eager
        return eager()

    @torch.no_grad()
    def _samples(self) -> list[dict[str, str]]:
        out = []
        self.model.eval()
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        from transformers import LogitsProcessorList

        from .whole_chars import WholeChars, decode
        whole = LogitsProcessorList([WholeChars(self.tokenizer)])   # no half characters in a sample
        # Sampling must not move the training RNG, or a resumed run would diverge.
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.spec.seed)
            for prompt in self.spec.sample_prompts:
                enc = self.tokenizer(prompt, return_tensors="pt").to(self.device)
                with self._autocast():
                    ids = self.model.generate(**enc, max_new_tokens=self.spec.sample_max_tokens, do_sample=True,
                                              top_k=40, temperature=0.8, pad_token_id=self.tokenizer.pad_token_id,
                                              logits_processor=whole)
                text = decode(self.tokenizer, ids[0][enc["input_ids"].shape[1]:].tolist())
                out.append({"prompt": prompt, "text": text})
                self.emit("sample", step=self.step, prompt=prompt, text=text)
        self.model.train()
        return out

    def trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step, "total_steps": self.total_steps,
            "epoch": self.step * self.spec.batch_size / max(1, self.data.num_train),
            "data_position": self.step * self.spec.batch_size, "micro_batch": self.micro_batch,
            "tokens_seen": self.tokens_seen, "scheduler": self.scheduler.state_dict(),
            "grad_scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "elapsed_s": self.elapsed(), "data_fingerprint": self.data.fingerprint,
            "last_loss": self.last_loss, "precision": self.precision, "method": self.method,
            **self.strategy.trainer_state(self),
        }

    def weights_finite(self) -> bool:
        params = [p for p in self.model.parameters() if p.requires_grad]
        return not params or bool(torch.stack([torch.isfinite(p.detach()).all() for p in params]).all())

    def diverged(self, loss: float | None) -> DivergedError:
        """The error that ends a run whose loss (or weights) stopped being finite numbers."""
        lr = self.peak_lr()
        suggested = float(f"{lr / LR_RETRY_FACTOR:.2g}")
        kept = ckpt_io.latest(self.run_dir)
        kept_text = (f"the last good checkpoint (step {ckpt_io.read_manifest(kept)['step']}) is kept"
                     if kept is not None else "no checkpoint had been written yet")
        what = f"the loss became {loss}" if loss is not None else "the weights stopped being finite numbers"
        return DivergedError(self.run_dir, f"training diverged: {what} by step {self.step} with learning rate "
                                           f"{lr:.3g}; {kept_text}; continue with a lower learning rate, "
                                           f"e.g. {suggested:g}",
                             step=self.step, lr=lr, suggested_lr=suggested, checkpoint=str(kept) if kept else None)

    def save_checkpoint(self, reason: str, with_eval: bool = True) -> Path:
        again = reason in ("stop", "pause") or (reason == "requested" and self.strategy.name == "local")
        if again and self._saved and self._saved[0] == self.step and self._saved[1].is_dir():
            # Nothing trained since this session's last checkpoint (a stop, pause or request that came during
            # a periodic one): that folder is what a resume needs; writing it again costs GBs for a 1 B model.
            # (Not for a swarm's request: a peer's weights can change between steps, when a state download lands.)
            if reason == "requested":
                self.emit("checkpoint", step=self.step, path=str(self._saved[1]), reason=reason)
            return self._saved[1]
        if self.strategy.name == "local" and not self.weights_finite():
            raise self.diverged(None)   # a checkpoint to resume from must never hold NaN weights
        eval_result = self.evaluate() if with_eval else self.last_eval
        self.last_eval = eval_result
        samples = self.samples() if with_eval else []
        self.phase("checkpointing", "Writing the final checkpoint…" if reason == "final"
                   else f"Writing a checkpoint at step {self.step}…")
        path = ckpt_io.save(self.run_dir, self.step, model=self.model, tokenizer=self.tokenizer,
                            optimizer=self.strategy.checkpoint_optimizer(self), kind="lora" if self.method in ("lora", "qlora") else "full",
                            trainer_state=self.trainer_state(), job=self.spec.to_dict(),
                            licence=self.licence.to_dict(), eval_result=eval_result, samples=samples,
                            keep=self.spec.keep_checkpoints, test_sleep=self.spec.test_sleep_in_checkpoint)
        self.last_ckpt_time = time.monotonic()
        self._saved = (self.step, Path(path))
        self.emit("checkpoint", step=self.step, path=str(path), reason=reason)
        return path

    # ---- pause / resume ---------------------------------------------------------------------
    def _move_to(self, device: torch.device) -> None:
        """Model, optimizer state and the strategy's own device tensors to `device`."""
        self.model.to(device)
        for st in self.strategy.checkpoint_optimizer(self).state.values():
            for k, v in st.items():
                if torch.is_tensor(v) and k != "step":
                    st[k] = v.to(device)
        for t in self.strategy.device_tensors(self):
            t.data = t.data.to(device)

    def _release_accelerator(self) -> None:
        if self.device.type != "cuda":
            return
        self._move_to(torch.device("cpu"))
        gc.collect()
        torch.cuda.empty_cache()

    def _reclaim_accelerator(self) -> None:
        if self.device.type == "cuda":
            self._move_to(self.device)

    def vram(self) -> tuple[int, int]:
        if self.device.type != "cuda":
            return 0, 0
        return torch.cuda.memory_allocated(self.device), torch.cuda.memory_reserved(self.device)

    def pause(self) -> None:
        """Give the GPU back (checkpointing first where the strategy wants it), wait for resume or stop.
        All of it, the checkpoint and the moves off and back onto the GPU too, is left out of the
        training clock (`elapsed()`), so speed and ETA after a resume count no paused time."""
        self._pause_began = time.monotonic()
        self.paused = True
        self.strategy.pausing(self)
        self._release_accelerator()
        path = str(self.save_checkpoint("pause", with_eval=False)) if self.strategy.checkpoint_on_pause else None
        used, reserved = self.vram()
        self.emit("paused", step=self.step, vram_used=used, vram_reserved=reserved, checkpoint=path)
        while True:
            msg = self.controls.wait()
            if msg == "resume":
                break
            if msg == "stop":
                self.emit("stopped", step=self.step, checkpoint=path)
                raise StopRun
        self._reclaim_accelerator()
        self.strategy.resumed(self)
        self.paused = False
        self._paused_total += time.monotonic() - self._pause_began
        self._pause_began = None
        self.emit("resumed", step=self.step)

    def handle_controls(self) -> None:
        while (msg := self.controls.poll()) is not None:
            if msg == "pause":
                self.pause()
            elif msg == "stop":
                self.emit("stopped", step=self.step, checkpoint=self.strategy.stop_checkpoint(self))
                raise StopRun
            elif msg == "checkpoint":
                self.save_checkpoint("requested")

    def elapsed(self) -> float:
        """Training seconds of this run, earlier sessions included, pauses left out."""
        return self.elapsed_before + self._training_clock()

    def _training_clock(self) -> float:
        """Seconds since this session's training started, pauses left out: speed and ETA are measured
        on it, so the first step events after a resume do not count the pause. It stands still
        while paused."""
        now = time.monotonic()
        pausing = now - self._pause_began if self._pause_began is not None else 0.0
        return now - self._t0 - self._paused_total - pausing

    # ---- the loop -------------------------------------------------------------------------
    def run(self) -> RunResult:
        try:
            while True:
                try:
                    return self._run()
                except DivergedError as exc:
                    if not self._retry_with_lower_lr(exc):
                        raise
        except StopRequested:
            # A stop before the loop read its controls (SIGTERM while a model loads): nothing new to save.
            kept = ckpt_io.latest(self.run_dir) if self.run_dir.is_dir() else None
            step = max(self.step, ckpt_io.step_of(kept)) if kept else self.step   # where a resume goes on from
            self.emit("stopped", step=step, checkpoint=str(kept) if kept else None, run_dir=str(self.run_dir))
            return RunResult("stopped", self.step, None, self.last_loss, self.last_eval.get("eval_loss"))
        finally:
            self.strategy.close(self)   # a swarm leaves its network even when set-up failed
            if self._run_dir_lock is not None:
                self._run_dir_lock.close()
                self._run_dir_lock = None

    def _retry_with_lower_lr(self, exc: DivergedError) -> bool:
        """on_divergence="lower_lr": back to the last good checkpoint (or the start) with a third of the
        learning rate, at most MAX_LR_RETRIES times; False when the run should stop instead."""
        if (self.spec.on_divergence != "lower_lr" or self._lr_retries >= MAX_LR_RETRIES
                or self.strategy.name != "local"):
            return False
        self._lr_retries += 1
        self.spec.lr = exc.suggested_lr
        back_to = f"step {ckpt_io.read_manifest(exc.checkpoint)['step']}" if exc.checkpoint else "the start"
        self.warn("diverged", f"the loss stopped being finite at step {exc.step} with learning rate {exc.lr:.3g}; "
                              f"going back to {back_to} with learning rate {exc.suggested_lr:g} "
                              f"(retry {self._lr_retries} of {MAX_LR_RETRIES})")
        if self._run_dir_lock is not None:
            self._run_dir_lock.close()
            self._run_dir_lock = None
        for name in ("model", "optimizer", "scheduler", "scaler", "data"):
            self.__dict__.pop(name, None)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.resume, self.step, self.tokens_seen, self.elapsed_before = True, 0, 0, 0.0
        self.last_loss, self.last_eval = None, {}
        self._saved = None
        self.controls.polling = False
        return True

    def _thread_governor(self):
        """A CPU run not given --threads trains on the cores other programs leave free, looked at every
        few seconds (training_core/cpu_threads.py); a GPU run's CPU threads are mostly idle."""
        if self.device.type != "cpu" or self.spec.threads:
            return None
        from .cpu_threads import ThreadGovernor
        return ThreadGovernor(torch.get_num_threads(), torch.set_num_threads)

    def _run(self) -> RunResult:
        self._t0 = time.monotonic()
        self._paused_total, self._pause_began = 0.0, None
        self._setup()
        spec = self.spec
        self._t0 = time.monotonic()  # training time starts after set-up
        self.last_ckpt_time = time.monotonic()
        tokens_per_step = spec.batch_size * spec.seq_len
        first_step = self.step
        last_emit_t, last_emit_step = self._training_clock(), self.step
        loss_acc = torch.zeros((), device=self.device)
        step_time_ema: float | None = None
        threads = self._thread_governor()
        try:
            self.controls.polling = True   # from here a stop is obeyed between steps, after a checkpoint
            while self.step < self.total_steps:
                self.handle_controls()
                if self.step == first_step:
                    self.phase("first_step", "First step (compiling the model: up to a few minutes)…" if self.compiled
                               else "First step (slow: allocating memory, warming up kernels)…")
                loss_acc += self.train_step()
                if self.step == first_step + 1 and self.compiled:
                    self._check_compiled()
                self.phase("training", "Training")
                self.strategy.after_step(self)
                if threads is not None:
                    threads.tick()
                due_ckpt = (self.step % spec.checkpoint_every == 0) if spec.checkpoint_every else \
                    (time.monotonic() - self.last_ckpt_time >= spec.checkpoint_minutes * 60)
                last = self.step == self.total_steps
                now = self._training_clock()   # speed and ETA: pauses left out
                if now - last_emit_t >= EMIT_INTERVAL_S or last or self.step == first_step + 1 or due_ckpt:
                    n = self.step - last_emit_step
                    loss = (loss_acc / n).item()   # the only device sync in the loop
                    dt = max(1e-9, now - last_emit_t)
                    per_step = dt / n
                    step_time_ema = per_step if step_time_ema is None else 0.7 * step_time_ema + 0.3 * per_step
                    self.last_loss = loss
                    used, reserved = self.vram()
                    if not math.isfinite(loss) and self.strategy.name == "local":
                        raise self.diverged(loss)   # before any checkpoint could keep what it did
                    if not math.isfinite(loss):
                        self.warn("nonfinite_loss", f"loss is {loss} at step {self.step}; try a lower --lr")
                    self.emit("step", step=self.step, total_steps=self.total_steps,
                              epoch=self.step * spec.batch_size / self.data.num_train, loss=loss,
                              lr=self.scheduler.get_last_lr()[0], tokens_per_s=tokens_per_step / per_step,
                              samples_per_s=spec.batch_size / per_step, vram_used=used, vram_reserved=reserved,
                              ram_used=psutil.Process().memory_info().rss,
                              eta_s=preflight.eta_seconds(self.step, self.total_steps, step_time_ema),
                              elapsed_s=self.elapsed(), tokens_seen=self.tokens_seen, micro_batch=self.micro_batch)
                    loss_acc.zero_()
                    last_emit_t, last_emit_step = now, self.step
                if last:
                    break
                if spec.eval_every and self.step % spec.eval_every == 0 and not due_ckpt:
                    self.last_eval = self.evaluate()
                if due_ckpt:
                    self.save_checkpoint("periodic")
            path = self.save_checkpoint("final")
            self.phase("finishing", "Finishing…")
        except StopRun:
            return RunResult("stopped", self.step, None, self.last_loss, self.last_eval.get("eval_loss"))
        result = RunResult("finished", self.step, str(path), self.last_loss, self.last_eval.get("eval_loss"))
        self.emit("finished", step=self.step, run_dir=str(self.run_dir), final_loss=self.last_loss,
                  final_eval_loss=self.last_eval.get("eval_loss"), perplexity=self.last_eval.get("perplexity"),
                  checkpoint=str(path), elapsed_s=self.elapsed())
        return result


def _job_id_in(job_json: Path) -> str | None:
    """The job id a run folder's job.json names (None: no job.json, or one that does not say)."""
    try:
        job_id = json.loads(job_json.read_text(encoding="utf-8")).get("job_id")
    except (OSError, ValueError, AttributeError):
        return None
    return job_id if isinstance(job_id, str) else None


def _lock_folder(folder: Path):
    """Hold `folder` for this process (released when it exits, even by SIGKILL). Two processes training
    in one run folder would mix their checkpoints; the second is refused in one line."""
    try:
        import fcntl
    except ImportError:   # Windows: no advisory locks; the app's one-worker-per-job rule still holds
        return None
    fh = open(folder / ".lock", "a+")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise ConfigError(folder, "is in use by another Modron training process; wait for it to end "
                                  "or stop it first") from None
    return fh


def _licence_from_dict(d: dict):
    from .licence import LicenceInfo
    return LicenceInfo(**d)
