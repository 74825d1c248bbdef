"""The hostile-peer guards without a swarm: epoch filter, received-tensor checks, backups,
signed metrics and the token tag."""
from __future__ import annotations

import concurrent.futures
import contextlib
import math
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from training_core.swarm import metrics
from training_core.swarm.guards import (EpochClaim, ParamBackup, auth_ok, auth_tag, believed_epoch_ceiling,
                                        filter_epoch_claims, grads_finite, tensors_match)


def claim(who: str, epoch: int, counts: bool = True) -> EpochClaim:
    return EpochClaim(who.encode(), epoch, counts)


# ---- epoch filter -------------------------------------------------------------------------

def test_one_peer_far_ahead_is_not_believed():
    claims = [claim("a", 5), claim("b", 5), claim("evil", 1_000_000)]
    kept, rejected = filter_epoch_claims(claims, local_epoch=5)
    assert [c.source for c in rejected] == [b"evil"]
    assert {c.source for c in kept} == {b"a", b"b"}


def test_two_peers_agreeing_far_ahead_are_believed():
    # A late joiner at epoch 0 must follow a swarm that really is at epoch 40.
    claims = [claim("me", 0), claim("a", 40), claim("b", 41), claim("evil", 900)]
    assert believed_epoch_ceiling(claims, local_epoch=0) == 43   # 41 vouched for by two, plus the lead
    kept, rejected = filter_epoch_claims(claims, local_epoch=0)
    assert [c.source for c in rejected] == [b"evil"]
    assert {c.source for c in kept} == {b"me", b"a", b"b"}


def test_one_source_cannot_agree_with_itself_and_clients_do_not_vote():
    # With another training peer beside us (b); were evil our only fellow, its word would count
    # (the majority rule, tests/test_swarm_epoch_filter.py).
    claims = [claim("b", 3), claim("evil", 50), claim("evil", 60), claim("client", 60, counts=False)]
    assert believed_epoch_ceiling(claims, local_epoch=3) == 5   # local + MAX_EPOCH_LEAD


def test_small_leads_are_normal_and_kept():
    claims = [claim("a", 7), claim("b", 8)]
    kept, rejected = filter_epoch_claims(claims, local_epoch=6)
    assert rejected == [] and len(kept) == 2


def test_a_signed_metrics_witness_corroborates_a_single_progress_record():
    # The host does not report training progress, but its signed metrics record can vouch.
    claims = [claim("me", 0), claim("peer", 30)]
    kept, _ = filter_epoch_claims(claims, local_epoch=0, witnesses=[claim("host", 30)])
    assert {c.source for c in kept} == {b"me", b"peer"}
    kept, _ = filter_epoch_claims(claims, local_epoch=0, witnesses=[claim("peer", 30)])  # itself: no
    assert {c.source for c in kept} == {b"me"}


def test_tracker_filter_on_hivemind_shaped_records():
    from hivemind.utils import ValueWithExpiration
    from records_helpers import make_tracker, progress

    tracker, warnings = make_tracker(local_epoch=3)
    metadata = {b"[owner:a]": progress(3), b"[owner:b]": progress(4), b"[owner:evil]": progress(99),
                b"[owner:junk]": ValueWithExpiration({"epoch": "lots"}, 0)}
    kept = tracker.filter_metadata(metadata)
    assert set(kept) == {b"[owner:a]", b"[owner:b]"}
    assert len(warnings) == 1 and "99" in warnings[0]
    tracker.filter_metadata(metadata)
    assert len(warnings) == 1                  # said once per peer and epoch, not every fetch


# ---- what peers send --------------------------------------------------------------------

def test_tensors_match_checks_count_shape_and_finiteness():
    shapes = [torch.Size([2, 3]), torch.Size([4])]
    assert tensors_match([torch.zeros(2, 3), torch.zeros(4)], shapes) is None
    assert "shape" in tensors_match([torch.zeros(3, 2), torch.zeros(4)], shapes)
    assert "tensors" in tensors_match([torch.zeros(2, 3)], shapes)
    assert "non-finite" in tensors_match([torch.zeros(2, 3), torch.tensor([0, 1, float("inf"), 0])], shapes)


def _fake_optimizer(params, averaged):
    from training_core.swarm.collab import GuardedOptimizer

    class FakeGradAverager:
        def __init__(self):
            self.buffers = averaged
            self.used = 0

        @contextlib.contextmanager
        def get_tensors(self):
            yield self.buffers

        def notify_used_averaged_gradients(self):
            self.used += 1

    warnings = []
    opt = SimpleNamespace(state_averager=SimpleNamespace(optimizer=SimpleNamespace(param_groups=[{"params": params}])),
                          grad_averager=FakeGradAverager(), _loading_local=False,
                          on_warning=lambda code, msg: warnings.append(code))
    opt._optimized_params = lambda: GuardedOptimizer._optimized_params(opt)
    opt._load_averaged_gradients_into_optimizer_ = lambda: GuardedOptimizer._load_averaged_gradients_into_optimizer_(opt)
    return opt, warnings


def test_nonfinite_averaged_gradients_fall_back_to_local_ones(monkeypatch):
    import hivemind
    params = [torch.nn.Parameter(torch.ones(3))]
    local = [torch.full((3,), 0.5)]
    opt, warnings = _fake_optimizer(params, [torch.tensor([1.0, float("nan"), 1.0])])

    def load_local():   # what hivemind does: local accumulators into the buffers, then load them
        opt.grad_averager.buffers = local
        opt._load_averaged_gradients_into_optimizer_()
    opt._load_local_gradients_into_optimizer = load_local
    applied = []
    monkeypatch.setattr(hivemind.Optimizer, "_load_averaged_gradients_into_optimizer_",
                        lambda self: applied.append([t.clone() for t in self.grad_averager.buffers]))
    opt._load_averaged_gradients_into_optimizer_()
    assert warnings == ["peer_rejected"]
    assert len(applied) == 1 and torch.equal(applied[0][0], local[0])


def test_when_local_gradients_are_bad_too_no_gradient_is_applied(monkeypatch):
    import hivemind
    params = [torch.nn.Parameter(torch.ones(2, 2))]
    opt, warnings = _fake_optimizer(params, [torch.zeros(4)])     # wrong shape from peers

    def load_local():
        opt.grad_averager.buffers = [torch.full((2, 2), float("inf"))]
        opt._load_averaged_gradients_into_optimizer_()
    opt._load_local_gradients_into_optimizer = load_local
    monkeypatch.setattr(hivemind.Optimizer, "_load_averaged_gradients_into_optimizer_",
                        lambda self: pytest.fail("bad gradients must not be applied"))
    opt._load_averaged_gradients_into_optimizer_()
    assert torch.equal(params[0].grad, torch.zeros(2, 2))
    assert opt.grad_averager.used == 1 and warnings == ["peer_rejected"]


def test_state_from_a_peer_is_checked_before_loading(monkeypatch):
    from hivemind.averaging import DecentralizedAverager
    from training_core.swarm.collab import GuardedStateAverager, _CheckedStateLoad

    obj = object.__new__(GuardedStateAverager)     # no processes: only the check runs
    warnings = []
    obj.__dict__.update(_parent_pid=-1, main_parameters=(torch.zeros(2, 2),), extra_tensors=(),
                        on_warning=lambda code, msg: warnings.append(msg), max_epoch=lambda: 12)
    sent = {}
    def done(self, wait=True, **kw):
        future = concurrent.futures.Future()
        future.set_result(sent["state"])
        return future
    monkeypatch.setattr(DecentralizedAverager, "load_state_from_peers", done)
    good = ({"epoch": 10}, [torch.ones(2, 2), torch.ones(2, 2)])
    for state, problem in [(good, None), (({"epoch": 10}, [torch.ones(4)]), "shape"),
                           (({"epoch": 10}, [torch.ones(2, 2), torch.tensor([float("nan")])]), "non-finite"),
                           (({"epoch": 10 ** 6}, [torch.ones(2, 2)]), "far ahead")]:
        sent["state"] = state
        result = _CheckedStateLoad.load_state_from_peers(obj)
        if problem is None:
            assert result is state
        else:
            assert result is None and problem in warnings[-1]
    assert len(warnings) == 3


def test_a_state_download_gives_up_when_told_and_at_its_timeout(monkeypatch):
    """A stop or pause must not wait out a download that takes minutes on a home uplink."""
    from hivemind.averaging import DecentralizedAverager
    from training_core.swarm.collab import CancellableDownload

    pending = []

    def never(self, wait=True, **kw):
        assert wait is False
        pending.append(concurrent.futures.Future())
        return pending[-1]
    monkeypatch.setattr(DecentralizedAverager, "load_state_from_peers", never)
    obj = object.__new__(CancellableDownload)
    obj.__dict__.update(_parent_pid=-1, download_cancel=threading.Event())
    threading.Timer(0.3, obj.download_cancel.set).start()
    t0 = time.monotonic()
    assert CancellableDownload.load_state_from_peers(obj, timeout=60) is None
    assert time.monotonic() - t0 < 2 and pending[-1].cancelled()

    obj.download_cancel.clear()
    with pytest.raises(concurrent.futures.TimeoutError):
        CancellableDownload.load_state_from_peers(obj, timeout=0.4)
    assert pending[-1].cancelled()


def test_backup_restores_parameters_and_optimizer_state():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    backup = ParamBackup()
    assert backup.take([p], opt)
    saved_p, saved_m = p.detach().clone(), opt.state[p]["exp_avg"].clone()
    with torch.no_grad():
        p.fill_(float("nan"))
        opt.state[p]["exp_avg"].fill_(float("nan"))
    assert not backup.take([p], opt)          # never back up poison
    assert backup.restore([p], opt)
    assert torch.equal(p.detach(), saved_p) and torch.equal(opt.state[p]["exp_avg"], saved_m)


def test_grads_finite():
    p = torch.nn.Parameter(torch.ones(2))
    assert grads_finite([p])                  # no gradient yet
    p.grad = torch.tensor([1.0, float("-inf")])
    assert not grads_finite([p])


# ---- metrics records and tokens ---------------------------------------------------------

def _record(**kw):
    base = dict(role="peer", epoch=3, samples=64, samples_per_s=12.5, loss=3.2, time=time.time())
    base.update(kw)
    return base


def test_metrics_records_that_do_not_fit_the_schema_are_dropped():
    raw = {b"[owner:a]": _record(), b"[owner:b]": _record(loss=float("nan")), b"[owner:c]": _record(role="king"),
           b"[owner:d]": _record(epoch=-1), b"[owner:e]": _record(samples="many"), b"[owner:f]": None,
           "not-bytes": _record()}
    views = metrics.parse_records(raw, "run-x")
    assert [v.public_key for v in views] == [b"[owner:a]"]


def test_summary_counts_fresh_peers_only_and_takes_the_median_loss():
    now = time.time()
    raw = {b"a": _record(loss=3.0, time=now), b"b": _record(loss=5.0, time=now, samples_per_s=2.5, epoch=4),
           b"old": _record(time=now - 600), b"host": _record(role="host", epoch=2, loss=None, time=now)}
    s = metrics.SwarmSummary.of(metrics.parse_records(raw, "run-x"), now=now)
    # the lower median: a loss one of the peers had (a mean of forged and honest losses is no one's)
    assert (s.peers, s.epoch, s.loss, s.samples_per_s) == (2, 4, 3.0, 15.0)


def test_token_tag_binds_token_run_and_signer():
    tag = auth_tag("s3cret", "run-x", b"key-a")
    assert auth_ok(tag, "s3cret", "run-x", b"key-a")
    assert not auth_ok(tag, "s3cret", "run-x", b"key-b")      # copied onto another signer's record
    assert not auth_ok(tag, "wrong", "run-x", b"key-a")
    assert not auth_ok(tag, "s3cret", "run-y", b"key-a")
    assert not auth_ok(None, "s3cret", "run-x", b"key-a")


def test_private_swarm_reads_only_records_with_a_valid_tag():
    raw = {b"a": _record(auth=auth_tag("tok", "run-x", b"a")), b"b": _record(auth=auth_tag("other", "run-x", b"b")),
           b"c": _record()}
    assert [v.public_key for v in metrics.parse_records(raw, "run-x", "tok", require_auth=True)] == [b"a"]
    assert len(metrics.parse_records(raw, "run-x", "tok", require_auth=False)) == 3


def test_the_dht_stores_only_signed_records_that_fit_the_schema():
    """A real (loopback) DHT with the swarm's validators: forged or malformed records are refused."""
    import hivemind
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.utils import get_dht_time
    from hivemind.utils.crypto import RSAPrivateKey

    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                       record_validators=metrics.make_validators("run-x"))
    try:
        me = RSASignatureValidator(RSAPrivateKey.process_wide()).local_public_key
        other = RSASignatureValidator(RSAPrivateKey()).local_public_key
        key, exp = metrics.metrics_key("run-x"), get_dht_time() + 30
        assert dht.store(key, subkey=me, value=metrics.MetricsRecord(**_record()).dict(), expiration_time=exp)
        assert not dht.store(key, subkey=me, value=_record(role="king"), expiration_time=exp)
        # A subkey naming someone else's key cannot be signed by us.
        assert not dht.store(key, subkey=other, value=_record(), expiration_time=exp)
        views = metrics.read(dht, "run-x")
        assert [v.public_key for v in views] == [me] and math.isclose(views[0].record.loss, 3.2)
    finally:
        dht.shutdown()


def test_pause_moves_hivemind_gradient_accumulators_with_the_model():
    # On a GPU, hivemind's per-parameter accumulators would keep a model's worth of memory after a
    # pause; the sync strategy names them, and the engine moves them with the model.
    import types
    import torch
    from training_core.engine import Engine
    from training_core.swarm.sync_strategy import SyncStrategy

    class Buffer:
        def __init__(self):
            self.data = self

        def to(self, device):
            moved = Buffer()
            moved.device = device
            return moved

    accs = (Buffer(), Buffer())
    strategy = SyncStrategy.__new__(SyncStrategy)
    strategy.optimizer = types.SimpleNamespace(grad_averager=types.SimpleNamespace(_local_accumulators=accs),
                                               opt=types.SimpleNamespace(state={}))
    engine = Engine.__new__(Engine)
    engine.strategy, engine.model = strategy, torch.nn.Linear(2, 2)
    engine._move_to(torch.device("cpu"))
    assert [a.data.device for a in accs] == [torch.device("cpu")] * 2
