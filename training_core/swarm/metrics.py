"""Swarm metrics: each peer's loss and progress as a signed, schema-checked DHT record.

Records live under f"{run_id}_metrics", one subkey per signer (its RSA public key). hivemind's
RSASignatureValidator rejects records not signed by the key named in their subkey, and the
SchemaValidator rejects any that do not fit `MetricsRecord`; readers parse again before use, and
report only from records within the swarm's limits (MetricsReader).
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional

from pydantic.v1 import BaseModel, StrictFloat, ValidationError, confloat, conint, constr, validator

from hivemind.dht.schema import BytesWithPublicKey

from .guards import (MAX_SIGNERS, Admitted, EpochClaim, LruDict, RecordGate, RecordLimits, auth_ok, auth_tag,
                     believed_epoch_ceiling, everyone, signer_identity, signer_name)

METRICS_TTL_S = 30.0     # a peer gone this long drops out of "peers alive"


Role = constr(regex=r"^(peer|host)$", strict=True)
AuthTag = constr(regex=r"^[0-9a-f]{64}$", strict=True)


class MetricsRecord(BaseModel):
    role: Role
    epoch: conint(ge=0, strict=True)
    samples: conint(ge=0, strict=True)             # samples contributed since the peer joined
    samples_per_s: confloat(ge=0.0, strict=True)
    loss: Optional[confloat(ge=0.0, lt=1e4, strict=True)] = None
    time: StrictFloat
    auth: Optional[AuthTag] = None

    @validator("samples_per_s", "time", "loss")
    def _finite(cls, v):  # noqa: N805 - pydantic's signature
        if v is not None and not math.isfinite(v):
            raise ValueError("must be finite")
        return v


class MetricsSchema(BaseModel):
    metrics: Dict[BytesWithPublicKey, Optional[MetricsRecord]]


def make_validators(run_id: str, private_key=None) -> list:
    """Validators every swarm DHT (peer and host) adds; the signer is the process-wide key by default."""
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.dht.schema import SchemaValidator
    return [SchemaValidator(MetricsSchema, prefix=run_id), RSASignatureValidator(private_key)]


def local_public_key() -> bytes:
    """The public half of this process's hivemind key: the subkey its signed records go under."""
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.utils.crypto import RSAPrivateKey
    return RSASignatureValidator(RSAPrivateKey.process_wide()).local_public_key


def metrics_key(run_id: str) -> str:
    return f"{run_id}_metrics"


def publish(dht, run_id: str, public_key: bytes, record: MetricsRecord, token: str | None = None) -> None:
    """Store our record (signed by the DHT's RSASignatureValidator on the way out). Non-blocking."""
    from hivemind.utils import get_dht_time
    if token is not None:
        record = record.copy(update={"auth": auth_tag(token, run_id, public_key)})
    dht.store(metrics_key(run_id), subkey=public_key, value=record.dict(),
              expiration_time=get_dht_time() + METRICS_TTL_S, return_future=True)


@dataclass
class PeerView:
    public_key: bytes
    record: MetricsRecord
    authorized: bool


def parse_records(raw: Any, run_id: str, token: str | None = None, require_auth: bool = False) -> list[PeerView]:
    """The records in a DHT dictionary value that validate; with require_auth, only those whose
    tag matches our token."""
    if not isinstance(raw, dict):
        return []
    out = []
    for subkey, item in raw.items():
        value = getattr(item, "value", item)
        if value is None or not isinstance(subkey, bytes):
            continue
        try:
            record = MetricsRecord.parse_obj(value)
        except (ValidationError, TypeError, ValueError):
            continue
        authorized = token is not None and auth_ok(record.auth, token, run_id, subkey)
        if require_auth and not authorized:
            continue
        out.append(PeerView(subkey, record, authorized))
    return out


def read(dht, run_id: str, token: str | None = None, require_auth: bool = False,
         reader: "MetricsReader | None" = None) -> list[PeerView]:
    """The swarm's metrics records; with a reader, only those within its limits."""
    found = dht.get(metrics_key(run_id), latest=True)
    views = parse_records(found.value if found is not None else None, run_id, token, require_auth)
    return reader.sift(views) if reader is not None else views


class MetricsReader:
    """Keeps the metrics records that pass, for reports (the host's, a peer's):
    - one signer, one record: only the canonical spelling of its key (guards.signer_identity);
    - only admitted signers (`admitted`: a private swarm's check; everyone by default);
    - its time within skew of now and not older than the limits allow;
    - samples_per_s at most what one peer can compute, and samples (counted since the peer joined)
      at most that rate times the time since its last record that passed, or, for a signer seen
      for the first time, since this reader started (plus slack): guards.RecordGate;
    - a loss within [0, limits.loss_max].
    State per signer is bounded (guards.MAX_SIGNERS, oldest evicted). Sybil keys (one peer, many
    keys) each pass on their own: admission is what limits them.
    `on_warning(code, message)`: a signer whose record is left out is named once (`peer_rejected`,
    guards.signer_name), at most MAX_WARNINGS_PER_MIN times a minute under a flood of keys.
    """
    MAX_WARNINGS_PER_MIN = 10

    def __init__(self, limits: RecordLimits | None = None, admitted: Admitted = everyone,
                 max_signers: int = MAX_SIGNERS, started: float | None = None, on_warning=None):
        self.limits = limits or RecordLimits()
        self.admitted = admitted
        self.gate = RecordGate(self.limits, per_epoch=False, started=time.time() if started is None else started,
                               max_signers=max_signers)
        self.rejected: list[tuple[bytes, str]] = []     # the last sift's (signer, why), for tests and logs
        self.on_warning = on_warning
        self._warned = LruDict(max_signers)
        self._warn_times: list[float] = []

    def problem(self, view: PeerView, now: float) -> str | None:
        who, r = view.public_key, view.record
        if signer_identity(who) != who:
            return "it is signed under a second spelling of a signer's key"
        if not self.admitted(who):
            return "its signer is not admitted to this swarm"
        if r.loss is not None and r.loss > self.limits.loss_max:
            return f"its loss {r.loss:.4g} is beyond {self.limits.loss_max:.3g}"
        return self.gate.timing(who, r.time, now) or \
            self.gate.work(who, epoch=r.epoch, samples=r.samples, samples_per_s=r.samples_per_s, time=r.time)

    def sift(self, views: list[PeerView], now: float | None = None) -> list[PeerView]:
        now = time.time() if now is None else now
        out, self.rejected = [], []
        for v in views:
            problem = self.problem(v, now)
            if problem is None:
                out.append(v)
            else:
                self.rejected.append((v.public_key, problem))
                self._warn(v.public_key, problem, now)
        return out

    def _warn(self, who: bytes, problem: str, now: float) -> None:
        if self.on_warning is None or who in self._warned:
            return
        self._warn_times = [t for t in self._warn_times if t > now - 60.0][-self.MAX_WARNINGS_PER_MIN:]
        if len(self._warn_times) >= self.MAX_WARNINGS_PER_MIN:
            return
        self._warned[who] = True
        self._warn_times.append(now)
        self.on_warning("peer_rejected", f"ignored the metrics records of {signer_name(who)}: {problem}")

    def read(self, dht, run_id: str, token: str | None = None, require_auth: bool = False) -> list[PeerView]:
        return read(dht, run_id, token, require_auth, reader=self)


@dataclass
class SwarmSummary:
    peers: int                 # contributing peers with a fresh record (the host not counted)
    epoch: int                 # the highest epoch believed (guards.believed_epoch_ceiling)
    samples: int
    samples_per_s: float
    loss: float | None         # the (lower) median of the peers' losses: always one a peer had

    @classmethod
    def of(cls, views: list[PeerView], now: float | None = None) -> "SwarmSummary":
        """From the records given (MetricsReader.sift's, for reports), the fresh ones, each signer once."""
        now = time.time() if now is None else now
        by_signer: dict[bytes, MetricsRecord] = {}
        for v in views:
            if now - v.record.time <= METRICS_TTL_S:
                by_signer.setdefault(v.public_key, v.record)
        fresh = list(by_signer.values())
        peers = [r for r in fresh if r.role == "peer"]
        losses = [r.loss for r in peers if r.loss is not None]
        # peers vote, the host (which trails the swarm) vouches: as the epoch filter weighs them
        ceiling = believed_epoch_ceiling([EpochClaim(k, r.epoch, witness=r.role == "host")
                                          for k, r in by_signer.items()], 0)
        return cls(peers=len(peers), epoch=max((r.epoch for r in fresh if r.epoch <= ceiling), default=0),
                   samples=sum(r.samples for r in peers), samples_per_s=sum(r.samples_per_s for r in peers),
                   loss=statistics.median_low(losses) if losses else None)


def witnesses(views: list[PeerView]) -> list[EpochClaim]:
    """Signed metrics as corroboration for the epoch filter (the host's record counts here). They
    vouch for an epoch but do not vote in the majority rule (guards.believed_epoch_ceiling)."""
    return [EpochClaim(v.public_key, v.record.epoch, witness=True) for v in views]
