"""Behind a home router or not: the address a full peer sees a new peer's connection come from.

On loopback the host sees 127.0.0.1, an address of this machine: a full peer. The NAT case itself
(a masquerading router in network namespaces) runs in bench/swarm_wan.py; here its decision rule.
"""
from __future__ import annotations

import functools

import pytest

from training_core.swarm.network import _ask_observed, behind_nat, local_ips, serve_observed_addr


def test_an_address_this_machine_lacks_means_a_router_translates():
    own = {"127.0.0.1", "192.168.1.20", "fe80::1"}
    assert behind_nat(["192.168.1.20"], own) is None
    assert behind_nat(["127.0.0.1", "203.0.113.7"], own) is None      # one path is direct
    reason = behind_nat(["203.0.113.7"], own)
    assert reason and "203.0.113.7" in reason and "NAT" in reason
    assert behind_nat([], own) is None                                 # nobody answered: not decided here
    assert "127.0.0.1" in local_ips()


@pytest.mark.timeout(120)
def test_a_full_peer_tells_a_newcomer_the_address_it_comes_from():
    import hivemind
    from hivemind.p2p import PeerID
    host = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    stock = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])   # answers no such RPC
    peer = None
    try:
        host.run_coroutine(serve_observed_addr)
        peer = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                            initial_peers=[str(m) for m in host.get_visible_maddrs()])
        ids = [PeerID.from_base58(str(stock.peer_id)), PeerID.from_base58(str(host.peer_id))]
        observed = peer.run_coroutine(functools.partial(_ask_observed, ids))
        assert observed == ["127.0.0.1"]          # the stock peer said nothing; the host answered
        assert behind_nat(observed, local_ips()) is None
        assert peer.run_coroutine(functools.partial(_ask_observed, ids[:1])) is None
    finally:
        for d in (peer, stock, host):
            if d is not None:
                d.shutdown()
