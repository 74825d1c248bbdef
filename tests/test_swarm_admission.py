"""Admission to private swarms (training_core/swarm/admission.py): credentials, the DHT's authorizer,
the averagers' RPCs, and `swarm credential` on the command line. Swarms run in-process on loopback."""
from __future__ import annotations

import asyncio
import json
import stat
import time

import pytest

from swarm_helpers import write_manifest
from training_core.cli import main
from training_core.swarm import admission as A

RUN = "adm-run"


@pytest.fixture(scope="module")
def issuer(tmp_path_factory):
    out = tmp_path_factory.mktemp("host")
    key = A.load_issuer(out, create=True)
    return out, key, A.parse_issuer(A.issuer_public(key))


def _identity(path):
    ident = A.load_identity(path)
    return ident, A.peer_id_of_rsa(ident.get_public_key().to_bytes())


# ---- credentials ------------------------------------------------------------------------------
def test_issuer_key_is_private_and_kept(issuer):
    out, key, pub = issuer
    path = out / A.ISSUER_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert A.issuer_public(A.load_issuer(out)) == A.issuer_public(key)
    assert A.parse_issuer("https://auth.example.org/key") is None and A.parse_issuer("ed25519:!!") is None


def test_credential_verifies_and_each_binding_matters(issuer, tmp_path):
    _, key, pub = issuer
    _, pid = _identity(tmp_path / "p.key")
    cred = A.Credential.from_json(A.issue(key, RUN, pid, days=2).to_json())   # survives its file format
    assert A.verify(cred, pub, RUN) is None
    assert "swarm" in A.verify(cred, pub, "other-run")
    assert "expired" in A.verify(cred, pub, RUN, now=cred.expires + 1)
    assert "revoked" in A.verify(cred, pub, RUN, revoked={pid})
    other = A.parse_issuer(A.issuer_public(A.load_issuer(tmp_path / "other", create=True)))
    assert "signature" in A.verify(cred, other, RUN)
    _, pid2 = _identity(tmp_path / "q.key")
    forged = A.Credential(RUN, pid2, cred.issued, cred.expires, cred.signature)    # someone else's signature
    assert "signature" in A.verify(forged, pub, RUN)
    longer = A.Credential(RUN, pid, cred.issued, cred.expires + 86400, cred.signature)
    assert "signature" in A.verify(longer, pub, RUN)
    for bad in ("nope", "{}", json.dumps(dict(modron_credential=1, run_id=RUN))):
        with pytest.raises(A.AdmissionError):
            A.Credential.from_json(bad)
    with pytest.raises(A.AdmissionError):
        A.issue(key, RUN, "not-a-peer-id", days=1)
    with pytest.raises(A.AdmissionError):
        A.issue(key, RUN, pid, days=0)


def test_revocation_list_is_signed(issuer, tmp_path):
    out, key, pub = issuer
    _, pid = _identity(tmp_path / "p.key")
    record = A.sign_revocations(key, RUN, [pid])
    assert A.verify_revocations(record, pub, RUN) == {pid}
    assert A.verify_revocations(record, pub, "other-run") is None
    tampered = json.loads(record)
    tampered["peer_ids"] = []
    assert A.verify_revocations(json.dumps(tampered), pub, RUN) is None
    assert A.revoke(tmp_path, pid) == [pid] and A.revoke(tmp_path, pid) == [pid]     # idempotent
    assert A.read_revoked(tmp_path) == [pid]


def test_token_checks_credential_key_expiry_and_revocation(issuer, tmp_path):
    _, key, pub = issuer
    ident_a, pid_a = _identity(tmp_path / "a.key")
    ident_b, pid_b = _identity(tmp_path / "b.key")
    auth_a = A.Admission(RUN, pub, A.issue(key, RUN, pid_a, 1), ident_a)
    auth_b = A.Admission(RUN, pub, A.issue(key, RUN, pid_b, 1), ident_b)
    token_b = asyncio.run(auth_b.get_token())
    assert auth_a.is_token_valid(token_b)
    # b's credential presented with another RSA key (a stolen credential) does not hash to b's id
    stolen = type(token_b)()
    stolen.CopyFrom(token_b)
    stolen.public_key = ident_a.get_public_key().to_bytes()
    assert not auth_a.is_token_valid(stolen)
    auth_a.revoked.add(pid_b)
    assert not auth_a.is_token_valid(token_b)        # a cached token is re-checked for revocation
    with pytest.raises(A.AdmissionError, match="not this peer"):
        A.Admission(RUN, pub, A.issue(key, RUN, pid_b, 1), ident_a)
    expired = A.issue(key, RUN, pid_a, 1, now=time.time() - 2 * 86400)
    with pytest.raises(A.AdmissionError, match="expired"):
        A.Admission(RUN, pub, expired, ident_a)


def test_admitted_set_takes_only_valid_matching_records(issuer, tmp_path):
    _, key, pub = issuer
    ident, pid = _identity(tmp_path / "a.key")
    _, pid_b = _identity(tmp_path / "b.key")
    _, pid_c = _identity(tmp_path / "c.key")
    auth = A.Admission(RUN, pub, A.issue(key, RUN, pid, 1), ident)
    good_b = A.issue(key, RUN, pid_b, 1).to_json()
    auth.ingest({pid_b: good_b, pid_c: good_b, "x": "junk"}, None)    # c posting b's credential admits nobody new
    assert auth.allows(pid_b) and not auth.allows(pid_c) and auth.allows(pid)
    auth.ingest({}, A.sign_revocations(key, RUN, [pid_b]))
    assert not auth.allows(pid_b)
    auth.ingest({pid_b: good_b}, None)            # a revocation is not forgotten
    assert not auth.allows(pid_b)


def test_outgoing_join_to_an_unadmitted_leader_is_not_sent(issuer, tmp_path):
    from hivemind.p2p import PeerID
    _, key, pub = issuer
    ident, pid = _identity(tmp_path / "a.key")
    _, pid_x = _identity(tmp_path / "x.key")
    auth = A.Admission(RUN, pub, A.issue(key, RUN, pid, 1), ident)
    auth.refresh = lambda dht: asyncio.sleep(0)        # nothing in the DHT admits x
    asked = []

    class MM:
        async def _request_join_group(self, leader):
            asked.append(leader)
            return "group"

        async def look_for_group(self, step):
            return type("G", (), {"peer_ids": (PeerID.from_base58(pid), PeerID.from_base58(pid_x))})()

    class Averager(A.AdmissionMixin):
        dht = type("D", (), {"modron_admission": auth})()
    av = Averager()
    av._matchmaking = MM()
    assert asyncio.run(av._matchmaking._request_join_group(PeerID.from_base58(pid_x))) is None and asked == []
    assert asyncio.run(av._matchmaking._request_join_group(PeerID.from_base58(pid))) == "group"
    from hivemind.averaging.matchmaking import MatchmakingException
    with pytest.raises(MatchmakingException, match="credential"):
        asyncio.run(av._matchmaking.look_for_group(None))


def test_swarm_averagers_carry_the_mixin():
    from training_core.swarm.collab import GuardedStateAverager, LocalGradsKeptAverager
    from training_core.swarm.diloco import DiLoCoAverager
    for cls in (DiLoCoAverager, GuardedStateAverager, LocalGradsKeptAverager):
        assert issubclass(cls, A.AdmissionMixin)


# ---- a private swarm on loopback --------------------------------------------------------------
@pytest.fixture(scope="module")
def swarm(issuer, tmp_path_factory):
    """a and b admitted (b bootstraps from a); c has no credential and tries a's address."""
    import hivemind
    d = tmp_path_factory.mktemp("ids")
    _, key, pub = issuer
    made = {}

    def node(name, admitted, initial):
        ident, pid = _identity(d / f"{name}.key")
        auth = A.Admission(RUN, pub, A.issue(key, RUN, pid, 1), ident) if admitted else None
        dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], identity_path=str(d / f"{name}.key"),
                           authorizer=auth, initial_peers=initial, ensure_bootstrap_success=admitted)
        A.attach(dht, auth, period=0.5)
        made[name] = dht
        return dht
    a = node("a", True, [])
    addr = [str(m) for m in a.get_visible_maddrs()]
    node("b", True, addr)
    node("c", False, addr)
    yield made
    for name in ("c", "b", "a"):
        made[name].shutdown()


def test_dht_serves_admitted_peers_only(swarm):
    from hivemind.utils.timed_storage import get_dht_time
    a, b, c = swarm["a"], swarm["b"], swarm["c"]
    assert b.store("from-b", "yes", get_dht_time() + 60)
    assert a.get("from-b").value == "yes"                 # admitted peers bootstrap, store and read
    c.store("from-c", "junk", get_dht_time() + 60)         # lands in c's own storage at most
    assert a.get("from-c") is None and b.get("from-c") is None
    assert c.get("from-b") is None                         # and c cannot read theirs
    published = A._values(a.get(A.admission_key(RUN), latest=True))
    assert b.peer_id.to_base58() in published and c.peer_id.to_base58() not in published


def test_a_revoked_peer_is_refused_once_the_host_reads_its_list(tmp_path):
    import hivemind
    from hivemind.utils.timed_storage import get_dht_time
    out = tmp_path / "host"
    key = A.load_issuer(out, create=True)
    pub = A.parse_issuer(A.issuer_public(key))
    nodes = []
    try:
        for name in ("h", "p"):
            ident, pid = _identity(tmp_path / f"{name}.key")
            auth = A.Admission(RUN, pub, A.issue(key, RUN, pid, 1), ident, host_out=out if name == "h" else None)
            nodes.append(hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], authorizer=auth,
                                      identity_path=str(tmp_path / f"{name}.key"),
                                      initial_peers=[str(m) for m in nodes[0].get_visible_maddrs()] if nodes else []))
            A.attach(nodes[-1], auth, period=0.3)
        h, p = nodes
        assert p.store("before", 1, get_dht_time() + 60) and h.get("before") is not None
        A.revoke(out, p.peer_id.to_base58())
        deadline = time.monotonic() + 15
        # the host publishes its (signed) list, p among it, right after it starts refusing p itself
        while p.peer_id.to_base58() not in (A.verify_revocations(
                A._values(h.get(A.revoked_key(RUN), latest=True)).get("", ""), pub, RUN) or ()):
            assert time.monotonic() < deadline, "the host never published its list"
            time.sleep(0.2)
        p.store("after", 1, get_dht_time() + 60)
        assert h.get("after") is None
    finally:
        for n in reversed(nodes):
            n.shutdown()


def test_unadmitted_averager_gets_nothing_and_the_round_goes_on(swarm):
    import torch
    from hivemind.averaging import DecentralizedAverager
    from hivemind.proto import averaging_pb2
    from hivemind.utils.timed_storage import get_dht_time

    class Averager(A.AdmissionMixin, DecentralizedAverager):
        pass
    opts = dict(prefix="adm_avg", target_group_size=4, min_matchmaking_time=1.5, request_timeout=1.0, start=True)
    avs = [Averager([torch.full((5,), float(i))], swarm[n], **opts) for i, n in enumerate("ab")]
    intruder = Averager([torch.full((5,), 100.0)], swarm["c"], **opts)
    try:
        steps = [av.step(wait=False, timeout=6) for av in avs + [intruder]]
        for s in steps[:2]:
            assert len(s.result()) == 2                     # a and b averaged, as a group of two
        with pytest.raises(Exception):
            steps[2].result()                               # c found nobody
        for av in avs:
            with av.get_tensors() as (t,):
                assert torch.equal(t, torch.full((5,), 0.5))
        with intruder.get_tensors() as (t,):
            assert torch.equal(t, torch.full((5,), 100.0))

        async def call(dht):
            """c (or b) calling a's averager directly, as anyone who knows a's address can."""
            p2p = await dht.replicate_p2p()
            stub = Averager.get_stub(p2p, swarm["a"].peer_id, namespace="adm_avg")
            join = averaging_pb2.JoinRequest(schema_hash=avs[0].schema_hash, expiration=get_dht_time() + 5,
                                             group_key="x")
            joined = [m.code async for m in await stub.rpc_join_group(join)]
            state = [m async for m in await stub.rpc_download_state(averaging_pb2.DownloadRequest())]

            async def part():
                yield averaging_pb2.AveragingData(group_id=b"g", code=averaging_pb2.PART_FOR_AVERAGING)
            parts = [m.code async for m in await stub.rpc_aggregate_part(part())]
            return joined, len(state), parts
        refused = averaging_pb2.PROTOCOL_VIOLATION
        assert asyncio.run(call(swarm["c"])) == ([refused], 0, [refused])
        joined, state, parts = asyncio.run(call(swarm["b"]))
        assert refused not in joined + parts and state > 0    # the same calls from b get real answers
    finally:
        for av in avs + [intruder]:
            av.shutdown()


# ---- the command line -------------------------------------------------------------------------
def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("modron-train: error: "), err
    return err[0]


def test_cli_issuer_issue_revoke_round_trip(tmp_path, capsys):
    out = tmp_path / "host"
    assert main(["swarm", "credential", "issuer", "--out", str(out)]) == 0
    pub = capsys.readouterr().out.strip()
    assert pub.startswith("ed25519:")
    manifest = write_manifest(tmp_path / "m.toml", run_id=RUN, auth=True)
    manifest.write_text(manifest.read_text().replace('issuer = "the test"', f'issuer = "{pub}"'))
    _, pid = _identity(tmp_path / "peer.key")
    assert main(["swarm", "credential", "issue", "--out", str(out), "--manifest", str(manifest),
                 "--peer", pid, "--days", "3"]) == 0
    cred = A.Credential.from_json(capsys.readouterr().out)
    assert cred.peer_id == pid and A.verify(cred, A.parse_issuer(pub), RUN) is None
    assert 3 * 86400 - 5 <= cred.expires - time.time() <= 3 * 86400
    assert main(["swarm", "credential", "revoke", "--out", str(out), "--peer", pid]) == 0
    assert A.read_revoked(out) == [pid]
    capsys.readouterr()

    assert main(["swarm", "credential", "issue", "--out", str(out), "--manifest", str(manifest),
                 "--peer", "QmNope", "--days", "3"]) == 2
    assert "peer id" in _one_line(capsys)
    assert main(["swarm", "credential", "issue", "--out", str(out), "--manifest", str(manifest),
                 "--peer", pid, "--days", "nan"]) == 2
    assert "--days" in _one_line(capsys)
    assert main(["swarm", "credential", "revoke", "--out", str(tmp_path / "nohost"), "--peer", pid]) == 2
    assert "issuer key" in _one_line(capsys)
    named = write_manifest(tmp_path / "t.toml", run_id=RUN, auth=True)      # issuer = "the test": the host's key
    assert main(["swarm", "credential", "issue", "--out", str(out), "--manifest", str(named), "--peer", pid]) == 0
    assert A.verify(A.Credential.from_json(capsys.readouterr().out), A.parse_issuer(pub), RUN) is None
    public = write_manifest(tmp_path / "p.toml", run_id=RUN)
    assert main(["swarm", "credential", "issue", "--out", str(out), "--manifest", str(public), "--peer", pid]) == 2
    assert "private" in _one_line(capsys)
    other = tmp_path / "other"
    main(["swarm", "credential", "issuer", "--out", str(other)])
    capsys.readouterr()
    assert main(["swarm", "credential", "issue", "--out", str(other), "--manifest", str(manifest),
                 "--peer", pid]) == 2
    assert "not the key" in _one_line(capsys)


def test_join_needs_a_credential_in_a_swarm_with_an_issuer_key(tmp_path, capsys, issuer):
    from training_core.swarm.manifest import load_manifest
    _, key, _ = issuer
    manifest = write_manifest(tmp_path / "m.toml", run_id=RUN, auth=True)
    manifest.write_text(manifest.read_text().replace('issuer = "the test"', f'issuer = "{A.issuer_public(key)}"'))
    m = load_manifest(manifest)
    from training_core.errors import ConfigError
    with pytest.raises(ConfigError, match="--credential"):
        A.for_peer(m, None, tmp_path / "id.key")
    bad = tmp_path / "cred.json"
    bad.write_text("{}")
    with pytest.raises(ConfigError, match="modron_credential"):
        A.for_peer(m, bad, tmp_path / "id.key")
    _, pid = _identity(tmp_path / "id.key")
    bad.write_text(A.issue(key, RUN, pid, 1).to_json())
    assert A.for_peer(m, bad, tmp_path / "id.key").peer_id == pid
    assert A.for_peer(load_manifest(write_manifest(tmp_path / "p.toml")), None, tmp_path / "id.key") is None
    named = load_manifest(write_manifest(tmp_path / "n.toml", run_id=RUN, auth=True))   # issuer = "the test"
    with pytest.raises(ConfigError, match="invite"):
        A.for_peer(named, bad, tmp_path / "id.key")


def test_host_puts_its_issuer_key_in_a_private_manifest(tmp_path):
    from training_core.swarm.manifest import load_manifest, make_invite, read_invite
    named = load_manifest(write_manifest(tmp_path / "n.toml", run_id=RUN, auth=True))
    hosted = A.host_manifest(named, tmp_path / "out")
    key = A.load_issuer(tmp_path / "out")
    assert hosted.auth["issuer"] == A.issuer_public(key) and hosted.auth["required"]
    assert read_invite(make_invite(hosted, None)).auth["issuer"] == A.issuer_public(key)
    assert A.host_manifest(hosted, tmp_path / "elsewhere") is hosted          # a key already there stays
    public = load_manifest(write_manifest(tmp_path / "p.toml"))
    assert A.host_manifest(public, tmp_path / "out") is public
    assert A.for_host(public, tmp_path / "out", tmp_path / "id.key") is None
    assert A.for_host(hosted, tmp_path / "out", tmp_path / "id.key").peer_id == A.identity_peer_id(tmp_path / "id.key")


def test_a_diloco_round_between_admitted_peers_leaves_the_intruder_out(swarm):
    from hivemind.utils.crypto import RSAPrivateKey
    from test_swarm_diloco import MB, Peer, _close_round_from_a, _in_threads, _wait
    a, b, c = (Peer((swarm[n], RSAPrivateKey()), "adm-diloco") for n in "abc")
    try:
        a.drift(1 / 3, 1)
        a.r.after_inner_step(MB)
        b.drift(-1.0, 2)
        b.r.after_inner_step(MB)
        c.drift(50.0, 3)                  # the intruder's very different weights must reach nobody
        c.r.after_inner_step(MB)
        _wait(lambda: a.r.num_peers() == 2 and b.r.num_peers() == 2, poll=(a.r, b.r, c.r))
        _close_round_from_a(a, b)
        _in_threads(lambda: (a.r.after_inner_step(MB), _wait(lambda: a.r.round == 1, poll=(a.r,))),
                    lambda: _wait(lambda: b.r.round == 1, poll=(b.r,)))
        assert a.r.digest == b.r.digest and a.r.last_round_peers == b.r.last_round_peers == 2
        assert c.r.num_peers() <= 1 and c.r.digest != a.r.digest
    finally:
        for peer in (a, b, c):
            peer.r.shutdown()

