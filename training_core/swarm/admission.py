"""Admission to a private swarm: per-peer credentials, checked on the DHT's and the averagers' RPCs.

Design
------
* The swarm's secret is the host's Ed25519 *issuer* key, kept in the host's OUT folder
  (`OUT/swarm-issuer.key`, PEM, 0600). Its public half goes in the manifest as
  `auth.issuer = "ed25519:<base64>"` (`modron-train swarm credential issuer --out OUT` prints it).
  When `auth.issuer` is anything else (an URL, a name), the host puts its own key there
  (host_manifest), so the invite it prints carries it; a peer given such a manifest instead of the
  invite stops with one line.
* A credential binds run_id, the peer's libp2p peer id and an expiry, signed by the issuer
  (`swarm credential issue --out OUT --manifest M --peer PEER_ID --days N > cred.json`; the peer
  learns its id with `swarm join --print-peer-id`). hivemind's peer identity (identity.key) is an
  RSA key and the peer id is the hash of its public half, so one key serves both layers below: no
  second key to keep.
* Revocation: `swarm credential revoke` adds the peer id to `OUT/swarm-revoked.json`; the host's
  DHT process re-reads it every MAINTAIN_S, refuses those peers at once, and publishes the list as
  an issuer-signed record under f"{run_id}_revoked". Every peer reads it, checks the signature and
  refuses the ids it holds (a process never forgets a revocation it has verified).

What is enforced where
----------------------
* DHT (every rpc_ping/store/find, both directions): `Admission` is a hivemind TokenAuthorizerBase.
  Our AccessToken carries the credential (username = credential JSON, public_key = our identity's
  RSA key, expiration_time, signature = issuer's signature). A request is served only if the
  credential verifies against the manifest's issuer, is for this run, has not expired or been
  revoked, and names the peer id that `public_key` hashes to; hivemind then checks that the request
  is signed by that RSA key, fresh and not replayed. A node without such a credential can neither
  store nor read records, and its answers to our requests are dropped.
* Averagers (AdmissionMixin, in the bases of DiLoCoAverager, GuardedStateAverager and the gradient
  averager): rpc_join_group, rpc_aggregate_part and rpc_download_state refuse a caller whose peer
  id (authenticated by libp2p as context.remote_id) has no valid, unrevoked credential published
  under f"{run_id}_admission" (subkey = peer id; the value is the credential, self-validating).
  Outgoing: we do not ask an unadmitted leader to take us in, and refuse a group (matchmaking's
  result) that holds an unadmitted peer, before any part is sent. The admitted set is cached, refreshed every REFRESH_S and
  at once (at most every MIN_REFRESH_S) for an unknown caller; it holds at most MAX_ADMITTED ids.

Who was refused: a DHT request whose credential does not admit it is refused silently by hivemind;
here its caller is named (`Admission.refused`, peer id -> why; a hivemind warning once per peer)
when the request is signed by the key its credential carries, i.e. the caller proved that peer id
(a request signed otherwise names nobody: anyone can copy a peer's public key). The averagers' RPCs
name the caller libp2p authenticated. `Refusals.poll(dht)` turns the DHT process's record into
`peer_refused` warnings (the host and the peers call it as they report).

Not enforced: state downloads that *we* start (load_state_from_peers) pick peers from DHT records,
which only admitted peers can write, but are not re-checked per peer; an admitted peer can
overwrite (DoS) another's admission or the revocation record in the DHT (cached verified entries
survive that); public swarms (auth.required false) change nothing and rely on the guards.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2, crypto_pb2
from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils.auth import TokenAuthorizerBase
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey
from hivemind.utils.logging import get_logger

from ..errors import ConfigError

ISSUER_FILE = "swarm-issuer.key"
REVOKED_FILE = "swarm-revoked.json"
ISSUER_PREFIX = "ed25519:"
MAX_DAYS = 3650
REFRESH_S = 10.0            # how stale the averager's admitted set may get (revocations, new peers)
MIN_REFRESH_S = 1.0         # an unknown caller forces a refresh at most this often
MAINTAIN_S = 30.0           # re-publish our credential / the host's revocations
RECORD_TTL_S = 300.0        # DHT records outlive a few missed re-publications
MAX_ADMITTED = 4096         # bound on the cached admitted set (a DHT key can hold many subkeys)
_TOKEN_CACHE = 1024
MAX_REFUSED = 256           # refused peers remembered (and named once each) per process

logger = get_logger(__name__)


class AdmissionError(ValueError):
    """A credential or revocation list that does not hold up; the message is one line for users."""


def _canon(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise AdmissionError("not valid base64") from None


# ---- the issuer's key -------------------------------------------------------------------------
def issuer_public(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return ISSUER_PREFIX + _b64(raw)


def parse_issuer(text: str | None) -> Ed25519PublicKey | None:
    """The manifest's auth.issuer as a key, or None when it is not one (token-only private swarm)."""
    if not isinstance(text, str) or not text.startswith(ISSUER_PREFIX):
        return None
    try:
        raw = _unb64(text[len(ISSUER_PREFIX):])
        return Ed25519PublicKey.from_public_bytes(raw)
    except (AdmissionError, ValueError):
        return None


def load_issuer(out: Path, create: bool = False) -> Ed25519PrivateKey:
    path = Path(out) / ISSUER_FILE
    if not path.is_file():
        if not create:
            raise AdmissionError(f"no issuer key in {out} (run `swarm credential issuer --out {out}` first)")
        path.parent.mkdir(parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        # O_EXCL + 0600: never readable by others, and two concurrent calls cannot swap keys
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        return key
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise AdmissionError(f"{path} is not an issuer key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise AdmissionError(f"{path} is not an Ed25519 issuer key")
    return key


# ---- peer ids ---------------------------------------------------------------------------------
def check_peer_id(text: str) -> str:
    try:
        raw = PeerID.from_base58(text.strip()).to_bytes()
    except Exception:
        raise AdmissionError(f"{text!r} is not a peer id (base58, as `swarm join --print-peer-id` prints)") from None
    if len(raw) != 34 or raw[:2] != b"\x12\x20":     # sha2-256 multihash, as RSA identities have
        raise AdmissionError(f"{text!r} is not a peer id (base58, as `swarm join --print-peer-id` prints)")
    return text.strip()


def peer_id_of_rsa(public_key: bytes) -> str:
    """The libp2p peer id of an RSA public key in hivemind's (OpenSSH) encoding."""
    key = serialization.load_ssh_public_key(public_key)
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    proto = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    return PeerID(b"\x12\x20" + hashlib.sha256(proto).digest()).to_base58()


def load_identity(path: Path) -> RSAPrivateKey:
    """hivemind's identity file (libp2p protobuf around an RSA key), made if missing."""
    path = Path(path)
    if not path.is_file():
        from hivemind.p2p import P2P
        path.parent.mkdir(parents=True, exist_ok=True)
        P2P.generate_identity(str(path))
    data = crypto_pb2.PrivateKey.FromString(path.read_bytes()).data
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key.__setstate__({"_private_key": data})        # hivemind's own unpickling path
    return key


def identity_peer_id(path: Path) -> str:
    return peer_id_of_rsa(load_identity(path).get_public_key().to_bytes())


# ---- credentials ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Credential:
    run_id: str
    peer_id: str
    issued: int
    expires: int
    signature: str

    def payload(self) -> bytes:
        return _canon(dict(kind="modron-credential/1", run_id=self.run_id, peer_id=self.peer_id,
                           issued=self.issued, expires=self.expires))

    def to_json(self) -> str:
        return json.dumps(dict(modron_credential=1, run_id=self.run_id, peer_id=self.peer_id, issued=self.issued,
                               expires=self.expires, signature=self.signature), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Credential":
        try:
            d = json.loads(text)
        except (ValueError, TypeError):
            raise AdmissionError("not a credential (not JSON)") from None
        if not isinstance(d, dict) or d.get("modron_credential") != 1:
            raise AdmissionError("not a credential (no modron_credential: 1)")
        try:
            c = cls(run_id=d["run_id"], peer_id=d["peer_id"], issued=d["issued"], expires=d["expires"],
                    signature=d["signature"])
        except KeyError as e:
            raise AdmissionError(f"credential lacks {e.args[0]!r}") from None
        if not (isinstance(c.run_id, str) and isinstance(c.peer_id, str) and isinstance(c.signature, str)
                and type(c.issued) is int and type(c.expires) is int):
            raise AdmissionError("credential has fields of the wrong type")
        return c


def issue(key: Ed25519PrivateKey, run_id: str, peer_id: str, days: float, now: float | None = None) -> Credential:
    if not (0 < days <= MAX_DAYS):
        raise AdmissionError(f"--days must be more than 0 and at most {MAX_DAYS}")
    now = int(time.time() if now is None else now)
    unsigned = Credential(run_id, check_peer_id(peer_id), now, now + int(days * 86400), "")
    return Credential(unsigned.run_id, unsigned.peer_id, now, unsigned.expires, _b64(key.sign(unsigned.payload())))


def verify(cred: Credential, issuer: Ed25519PublicKey, run_id: str, now: float | None = None,
           revoked: frozenset | set = frozenset()) -> str | None:
    """Why `cred` does not admit its peer to `run_id` now, or None when it does."""
    try:
        issuer.verify(_unb64(cred.signature), cred.payload())
    except (InvalidSignature, AdmissionError):
        return "its signature is not the swarm issuer's"
    if cred.run_id != run_id:
        return f"it is for swarm {cred.run_id!r}, not {run_id!r}"
    if cred.expires <= (time.time() if now is None else now):
        return "it has expired"
    if cred.peer_id in revoked:
        return "the host revoked it"
    return None


def read_credential(path: Path) -> Credential:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise AdmissionError(f"cannot read credential {path}: {e.strerror or e}") from None
    return Credential.from_json(text)


# ---- revocation -------------------------------------------------------------------------------
def read_revoked(out: Path) -> list[str]:
    path = Path(out) / REVOKED_FILE
    if not path.is_file():
        return []
    try:
        ids = json.loads(path.read_text(encoding="utf-8")).get("peer_ids", [])
    except (ValueError, AttributeError):
        raise AdmissionError(f"{path} is damaged") from None
    return [i for i in ids if isinstance(i, str)]


def revoke(out: Path, peer_id: str) -> list[str]:
    ids = read_revoked(out)
    pid = check_peer_id(peer_id)
    if pid not in ids:
        ids.append(pid)
    path = Path(out) / REVOKED_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(peer_ids=sorted(ids)), indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return ids


def sign_revocations(key: Ed25519PrivateKey, run_id: str, peer_ids, now: float | None = None) -> str:
    body = dict(kind="modron-revoked/1", run_id=run_id, peer_ids=sorted(set(peer_ids)),
                issued=int(time.time() if now is None else now))
    return json.dumps(dict(body, signature=_b64(key.sign(_canon(body)))))


def verify_revocations(text, issuer: Ed25519PublicKey, run_id: str) -> set[str] | None:
    try:
        d = json.loads(text)
        sig = d.pop("signature")
        issuer.verify(_unb64(sig), _canon(d))
    except (ValueError, TypeError, KeyError, AttributeError, InvalidSignature, AdmissionError):
        return None
    if d.get("kind") != "modron-revoked/1" or d.get("run_id") != run_id or not isinstance(d.get("peer_ids"), list):
        return None
    return {p for p in d["peer_ids"] if isinstance(p, str)}


# ---- the authorizer ---------------------------------------------------------------------------
class Admission(TokenAuthorizerBase):
    """One per private-swarm process: signs our DHT requests with our credential, checks others',
    and keeps the admitted set the averager consults. Copied into hivemind's forked DHT and averager
    processes; each copy keeps its own caches."""

    def __init__(self, run_id: str, issuer: Ed25519PublicKey, credential: Credential, identity: RSAPrivateKey,
                 host_out: Path | None = None):
        super().__init__(identity)
        self.run_id, self.issuer, self.credential = run_id, issuer, credential
        self.peer_id = credential.peer_id
        self.host_out = Path(host_out) if host_out else None     # the host: where its revoked list lives
        self.revoked: set[str] = set()
        self.admitted: OrderedDict[str, int] = OrderedDict()      # peer id -> expiry
        self.refused: OrderedDict[str, str] = OrderedDict()       # peer id -> why (bounded, oldest out)
        self._tokens: OrderedDict[tuple[bytes, bytes], tuple[int, str]] = OrderedDict()
        self._refreshed = 0.0
        problem = verify(credential, issuer, run_id)
        if problem:
            raise AdmissionError(f"this peer's credential does not admit it: {problem}")
        if peer_id_of_rsa(identity.get_public_key().to_bytes()) != credential.peer_id:
            raise AdmissionError(f"the credential is for peer {credential.peer_id}, not this peer "
                                 f"({peer_id_of_rsa(identity.get_public_key().to_bytes())})")
        if self.host_out:
            self.revoked.update(read_revoked(self.host_out))

    # hivemind's TokenAuthorizerBase
    async def get_token(self) -> AccessToken:
        c = self.credential
        return AccessToken(username=c.to_json(), public_key=self.local_public_key.to_bytes(),
                           expiration_time=str(c.expires), signature=c.signature.encode())

    async def validate_request(self, request) -> bool:
        if await super().validate_request(request):
            return True
        self._name_refused(request)
        return False

    def _name_refused(self, request) -> None:
        """A refused DHT request names its caller only when it is signed by the key its token carries
        (hivemind checks that signature only for a valid token; for a refused one, here)."""
        auth = request.auth
        token = auth.client_access_token
        if not token.public_key or not auth.signature or self.is_token_valid(token):
            return      # no key to name, or refused for another reason (replay, clock)
        try:
            key = RSAPublicKey.from_bytes(token.public_key)
            signature = auth.signature
            auth.signature = b""
            try:
                proven = key.verify(request.SerializeToString(), signature)
            finally:
                auth.signature = signature
            pid = peer_id_of_rsa(token.public_key)
        except Exception:
            return
        if proven:
            self.note_refused(pid, self._why(token, pid))

    def _why(self, token: AccessToken, pid: str) -> str:
        try:
            cred = Credential.from_json(token.username)
        except AdmissionError as e:
            return f"it has no credential ({e})"
        if cred.peer_id != pid:
            return f"its credential is peer {cred.peer_id}'s"
        problem = verify(cred, self.issuer, self.run_id, revoked=self.revoked)
        return f"its credential does not admit it: {problem}" if problem else "its credential is no longer valid"

    def note_refused(self, pid: str, why: str) -> None:
        if pid not in self.refused:
            logger.warning(f"refused peer {pid}: {why}")
        self.refused.pop(pid, None)
        self.refused[pid] = why
        while len(self.refused) > MAX_REFUSED:
            self.refused.popitem(last=False)

    def does_token_need_refreshing(self, access_token: AccessToken) -> bool:
        return False        # a credential does not change; once it expires the peer is out

    def is_token_valid(self, access_token: AccessToken) -> bool:
        key = (access_token.username.encode(), access_token.public_key)
        known = self._tokens.get(key)
        if known is None:
            try:
                cred = Credential.from_json(access_token.username)
                if verify(cred, self.issuer, self.run_id) is not None or \
                        peer_id_of_rsa(access_token.public_key) != cred.peer_id:
                    return False
            except (AdmissionError, ValueError, TypeError):
                return False
            self._tokens[key] = known = (cred.expires, cred.peer_id)
            while len(self._tokens) > _TOKEN_CACHE:
                self._tokens.popitem(last=False)
        # expiry and revocation are re-checked on every request: both change while cached
        expires, peer_id = known
        return expires > time.time() and peer_id not in self.revoked

    # the admitted set (averager side)
    def ingest(self, admission_raw, revoked_raw) -> None:
        """Merge what the DHT holds under the admission and revocation keys (hivemind's get() results)."""
        for raw in _values(revoked_raw).values():
            ids = verify_revocations(raw, self.issuer, self.run_id)
            if ids:
                self.revoked |= ids
        now = time.time()
        for subkey, raw in _values(admission_raw).items():
            try:
                cred = Credential.from_json(raw)
            except (AdmissionError, TypeError):
                continue
            if cred.peer_id != subkey or verify(cred, self.issuer, self.run_id, now, self.revoked):
                continue
            self.admitted[cred.peer_id] = max(cred.expires, self.admitted.pop(cred.peer_id, 0))
        for pid in [p for p, exp in self.admitted.items() if exp <= now or p in self.revoked]:
            del self.admitted[pid]
        while len(self.admitted) > MAX_ADMITTED:
            self.admitted.popitem(last=False)

    def allows(self, peer_id: str) -> bool:
        if peer_id in self.revoked:
            return False
        return peer_id == self.peer_id or self.admitted.get(peer_id, 0) > time.time()

    async def refresh(self, dht) -> None:
        self._refreshed = time.monotonic()
        try:
            adm = await dht.get(admission_key(self.run_id), latest=True, return_future=True)
            rev = await dht.get(revoked_key(self.run_id), latest=True, return_future=True)
        except Exception:
            return          # keep what we had: a DHT hiccup must not admit or expel anyone
        self.ingest(adm, rev)

    async def admits(self, dht, peer: PeerID) -> bool:
        pid = peer.to_base58()
        since = time.monotonic() - self._refreshed
        if since >= REFRESH_S or (not self.allows(pid) and since >= MIN_REFRESH_S):
            await self.refresh(dht)
        return self.allows(pid)


def admission_key(run_id: str) -> str:
    return f"{run_id}_admission"


def revoked_key(run_id: str) -> str:
    return f"{run_id}_revoked"


def _values(raw) -> dict:
    """{subkey: value} from a hivemind get() result (ValueWithExpiration of a dictionary), or {}."""
    value = getattr(raw, "value", raw)
    if isinstance(value, dict):
        return {k: getattr(v, "value", v) for k, v in value.items() if isinstance(k, str)}
    if isinstance(value, str):
        return {"": value}
    return {}


async def _refused(_dht, node) -> dict:
    """Runs in the DHT's process (module level: hivemind pickles it by name)."""
    return dict(getattr(node.protocol.authorizer, "refused", None) or {})


REFUSED_TIMEOUT_S = 5.0   # asked every few seconds by a peer's or host's report loop, which must go on


def refused_peers(dht) -> dict[str, str]:
    """Peer id -> why, for the peers this DHT refused (a private swarm's; {} for a public one)."""
    if getattr(dht, "modron_admission", None) is None:
        return {}
    from .network import dht_call
    try:
        return dht_call(dht, _refused, REFUSED_TIMEOUT_S)
    except Exception:   # a DHT that does not answer (network.dht_call) names nobody this time
        return {}


class Refusals:
    """Names each peer the DHT refused once, as a `peer_refused` warning (`warn(code, message)`)."""

    def __init__(self, warn):
        self.warn = warn
        self.seen: OrderedDict[str, bool] = OrderedDict()

    def poll(self, dht) -> None:
        for pid, why in refused_peers(dht).items():
            if pid in self.seen:
                continue
            self.seen[pid] = True
            while len(self.seen) > MAX_REFUSED:
                self.seen.popitem(last=False)
            self.warn("peer_refused", f"refused peer {pid}: {why}; it can neither read nor write this swarm's "
                                      "records nor join its rounds")


async def _maintain(_dht, node, period: float = MAINTAIN_S) -> None:
    """In the DHT process: publish our credential; the host also signs and publishes its revoked
    list; everyone reads the revocations into the authorizer that checks DHT requests. Runs as a
    task of its own, so that run_coroutine returns and the DHT's shutdown just drops it."""
    import asyncio
    from hivemind.utils.timed_storage import get_dht_time
    auth: Admission = node.protocol.authorizer
    issuer_key = load_issuer(auth.host_out) if auth.host_out else None

    async def loop():
        while True:
            try:
                ttl = min(get_dht_time() + RECORD_TTL_S, auth.credential.expires)
                await node.store(admission_key(auth.run_id), auth.credential.to_json(), ttl, subkey=auth.peer_id)
                if issuer_key is not None:
                    auth.revoked.update(read_revoked(auth.host_out))
                    await node.store(revoked_key(auth.run_id),
                                     sign_revocations(issuer_key, auth.run_id, auth.revoked),
                                     get_dht_time() + RECORD_TTL_S)
                auth.ingest(None, await node.get(revoked_key(auth.run_id), latest=True))
            except Exception:
                pass    # the next period tries again; a failed publish only delays admission
            await asyncio.sleep(period)
    node.modron_admission_task = asyncio.create_task(loop())     # held: a bare task may be collected


def attach(dht, auth: Admission | None, period: float = MAINTAIN_S) -> None:
    """After the DHT started: let averagers on this DHT find the policy, and keep our records fresh."""
    dht.modron_admission = auth
    if auth is not None:
        import functools

        from .network import dht_call
        dht_call(dht, functools.partial(_maintain, period=period))   # it starts a task and returns


# ---- building it from the manifest ------------------------------------------------------------
def host_manifest(manifest, out: Path):
    """A private swarm whose auth.issuer is not a key (a name, an URL): the host puts its own issuer
    key there, so the invite it prints makes every joining peer check credentials."""
    if not manifest.auth.get("required") or parse_issuer(manifest.auth.get("issuer")) is not None:
        return manifest
    import dataclasses
    try:
        key = load_issuer(out, create=not (Path(out) / ISSUER_FILE).exists())
    except AdmissionError as e:
        raise ConfigError("auth.issuer", str(e)) from None
    return dataclasses.replace(manifest, auth=dict(manifest.auth, issuer=issuer_public(key)))


def for_peer(manifest, credential_path: Path | None, identity_path: Path) -> Admission | None:
    """A joining peer's authorizer; None for a public swarm."""
    if not manifest.auth.get("required"):
        return None
    issuer = parse_issuer(manifest.auth.get("issuer"))
    if issuer is None:
        raise ConfigError("auth.issuer", f"{str(manifest.auth.get('issuer'))[:80]!r} is not the host's issuer key "
                                         "(ed25519:...): join with the invite the host printed, which carries it")
    if credential_path is None:
        raise ConfigError("--credential", f"swarm {manifest.run_id!r} admits only peers with a credential from its "
                                          f"host: send the host your peer id (swarm join --print-peer-id) and pass "
                                          "the file it gives you with --credential FILE")
    try:
        return Admission(manifest.run_id, issuer, read_credential(credential_path), load_identity(identity_path))
    except AdmissionError as e:
        raise ConfigError("--credential", str(e)) from None


def for_host(manifest, out: Path, identity_path: Path) -> Admission | None:
    """The host issues itself a credential (it holds the issuer key) for its own identity."""
    issuer_text = manifest.auth.get("issuer")
    issuer = parse_issuer(issuer_text) if manifest.auth.get("required") else None
    if issuer is None:
        return None
    try:
        key = load_issuer(out, create=not (Path(out) / ISSUER_FILE).exists())
        if issuer_public(key) != issuer_text:
            raise AdmissionError(f"the manifest's auth.issuer is not the key in {Path(out) / ISSUER_FILE}; "
                                 f"use auth.issuer = \"{issuer_public(key)}\"")
        identity = load_identity(identity_path)
        cred = issue(key, manifest.run_id, peer_id_of_rsa(identity.get_public_key().to_bytes()), days=30)
        return Admission(manifest.run_id, issuer, cred, identity, host_out=out)
    except AdmissionError as e:
        raise ConfigError("auth.issuer", str(e)) from None


# ---- the averagers' RPCs ----------------------------------------------------------------------
class AdmissionMixin:
    """Put before hivemind's DecentralizedAverager in the bases. Without a policy on the DHT
    (`attach`), i.e. public and token-only swarms, every method passes straight through."""

    def _admission(self) -> Admission | None:
        return getattr(self.dht, "modron_admission", None)

    async def _admits(self, peer: PeerID) -> bool:
        auth = self._admission()
        if auth is None or await auth.admits(self.dht, peer):
            return True
        auth.note_refused(peer.to_base58(), "no valid credential of it is in this swarm's records")
        return False

    # hivemind assigns self._matchmaking once, in the averager process: wrap it there. (Subclasses
    # such as DiLoCoAverager override _aggregate_with_group without super(), so the group is checked here.)
    @property
    def _matchmaking(self):
        return self.__dict__.get("_modron_matchmaking")

    @_matchmaking.setter
    def _matchmaking(self, mm) -> None:
        if mm is not None and self._admission() is not None:
            ask, look = mm._request_join_group, mm.look_for_group

            async def request_join_group(leader):
                if not await self._admits(leader):
                    return None         # as if the leader had turned us down
                return await ask(leader)

            async def look_for_group(step):
                group = await look(step)
                for peer in group.peer_ids if group is not None else ():
                    if not await self._admits(peer):
                        from hivemind.averaging.matchmaking import MatchmakingException
                        raise MatchmakingException(f"the group holds a peer without a credential ({peer})")
                return group
            mm._request_join_group, mm.look_for_group = request_join_group, look_for_group
        self.__dict__["_modron_matchmaking"] = mm

    async def rpc_join_group(self, request: averaging_pb2.JoinRequest, context: P2PContext
                             ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        if not await self._admits(context.remote_id):
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for response in super().rpc_join_group(request, context):
            yield response

    async def rpc_aggregate_part(self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
                                 ) -> AsyncIterator[averaging_pb2.AveragingData]:
        if not await self._admits(context.remote_id):
            await anext(stream, None)     # p2pd drops a reply sent before the request was read
            yield averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for response in super().rpc_aggregate_part(stream, context):
            yield response

    async def rpc_download_state(self, request: averaging_pb2.DownloadRequest, context: P2PContext
                                 ) -> AsyncIterator[averaging_pb2.DownloadData]:
        if not await self._admits(context.remote_id):
            return      # no data: the caller moves on to the next peer
        async for response in super().rpc_download_state(request, context):
            yield response
