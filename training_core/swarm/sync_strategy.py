"""`algorithm = "sync"`: hivemind.Optimizer averages gradients once the swarm has done
`target_batch_size` samples (one global epoch), then parameters. Every epoch sends a whole
(compressed) gradient, so this suits fast links; `diloco` is the default for home connections."""
from __future__ import annotations

import threading
import time
from typing import Any

import torch

from ..engine import Engine
from . import guards, metrics
from .network import compression_for, round_bytes, sender_gap_s
from .peer import SwarmStrategy, optimizer_factories

BACKUP_OPT_STATE_MAX_PARAMS = 300_000_000
LEAVE_TIMEOUT_S = 10.0


class _SwarmLR:
    """What the engine's `step` events and trainer_state read from a scheduler."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def step(self) -> None:
        pass   # hivemind's optimizer steps the schedule per global epoch

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.opt.param_groups]

    def state_dict(self) -> dict:
        return {"swarm_epoch": self.optimizer.local_epoch}

    def load_state_dict(self, state: dict) -> None:
        pass


class SyncStrategy(SwarmStrategy):
    name = "sync"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bytes_up = self.bytes_down = 0.0
        self.backup = guards.ParamBackup()
        self.last_round_bytes = 0.0
        self.last_round_peers = 0
        self.download_cancel = threading.Event()
        self.stepping_since: float | None = None

    def make_optimizer(self, engine: Engine, params: list[torch.nn.Parameter], lr: float):
        from .collab import GuardedOptimizer
        m = self.manifest
        handle = self.connect(engine)
        self.params = params
        make_opt, make_sched = optimizer_factories(m)
        compression = compression_for(m.compression)
        self.param_numel = sum(p.numel() for p in params)
        opt = GuardedOptimizer(
            dht=handle.dht, run_id=m.run_id, target_batch_size=m.target_batch_size,
            batch_size_per_step=m.micro_batch, params=params, optimizer=make_opt, scheduler=make_sched,
            matchmaking_time=m.matchmaking_time, averaging_timeout=m.averaging_timeout,
            next_chunk_timeout=sender_gap_s(m.matchmaking_time, m.averaging_timeout),
            load_state_timeout=max(30.0, m.averaging_timeout), offload_optimizer=False,
            grad_compression=compression, state_averaging_compression=compression,
            # Downloaded state stays full precision: Adam's second moments underflow in float16
            # (zeros there turn the next update into a huge step).
            load_state_compression=compression_for("none"),
            tracker_opts=dict(min_refresh_period=0.5, max_refresh_period=3.0, default_refresh_period=1.0,
                              limits=self.record_limits(engine)),
            shutdown_timeout=2.0, on_warning=engine.warn,
            # Said outright: hivemind.Optimizer turns client_mode=None into None rather than the DHT's
            # mode, and a client-mode peer then died at its first epoch setting a state-sharing priority.
            client_mode=handle.client_mode)
        opt.state_averager.download_cancel = opt.grad_averager.download_cancel = self.download_cancel
        self.optimizer = opt
        self.backup.take(params, self._backup_optimizer())
        return opt

    def make_scheduler(self, engine: Engine):
        return _SwarmLR(engine.optimizer)

    def checkpoint_optimizer(self, engine: Engine) -> torch.optim.Optimizer:
        return self.optimizer.opt

    def local_epoch(self) -> int:
        return self.optimizer.local_epoch

    def optimizer_step(self, engine: Engine) -> bool:
        opt, params = self.optimizer, self.params
        if self.opts.test_send_nan:
            for p in params:
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
        elif not guards.grads_finite(params):
            # Never send non-finite gradients: this step does not count toward the swarm's batch.
            opt.zero_grad(set_to_none=True)
            engine.warn("nonfinite_grad", f"non-finite gradients at local step {engine.step}; step skipped")
            return False
        if engine.spec.max_grad_norm > 0 and not self.opts.test_send_nan:
            torch.nn.utils.clip_grad_norm_(params, engine.spec.max_grad_norm)
        epoch_before = opt.local_epoch
        group = max(1, opt.tracker.global_progress.num_peers)
        t0 = self.stepping_since = time.monotonic()    # commands.StopWatchdog reads it
        try:
            opt.step()
        finally:
            self.stepping_since = None
        opt.zero_grad(set_to_none=True)
        self.samples_contributed += self.manifest.micro_batch
        if opt.local_epoch != epoch_before:
            self._after_epoch(engine, epoch_before, group, time.monotonic() - t0)
        return True

    def _after_epoch(self, engine: Engine, epoch_before: int, group: int, dt: float) -> None:
        opt = self.optimizer
        self.waited_s += dt
        if opt.local_epoch == epoch_before + 1 and group > 1:
            # One gradient round and one parameter round per epoch (estimate; see docs/swarm.md).
            b = 2 * round_bytes(self.param_numel, group, self.manifest.compression)
            self.bytes_up += b
            self.bytes_down += b
            self.last_round_bytes, self.last_round_peers = b, group
        elif opt.local_epoch > epoch_before + 1:
            # Loaded state from a peer: parameters and optimizer statistics came down.
            self.bytes_down += 3 * self.param_numel * 4
        if guards.all_finite(self.params):
            self.backup.take(self.params, self._backup_optimizer())
        elif self.backup.restore(self.params, self._backup_optimizer()):
            engine.warn("restored_backup", f"parameters turned non-finite at epoch {opt.local_epoch}; "
                                           "restored the last good copy")

    def _backup_optimizer(self):
        # Adam's moments double the copy; above this size a parameters-only backup has to do.
        return self.optimizer.opt if self.param_numel <= BACKUP_OPT_STATE_MAX_PARAMS else None

    def after_step(self, engine: Engine) -> None:
        # Poisoned state can arrive between epochs too (delayed parameter averaging).
        if engine.step % 8 == 0 and not guards.all_finite(self.params):
            if self.backup.restore(self.params, self._backup_optimizer()):
                engine.warn("restored_backup", "parameters turned non-finite; restored the last good copy")
        super().after_step(engine)

    # ---- pause / stop ---------------------------------------------------------------------
    def interrupt(self) -> None:
        opt = getattr(self, "optimizer", None)
        self.download_cancel.set()      # a state download in flight is given up (collab._download)
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

    def pausing(self, engine: Engine) -> None:
        self._leave_rounds()

    def device_tensors(self, engine: Engine) -> list[Any]:
        """hivemind keeps one gradient accumulator per parameter on the parameters' device, outside
        the model and the optimizer state that the engine moves; without this a paused peer would
        keep a model's worth of GPU memory."""
        grad_averager = getattr(getattr(self, "optimizer", None), "grad_averager", None)
        return list(getattr(grad_averager, "_local_accumulators", None) or ())

    def resumed(self, engine: Engine) -> None:
        opt = self.optimizer
        self.download_cancel.clear()
        if opt.local_epoch < opt.tracker.global_epoch:
            t0 = time.monotonic()
            opt.load_state_from_peers()
            self.waited_s += time.monotonic() - t0

    def leave(self) -> None:
        opt = getattr(self, "optimizer", None)
        if opt is None:
            return
        self._leave_rounds()

        def shutdown():
            try:
                opt.shutdown()
            except Exception:
                pass
        # hivemind's Optimizer.shutdown waits without a limit for a state-averaging round in flight;
        # on a slow link a peer asked to stop sat there for minutes. Past the limit the process goes
        # on exiting, and its averagers die with it (network.reap_children, proc_guard); hivemind's
        # executor thread still waiting on that round would hold up the interpreter's exit, so the
        # command ends the process outright (commands.cmd_join).
        t = threading.Thread(target=shutdown, name="modron-leave", daemon=True)
        t.start()
        t.join(LEAVE_TIMEOUT_S)
        self.leave_abandoned = t.is_alive()

    # ---- reporting ------------------------------------------------------------------------
    def report_fields(self, views: list) -> dict[str, Any]:
        opt = self.optimizer
        opt.tracker.witnesses = [w for w in metrics.witnesses(views) if w.source != self.public_key]
        progress = opt.tracker.global_progress
        eta = max(0.0, progress.eta_next_epoch - metrics_now()) if progress.eta_next_epoch else None
        return dict(peers=progress.num_peers, epoch=opt.local_epoch, round=opt.local_epoch,
                    swarm_epoch=opt.tracker.global_epoch, bytes_up=int(self.bytes_up),
                    bytes_down=int(self.bytes_down), averaging_s=self.waited_s,
                    phase="paused" if self.engine.paused else "inner", next_exchange_s=eta,
                    round_bytes_up=int(self.last_round_bytes), round_bytes_down=int(self.last_round_bytes),
                    round_peers=self.last_round_peers, clipped_peers=opt.clipped_peers())


def metrics_now() -> float:
    from hivemind.utils import get_dht_time
    return get_dht_time()
