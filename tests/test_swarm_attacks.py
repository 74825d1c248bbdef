"""The attack suite (issue 10, point 5): hostile peers on loopback against two honest DiLoCo peers.

For each attack (tests/attack_helpers.py says what each attacker does): the honest peers stay finite,
their final eval loss is at most 10 % above a clean swarm's over the same samples, the attacker is
named in a warning the honest side emits (by peer id, or by signer name for forged records), and no
honest peer is named. The clean run and each attack are one run (~20 s, mostly waiting on rounds), made
once for the module, PARALLEL at a time, each in its own process (its result comes back as JSON). The
forged-record attacks run together as "records": two signers forging epoch records (epoch-2keys, of
which epoch-1key is the weaker half), one forging samples and one forging metrics, in one swarm;
bench/swarm_attacks.py runs each alone. 1e30 is not run here: under float16 it sends the very bytes inf
does (attack_helpers.SUITE_ATTACKS).
The bound is one-sided: an attacked swarm that ends a little *below* the clean loss (fewer, larger
rounds can do that) has lost nothing. bench/swarm_attacks.py prints the same runs' figures.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import pytest

from attack_helpers import FORGED_EPOCH, FORGERS, GRADIENT_ATTACKS, SUITE_ATTACKS, run_attack_in_process

LOSS_BOUND = 1.10
PARALLEL = 2      # runs at once (each keeps ~1.4 cores busy: three at once starved rounds on 2 cores)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every run's Result (or the error that ended it), the slowest (wrong-shape) first."""
    names = sorted(("clean",) + SUITE_ATTACKS, key=lambda n: n != "wrong-shape")
    base = tmp_path_factory.mktemp("attacks")

    def one(name):
        (base / name).mkdir()
        try:
            return name, run_attack_in_process(name, base / name)
        except Exception as exc:
            return name, exc
    with ThreadPoolExecutor(PARALLEL) as pool:
        return dict(pool.map(one, names))


def _result(runs, name):
    r = runs[name]
    if isinstance(r, Exception):
        pytest.fail(str(r))
    return r


@pytest.fixture(scope="module")
def clean(runs):
    r = _result(runs, "clean")
    assert r.finite and r.accusations() == [], r.warnings
    assert r.loss < 0.8 * math.log(4), r.eval_loss      # it learned something (chance is ln 4)
    assert min(r.rounds) >= 10, r.rounds                  # ...as a swarm: rounds went through
    return r


@pytest.mark.parametrize("attack", SUITE_ATTACKS)
def test_honest_peers_hold_and_name_the_attacker(attack, clean, runs):
    r = _result(runs, attack)
    context = f"{attack}: loss {r.eval_loss} vs clean {clean.eval_loss}, rounds {r.rounds}, warnings {r.warnings}"
    assert r.finite, context
    assert r.loss <= LOSS_BOUND * clean.loss, context
    assert r.attacker and all(r.named().values()), context
    assert r.blamed_honest() == [], context
    assert min(r.rounds) >= min(clean.rounds) // 2, context     # the swarm went on averaging

    if attack in GRADIENT_ATTACKS:
        # Both honest peers clipped it round after round and left it out.
        for who in ("a", "b"):
            assert any(w == who and code == "peer_clipped" and r.attacker[0] in m for w, code, m in r.warnings), context
    elif attack == "wrong-token":
        assert max(r.num_peers) == 2, context                     # its records never reached them
        assert any(code == "peer_refused" and r.attacker[0] in m for _, code, m in r.warnings), context
    else:
        # Forged progress records: the forgers are not counted as peers (a peer with no believable
        # samples at our epoch made every round wait for a third peer's worth of samples).
        assert max(r.num_peers) == 2, context
    if "metrics" in FORGERS.get(attack, ()):
        s = r.summary
        assert s is not None and s.peers == 2, context
        assert s.samples <= r.honest_samples and s.samples_per_s < 1e6, context     # no 10**12, no 10**9/s
        assert s.epoch < FORGED_EPOCH and s.loss != 0.001, context


def test_a_fresh_pair_that_trains_at_epoch_0_is_not_outvoted_by_two_forged_keys():
    """The rule behind epoch-2keys: our own epoch 0 is a voice once we have samples in it."""
    from training_core.swarm.guards import EpochClaim, believed_epoch_ceiling
    claims = [EpochClaim(b"a", 0), EpochClaim(b"b", 0),
              EpochClaim(b"f1", FORGED_EPOCH), EpochClaim(b"f2", FORGED_EPOCH)]
    assert believed_epoch_ceiling(claims, 0, own=b"a", own_samples=16) == 2
    # Before its first step a peer is a newcomer: two signers ahead and one behind are believed.
    assert believed_epoch_ceiling(claims, 0, own=b"a") == FORGED_EPOCH + 2
