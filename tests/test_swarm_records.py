"""Records with limits (issue 10, point 3): progress and metrics records count only within what the
manifest makes plausible (samples one peer can compute since its last record, times near now, a
loss in range), one signer once, epochs within reach of what several admitted peers agree on; the
host reports only from records that pass. Unit level: hivemind-shaped records, no network."""
from __future__ import annotations

import dataclasses
import math
import time

import pytest
from hivemind.optim.progress_tracker import ProgressTracker

from records_helpers import make_tracker, parsed, progress
from training_core.swarm import metrics
from training_core.swarm.guards import (CLOCK_SKEW_S, FORWARD_FLOPS_PER_WEIGHT, MAX_EPOCH_LEAD, MAX_SIGNERS,
                                        PEAK_FLOPS, EpochClaim, ProgressRecords, RecordGate, RecordLimits,
                                        believed_epoch_ceiling, filter_epoch_claims, model_matmul_weights,
                                        preset_matmul_weights, signer_identity)
from training_core.swarm.manifest import SwarmManifest

FORGED_SAMPLES = 10 ** 9
FORGED_EPOCH = 10 ** 6


def manifest(**kw) -> SwarmManifest:
    base = dict(run_id="records-unit", model="scratch:small", data={"source": "local"}, seq_len=128, micro_batch=8)
    base.update(kw)
    return SwarmManifest(**base)


LIMITS = RecordLimits.for_manifest(manifest())
RATE = LIMITS.rate_max


def claim(who: str, epoch: int, counts: bool = True, witness: bool = False) -> EpochClaim:
    return EpochClaim(who.encode(), epoch, counts, witness)


# ---- the limits and where they come from --------------------------------------------------------

def test_the_speed_bound_follows_from_the_model_and_seq_len():
    m = manifest()
    weights = preset_matmul_weights("small")      # 10 blocks of q, k, v, o (512x512) and a 512x1376 SwiGLU
    assert weights == 10 * (4 * 512 * 512 + 3 * 512 * 1376)
    assert math.isclose(RATE, PEAK_FLOPS / (FORWARD_FLOPS_PER_WEIGHT * weights * m.seq_len))
    assert 1e5 < RATE < 1e6                      # ~250k samples/s: ~10x what any one device trains
    # Longer samples, bigger models: fewer samples per second.
    assert math.isclose(RecordLimits.for_manifest(manifest(seq_len=1024)).rate_max, RATE / 8)
    assert RecordLimits.for_manifest(manifest(model="scratch:medium")).rate_max < RATE / 9
    # Every preset refuses 10**9 samples claimed a minute into an epoch.
    for preset in ("tiny", "mini", "small", "base", "medium"):
        assert RecordLimits.for_manifest(manifest(model=f"scratch:{preset}")).rate_max * 60 < FORGED_SAMPLES
    assert LIMITS.grace_samples == 8 and 0 < LIMITS.loss_max < 1e4


def test_a_base_model_is_measured_from_its_weights():
    import torch
    model = torch.nn.Sequential(torch.nn.Embedding(100, 16), torch.nn.Linear(16, 32), torch.nn.Linear(32, 100))
    assert model_matmul_weights(model) == 16 * 32 + 32 * 100          # the embedding table only looks up
    model.config = type("Config", (), {"vocab_size": 100})()
    limits = RecordLimits.for_manifest(manifest(model="some/base-model"), model)
    assert math.isclose(limits.rate_max, PEAK_FLOPS / (2 * (16 * 32 + 32 * 100) * 128))
    assert math.isclose(limits.loss_max, 10 * math.log(100))
    # Without the model there is no speed bound: samples go unchecked, the rest is checked.
    assert RecordLimits.for_manifest(manifest(model="some/base-model")).rate_max is None


# ---- samples: DiLoCo rounds and sync's batch ----------------------------------------------------

def test_forged_samples_do_not_close_a_diloco_round_early():
    # A round closes when the swarm's samples for it reach inner_steps * micro_batch * peers
    # (DiLoCoRounds._due). Two honest peers and this one are at epoch 7, far from that.
    inner_steps, micro_batch = 500, 8
    tracker, warnings = make_tracker(local_epoch=7, limits=LIMITS, target=inner_steps * micro_batch)
    metadata = {b"[owner:me]": progress(7, samples=800, samples_per_second=20.0),
                b"[owner:a]": progress(7, samples=1000, samples_per_second=20.0),
                b"[owner:b]": progress(7, samples=900, samples_per_second=18.0),
                b"[owner:evil]": progress(7, samples=FORGED_SAMPLES, samples_per_second=20.0)}
    unfiltered = ProgressTracker._parse_swarm_progress_data(tracker, metadata)
    assert unfiltered.samples_accumulated >= inner_steps * micro_batch * unfiltered.num_peers   # what it did

    g = tracker._parse_swarm_progress_data(metadata)
    assert g.epoch == 7 and g.samples_accumulated == 800 + 1000 + 900       # the forged samples count as none
    assert g.samples_accumulated < inner_steps * micro_batch * g.num_peers   # the round is not due
    assert any("without its samples" in w for w in warnings)


def test_forged_samples_do_not_shrink_syncs_batch():
    # sync: the epoch ends (hivemind's ready_to_update_epoch) when the swarm's samples reach
    # target_batch_size, or when the ETA from everyone's samples/s has passed.
    tracker, _ = make_tracker(local_epoch=3, limits=LIMITS, target=4096)
    for forged in (progress(3, samples=FORGED_SAMPLES, samples_per_second=50.0),
                   progress(3, samples=10, samples_per_second=1e12)):          # or a forged speed
        metadata = {b"[owner:me]": progress(3, samples=96, samples_per_second=50.0),
                    b"[owner:a]": progress(3, samples=128, samples_per_second=50.0),
                    b"[owner:evil]": forged}
        assert ProgressTracker._parse_swarm_progress_data(tracker, metadata).eta_next_epoch <= time.time() + 1
        tracker.global_progress = tracker._parse_swarm_progress_data(metadata)
        assert tracker.global_progress.samples_accumulated == 96 + 128
        assert tracker.global_progress.eta_next_epoch > time.time() + 30     # ~3800 samples at ~100/s to go
        assert not tracker.ready_to_update_epoch


def test_samples_within_reach_of_the_last_record_count():
    records = ProgressRecords(LIMITS, started=1000.0)
    t0 = 1000.0

    def sift(samples, t, now=None):
        return records.sift([(b"[owner:a]", parsed(4, samples=samples, t=t))], 4, now=t if now is None else now)

    assert not sift(1000, t0).no_work
    # 10 s later: at most RATE * (10 s + slack) + one step more. A fast honest peer is far below.
    assert not sift(1000 + int(RATE * 9), t0 + 10).no_work
    forged = 1000 + int(RATE * 9) + int(RATE * 20)
    out = sift(forged, t0 + 20)
    assert out.no_work and "samples" in out.problems[0].text
    # The record that failed stays failed when read again later (it carries its own time).
    assert sift(forged, t0 + 20, now=t0 + 200).no_work
    # The signer's next honest record is judged against its last one that passed.
    assert not sift(1000 + int(RATE * 9) + 500, t0 + 30).no_work


def test_a_newcomer_still_catches_up_with_a_peer_whose_samples_it_cannot_place_yet():
    # Just started: a fast peer's samples for its long round are more than one peer could compute
    # since we began watching; its record counts for its epoch (the epoch filter judges that) but
    # not for samples, until its count is plausible.
    tracker, _ = make_tracker(local_epoch=0, limits=LIMITS)
    g = tracker._parse_swarm_progress_data({b"[owner:me]": progress(0, samples=0),
                                            b"[owner:peer]": progress(12, samples=int(RATE * 100))})
    assert g.epoch == 12 and g.samples_accumulated == 0


def test_record_times_must_be_now():
    tracker, _ = make_tracker(local_epoch=5, limits=LIMITS)
    now = time.time()
    for t in (now + CLOCK_SKEW_S + 30, now - LIMITS.max_age_s - 30, float("inf")):
        g = tracker._parse_swarm_progress_data({b"[owner:me]": progress(5, samples=8),
                                                b"[owner:odd]": progress(6, samples=8, t=t)})
        assert g.num_peers == 1 and g.samples_accumulated == 8       # not counted at all
    g = tracker._parse_swarm_progress_data({b"[owner:me]": progress(5, samples=8),
                                            b"[owner:late]": progress(5, samples=8, t=now + CLOCK_SKEW_S / 2)})
    assert g.num_peers == 2


# ---- epochs ------------------------------------------------------------------------------------

def test_two_forged_keys_do_not_outvote_several_honest_peers():
    honest = [claim("a", 500), claim("b", 500), claim("c", 501)]
    forged = [claim("evil1", FORGED_EPOCH), claim("evil2", FORGED_EPOCH)]
    # Each honest peer, the host (its own metrics record a witness), and a newcomer at epoch 0.
    for own, local in (("a", 500), ("c", 501), (None, 490), ("me", 0)):
        ceiling = believed_epoch_ceiling(honest + forged + [claim("host", 499, witness=True)], local,
                                         own=own.encode() if own else None)
        assert 500 <= ceiling < FORGED_EPOCH
    # The forgers' metrics records (the same keys) do not make them count twice.
    kept, rejected = filter_epoch_claims(honest + forged, 500, [claim("evil1", FORGED_EPOCH, witness=True),
                                                                claim("evil2", FORGED_EPOCH, witness=True)], own=b"a")
    assert {c.source for c in rejected} == {b"evil1", b"evil2"}


def test_two_forged_keys_move_no_tracker_of_an_honest_swarm():
    metadata = {b"[owner:a]": progress(500), b"[owner:b]": progress(500), b"[owner:c]": progress(501),
                b"[owner:evil1]": progress(FORGED_EPOCH), b"[owner:evil2]": progress(FORGED_EPOCH)}
    tracker, warnings = make_tracker(local_epoch=500, own=b"[owner:a]", limits=LIMITS)
    assert tracker._parse_swarm_progress_data(metadata).epoch == 501
    assert sum(str(FORGED_EPOCH) in w for w in warnings) == 2
    newcomer, _ = make_tracker(local_epoch=0, own=b"[owner:new]", limits=LIMITS)
    assert newcomer._parse_swarm_progress_data(metadata).epoch == 501       # it follows the honest swarm


def test_a_swarm_that_moved_on_is_still_followed():
    # Two signers ahead and nobody training below them: a newcomer follows (as before).
    assert believed_epoch_ceiling([claim("a", 40), claim("b", 41)], 0, own=b"me") == 40 + MAX_EPOCH_LEAD
    # Two other newcomers (epoch 0) beside two veterans: a tie, which the host's record breaks.
    claims = [claim("n1", 0), claim("n2", 0), claim("v1", 40), claim("v2", 41)]
    assert believed_epoch_ceiling(claims, 0, own=b"me") == 0 + MAX_EPOCH_LEAD
    assert believed_epoch_ceiling(claims + [claim("host", 40, witness=True)], 0, own=b"me") == 40 + MAX_EPOCH_LEAD


def test_only_admitted_signers_count():
    admitted = lambda who: not who.startswith(b"[owner:evil")       # noqa: E731 - the hook, as admission plugs in
    # Two unadmitted keys far ahead, nobody opposing: not believed, not kept.
    claims = [claim("[owner:a]", 5), claim("[owner:evil1]", 90), claim("[owner:evil2]", 90)]
    assert believed_epoch_ceiling(claims, 5) == 90 + MAX_EPOCH_LEAD
    assert believed_epoch_ceiling(claims, 5, admitted=admitted) == 5 + MAX_EPOCH_LEAD
    kept, rejected = filter_epoch_claims(claims, 5, admitted=admitted)
    assert [c.source for c in kept] == [b"[owner:a]"]
    # In the tracker an unadmitted signer's record counts for nothing (peers, samples, epoch).
    tracker, warnings = make_tracker(local_epoch=5, limits=LIMITS)
    tracker.admitted = admitted
    g = tracker._parse_swarm_progress_data({b"[owner:me]": progress(5, samples=8), b"[owner:a]": progress(5, samples=8),
                                            b"[owner:evil1]": progress(5, samples=8)})
    assert (g.num_peers, g.samples_accumulated) == (2, 16)
    assert any("not admitted" in w for w in warnings)


# ---- one signer, one record ------------------------------------------------------------------

@pytest.fixture(scope="module")
def signer():
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.utils.crypto import RSAPrivateKey
    return RSASignatureValidator(RSAPrivateKey())


def spellings(canonical: bytes) -> list[bytes]:
    key = canonical[len(b"[owner:"):-1]
    return [b"x" + canonical, canonical + b"y", canonical + canonical, b"[owner:" + key + b" a-comment]"]


def test_one_key_has_one_spelling(signer):
    from hivemind.dht.validation import DHTRecord
    canonical = signer.local_public_key
    assert signer_identity(canonical) == canonical
    for other in spellings(canonical):
        assert signer_identity(other) is None
    # hivemind's validator does accept a record signed under another spelling: the reason for this.
    record = DHTRecord(key=b"run_progress", subkey=b"x" + canonical, value=b"v", expiration_time=1e10)
    assert signer.validate(dataclasses.replace(record, value=signer.sign_value(record)))


def test_a_key_counts_once_in_the_tracker(signer):
    canonical = signer.local_public_key
    metadata = {b"[owner:me]": progress(5, samples=8), canonical: progress(5, samples=8)}
    for i, other in enumerate(spellings(canonical)):        # as a client too, with more samples
        metadata[other] = progress(5, samples=8 + i, client=bool(i % 2))
    tracker, warnings = make_tracker(local_epoch=5, limits=LIMITS)
    g = tracker._parse_swarm_progress_data(metadata)
    assert (g.num_peers, g.num_clients, g.samples_accumulated) == (2, 0, 16)
    assert any("second spelling" in w for w in warnings)


def test_a_key_counts_once_in_reports(signer):
    canonical = signer.local_public_key
    now = time.time()
    views = [metrics.PeerView(canonical, metrics.MetricsRecord(role="peer", epoch=5, samples=100, samples_per_s=10.0,
                                                               loss=3.0, time=now), False)]
    views += [metrics.PeerView(other, metrics.MetricsRecord(role="peer", epoch=5, samples=100, samples_per_s=10.0,
                                                            loss=0.1, time=now), False) for other in spellings(canonical)]
    summary = metrics.SwarmSummary.of(metrics.MetricsReader(LIMITS).sift(views, now), now)
    assert (summary.peers, summary.samples, summary.loss) == (1, 100, 3.0)


# ---- the host's reports --------------------------------------------------------------------------

def _metrics_view(who: bytes, now: float, **kw) -> metrics.PeerView:
    fields = dict(role="peer", epoch=5, samples=4000, samples_per_s=40.0, loss=3.1, time=now)
    fields.update(kw)
    return metrics.PeerView(who, metrics.MetricsRecord(**fields), False)


def test_forged_metrics_are_not_reported():
    now = time.time()
    honest = [_metrics_view(b"a", now, loss=3.1), _metrics_view(b"b", now, loss=3.3, samples=5000),
              _metrics_view(b"c", now, loss=3.2, samples=4500)]
    forged = [_metrics_view(b"evil-samples", now, samples=10 ** 12, loss=0.01),
              _metrics_view(b"evil-speed", now, samples_per_s=1e12),
              _metrics_view(b"evil-loss", now, loss=5000.0),                    # a loss no peer has
              _metrics_view(b"evil-future", now, time=now + 600),
              _metrics_view(b"evil-epoch", now, epoch=FORGED_EPOCH)]
    reader = metrics.MetricsReader(LIMITS)
    passed = reader.sift(honest + forged, now)
    assert {v.public_key for v in passed} == {b"a", b"b", b"c", b"evil-epoch"}
    assert {who for who, _ in reader.rejected} == {b"evil-samples", b"evil-speed", b"evil-loss", b"evil-future"}
    summary = metrics.SwarmSummary.of(passed, now)
    assert summary.samples == 4000 + 5000 + 4500 + 4000 and summary.samples_per_s == 160.0
    assert summary.epoch == 5                           # one signer's epoch 10**6 is not the swarm's
    assert summary.loss in (3.1, 3.2, 3.3)
    # A forged loss within range is outvoted by the median (the mean would be no one's loss).
    summary = metrics.SwarmSummary.of(passed + [_metrics_view(b"d", now, loss=0.0001)], now)
    assert summary.loss in (3.1, 3.2, 3.3)


def test_a_peers_count_grows_only_as_fast_as_one_peer_computes():
    t0 = time.time() - 100
    reader = metrics.MetricsReader(LIMITS, started=t0)
    # Seen first 20 s after the reader started: up to RATE * (20 s + slack) samples, honest peers far less.
    assert reader.sift([_metrics_view(b"a", t0 + 20, samples=100_000)], t0 + 20)
    assert reader.sift([_metrics_view(b"a", t0 + 30, samples=100_000 + int(RATE * 9))], t0 + 30)
    assert not reader.sift([_metrics_view(b"a", t0 + 40, samples=10 ** 12)], t0 + 40)
    assert not reader.sift([_metrics_view(b"a", t0 + 90, samples=10 ** 12)], t0 + 90)     # nor a minute later
    assert reader.sift([_metrics_view(b"a", t0 + 95, samples=10)], t0 + 95)               # a restart: from 0


def test_the_hosts_epoch_belief_uses_only_records_that_pass(signer):
    from hivemind.utils import ValueWithExpiration
    from training_core.swarm import host

    now = time.time()
    raw = {b"[owner:a]": progress(8, samples=16), b"[owner:b]": progress(8, samples=16),
           b"[owner:host]": progress(6, samples=0), b"[owner:evil1]": progress(FORGED_EPOCH),
           b"[owner:evil2]": progress(FORGED_EPOCH), b"x" + signer.local_public_key: progress(9),
           b"[owner:stale]": progress(50, t=now - 3600)}

    class DHT:
        def get(self, key, latest=True):
            assert key == "run_diloco_progress"
            return ValueWithExpiration(raw, now + 30)

    sifted = host.progress_epochs(DHT(), "run_diloco_progress", ProgressRecords(LIMITS), 6, own=b"[owner:host]",
                                  witnesses=[claim("[owner:evil1]", FORGED_EPOCH, witness=True)])
    assert max(c.epoch for c in sifted.claims if c.counts) == 8
    assert 8 <= sifted.ceiling < 50
    assert sorted(p.kind for p in sifted.problems) == ["epoch", "epoch", "identity", "time"]


# ---- memory ------------------------------------------------------------------------------------

def test_the_signer_table_is_bounded():
    gate = RecordGate(LIMITS, per_epoch=True, started=0.0, max_signers=16)
    for i in range(1000):
        gate.work(b"key-%d" % i, epoch=1, samples=8, samples_per_s=1.0, time=1.0 + i * 1e-3)
    assert len(gate.signers) == 16 and b"key-999" in gate.signers and b"key-0" not in gate.signers


def test_a_flood_of_keys_leaves_the_tracker_bounded():
    tracker, warnings = make_tracker(local_epoch=3, limits=LIMITS)
    for wave in range(3):
        flood = {b"[owner:flood-%d-%d]" % (wave, i): progress(3, samples=FORGED_SAMPLES) for i in range(800)}
        flood[b"[owner:me]"] = progress(3, samples=8)
        g = tracker._parse_swarm_progress_data(flood)
        assert g.samples_accumulated == 8
    assert len(tracker.records.gate.signers) == MAX_SIGNERS
    assert len(tracker._warned) <= tracker.MAX_WARNED
    assert len(warnings) <= tracker.MAX_WARNINGS_PER_MIN


def test_two_honest_peers_hold_against_two_forged_keys():
    # Each honest peer counts its own epoch against far claims once it has one (> 0)...
    claims = [claim("a", 500), claim("b", 500), claim("evil1", FORGED_EPOCH), claim("evil2", FORGED_EPOCH)]
    for me in ("a", "b"):
        assert believed_epoch_ceiling(claims, 500, own=me.encode()) < FORGED_EPOCH
    # ...a newcomer's epoch 0 is no opinion: two peers far ahead are the swarm it came to join.
    assert believed_epoch_ceiling([claim("v1", 40), claim("v2", 41), claim("me", 0)], 0, own=b"me") == 42


def test_the_hosts_copy_of_the_state_is_no_opinion():
    # The host trails the swarm (it downloads when a checkpoint is due): its epoch does not stand
    # against the peers ahead of it, as a training peer's does.
    claims = [claim("a", 100), claim("b", 150), claim("c", 151)]
    assert believed_epoch_ceiling(claims, 100, own=b"host", own_counts=False) == 150 + MAX_EPOCH_LEAD
    assert believed_epoch_ceiling(claims, 100, own=b"me") == 100 + MAX_EPOCH_LEAD


def test_progress_records_go_out_at_most_once_per_interval_and_at_once_on_a_new_epoch():
    tracker, _ = make_tracker(report_interval_s=30.0)
    due = tracker.should_report_progress
    tracker.report_local_progress(0, 8)
    assert due.is_set()                      # the first one goes out
    due.clear()                              # (the reporter stored it)
    for n in (16, 24, 32):
        tracker.report_local_progress(0, n)
        assert not due.is_set()              # within the interval: held back...
    assert tracker.local_progress.samples_accumulated == 32   # ...but the next record carries them all
    tracker.report_local_progress(1, 0)
    assert due.is_set()                      # a new epoch: at once
    tracker.report_local_progress(1, 8)
    assert due.is_set()                      # a due record not stored yet is never taken back
    due.clear()
    tracker.report_local_progress(1, 4)      # the count went back (a reset): at once
    assert due.is_set()
    plain, _ = make_tracker()
    for n in (8, 16):
        plain.should_report_progress.clear()
        plain.report_local_progress(0, n)
        assert plain.should_report_progress.is_set()    # interval 0: hivemind's behaviour, every step


@pytest.mark.parametrize("own_counts", [True, False])
def test_a_restarted_host_catches_up_with_two_peers_despite_a_stale_record_behind(own_counts):
    """A host restarted from its epoch-20 checkpoint; the two training peers are at 30, and a peer that
    left at epoch 20 still has a record in the DHT. The host's epoch is no voice (a follower trains
    none: DiLoCoRounds sets own_counts=False for it), so the two peers are believed at once; counted,
    it and the stale record outweighed them until that record expired (~40 s in the DiLoCo e2e test)."""
    tracker, warnings = make_tracker(local_epoch=20, own=b"[owner:host]")
    tracker.records.own_counts = own_counts
    metadata = {b"[owner:host]": progress(20, samples=0), b"[owner:gone]": progress(20),
                b"[owner:a]": progress(30), b"[owner:b]": progress(30)}
    kept = tracker.filter_metadata(metadata)
    believed = {b"[owner:a]", b"[owner:b]"} <= set(kept)
    assert believed == (not own_counts), (sorted(kept), warnings)
