"""Robust aggregation (training_core/swarm/robust.py; issue 10). First the reducer's rule by hand, then
3-peer exchanges on loopback with one attacker: as a sender (noise, ×(−100), 1e30, clamped ±65504),
as a reducer returning garbage (DiLoCo: the round fails alike everywhere; sync: our own values), and
the naming that leaves it out."""
from __future__ import annotations

import asyncio
import concurrent.futures
import math
from types import SimpleNamespace

import pytest
import torch

from training_core.swarm import robust
from training_core.swarm.robust import (FLAG, ClipRecord, RobustPartReducer, _coordinate_median, _WithoutNamed,
                                        excluded_reducers, robust_combine, state_problem)

D = 5000


def _honest(n: int, seed: int, d: int = D, spread: float = 0.5) -> list[torch.Tensor]:
    """Pseudo-gradients of n honest peers: a shared direction plus each peer's own noise."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(d, generator=g)
    return [common + spread * torch.randn(d, generator=g) for _ in range(n)]


def _attack(kind: str, like: torch.Tensor, seed: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return {"noise": lambda: 1000 * torch.randn(like.shape, generator=g),   # weights replaced by noise
            "x-100": lambda: -100 * like,
            "1e30": lambda: torch.full_like(like, 1e30),
            "65504": lambda: 65504 * torch.sign(torch.randn(like.shape, generator=g)),   # ±inf through fp16
            }[kind]()


ATTACKS = ["noise", "x-100", "1e30", "65504"]


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).norm() / ref.double().norm())


# ---- the rule ------------------------------------------------------------------------------------
def test_honest_groups_are_averaged_as_before():
    h = _honest(3, 0)
    pair = robust_combine(h[:2], [12, 4])
    torch.testing.assert_close(pair.value, (12 * h[0] + 4 * h[1]) / 16, rtol=0, atol=1e-6)   # exactly the mean
    assert pair.factors == [1.0, 1.0]
    trio = robust_combine(h, [1, 1, 1])
    mean = sum(h) / 3
    assert _rel(trio.value, mean) < 0.02 and min(trio.factors) > 0.5     # nobody is taken for a liar
    assert torch.equal(_coordinate_median(torch.stack(h)), torch.stack(h).median(dim=0).values)


@pytest.mark.parametrize("kind", ATTACKS)
def test_one_attacker_moves_the_result_by_a_bounded_amount(kind):
    h = _honest(2, 1)
    z = _attack(kind, h[0])
    honest_mean = (h[0] + h[1]) / 2
    plain = (h[0] + h[1] + z) / 3
    out = robust_combine([h[0], h[1], z], [1, 1, 1])
    assert not _rel(plain, honest_mean) < 30          # the plain mean goes where the attacker wants
    # CenteredClip: a third of the weight moves the result by at most τ/3-ish; τ is the honest spread.
    assert float((out.value - honest_mean).norm()) <= 0.5 * float((h[0] - h[1]).norm())
    assert out.factors[:2] == [1.0, 1.0] and out.factors[2] < FLAG
    # With the weight it declares (10**9) capped at the median, it does no better.
    heavy = robust_combine([h[0], h[1], z], [1, 1, 1e9])
    assert float((heavy.value - honest_mean).norm()) <= 0.5 * float((h[0] - h[1]).norm())
    # Two senders: nobody can tell who is right, but the attacker counts for at most twice the
    # honest peer's size, so the result stays within 1.5× of the honest contribution.
    pair = robust_combine([h[0], z], [1, 1])
    assert float((pair.value - h[0]).norm()) <= 1.5 * float(h[0].norm()) * 1.0001
    assert pair.factors[0] == 1.0 and pair.factors[1] < FLAG


def test_non_finite_and_weightless_parts_are_left_out():
    h = _honest(3, 2)
    nan = torch.full((D,), float("nan"))
    out = robust_combine([h[0], h[1], nan], [1, 1, 1])
    torch.testing.assert_close(out.value, (h[0] + h[1]) / 2, rtol=0, atol=1e-6)
    assert out.factors[2] == 0.0
    out = robust_combine([h[0], h[1], h[2] * 1e6], [1, 1, 0])
    torch.testing.assert_close(out.value, (h[0] + h[1]) / 2, rtol=0, atol=1e-6)
    assert out.factors[2] is None
    assert bool(torch.isnan(robust_combine([h[0]], [0]).value).all())   # nothing to average: 0/0, as hivemind


def test_parameters_are_judged_by_their_movement_from_the_reference():
    g = torch.Generator().manual_seed(3)
    ref = torch.randn(D, generator=g)                       # our weights at the last round
    honest = ref + 0.01 * torch.randn(D, generator=g)       # moved a little since
    noise = torch.randn(D, generator=g)                     # another peer's weights replaced by noise: same norm
    out = robust_combine([honest, noise], [1, 1], reference=ref)
    moved = float((honest - ref).norm())
    assert float((out.value - honest).norm()) <= 1.5 * moved * 1.0001     # bounded by the honest movement
    plain = robust_combine([honest, noise], [1, 1])                         # norms alone cannot see it
    assert float((plain.value - honest).norm()) > 30 * moved


def test_the_reducer_combines_whole_parts_and_names_who_it_clipped():
    h = _honest(3, 4, d=2048)
    z = _attack("x-100", h[2])
    shapes = [torch.Size([1024]), torch.Size([1024])]

    async def run():
        r = RobustPartReducer(shapes, 3, sender_ids=["a", "b", "z"], own_index=0)

        async def sender(i, x, delay):
            out = []
            for k, part in enumerate(x.split(1024)):
                await asyncio.sleep(delay)
                out.append(await r.accumulate_part(i, k, part, weight=1.0))
            return torch.cat(out)
        results = await asyncio.gather(sender(0, h[0], 0.01), sender(1, h[1], 0.0), sender(2, z, 0.005))
        return r, results
    r, results = asyncio.run(run())
    assert all(torch.equal(results[0], x) for x in results)          # one result per part, for everyone
    expected = torch.cat([robust_combine([a, b, c], [1, 1, 1]).value for a, b, c in
                          zip(h[0].split(1024), h[1].split(1024), z.split(1024))])
    assert torch.equal(results[0], expected)
    assert r.verdicts() == {"b": False, "z": True}                   # never ourselves
    assert r.median_sq > 0 and r.own_sq > 0

    async def named():
        r = RobustPartReducer(shapes[:1], 3, sender_ids=["a", "b", "z"], skip=frozenset({"z"}), own_index=0)
        return await asyncio.gather(*(r.accumulate_part(i, 0, x[:1024]) for i, x in enumerate((h[0], h[1], z)))), r
    results, r = asyncio.run(named())
    torch.testing.assert_close(results[0], (h[0][:1024] + h[1][:1024]) / 2, rtol=0, atol=1e-6)
    assert "z" not in r.verdicts()                                   # named peers are not judged again


def test_clipped_three_rounds_of_five_names_a_peer_and_the_group_agrees_who_reduces():
    rec = ClipRecord()
    assert rec.judge({"x": True, "h": True}) == []
    assert rec.judge({"x": True, "h": False}) == []
    assert rec.judge({"x": True, "h": False}) == ["x"]
    for _ in range(10):                       # an honest peer clipped now and then is never named
        assert rec.judge({"h": False}) == [] and rec.judge({"h": False}) == []
        assert rec.judge({"h": True}) == []
    assert rec.snapshot() == dict(counts={"x": 3, "h": 11}, named=["x"])
    members = ["a", "b", "c", "z"]
    gathered = {"a": dict(named=["z"]), "b": dict(named=["z", "c"]), "c": dict(named=["z"]), "z": dict(named=["a"])}
    assert excluded_reducers(gathered, members) == {"z"}         # 3 of 3 others; c (1) and a (1) stay
    assert excluded_reducers({"a": dict(named=["z"]), "z": dict(named=["a"])}, ["a", "z"]) == set()   # never all
    assert excluded_reducers({"a": "junk", "b": dict(named="z")}, ["a", "b"]) == set()


def test_state_downloads_are_held_to_a_norm_ratio_and_the_size_of_recent_rounds():
    own = [torch.ones(10, 10), torch.ones(10)]
    near = [t + 0.01 for t in own]
    assert state_problem(near, own) is None
    assert "norm" in state_problem([t * -100 for t in own], own)
    assert "norm" in state_problem([t * 1e30 for t in own], own)          # overflows to inf: refused
    assert "norm" in state_problem([torch.zeros_like(t) for t in own], own)
    far = [t + 0.5 for t in own]
    assert state_problem(far, own) is None                                 # no history: the ratio only
    assert "more than" in state_problem(far, own, recent_step=0.05)       # 5.5 away, rounds move 0.05
    assert state_problem(far, own, recent_step=0.05, rounds_ahead=20) is None

    from hivemind.p2p import PeerID
    from hivemind.utils.timed_storage import ValueWithExpiration
    good, bad = PeerID(b"good-peer"), PeerID(b"bad-peer")
    entries = {good.to_bytes(): ValueWithExpiration(1.0, 9), bad.to_bytes(): ValueWithExpiration(5.0, 9)}
    dht = SimpleNamespace(get=lambda key, **kw: ValueWithExpiration(dict(entries), 9), peer_id="me")
    seen = _WithoutNamed(dht, {str(bad)}).get("run_diloco.all_averagers", latest=True)
    assert list(seen.value) == [good.to_bytes()]                          # no state from a named peer
    assert _WithoutNamed(dht, {str(bad)}).peer_id == "me"
    assert len(_WithoutNamed(dht, {str(bad)}).get("other.key").value) == 2


def test_sync_state_load_refuses_weights_of_another_scale(monkeypatch):
    from hivemind.averaging import DecentralizedAverager
    from training_core.swarm.collab import GuardedStateAverager, _CheckedStateLoad
    obj = object.__new__(GuardedStateAverager)
    warnings = []
    obj.__dict__.update(_parent_pid=-1, main_parameters=(torch.ones(2, 2),), extra_tensors=(),
                        on_warning=lambda code, msg: warnings.append(msg), max_epoch=lambda: 12)
    sent = {}
    def done(self, wait=True, **kw):      # the download finished: a future holding its state
        future = concurrent.futures.Future()
        future.set_result(sent["state"])
        return future
    monkeypatch.setattr(DecentralizedAverager, "load_state_from_peers", done)
    sent["state"] = ({"epoch": 10}, [torch.full((2, 2), 3.0)])
    assert _CheckedStateLoad.load_state_from_peers(obj) is sent["state"]
    sent["state"] = ({"epoch": 10}, [torch.full((2, 2), -100.0)])
    assert _CheckedStateLoad.load_state_from_peers(obj) is None and "norm" in warnings[-1]


def test_diloco_state_check_and_clip_warnings_without_a_swarm():
    from training_core.swarm.diloco import DiLoCoRounds
    r = object.__new__(DiLoCoRounds)
    warnings = []
    r.__dict__.update(outer=[torch.ones(4, 4)], momentum=[torch.zeros(4, 4)], round=5, epoch=5, outer_lr=0.7,
                      tracker=SimpleNamespace(global_epoch=5), _sync_target=None, _recent_steps=[0.1],
                      _clip_counts={}, _named=set(), on_warning=lambda c, m: warnings.append((c, m)))
    meta = dict(kind="modron-diloco-1", round=6, epoch=6)
    assert r._check_state(meta, [torch.ones(4, 4) + 0.05, torch.full((4, 4), 0.01)]) is None
    assert "more than" in r._check_state(meta, [torch.ones(4, 4) + 2, torch.zeros(4, 4)])
    assert "momentum" in r._check_state(meta, [torch.ones(4, 4), torch.full((4, 4), 100.0)])
    r._sync_target = (5, "x")      # the group says our θ_g is not the swarm's: the ratio only
    assert r._check_state(meta, [torch.ones(4, 4) + 2, torch.zeros(4, 4)]) is None
    assert r._check_state(meta, [torch.ones(4, 4), torch.zeros(4, 4)], from_peer=False) is None

    r._take_clips(dict(counts={"z": 3, "h": 1}, named=["z"]))
    r._take_clips(dict(counts={"z": 3, "h": 1}, named=["z"]))
    assert [c for c, _ in warnings] == ["peer_clipped"] and "z" in warnings[0][1]
    assert r.clipped_peers() == {"z": 3, "h": 1} and r.named_peers() == ["z"]


# ---- 3 peers on loopback -------------------------------------------------------------------------
SHAPES = [(3000,), (40, 50)]


@pytest.fixture(scope="module")
def dhts():
    import hivemind
    first = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    rest = [hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                         initial_peers=[str(m) for m in first.get_visible_maddrs()]) for _ in range(2)]
    yield [first, *rest]
    for d in rest + [first]:
        d.shutdown()


def _averagers(dhts, prefix: str, compression: str, classes) -> list:
    from hivemind.compression import NoCompression
    from training_core.swarm.compression import compression_for
    made = []
    try:
        for dht, cls in zip(dhts, classes):
            made.append(cls([torch.zeros(s) for s in SHAPES], dht, prefix=prefix, start=True, min_group_size=3,
                            min_matchmaking_time=1.0, request_timeout=0.5, allreduce_timeout=15.0,
                            next_chunk_timeout=5.0, compression=compression_for(compression),
                            state_compression=NoCompression(), part_size_bytes=2048, shutdown_timeout=2.0))
    except BaseException:
        for a in made:
            a.shutdown()
        raise
    return made


def _round(avgs, contributions, weights, gathers=None):
    """One all-reduce of all three; returns their step results and the averaged vectors."""
    from hivemind.utils import get_dht_time
    when = get_dht_time() + 1.5
    controls = []
    for i, (a, x, w) in enumerate(zip(avgs, contributions, weights)):
        with a.get_tensors() as tensors:
            for t, part in zip(tensors, x.split([math.prod(s) for s in SHAPES])):
                t.copy_(part.reshape(t.shape))
        controls.append(a.step(gather=gathers[i] if gathers else None, weight=float(w), scheduled_time=when,
                               timeout=20.0, allow_retries=False, wait=False))
    results = [c.result(timeout=40) for c in controls]
    outs = []
    for a in avgs:
        with a.get_tensors() as tensors:
            outs.append(torch.cat([t.reshape(-1).clone() for t in tensors]))
    return results, outs


def _gather(w: float, named=()) -> dict:
    return dict(v=1, round=0, digest="d", samples=w, named=sorted(named))


def test_diloco_exchanges_with_an_attacker_stay_identical_and_bounded_and_name_it(dhts):
    from training_core.swarm.diloco import DiLoCoAverager
    avgs = _averagers(dhts, "robust-diloco", "none", [DiLoCoAverager] * 3)
    try:
        z_id = str(avgs[2].peer_id)
        named: list = [[], [], []]
        for k, kind in enumerate(ATTACKS):
            h = _honest(3, 10 + k)
            weights = [8, 4, 1e9 if kind == "x-100" else 4]          # it also claims 10**9 samples once
            honest_mean = (8 * h[0] + 4 * h[1]) / 12
            reports, outs = _round(avgs, [h[0], h[1], _attack(kind, h[2])], weights,
                                   [_gather(w, n) for w, n in zip(weights, named)])
            named = [r["clips"]["named"] for r in reports]
            a, b = reports[0], reports[1]
            assert a["failure"] is None and b["failure"] is None, (a, b)
            assert torch.equal(outs[0], outs[1])                      # honest peers end identical
            spread = float((h[0] - h[1]).norm())
            if k < 3:   # within the honest peers' own spread (the plain mean moves 100× farther)
                assert float((outs[0] - honest_mean).norm()) <= 0.75 * spread, kind
            assert a["clips"]["counts"].get(z_id) == min(k + 1, 3)
            assert a["named_now"] == ([z_id] if k == 2 else [])
            if k == 3:   # named by both: weight 0 at their reducers, and (named in the gathers) no part to reduce
                torch.testing.assert_close(outs[0], (8 * h[0] + 4 * h[1]) / 12, rtol=0, atol=1e-6)
            if k == 2:
                assert a["clips"]["named"] == b["clips"]["named"] == [z_id]
    finally:
        for x in avgs:
            x.shutdown()


def test_a_reducer_returning_garbage_fails_the_round_alike_until_it_is_left_out(dhts, monkeypatch):
    from training_core.swarm.diloco import DiLoCoAverager, ExactAllReduceRunner

    class GarbageRunner(ExactAllReduceRunner):
        def _reply_for(self, part_index, averaged):
            return super()._reply_for(part_index, averaged * -50 + 3)

    class GarbageAverager(DiLoCoAverager):
        runner_class = GarbageRunner
    GarbageAverager.__name__ = "DiLoCoAverager"     # hivemind names its RPC handlers after the class

    monkeypatch.setattr(robust, "STRIKES", 2)       # read by the averagers' processes when they start
    monkeypatch.setattr(robust, "WINDOW", 3)
    avgs = _averagers(dhts, "robust-garbage", "float16", [DiLoCoAverager, DiLoCoAverager, GarbageAverager])
    try:
        z_id = str(avgs[2].peer_id)
        named: list[set] = [set(), set(), set()]
        for k in range(3):
            h = _honest(3, 20 + k)
            reports, outs = _round(avgs, h, [4, 4, 4], [_gather(4, named[i]) for i in range(3)])
            a, b = reports[0], reports[1]
            if k < 2:
                # The same bad bytes went to both: both fail the round, nothing applied anywhere.
                assert z_id in a["failure"] and z_id in b["failure"] and "not believable" in a["failure"]
                assert a["clips"]["counts"][z_id] == b["clips"]["counts"][z_id] == k + 1
            else:
                # Named by both (in their gathers): it reduces nothing, counts for nothing; rounds go on.
                assert a["failure"] is None and b["failure"] is None, (a, b)
                assert torch.equal(outs[0], outs[1])
                torch.testing.assert_close(outs[0], (h[0] + h[1]) / 2, rtol=0, atol=2e-3)
            named = [set(r["clips"]["named"]) for r in reports]
        assert named[0] == named[1] == {z_id}
    finally:
        for x in avgs:
            x.shutdown()


def test_sync_all_reduce_falls_back_to_own_values_for_a_garbage_part(dhts):
    from training_core.swarm.robust import RobustAllReduceRunner, RobustAveraging

    class GarbageSyncRunner(RobustAllReduceRunner):
        def _setup_robust(self, skip, reference):
            super()._setup_robust(skip, reference)
            r = self.tensor_part_reducer
            r._combine = lambda: torch.full(r.part_shapes[r.current_part_index], 1e4)

    class GarbageSyncAverager(RobustAveraging):
        runner_class = GarbageSyncRunner
    GarbageSyncAverager.__name__ = "RobustAveraging"

    avgs = _averagers(dhts, "robust-sync", "float16", [RobustAveraging, RobustAveraging, GarbageSyncAverager])
    try:
        h = _honest(3, 30)
        _, outs = _round(avgs, [h[0], h[1], _attack("x-100", h[2])], [1, 1, 1])
        honest_mean = (h[0] + h[1]) / 2
        for x, own in zip(outs[:2], h[:2]):
            kept = (x == own)                       # parts the garbage reducer returned: our own values
            assert 0.1 < float(kept.float().mean()) < 0.6
            assert float((x[~kept] - honest_mean[~kept]).norm()) <= 0.5 * float((h[0] - h[1])[~kept].norm())
        report = avgs[0].clip_report()
        assert report["counts"][str(avgs[2].peer_id)] == 1 and report["named"] == []
    finally:
        for x in avgs:
            x.shutdown()
