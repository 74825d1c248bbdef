"""`algorithm = "diloco"` (the default): rounds of local AdamW steps, then an exchange of compressed
pseudo-gradients and an outer Nesterov step, identical on every peer (training_core/swarm/diloco.py).

The engine's own AdamW takes the inner steps; this strategy hands each finished step to the rounds
object, which decides when the round closes, runs the exchange beside training and applies its
result between steps."""
from __future__ import annotations

import time
from typing import Any

import torch

from ..engine import Engine
from . import guards, metrics
from .peer import SwarmStrategy, epoch_schedule

# At most one progress record per second (collab.FilteredProgressTracker): a round closes at most
# that late, against rounds of minutes; per-step records were most of a DiLoCo peer's traffic.
DILOCO_REPORT_INTERVAL_S = 1.0


class _RoundLR:
    """The inner learning rate follows the manifest's schedule by round (a swarm has no last step)."""

    def __init__(self, optimizer: torch.optim.Optimizer, rounds, factor):
        self.optimizer, self.rounds, self.factor = optimizer, rounds, factor
        self.base = [g["lr"] for g in optimizer.param_groups]
        self.step()

    def step(self) -> None:
        f = self.factor(self.rounds.round)
        for g, base in zip(self.optimizer.param_groups, self.base):
            g["lr"] = base * f

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"diloco_round": self.rounds.round}

    def load_state_dict(self, state: dict) -> None:
        pass


class DiLoCoStrategy(SwarmStrategy):
    name = "diloco"

    def make_optimizer(self, engine: Engine, params: list[torch.nn.Parameter], lr: float):
        from .diloco import DiLoCoRounds
        m = self.manifest
        handle = self.connect(engine)
        self.params = params
        inner = super().make_optimizer(engine, params, m.optimizer["lr"])
        d = m.diloco
        self.rounds = DiLoCoRounds(
            handle.dht, m.run_id, params, micro_batch=m.micro_batch, inner_steps=d["inner_steps"],
            outer_lr=d["outer_lr"], outer_momentum=d["outer_momentum"], compression=m.compression,
            matchmaking_time=m.matchmaking_time, averaging_timeout=m.averaging_timeout,
            max_round_s=d["max_round_s"], overlap=d["overlap"], client_mode=handle.client_mode,
            on_warning=engine.warn,
            tracker_opts=dict(limits=self.record_limits(engine), report_interval_s=DILOCO_REPORT_INTERVAL_S,
                              # The swarm's count is read every 1-5 s (hivemind reads it sooner as
                              # the round's end nears): rounds last minutes; every 0.5 s was traffic.
                              min_refresh_period=1.0, max_refresh_period=5.0, default_refresh_period=2.0))
        return inner

    def make_scheduler(self, engine: Engine):
        return _RoundLR(engine.optimizer, self.rounds, epoch_schedule(self.manifest.schedule))

    def started(self, engine: Engine) -> None:
        # A late joiner starts from the swarm's outer weights, not from fresh ones.
        t0 = time.monotonic()
        self.rounds.catch_up()
        self.waited_s += time.monotonic() - t0
        super().started(engine)

    def local_epoch(self) -> int:
        return self.rounds.epoch     # the tracker's clock (closed rounds), which signed records vouch for

    def optimizer_step(self, engine: Engine) -> bool:
        if self.opts.test_send_nan:
            for p in self.params:
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
        if not guards.grads_finite(self.params):
            # A non-finite step is never taken, so it never reaches a pseudo-gradient.
            engine.optimizer.zero_grad(set_to_none=True)
            engine.warn("nonfinite_grad", f"non-finite gradients at local step {engine.step}; step skipped")
            return False
        super().optimizer_step(engine)
        self._stepped = True
        return True

    def after_step(self, engine: Engine) -> None:
        samples = self.manifest.micro_batch if getattr(self, "_stepped", False) else 0
        self._stepped = False
        self.samples_contributed += samples
        if engine.step % 8 == 0 and not guards.all_finite(self.params):
            self.rounds.reset_to_outer()   # the local drift went bad: start the round again from the swarm's weights
            engine.optimizer.state.clear()
            engine.warn("restored_backup", "parameters turned non-finite; went back to the swarm's weights")
        round_before = self.rounds.round
        self.rounds.after_inner_step(samples)
        self.waited_s += self.rounds.take_blocked_s()
        if self.rounds.round != round_before:
            engine.scheduler.step()
        super().after_step(engine)

    def trainer_state(self, engine: Engine) -> dict[str, Any]:
        return {"diloco_round": self.rounds.round}

    # ---- pause / stop ---------------------------------------------------------------------
    def interrupt(self) -> None:
        rounds = getattr(self, "rounds", None)
        if rounds is not None:
            rounds.interrupt()
            rounds.cancel_download()

    def pausing(self, engine: Engine) -> None:
        self.rounds.pause()

    def resumed(self, engine: Engine) -> None:
        t0 = time.monotonic()
        self.rounds.resume()
        self.waited_s += time.monotonic() - t0

    def leave(self) -> None:
        rounds = getattr(self, "rounds", None)
        if rounds is not None:
            try:
                # A leaving peer may be reducing a part for the others: finishing an all-reduce that
                # began (bounded by averaging_timeout) keeps them from a failed or lopsided round.
                rounds.flush(timeout=self.manifest.averaging_timeout)
            finally:
                rounds.shutdown()

    # ---- reporting ------------------------------------------------------------------------
    def report_fields(self, views: list) -> dict[str, Any]:
        r = self.rounds
        r.tracker.witnesses = [w for w in metrics.witnesses(views) if w.source != self.public_key]
        phase = "paused" if self.engine.paused else r.phase
        epoch, round_, outer_hash = r.identity()
        return dict(peers=r.num_peers(), epoch=epoch, round=round_, swarm_epoch=r.swarm_round(),
                    outer_hash=outer_hash,
                    bytes_up=int(r.bytes_up), bytes_down=int(r.bytes_down), averaging_s=self.waited_s,
                    phase=phase, next_exchange_s=r.next_exchange_s(), round_bytes_up=int(r.last_round_bytes_up),
                    round_bytes_down=int(r.last_round_bytes_down), round_peers=r.last_round_peers,
                    clipped_peers=r.clipped_peers())
