"""Joining the swarm's DHT: identity, addresses, the reachability check, traffic estimates."""
from __future__ import annotations

import concurrent.futures
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .manifest import SwarmManifest

DEFAULT_HOST_PORT = 31337
PROBE_TIMEOUT_S = 5.0
DHT_CALL_TIMEOUT_S = 10.0   # a call into the DHT's process that has no deadline of its own


def dht_call(dht, coro_fn, timeout: float = DHT_CALL_TIMEOUT_S):
    """`dht.run_coroutine(coro_fn)`'s answer, waiting at most `timeout` seconds (TimeoutError after).

    Never the plain call: a coroutine that dies in the DHT's process (hivemind logs a GeneratorExit)
    leaves its future unanswered, and run_coroutine() then waits forever (seen in CI: a host's loop
    blocked for good while its peers trained on)."""
    try:
        return dht.run_coroutine(coro_fn, return_future=True).result(timeout=timeout)
    except (TimeoutError, concurrent.futures.TimeoutError):   # one class from Python 3.11 on
        raise TimeoutError(f"the swarm's DHT process did not answer within {timeout:g} s") from None


def quiet_hivemind() -> None:
    """hivemind logs every round at INFO on stderr; keep warnings only unless asked otherwise."""
    if os.environ.get("MODRON_SWARM_VERBOSE"):
        return
    from hivemind.utils.logging import use_hivemind_log_handler
    use_hivemind_log_handler("in_root_logger")
    logging.getLogger("hivemind").setLevel(logging.WARNING)
    # hivemind's event loops are torn down with tasks still pending when a peer leaves; asyncio then
    # logs "Task was destroyed but it is pending!" at exit, which reads like a failure to users.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)


def compression_for(name: str):
    """The codec for a manifest compression name (training_core/swarm/compression.py)."""
    from .compression import compression_for as codec
    return codec(name)


@dataclass
class DHTHandle:
    dht: object
    client_mode: bool
    reason: str     # why this mode, for the `client_mode` warning / docs


# A peer behind a home router (NAT) must join in client mode: nobody can dial it. hivemind's own
# check (a ping with validate=True: "dial me back") cannot tell, because libp2p answers it over the
# connection the peer itself opened. What does tell: the address a full peer sees the connection come
# from. If it is not an address of this machine, a router translated it. Every full peer (the host
# too) answers this one small RPC; libp2p's own AutoNAT result is not exposed by p2pd's API.
OBSERVED_ADDR_RPC = "modron.ObservedAddr"
MAX_OBSERVED = 8     # addresses in an answer (a hostile answer is cut to this, then parsed)


async def serve_observed_addr(_dht, node) -> None:
    """Run in the DHT's process: answer OBSERVED_ADDR_RPC with the caller's address as seen here."""
    from hivemind.proto import p2pd_pb2
    p2p = node.p2p

    async def observed(request, context):
        addrs = []
        for info in await p2p.list_peers():
            if info.peer_id == context.remote_id:
                addrs.extend(a.to_bytes() for a in info.addrs)
        return p2pd_pb2.PeerInfo(id=context.remote_id.to_bytes(), addrs=addrs[:MAX_OBSERVED])
    await p2p.add_protobuf_handler(OBSERVED_ADDR_RPC, observed, p2pd_pb2.PeerInfo)


async def _ask_observed(peer_ids, _dht, node) -> list[str] | None:
    """The IPs initial peers see us at (None: none of them answered)."""
    import asyncio

    from hivemind.proto import p2pd_pb2
    from hivemind.utils.multiaddr import Multiaddr
    mine = p2pd_pb2.PeerInfo(id=node.peer_id.to_bytes(), addrs=[])
    for peer_id in peer_ids:
        try:
            reply = await asyncio.wait_for(node.p2p.call_protobuf_handler(
                peer_id, OBSERVED_ADDR_RPC, mine, p2pd_pb2.PeerInfo), PROBE_TIMEOUT_S)
        except Exception:     # an older Modron, a stock hivemind peer, or unreachable: ask the next
            continue
        ips = []
        for raw in list(reply.addrs)[:MAX_OBSERVED]:
            ip = None
            for proto in ("ip4", "ip6"):
                try:
                    ip = ip or Multiaddr(raw).value_for_protocol(proto)
                except Exception:
                    pass
            if isinstance(ip, str) and len(ip) <= 64:
                ips.append(ip)
        if ips:
            return ips
    return None


def local_ips() -> set[str]:
    import psutil
    ips = set()
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            ips.add(a.address.split("%", 1)[0])     # fe80::1%eth0 -> fe80::1
    return ips


def behind_nat(observed: list[str], own: set[str]) -> str | None:
    """A plain reason when the address peers see is none of ours (a router translates), else None."""
    foreign = [ip for ip in observed if ip not in own]
    if observed and len(foreign) == len(observed):
        return f"the swarm sees this peer at {foreign[0]}, an address this machine does not have (a router's NAT)"
    return None


async def _probe_reachable(peer_ids, _dht, node) -> bool | None:
    """Ask initial peers to dial us back (hivemind's ping with validate=True). None: nobody answered."""
    from hivemind.proto import dht_pb2
    answered = False
    for peer_id in peer_ids:
        try:
            request = dht_pb2.PingRequest(peer=node.protocol.node_info, validate=True)
            response = await node.protocol.get_stub(peer_id).rpc_ping(request, timeout=PROBE_TIMEOUT_S)
        except Exception:
            continue
        answered = True
        if response.available:
            return True
    return False if answered else None


def start_dht(manifest: SwarmManifest, *, identity_path: Path | None, client_mode: str = "auto",
              host_maddrs: list[str] | None = None, announce_maddrs: list[str] | None = None,
              validators: list | None = None, authorizer=None) -> DHTHandle:
    """Start a DHT for this swarm; `client_mode` on|off|auto (auto: full peer iff the initial
    peers can dial us back; alone, we are the bootstrap and must be a full peer). `authorizer`:
    a private swarm's admission.Admission (checks every DHT request; averagers find it on the DHT)."""
    import hivemind
    from hivemind.p2p import PeerID

    initial = list(manifest.initial_peers)
    if identity_path is not None:
        identity_path.parent.mkdir(parents=True, exist_ok=True)

    def start(client: bool):
        try:
            dht = hivemind.DHT(
                initial_peers=initial, start=True, client_mode=client, record_validators=validators or [],
                host_maddrs=host_maddrs or ["/ip4/0.0.0.0/tcp/0"], announce_maddrs=announce_maddrs,
                identity_path=str(identity_path) if identity_path else None,
                use_relay=True, use_auto_relay=client, await_ready=True, authorizer=authorizer)
            if authorizer is not None:
                from .admission import attach
                attach(dht, authorizer)
            if not client:
                try:   # only helps others tell whether they are behind a NAT: not worth failing the join for
                    dht_call(dht, serve_observed_addr)
                except Exception as exc:
                    logging.getLogger(__name__).warning("not answering observed-address requests: %s", exc)
            return dht
        except Exception as exc:   # unreachable bootstrap, port taken, identity in use
            where = "initial_peers" if initial else "--port"
            raise ConfigError(where, f"could not join the swarm's network: {str(exc).splitlines()[0][:300]}") from None

    if client_mode == "on":
        return DHTHandle(start(True), True, "asked for (--client-mode on)")
    dht = start(False)
    if client_mode == "off":
        return DHTHandle(dht, False, "asked for (--client-mode off)")
    if not initial:
        return DHTHandle(dht, False, "no initial peers: this peer bootstraps the swarm")
    peer_ids = []
    for addr in initial:
        try:
            peer_ids.append(PeerID.from_base58(addr.rsplit("/p2p/", 1)[1]))
        except Exception:
            continue
    # Each asks the initial peers in turn, PROBE_TIMEOUT_S each; a DHT that stops answering counts as none.
    probe_s = PROBE_TIMEOUT_S * len(peer_ids) + DHT_CALL_TIMEOUT_S
    try:
        observed = dht_call(dht, functools.partial(_ask_observed, peer_ids), probe_s)
    except Exception:
        observed = None
    nat = behind_nat(observed or [], local_ips())
    try:
        reachable = False if nat else dht_call(dht, functools.partial(_probe_reachable, peer_ids), probe_s)
    except Exception:
        reachable = None
    if reachable:
        return DHTHandle(dht, False, "initial peers can reach this peer directly")
    dht.shutdown()
    why = nat or ("no initial peer answered the reachability check" if reachable is None else
                  "initial peers cannot dial this peer back (NAT or firewall)")
    return DHTHandle(start(True), True, why + "; joining as a client through relays")


SHM_MANAGER = "torch_shm_manager"


def _name(proc) -> str | None:
    try:
        return proc.name()
    except Exception:   # gone meanwhile
        return None


def reap_children(grace_s: float = 3.0) -> None:
    """End the helper processes hivemind forked (DHT, averagers, p2pd) that outlived shutdown.

    A forked averager stuck in a round would otherwise keep this process from exiting: Python
    joins its children at exit. (When this process is killed instead, proc_guard.own_children(),
    called by the swarm commands, takes the children down.)
    """
    import psutil

    from ..proc_guard import sentinel_pid
    # Not the sentinel (it leaves when we do) nor torch_shm_manager (2 s after its last client): waiting
    # for them cost every swarm process the whole grace at exit.
    children = [c for c in psutil.Process().children(recursive=True) if c.pid != sentinel_pid() and _name(c) != SHM_MANAGER]
    _, alive = psutil.wait_procs(children, timeout=grace_s)
    for child in alive:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace_s)


def identity_path_for(base_dir: Path, device: str | None) -> Path:
    """This install's peer identity for `device`, so that one install can run one peer per GPU.

    auto, cpu, cuda, cuda:0 (and any other first device) keep `identity.key`, the name installs
    already have; another device gets its own key, e.g. cuda:1 -> `identity-cuda1.key`.
    """
    kind, _, index = (device or "auto").strip().lower().partition(":")
    if index and not (kind.isalnum() and index.isdigit()):
        raise ConfigError("--device", f"{device!r} is not a device (auto, cpu, cuda or cuda:N)")
    if not index or int(index) == 0:
        return base_dir / "identity.key"
    return base_dir / f"identity-{kind}{int(index)}.key"


def visible_maddrs(dht) -> list[str]:
    return [str(a) for a in dht.get_visible_maddrs()]


def sender_gap_s(matchmaking_time: float, averaging_timeout: float) -> float:
    """How long a round waits for a peer's next part before leaving it out (hivemind's
    next_chunk_timeout). hivemind's default is matchmaking_time, 0.5 s in small swarms, while one of
    its 512 KB parts takes seconds on a home uplink: a slow sender (a peer behind NAT, measured on the
    bench) was dropped and then waited out the whole averaging_timeout, every round."""
    return max(matchmaking_time, averaging_timeout / 3)


def round_bytes(numel: int, group_size: int, compression: str) -> float:
    """Bytes one peer sends (and, alike, receives) in one butterfly all-reduce of `numel` values:
    (n-1)/n of the tensor out in reduce-scatter and again in all-gather. An estimate: p2pd has no
    per-peer byte counter."""
    if group_size <= 1:
        return 0.0
    from .compression import wire_bytes_per_value
    return 2.0 * (group_size - 1) / group_size * numel * wire_bytes_per_value(compression)
