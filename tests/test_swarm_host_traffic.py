"""The host's state downloads stay a small share of what the swarm's rounds send (issue 9)."""
from __future__ import annotations

from training_core.swarm import host
from training_core.swarm.network import round_bytes


def test_downloads_are_spread_so_they_stay_a_tenth_of_the_rounds_traffic():
    n = 110_000_000                                    # `base`
    traffic = host.SwarmTraffic(n, "blockwise8bit", exchanges_per_epoch=1)
    assert traffic.bytes_per_s(0.0) is None            # nothing seen yet: the plain interval
    for minute in range(0, 61, 5):                     # a DiLoCo round every 5 minutes, 3 peers
        traffic.observe(minute * 60.0, minute // 5, peers=3)
    rate = traffic.bytes_per_s(3600.0)
    assert abs(rate - 3 * round_bytes(n, 3, "blockwise8bit") / 300.0) < 1.0
    state = 2 * n * 4                                  # outer weights + momentum
    gap = host.next_download_gap(600.0, state, rate)
    # Over any stretch, downloads / rounds' bytes <= HOST_SHARE; every 10 minutes: as much as the rounds.
    assert state / (gap * rate) <= host.HOST_SHARE + 1e-9 and gap > 600.0
    assert state / (600.0 * rate) > 0.9
    assert host.next_download_gap(600.0, state, None) == 600.0
    assert host.next_download_gap(600.0, 1.0, rate) == 600.0        # never more often than asked


def test_a_download_schedules_the_next_one_by_the_swarms_traffic(monkeypatch):
    clock = {"t": 1000.0}
    monkeypatch.setattr(host.time, "monotonic", lambda: clock["t"])

    class Keeper:
        epoch, state_bytes = 0, 8_000_000

        def sync(self, swarm_epoch):
            self.epoch = swarm_epoch
            return self.state_bytes
    traffic = host.SwarmTraffic(1_000_000, "float16", exchanges_per_epoch=1)
    traffic.observe(0.0, 0, peers=2)
    traffic.observe(1000.0, 10, peers=2)               # 10 rounds in 1000 s
    d = host._Downloader(Keeper(), 60.0, lambda *a: None, traffic)
    d.maybe_start(10, asked=False)
    rate = 2 * round_bytes(1_000_000, 2, "float16") * 10 / 1000.0
    assert d.synced_once and abs(d.next_at - (1000.0 + 8_000_000 / (host.HOST_SHARE * rate))) < 1e-6


class SilentDHT:
    """A DHT whose process never answers: a coroutine that died there (hivemind logs a GeneratorExit)."""
    def run_coroutine(self, coro, return_future=False):
        import concurrent.futures
        assert return_future, "a plain run_coroutine() blocks without a timeout"
        return concurrent.futures.Future()     # never resolved


def test_remembering_peers_gives_up_on_a_dht_call_that_never_answers(tmp_path, monkeypatch):
    """A coroutine that dies in the DHT's process leaves its future unanswered: the host's loop must go on
    (it hung there for good in CI while its peers trained on)."""
    import time

    from training_core.swarm import host
    monkeypatch.setattr(host, "REMEMBER_TIMEOUT_S", 0.2)
    t0 = time.monotonic()
    host._remember_peers(SilentDHT(), tmp_path)
    assert time.monotonic() - t0 < 2.0
    assert not (tmp_path / "known_peers.json").exists()


def test_every_call_into_the_dht_process_has_a_deadline(monkeypatch):
    """network.dht_call: the refused-peers poll of every report loop and admission's start-up give up on a
    silent DHT instead of blocking for good."""
    import time

    import pytest

    from training_core.swarm import admission, network
    with pytest.raises(TimeoutError, match="did not answer within 0.1 s"):
        network.dht_call(SilentDHT(), lambda *_: None, 0.1)
    dht = SilentDHT()
    dht.modron_admission = object()          # a private swarm's DHT
    monkeypatch.setattr(admission, "REFUSED_TIMEOUT_S", 0.2)
    t0 = time.monotonic()
    assert admission.refused_peers(dht) == {}
    assert time.monotonic() - t0 < 2.0
