"""A contributing peer: the local Engine with hivemind.Optimizer in place of its optimizer step.

`SwarmEngine(manifest, options, emit, controls).run()` trains with the swarm until a --steps or
--minutes bound (or `stop`), emitting the worker events plus `swarm` events about every 2 s.
"""
from __future__ import annotations

import math
import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import JobSpec
from ..controls import Controls
from ..engine import Emit, Engine, StopRun
from ..errors import ConfigError
from ..paths import data_dir
from . import guards, metrics
from .manifest import SwarmManifest, bundled_path
from .network import DHTHandle, compression_for, quiet_hivemind, reap_children, round_bytes, start_dht

SWARM_EVENT_INTERVAL_S = 2.0
UNBOUNDED_STEPS = 10 ** 12
BACKUP_OPT_STATE_MAX_PARAMS = 300_000_000


@dataclass
class PeerOptions:
    steps: int | None = None
    minutes: float | None = None
    device: str = "auto"
    threads: int | None = None
    data_dir: str | None = None          # the peer's own data (manifest data.source = "local"/"url")
    client_mode: str = "auto"            # on | off | auto
    token: str | None = None
    identity_path: Path | None = None    # default <data_dir>/swarm/identity.key
    run_dir: Path | None = None          # default <data_dir>/swarm/<run_id>/
    host_maddrs: list[str] | None = None
    test_send_nan: bool = False          # test hook: send NaN gradients, our own guard disabled


def swarm_dir() -> Path:
    p = data_dir() / "swarm"
    p.mkdir(parents=True, exist_ok=True)
    return p


def check_token(manifest: SwarmManifest, token: str | None) -> str | None:
    token = token or os.environ.get("MODRON_SWARM_TOKEN") or None
    if manifest.auth.get("required") and not token:
        raise ConfigError("--token", f"swarm {manifest.run_id!r} is private: pass the token its host gave you "
                                     "(--token TOKEN or MODRON_SWARM_TOKEN)")
    return token


def peer_data(manifest: SwarmManifest, data_dir_arg: str | None) -> list[str]:
    source = manifest.data["source"]
    if data_dir_arg:
        if not Path(data_dir_arg).exists():
            raise ConfigError(data_dir_arg, "no such file or folder (--data-dir)")
        return [str(data_dir_arg)]
    if source == "bundled":
        path = bundled_path(manifest.data["path"])
        if not path.exists():
            raise ConfigError("data.path", f"{manifest.data['path']!r} is not bundled with this Modron")
        return [str(path)]
    what = "its own data" if source == "local" else f"the data at {manifest.data['url']}"
    raise ConfigError("--data-dir", f"this swarm trains on {what}; give the folder holding it with --data-dir")


def peer_tokenizer(manifest: SwarmManifest) -> str:
    tok = manifest.tokenizer
    if tok.startswith("bundled:"):
        return str(bundled_path(tok[len("bundled:"):]))
    return tok


def swarm_spec(manifest: SwarmManifest, opts: PeerOptions, out: Path) -> JobSpec:
    device = opts.device
    precision = "fp32"
    if device != "cpu" and torch.cuda.is_available():
        # fp16 needs hivemind's own GradScaler; bf16 needs none.
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return JobSpec(model=manifest.model, data=peer_data(manifest, opts.data_dir), out=str(out),
                   method="full" if manifest.is_scratch else None, steps=opts.steps or UNBOUNDED_STEPS,
                   batch_size=manifest.micro_batch, micro_batch_size=manifest.micro_batch, seq_len=manifest.seq_len,
                   lr=manifest.optimizer["lr"], weight_decay=manifest.optimizer["weight_decay"],
                   checkpoint_minutes=1e9, keep_checkpoints=2, eval_fraction=0.02, seed=0,  # seed 0: same init
                   precision=precision, tokenizer=peer_tokenizer(manifest), device=device, threads=opts.threads,
                   job_id=manifest.run_id, sample_max_tokens=20)


def epoch_schedule(schedule: dict[str, Any]):
    """The manifest's LR schedule as a multiplier per global epoch."""
    name, warmup, total = schedule["name"], schedule["warmup_epochs"], schedule["total_epochs"]

    def factor(epoch: int) -> float:
        if epoch < warmup:
            return (epoch + 1) / (warmup + 1)
        if name == "constant":
            return 1.0
        progress = min(1.0, (epoch - warmup) / max(1, total - warmup))
        if name == "linear":
            return max(0.0, 1.0 - progress)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def optimizer_factories(manifest: SwarmManifest):
    """(optimizer factory, scheduler factory) from the manifest. Peers and the host must build the
    same optimizer, or the state they share would not line up."""
    cfg = manifest.optimizer
    kwargs = dict(lr=cfg["lr"], betas=tuple(cfg["betas"]), weight_decay=cfg["weight_decay"])
    if "eps" in cfg:
        kwargs["eps"] = cfg["eps"]
    cls = torch.optim.AdamW if cfg["name"] == "adamw" else torch.optim.Adam
    factor = epoch_schedule(manifest.schedule)
    return (lambda params: cls(params, **kwargs)), (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor))


class _SwarmLR:
    """What the engine's `step` events and trainer_state read from a scheduler."""

    def __init__(self, engine: "SwarmEngine"):
        self.engine = engine

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.engine.optimizer.opt.param_groups]

    def state_dict(self) -> dict:
        return {"swarm_epoch": self.engine.optimizer.local_epoch}


class SwarmEngine(Engine):
    role = "peer"

    def __init__(self, manifest: SwarmManifest, opts: PeerOptions, emit: Emit, controls: Controls | None = None):
        self.manifest, self.opts = manifest, opts
        self.token = check_token(manifest, opts.token)
        run_dir = opts.run_dir or swarm_dir() / manifest.run_id
        super().__init__(swarm_spec(manifest, opts, run_dir), emit, controls)
        self._emit_lock = threading.Lock()
        self.handle: DHTHandle | None = None
        self.samples_contributed = 0
        self.bytes_up = self.bytes_down = 0.0
        self.contributed_s = 0.0
        self.averaging_s = 0.0       # time in optimizer steps that ended an epoch (rounds, state loads)
        self.paused = False
        self._closing = threading.Event()
        self._deadline = time.monotonic() + opts.minutes * 60 if opts.minutes else None
        self._offset = random.randrange(1 << 30)   # each peer walks the data from its own place
        self.backup = guards.ParamBackup()
        self._token_warned = False

    # ---- events ---------------------------------------------------------------------------
    def emit(self, type_: str, **fields: Any) -> None:
        if type_ in ("stopped", "finished"):
            self._closing.set()      # no `swarm` events after the last word
        if type_ in ("started", "step"):
            fields["total_steps"] = self.opts.steps or 0
            if type_ == "step" and not self.opts.steps:
                fields["eta_s"] = None
        with self._emit_lock:   # the reporter thread emits too
            super().emit(type_, **fields)

    # ---- the parts the swarm replaces -----------------------------------------------------
    def make_optimizer(self, params: list[torch.nn.Parameter], lr: float):
        from .collab import GuardedOptimizer
        quiet_hivemind()
        m = self.manifest
        self.params = params
        self.handle = start_dht(m, identity_path=self.opts.identity_path or swarm_dir() / "identity.key",
                                client_mode=self.opts.client_mode, host_maddrs=self.opts.host_maddrs,
                                validators=metrics.make_validators(m.run_id))
        if self.handle.client_mode:
            self.warn("client_mode", f"joined as a client (no incoming connections): {self.handle.reason}")
        make_opt, make_sched = optimizer_factories(m)
        compression = compression_for(m.compression)
        self.param_numel = sum(p.numel() for p in params)
        self.public_key = metrics.local_public_key()
        opt = GuardedOptimizer(
            dht=self.handle.dht, run_id=m.run_id, target_batch_size=m.target_batch_size,
            batch_size_per_step=m.micro_batch, params=params, optimizer=make_opt, scheduler=make_sched,
            matchmaking_time=m.matchmaking_time, averaging_timeout=m.averaging_timeout,
            load_state_timeout=max(30.0, m.averaging_timeout), offload_optimizer=False,
            grad_compression=compression, state_averaging_compression=compression,
            # Downloaded state stays full precision: Adam's second moments underflow in float16
            # (zeros there turn the next update into a huge step).
            load_state_compression=compression_for("none"), tracker_opts=dict(min_refresh_period=0.5, max_refresh_period=3.0,
                                                                  default_refresh_period=1.0),
            shutdown_timeout=2.0, on_warning=self.warn_from_any_thread)
        return opt

    def make_scheduler(self, schedule):
        return _SwarmLR(self)

    def checkpoint_optimizer(self) -> torch.optim.Optimizer:
        return self.optimizer.opt

    def warn_from_any_thread(self, code: str, message: str) -> None:
        self.warn(code, message)   # emit() holds the lock

    def batch_indices(self, step: int) -> np.ndarray:
        return super().batch_indices(step + self._offset)

    def optimizer_step(self) -> None:
        opt = self.optimizer
        params = self.params
        if self.opts.test_send_nan:
            for p in params:
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
        elif not guards.grads_finite(params):
            # Never send non-finite gradients: this step does not count toward the swarm's batch.
            opt.zero_grad(set_to_none=True)
            self.warn("nonfinite_grad", f"non-finite gradients at local step {self.step}; step skipped")
            return
        if self.spec.max_grad_norm > 0 and not self.opts.test_send_nan:
            torch.nn.utils.clip_grad_norm_(params, self.spec.max_grad_norm)
        epoch_before = opt.local_epoch
        group = max(1, opt.tracker.global_progress.num_peers)
        t0 = time.monotonic()
        opt.step()
        opt.zero_grad(set_to_none=True)
        self.samples_contributed += self.manifest.micro_batch
        if opt.local_epoch != epoch_before:
            self._after_epoch(epoch_before, group, time.monotonic() - t0)

    def _after_epoch(self, epoch_before: int, group: int, dt: float) -> None:
        opt = self.optimizer
        self.averaging_s += dt
        if opt.local_epoch == epoch_before + 1 and group > 1:
            # One gradient round and one parameter round per epoch (estimate; see docs/swarm.md).
            b = 2 * round_bytes(self.param_numel, group, self.manifest.compression)
            self.bytes_up += b
            self.bytes_down += b
        elif opt.local_epoch > epoch_before + 1:
            # Loaded state from a peer: parameters and optimizer statistics came down.
            self.bytes_down += 3 * self.param_numel * 4
        if guards.all_finite(self.params):
            self.backup.take(self.params, self._backup_optimizer())
        elif self.backup.restore(self.params, self._backup_optimizer()):
            self.warn("restored_backup", f"parameters turned non-finite at epoch {opt.local_epoch}; "
                                         "restored the last good copy")

    def _backup_optimizer(self):
        # Adam's moments double the copy; above this size a parameters-only backup has to do.
        return self.optimizer.opt if self.param_numel <= BACKUP_OPT_STATE_MAX_PARAMS else None

    def train_step(self) -> torch.Tensor:
        t0 = time.monotonic()
        loss = super().train_step()
        self.contributed_s += time.monotonic() - t0
        # Poisoned state can arrive between epochs too (delayed parameter averaging).
        if self.step % 8 == 0 and not guards.all_finite(self.params):
            if self.backup.restore(self.params, self._backup_optimizer()):
                self.warn("restored_backup", "parameters turned non-finite; restored the last good copy")
        if self._deadline is not None and time.monotonic() >= self._deadline:
            self.total_steps = self.step        # the engine's loop ends here and checkpoints
        return loss

    # ---- pause / stop ---------------------------------------------------------------------
    def interrupt_rounds(self) -> None:
        """Called from the control reader: leave an averaging round now rather than at its end."""
        opt = getattr(self, "optimizer", None)
        for name in ("scheduled_grads", "scheduled_state"):
            control = getattr(opt, name, None) if opt is not None else None
            try:
                if control is not None and not control.done():
                    control.cancel()
            except Exception:
                pass

    def _leave_rounds(self) -> None:
        opt = self.optimizer
        try:
            opt.tracker.report_local_progress(opt.local_epoch, 0)   # our samples no longer count
            opt.grad_averager.reset_accumulated_grads_()
        except Exception:
            pass

    def _move_grad_accumulators(self, device: torch.device) -> None:
        """hivemind keeps one gradient accumulator per parameter on the parameters' device, outside
        the model and the optimizer state that the engine moves; without this a paused peer would
        keep a model's worth of GPU memory."""
        grad_averager = getattr(getattr(self, "optimizer", None), "grad_averager", None)
        for t in getattr(grad_averager, "_local_accumulators", None) or ():
            t.data = t.data.to(device)

    def _release_accelerator(self) -> None:
        if self.device.type == "cuda":
            self._move_grad_accumulators(torch.device("cpu"))
        super()._release_accelerator()

    def _reclaim_accelerator(self) -> None:
        super()._reclaim_accelerator()
        if self.device.type == "cuda":
            self._move_grad_accumulators(self.device)

    def pause(self) -> None:
        self.paused = True
        self._leave_rounds()
        self._release_accelerator()
        used, reserved = self.vram()
        self.emit("paused", step=self.step, vram_used=used, vram_reserved=reserved, checkpoint=None)
        paused_at = time.monotonic()
        while True:
            msg = self.controls.wait()
            if msg == "resume":
                break
            if msg == "stop":
                self.emit("stopped", step=self.step, checkpoint=None)
                raise StopRun
        self._paused_total += time.monotonic() - paused_at
        self._reclaim_accelerator()
        opt = self.optimizer
        if opt.local_epoch < opt.tracker.global_epoch:
            opt.load_state_from_peers()
        self.paused = False
        self.emit("resumed", step=self.step)

    def checkpoint_on_stop(self) -> None:
        return None

    # ---- swarm reporting ------------------------------------------------------------------
    def _report_loop(self) -> None:
        while not self._closing.wait(SWARM_EVENT_INTERVAL_S):
            try:
                self.report_swarm()
            except Exception as exc:   # a DHT hiccup must not kill training
                self.warn("swarm_report", f"could not read or publish swarm metrics: {exc}")

    def report_swarm(self) -> None:
        opt = getattr(self, "optimizer", None)
        if opt is None or self.handle is None:
            return
        m = self.manifest
        if not self.paused:
            sps = self.samples_contributed / self.contributed_s if self.contributed_s > 0 else 0.0
            loss = self.last_loss if self.last_loss is not None and math.isfinite(self.last_loss) else None
            record = metrics.MetricsRecord(role="peer", epoch=opt.local_epoch, samples=self.samples_contributed,
                                           samples_per_s=float(sps), loss=loss, time=time.time())
            metrics.publish(self.handle.dht, m.run_id, self.public_key, record, self.token)
        views = metrics.read(self.handle.dht, m.run_id, self.token)
        if m.auth.get("required"):
            hosts = [v for v in views if v.record.role == "host"]
            if hosts and not any(v.authorized for v in hosts) and not self._token_warned:
                self._token_warned = True
                self.warn("token_rejected", "the swarm's host does not accept this token: this peer's metrics "
                                            "will not count; ask the host for the current token")
            views = [v for v in views if v.authorized]
        opt.tracker.witnesses = [w for w in metrics.witnesses(views) if w.source != self.public_key]
        summary = metrics.SwarmSummary.of(views)
        self.emit("swarm", role="peer", run_id=m.run_id, peers=opt.tracker.global_progress.num_peers,
                  epoch=opt.local_epoch, samples_contributed=self.samples_contributed,
                  bytes_up=int(self.bytes_up), bytes_down=int(self.bytes_down),
                  global_samples_per_s=summary.samples_per_s, loss=summary.loss,
                  client_mode=self.handle.client_mode, contributed_s=self.contributed_s,
                  swarm_epoch=opt.tracker.global_epoch, paused=self.paused, averaging_s=self.averaging_s)

    def _setup(self) -> None:
        super()._setup()
        self.backup.take(self.params, self._backup_optimizer())
        threading.Thread(target=self._report_loop, name="swarm-report", daemon=True).start()

    def run(self):
        try:
            return super().run()
        finally:
            self.close()

    def close(self) -> None:
        self._closing.set()
        opt = getattr(self, "optimizer", None)
        if opt is not None and hasattr(opt, "shutdown"):
            try:
                self._leave_rounds()
                opt.shutdown()
            except Exception:
                pass
        if self.handle is not None:
            try:
                self.handle.dht.shutdown()
            except Exception:
                pass
        reap_children()
