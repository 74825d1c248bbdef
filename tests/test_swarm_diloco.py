"""DiLoCo rounds (training_core/swarm/diloco.py) between in-process peers on loopback.

Two DHTs are shared by the module; each test uses its own run id. Local AdamW steps are simulated by
adding known "drift" to the weights, so every expected value can be computed by hand.
"""
from __future__ import annotations

import threading
import time

import pytest
import torch

from training_core.swarm.compression import wire_nbytes
from training_core.swarm.diloco import DiLoCoRounds, choose_lineage, outer_step_

LR, MOM, MB = 0.7, 0.9, 4


# ---- pure parts ---------------------------------------------------------------------------------
def test_outer_step_matches_torch_sgd_nesterov():
    gen = torch.Generator().manual_seed(0)
    w0 = [torch.randn(5, 7, generator=gen), torch.randn(3, generator=gen)]
    grads = [[torch.randn_like(w) for w in w0] for _ in range(4)]
    ours, buf = [w.clone() for w in w0], [torch.zeros_like(w) for w in w0]
    ref = [torch.nn.Parameter(w.clone()) for w in w0]
    opt = torch.optim.SGD(ref, lr=LR, momentum=MOM, nesterov=True)
    for g in grads:
        outer_step_(ours, buf, g, LR, MOM)
        for p, gi in zip(ref, g):
            p.grad = gi.clone()
        opt.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-6)
    # First step by hand: buf = g, w -= lr * (1 + m) * g.
    w, b = [w0[0].clone()], [torch.zeros_like(w0[0])]
    outer_step_(w, b, [grads[0][0]], LR, MOM)
    torch.testing.assert_close(w[0], w0[0] - LR * (1 + MOM) * grads[0][0])


def test_group_lineage_is_the_majority_then_the_highest_round():
    rec = lambda r, d: dict(v=1, round=r, digest=d, samples=1)   # noqa: E731
    chosen, ok = choose_lineage({"a": rec(3, "x"), "b": rec(3, "x"), "c": rec(4, "y"), "d": "junk"})
    assert chosen == (3, "x") and ok == {"a", "b"}
    chosen, ok = choose_lineage({"a": rec(3, "x"), "b": rec(4, "y")})
    assert chosen == (4, "y") and ok == {"b"}
    assert choose_lineage({"a": dict(v=1, round="3", digest="x")}) == (None, set())


# ---- swarms on loopback -------------------------------------------------------------------------
@pytest.fixture
def swarm():
    # A fresh DHT pair per test: one shared by the module once stopped answering (`add_validators` never
    # returned) after many rounds' trackers and averagers had come and gone on it, under heavy load.
    import hivemind
    from hivemind.utils.crypto import RSAPrivateKey
    a = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    b = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                     initial_peers=[str(m) for m in a.get_visible_maddrs()])
    # In-process peers need their own signing keys, or their progress records would share one subkey.
    yield [(a, RSAPrivateKey()), (b, RSAPrivateKey())]
    b.shutdown()
    a.shutdown()


def _model() -> torch.nn.Module:
    torch.manual_seed(0)   # every peer starts from the same weights, as swarm peers do (seed 0)
    return torch.nn.Sequential(torch.nn.Linear(37, 29), torch.nn.Tanh(), torch.nn.Linear(29, 3))


class Peer:
    def __init__(self, node, run_id: str, init: float = 0.0, **kw):
        dht, key = node
        self.model = _model()
        self.params = list(self.model.parameters())
        with torch.no_grad():
            for p in self.params:
                p.add_(init)      # a peer that did not start from the swarm's weights
        self.theta0 = [p.detach().clone() for p in self.params]
        self.warnings: list[tuple[str, str]] = []
        opts = dict(micro_batch=MB, inner_steps=2, outer_lr=LR, outer_momentum=MOM, compression="float16",
                    matchmaking_time=1.0, averaging_timeout=10.0, max_round_s=600.0, overlap=False,
                    tracker_opts=dict(min_refresh_period=0.1, max_refresh_period=0.5, default_refresh_period=0.2,
                                      private_key=key))
        opts.update(kw)
        self.r = DiLoCoRounds(dht, run_id, self.params, on_warning=lambda c, m: self.warnings.append((c, m)), **opts)

    def drift(self, offset: float, seed: int) -> list[torch.Tensor]:
        """A stand-in for one AdamW step: adds offset + noise to every weight; returns what it added."""
        gen = torch.Generator().manual_seed(seed)
        added = [offset + 0.1 * torch.randn(p.shape, generator=gen) for p in self.params]
        with torch.no_grad():
            for p, d in zip(self.params, added):
                p.add_(d)
        return added

    def weights(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]


def _wait(pred, timeout: float = 20.0, poll=()) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        for r in poll:
            r.poll()
        time.sleep(0.05)


@pytest.fixture
def pair(swarm):
    made = []

    def make(run_id: str, b_init: float = 0.0, **kw):
        a, b = Peer(swarm[0], run_id, **kw), Peer(swarm[1], run_id, init=b_init, **kw)
        made.extend([a, b])
        # One step each, then both must see two peers before the round can close on samples.
        a.drift(1 / 3, 1)
        a.r.after_inner_step(MB)
        b.drift(-1.0, 2)
        b.r.after_inner_step(MB)
        _wait(lambda: a.r.num_peers() == 2 and b.r.num_peers() == 2, poll=(a.r, b.r))
        return a, b
    yield make
    for p in made:
        p.r.shutdown()


def _in_threads(*fns):
    errors = []

    def run(fn):
        try:
            fn()
        except BaseException as e:   # re-raised in the test thread
            errors.append(e)
    threads = [threading.Thread(target=run, args=(f,)) for f in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    # One still running would go on calling into peers and DHTs that the fixtures then shut down.
    assert not any(t.is_alive() for t in threads), "a peer's thread did not finish in 60 s"


# Half a quantization step per codec and stage, relative to the largest |value| it codes.
HALF_STEP = {"float16": 2.0 ** -11, "blockwise8bit": 1 / 254, "blockwise4bit": 1 / 14}


def _close_round_from_a(a: Peer, b: Peer) -> tuple[list, list]:
    """a takes two more steps (12 samples in all, drift about +1; b has 4, drift about -1): the swarm
    then holds 16 = inner_steps * micro_batch * 2 peers and the round closes. Returns both θ_local."""
    theta_b = b.weights()
    a.drift(1 / 3, 3)
    a.r.after_inner_step(MB)
    a.drift(1 / 3, 4)
    theta_a = a.weights()
    return theta_a, theta_b


@pytest.mark.parametrize("compression", ["float16", "blockwise8bit", "blockwise4bit"])
def test_one_round_leaves_both_peers_identical_at_the_weighted_nesterov_step(pair, compression):
    a, b = pair(f"exact-{compression}", compression=compression)
    theta_a, theta_b = _close_round_from_a(a, b)
    _in_threads(lambda: (a.r.after_inner_step(MB), _wait(lambda: a.r.round == 1, poll=(a.r,))),
                lambda: _wait(lambda: b.r.round == 1, poll=(b.r,)))
    assert a.r.round == b.r.round == 1 and a.warnings == b.warnings == []
    for x, y in zip(a.params + a.r.outer + a.r.momentum, b.params + b.r.outer + b.r.momentum):
        assert torch.equal(x, y)          # bit-identical on both peers
    assert a.r.digest == b.r.digest
    for p, w in zip(a.params, a.r.outer):
        assert torch.equal(p, w)          # without overlap, the local weights are the new outer weights

    # By hand: Δ̄ weighted 12:4, then SGD-Nesterov from zero momentum: θ' = θ0 - lr (1 + m) Δ̄.
    for t0, ta, tb, w, m in zip(a.theta0, theta_a, theta_b, a.r.outer, a.r.momentum):
        da, db = t0 - ta, t0 - tb
        mean = (12 * da + 4 * db) / 16
        bound = HALF_STEP[compression] * (max(da.abs().max(), db.abs().max()) + mean.abs().max()) * 1.01 + 1e-6
        assert (m - mean).abs().max() <= bound
        assert (w - (t0 - LR * (1 + MOM) * mean)).abs().max() <= LR * (1 + MOM) * bound + 1e-5
        assert ((da + db) / 2 - mean).abs().max() > 3 * bound      # the weights matter at this precision

    # (e) Bytes actually serialized: with two peers each sends every value once, as its own part or as
    # the average it reduced, and receives every value once (each tensor here is one part).
    expected = sum(wire_nbytes(compression, p.numel()) for p in a.params)
    assert a.r.last_round_bytes_up == a.r.last_round_bytes_down == expected
    assert b.r.last_round_bytes_up == b.r.last_round_bytes_down == expected
    assert a.r.bytes_up == expected and a.r.last_round_peers == 2


def test_overlap_keeps_the_steps_taken_while_the_exchange_runs(pair):
    a, b = pair("overlap", overlap=True)
    _close_round_from_a(a, b)
    progress = {}

    def train(peer: Peer, seed: int):
        added = [torch.zeros_like(p) for p in peer.params]
        snapshot = None
        while peer.r.round == 0:
            d = peer.drift(0.01, seed)
            seed += 2
            if snapshot is not None:
                added = [x + y for x, y in zip(added, d)]
            t0 = time.monotonic()
            peer.r.after_inner_step(MB)
            if snapshot is None and peer.r.epoch == 1:
                assert time.monotonic() - t0 < 1.0 and peer.r.phase == "exchanging"   # did not wait
                snapshot = peer.weights()
            time.sleep(0.05)
        progress[peer] = added

    _in_threads(lambda: train(a, 100), lambda: train(b, 101))
    assert a.r.round == b.r.round == 1 and a.warnings == b.warnings == []
    for x, y in zip(a.r.outer + a.r.momentum, b.r.outer + b.r.momentum):
        assert torch.equal(x, y)
    for peer in (a, b):
        assert any(x.abs().max() > 0 for x in progress[peer])     # it did train during the exchange
        for p, w, added in zip(peer.params, peer.r.outer, progress[peer]):
            torch.testing.assert_close(p.detach(), w + added, rtol=0, atol=1e-5)   # θ_g' + progress since
        assert peer.r._samples_drift > 0   # those steps count toward the next round


def test_a_round_nobody_joins_fails_in_bounded_time_and_loses_nothing(pair):
    a, b = pair("failed", averaging_timeout=3.0)
    theta_a, _ = _close_round_from_a(a, b)     # b never shows up for the exchange
    t0 = time.monotonic()
    a.r.after_inner_step(MB)
    took = time.monotonic() - t0
    assert took < 1.0 + 3.0 + 4.0, took
    assert [c for c, _ in a.warnings] == ["round_failed"]
    assert a.r.round == 0 and a.r.epoch == 1
    for p, t, w, t0_ in zip(a.params, theta_a, a.r.outer, a.theta0):
        assert torch.equal(p.detach(), t) and torch.equal(w, t0_)   # local progress kept, θ_g unchanged
    assert a.r._samples_drift == 12

    # b leaves for good; alone, a's next round is a plain outer step on everything since θ_g.
    b.r.shutdown()
    _wait(lambda: a.r.num_peers() == 1, poll=(a.r,))
    a.drift(0.5, 5)
    a.r.after_inner_step(MB)
    a.drift(0.5, 6)
    theta_now = a.weights()
    a.r.after_inner_step(MB)          # 8 samples this round = inner_steps * micro_batch * 1 peer
    assert a.r.round == 1 and a.r.last_round_peers == 1
    for w, t0_, t in zip(a.r.outer, a.theta0, theta_now):
        torch.testing.assert_close(w, t0_ - LR * (1 + MOM) * (t0_ - t), rtol=0, atol=1e-5)
    assert a.r._samples_drift == 0


def test_a_late_joiner_loads_outer_state_and_keeps_its_own_drift(swarm):
    a = Peer(swarm[0], "late", inner_steps=1)
    c = None
    try:
        for k in (1, 2):          # alone, every step of 4 samples closes a round (once it sees itself)
            a.drift(0.2, k)
            a.r.after_inner_step(MB)
            _wait(lambda: a.r.round == k, poll=(a.r,))
        assert a.r.round == 2 and a.r.momentum[0].abs().max() > 0
        c = Peer(swarm[1], "late", inner_steps=1)
        _wait(lambda: c.r.tracker.global_epoch == 2)    # a's records reached c's side of the DHT
        added = c.drift(0.05, 9)         # trained a little before it saw the swarm
        c.r.after_inner_step(MB)
        assert c.r.round == 2 and c.r.epoch == a.r.epoch and c.warnings == []
        for x, y in zip(c.r.outer + c.r.momentum, a.r.outer + a.r.momentum):
            assert torch.equal(x, y)
        for p, w, d in zip(c.params, c.r.outer, added):
            torch.testing.assert_close(p.detach(), w + d, rtol=0, atol=1e-6)   # rebased, drift kept
        assert c.r.bytes_down == 2 * 4 * sum(p.numel() for p in c.params)     # full precision

        # Checks on what a peer sends: wrong shapes, non-finite values, too far ahead, older.
        good = dict(kind="modron-diloco-1", round=2, epoch=2, digest="")
        tensors = a.r.outer + a.r.momentum
        assert c.r._check_state(good, tensors) is None
        assert "tensors" in c.r._check_state(good, tensors[:-1])
        assert "expected" in c.r._check_state(good, [t.reshape(-1) for t in tensors])
        assert "non-finite" in c.r._check_state(good, tensors[:-1] + [tensors[-1] * float("nan")])
        assert "ahead" in c.r._check_state(dict(good, round=50, epoch=50), tensors)
        assert "older" in c.r._check_state(dict(good, round=1), tensors)
        assert "round" in c.r._check_state(dict(good, round=3), tensors)    # round cannot exceed epoch

        # Checkpoints hold the same state.
        state = c.r.state_dict()
        assert state["round"] == 2 and torch.equal(state["momentum"][0], a.r.momentum[0])
        c.r.shutdown()

        # A host follower (no training) takes the same state and serves it at a lower priority.
        c = Peer(swarm[1], "late", follower=True, sharing_priority=-0.5)
        # Its epoch is no voice against peers far ahead (a host restarted from an old checkpoint).
        assert c.r.tracker.records.own_counts is False and a.r.tracker.records.own_counts is True
        c.drift(0.05, 10)     # a follower has no drift to keep: it holds the outer weights
        _wait(lambda: c.r.round == 2, poll=(c.r,))
        for p, w in zip(c.params, a.r.outer):
            assert torch.equal(p.detach(), w)
        assert c.r.averager.state_sharing_priority == c.r.epoch - 0.5
    finally:
        a.r.shutdown()
        if c is not None:
            c.r.shutdown()


def test_a_round_closes_on_its_deadline_and_pause_leaves_it_quietly(pair):
    a, b = pair("deadline", overlap=True)     # 8 of 16 samples: only the deadline closes it
    # The deadline counts from a's start. Set at construction, it could pass while the pair was still
    # forming (under load that takes seconds): a, seeing no peer yet, then stepped alone.
    a.r.max_round_s = 3.0
    theta = a.weights()
    _wait(lambda: a.r.epoch == 1, poll=(a.r,))                  # b stays passive: nobody meets a
    assert time.monotonic() - a.r._round_began < 1.0 and a.r.phase == "exchanging"
    assert 0.0 < a.r.next_exchange_s() or a.r._pending is not None
    a.r.pause()
    a.r.resume()
    a.r.poll()
    assert a.r._pending is None and a.r.round == 0 and a.warnings == []   # left on purpose: no warning
    for p, t in zip(a.params, theta):
        assert torch.equal(p.detach(), t)
    assert a.r._samples_drift == MB    # its one step still waits to be sent


def test_a_peer_on_another_lineage_is_left_out_of_the_average_then_syncs_keeping_its_drift(pair):
    a, b = pair("lineage", b_init=0.01)       # same round 0, different outer weights
    theta_a, theta_b = _close_round_from_a(a, b)
    _in_threads(lambda: (a.r.after_inner_step(MB), _wait(lambda: a.r.epoch == 1 and a.r._pending is None, poll=(a.r,))),
                lambda: _wait(lambda: b.r.epoch == 1 and b.r._pending is None, poll=(b.r,)))
    # Both peers picked the same lineage (count tie, round tie: the larger digest) from what both sent.
    winner, loser, theta_w = (a, b, theta_a) if a.r.round == 1 else (b, a, theta_b)
    assert winner.r.round == 1 and loser.r.round == 0 and winner.warnings == []
    assert [c for c, _ in loser.warnings] == ["round_stale"]
    # The winner's round averaged its own Δ only: the other lineage had weight 0 at every reducer.
    for w, t0, t in zip(winner.r.outer, winner.theta0, theta_w):
        torch.testing.assert_close(w, t0 - LR * (1 + MOM) * (t0 - t), rtol=0, atol=3e-3)
    # The loser downloads the winner's state and keeps its own drift: θ_local = θ_g_new - (θ_g_old - θ_local).
    before = [(p.detach() - w).clone() for p, w in zip(loser.params, loser.r.outer)]
    _wait(lambda: loser.r.round == 1, poll=(loser.r,))
    assert loser.r.digest == winner.r.digest
    for p, w, d in zip(loser.params, loser.r.outer, before):
        torch.testing.assert_close(p.detach(), w + d, rtol=0, atol=1e-6)
