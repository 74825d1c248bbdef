"""When a gradient round is poisoned (a peer sent NaN) or fails, a peer falls back on its own
gradients for that epoch: they must still be there to fall back on. (The loopback scenario in
test_swarm_e2e.py runs it for real: A and B learn while X sends NaN.)"""
from __future__ import annotations


def test_starting_a_round_leaves_the_local_gradients_in_place(monkeypatch):
    from hivemind.optim.grad_averager import GradientAverager
    from training_core.swarm.collab import GuardedOptimizer, LocalGradsKeptAverager

    seen = {}
    monkeypatch.setattr(GradientAverager, "step", lambda self, **kw: seen.update(kw) or "control")
    averager = object.__new__(LocalGradsKeptAverager)
    assert averager.step(control="c", reset_accumulators=True, wait=False) == "control"
    assert seen["reset_accumulators"] is False and seen["control"] == "c" and seen["wait"] is False

    made = {}
    monkeypatch.setattr("hivemind.Optimizer._make_gradient_averager",
                        lambda self, factory, **kw: made.setdefault("factory", factory))
    assert GuardedOptimizer._make_gradient_averager(object.__new__(GuardedOptimizer), None) is LocalGradsKeptAverager
