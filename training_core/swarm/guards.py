"""Defences against hostile or broken peers, as plain functions the tests call directly.

Peers are strangers: what they report (epochs, metrics) and what they send (averaged
gradients, parameters) is checked before it changes anything here. Imports torch, not hivemind.
"""
from __future__ import annotations

import bisect
import functools
import hashlib
import hmac
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch

# An epoch more than this far ahead of ours is believed only when other signers vouch for it (below).
MAX_EPOCH_LEAD = 2

Admitted = Callable[[bytes], bool]


def everyone(identity: bytes) -> bool:
    """The default admission: every signer (a public swarm). Private swarms plug their check in."""
    return True


@dataclass(frozen=True)
class EpochClaim:
    source: bytes         # who claims it: the signer's public key (one key = one voice)
    epoch: int
    counts: bool = True   # False for client-mode peers: hivemind ignores their epoch too
    witness: bool = False  # a signed metrics record (peers' and the host's): it can vouch for an
                           # epoch, but it is not a training peer's progress record (no vote below)


def _epochs_by_source(claims: Iterable[EpochClaim], exclude: bytes | None = None,
                      admitted: Admitted = everyone) -> dict[bytes, int]:
    out: dict[bytes, int] = {}
    for c in claims:
        if c.counts and c.source != exclude and admitted(c.source):
            out[c.source] = max(c.epoch, out.get(c.source, -1))
    return out


def believed_epoch_ceiling(claims: Iterable[EpochClaim], local_epoch: int, max_lead: int = MAX_EPOCH_LEAD,
                           own: bytes | None = None, admitted: Admitted = everyone, own_counts: bool = True,
                           own_samples: int = 0) -> int:
    """The highest epoch we accept: max_lead past the highest of
    - our own epoch;
    - the highest epoch E that two or more distinct signers (progress or metrics records) claim or
      exceed, provided more signers stand behind E than training peers stand clearly below it
      (other peers' progress records more than max_lead under E, and ours once we train in an
      epoch of our own: above 0, or epoch 0 with samples in it (`own_samples`); own_counts: we
      train at all, the host's copy of the state is no opinion):
      several peers that agree on a lower epoch outweigh as many signers claiming a far higher one;
    - the epoch of the one other training peer, when there is exactly one (`own`, our signer,
      left out).

    Only admitted signers count (`admitted`, a private swarm's credential check; everyone by
    default), each once, with the highest epoch it claims. Clients' records do not count at all.

    Why both rules. Two signers far ahead: a swarm that really moved on while we were away (a
    newcomer at epoch 0 sees peers at 40 and 41, maybe other newcomers at 0 too: those are no
    opposition as long as no more of them than the signers ahead, and its own epoch 0 is no
    opinion). Two forged keys claiming 10**6 beside two honest peers at 500 are opposed by both
    (each counts itself and the other): not believed. Ties go to the epoch we have, and with two
    or more other training peers this is the only rule (a majority of them is two signers or
    more, and outweighs the rest). One other training peer: its word is the swarm's epoch. A
    newcomer (epoch 0) or a peer that fell far behind must be able to catch up with a swarm of one
    other peer, and waiting for a second signer fails there: the host's metrics record trails the
    swarm (it downloads state every few seconds), a peer reads metrics records only every 2 s, and
    a swarm need not have a host at all. Our own record cannot be a voice there, or a newcomer
    would outvote that peer with its epoch 0. What stays: one signer claiming epoch 10**6 moves no
    one who has another training peer beside it, and a swarm of honest peers moves only when more
    signers are ahead than honest peers behind. The price: a peer whose only fellow training peer
    lies follows it (with one other voice there is nobody to tell them apart); two groups of equal
    size far apart each keep their epoch (a forged pair and an honest pair look the same); and
    forged keys that outnumber the honest peers win (Sybil keys: admission's to stop, not this rule's).
    Metrics records vouch but do not vote or oppose: the host's trails the swarm, and a newcomer
    publishes one at epoch 0 before it has loaded anything.
    Epoch 0 with samples: two peers that began a fresh swarm together stand at epoch 0 until their
    first round closes; were their own epoch no opinion there, two forged keys claiming 10**6 would
    outvote the other one, and neither would ever close a round (tests/test_swarm_attacks.py,
    epoch-2keys). A newcomer catches up before its first step (no samples yet), so it still follows
    the swarm it came to join. The price: peers that trained at epoch 0 before they could see a
    swarm far ahead (a healed partition) follow it only when it has more signers than they are.
    """
    claims = list(claims)
    ceiling = local_epoch + max_lead
    sources = _epochs_by_source(claims, admitted=admitted)
    voices = sorted(_epochs_by_source((c for c in claims if not c.witness), exclude=own, admitted=admitted).values())
    ahead = sorted((e for e in sources.values() if e > ceiling), reverse=True)
    # ahead[i] is claimed or exceeded by i + 1 distinct signers; the first (highest) epoch that two
    # or more back and fewer voices oppose is the swarm's, seen maybe a moment early or late.
    # our own voice, when we train in our epoch (`ahead` is far above it)
    mine = 1 if own is not None and own_counts and (local_epoch > 0 or own_samples > 0) else 0
    for i in range(1, len(ahead)):
        behind = bisect.bisect_left(voices, ahead[i] - max_lead) + mine   # more than max_lead below it
        if i + 1 > behind:
            ceiling = ahead[i] + max_lead
            break
    if len(voices) == 1:
        ceiling = max(ceiling, voices[0] + max_lead)
    return ceiling


def filter_epoch_claims(claims: Sequence[EpochClaim], local_epoch: int, witnesses: Iterable[EpochClaim] = (),
                        max_lead: int = MAX_EPOCH_LEAD, own: bytes | None = None,
                        admitted: Admitted = everyone) -> tuple[list[EpochClaim], list[EpochClaim]]:
    """Split progress claims into (kept, rejected). Witnesses (e.g. signed metrics) can corroborate
    an epoch but are never kept themselves, and never vote (see believed_epoch_ceiling); `own` is
    the signer of our own progress record (admitted by definition); claims of signers not admitted
    are rejected."""
    witnesses = [EpochClaim(w.source, w.epoch, w.counts, witness=True) for w in witnesses]
    ceiling = believed_epoch_ceiling(list(claims) + witnesses, local_epoch, max_lead, own, admitted)
    kept, rejected = [], []
    for c in claims:
        ok = c.epoch <= ceiling and (c.source == own or admitted(c.source))
        (kept if ok else rejected).append(c)
    return kept, rejected


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """True when no tensor holds NaN or +-inf (one device sync for all of them)."""
    flags = [torch.isfinite(t.detach()).all() for t in tensors]
    return bool(torch.stack(flags).all()) if flags else True


def grads_finite(params: Iterable[torch.nn.Parameter]) -> bool:
    return all_finite(p.grad for p in params if p.grad is not None)


def tensors_match(received: Sequence[torch.Tensor], expected_shapes: Sequence[torch.Size]) -> str | None:
    """None if `received` has the expected count and shapes and is finite, else what is wrong."""
    if len(received) != len(expected_shapes):
        return f"{len(received)} tensors instead of {len(expected_shapes)}"
    for i, (t, shape) in enumerate(zip(received, expected_shapes)):
        if tuple(t.shape) != tuple(shape):
            return f"tensor {i} has shape {tuple(t.shape)} instead of {tuple(shape)}"
    if not all_finite(received):
        return "non-finite values"
    return None


class ParamBackup:
    """A CPU copy of parameters and optimizer state, taken when they are finite, to undo poison."""

    def __init__(self) -> None:
        self.params: list[torch.Tensor] | None = None
        self.opt_state: list[dict[str, torch.Tensor]] | None = None

    @torch.no_grad()
    def take(self, params: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer | None = None) -> bool:
        if not all_finite(params):
            return False
        self.params = [p.detach().to("cpu", copy=True) for p in params]
        if optimizer is not None:
            self.opt_state = [{k: (v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v)
                               for k, v in optimizer.state.get(p, {}).items()} for p in params]
        return True

    @torch.no_grad()
    def restore(self, params: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer | None = None) -> bool:
        if self.params is None:
            return False
        for p, saved in zip(params, self.params):
            p.copy_(saved.to(p.device))
        if optimizer is not None and self.opt_state is not None:
            for p, saved in zip(params, self.opt_state):
                state = optimizer.state.get(p)
                if state is None:
                    continue
                for k, v in saved.items():
                    if torch.is_tensor(v) and torch.is_tensor(state.get(k)):
                        state[k].copy_(v.to(state[k].device))
        return True


# ---- token authorization for private swarms ----------------------------------------------

def auth_tag(token: str, run_id: str, public_key: bytes) -> str:
    """HMAC-SHA256 of the record signer's public key with the swarm's shared token.

    The tag rides inside a record signed by that key, so it cannot be moved onto another
    signer's records without knowing the token.
    """
    msg = run_id.encode("utf-8") + b"\0" + public_key
    return hmac.new(token.encode("utf-8"), msg, hashlib.sha256).hexdigest()


def auth_ok(tag: str | None, token: str, run_id: str, public_key: bytes) -> bool:
    return tag is not None and hmac.compare_digest(tag, auth_tag(token, run_id, public_key))


# ---- records with limits ---------------------------------------------------------------------
#
# Progress records (hivemind's, one per signer) and metrics records (ours) say how much a peer
# computed. What one peer can compute follows from the manifest: a sample is `seq_len` tokens
# through the model, and no single device does more than PEAK_FLOPS. A record that claims more
# (or carries a time that is not now, or comes from a second spelling of a signer's key, or from
# a signer not admitted) does not count.

# The bound on one peer's speed: a single device's peak dense throughput, rounded up (an H100 or
# H200 does ~1e15 FLOP/s in bf16, a B200 ~2.2e15; Modron trains in fp32 or bf16; one swarm
# identity is one device, peer.identity_path). A sample costs at least FORWARD_FLOPS_PER_WEIGHT per
# matrix weight and token: the forward pass alone. A training step costs three times that (the
# backward pass twice the forward) plus attention and the output layer, and devices sustain half
# their peak at best: the bound is ~10x what the fastest device could really do, so no honest peer
# meets it, yet finite: 10**9 samples at once is refused for every model.
PEAK_FLOPS = 2e15
FORWARD_FLOPS_PER_WEIGHT = 2.0
# hivemind meets peers for an all-reduce at wall-clock times (get_dht_time is time.time()); peers
# whose clocks differ by more than the matchmaking time (seconds) cannot average together anyway.
CLOCK_SKEW_S = 10.0
# A live hivemind peer republishes its progress record every 30 s, with the time of its last report:
# one that downloads the swarm's state (60 s + ~1 s per million weights) reports nothing for minutes.
RECORD_MAX_AGE_S = 300.0
SAMPLES_SLACK_S = 2.0                       # timing noise between two records of one signer
# Our clock against the signer's, and how late we notice an epoch begin (a tracker fetches every
# 0.5-10 s): the slack on "since the epoch began as we saw it".
ANCHOR_SLACK_S = CLOCK_SKEW_S + 10.0
# Cross-entropy starts near ln(vocab) (a uniform guess); a peer far above that is diverging.
LOSS_PER_LN_VOCAB = 10.0
DEFAULT_VOCAB = 2 ** 18                     # when the vocabulary is not known: the largest in use
MAX_SIGNERS = 1024                          # per gate: a flood of keys evicts the oldest, not our memory
MAX_EPOCHS_REMEMBERED = 8


def preset_matmul_weights(name: str) -> int:
    """Matrix weights of a scratch preset's transformer blocks (q, k, v, o and the SwiGLU MLP); the
    output layer left out, so the bound does not depend on the vocabulary (and stays generous)."""
    from ..models.presets import PRESETS
    p = PRESETS[name]
    return p.num_layers * (4 * p.hidden_size ** 2 + 3 * p.hidden_size * p.intermediate_size)


def model_matmul_weights(model: torch.nn.Module) -> int:
    """Weights that multiply activations (every Linear, tied output layer included; quantized ones
    by their shape); embedding tables only look up, so they are left out."""
    total = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            total += m.in_features * m.out_features
        elif not isinstance(m, torch.nn.Embedding):
            w = getattr(m, "weight", None)
            if isinstance(w, torch.Tensor) and w.dim() == 2 and "weight" in m._parameters:
                total += w.numel()        # e.g. transformers' Conv1D (GPT-2)
    return total


@dataclass(frozen=True)
class RecordLimits:
    """What one signer's record may claim. rate_max None: the speed bound is not known (no model
    size), so samples go unchecked; times, identities and losses are checked all the same."""
    rate_max: float | None = None            # samples/s one peer can compute at most
    loss_max: float = LOSS_PER_LN_VOCAB * math.log(DEFAULT_VOCAB)
    grace_samples: int = 0                   # one reported step (micro_batch): reports come per step
    skew_s: float = CLOCK_SKEW_S
    max_age_s: float = RECORD_MAX_AGE_S
    slack_s: float = SAMPLES_SLACK_S
    anchor_slack_s: float = ANCHOR_SLACK_S

    @classmethod
    def for_manifest(cls, manifest: Any, model: torch.nn.Module | None = None) -> "RecordLimits":
        """The swarm's limits: from the preset for scratch models (the same on every peer and the
        host), else from `model` (its matrix weights; without it, no speed bound)."""
        if manifest.is_scratch:
            weights = preset_matmul_weights(manifest.model.split(":", 1)[1])
        else:
            weights = model_matmul_weights(model) if model is not None else 0
        rate = PEAK_FLOPS / (FORWARD_FLOPS_PER_WEIGHT * weights * manifest.seq_len) if weights > 0 else None
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        vocab = vocab if isinstance(vocab, int) and vocab >= 2 else DEFAULT_VOCAB
        return cls(rate_max=rate, loss_max=LOSS_PER_LN_VOCAB * math.log(vocab), grace_samples=manifest.micro_batch)


_OWNER_RE = re.compile(rb"\[owner:(.+?)\]")    # hivemind's RSASignatureValidator.PUBLIC_KEY_REGEX


@functools.lru_cache(maxsize=MAX_SIGNERS)
def _canonical_owner(key: bytes) -> bytes | None:
    from cryptography.hazmat.primitives import serialization
    try:
        parsed = serialization.load_ssh_public_key(key)
        return b"[owner:" + parsed.public_bytes(serialization.Encoding.OpenSSH,
                                                serialization.PublicFormat.OpenSSH) + b"]"
    except Exception:
        return None


def signer_name(subkey: bytes) -> str:
    """How warnings name a record's signer: 'signer ' and 12 hex digits of a hash of its subkey, the
    same for a peer's progress and metrics records (one key signs both). Not a peer id: records are
    signed with a process key, not the libp2p identity, and the peer_id inside a progress record is
    whatever its writer put there (naming it would let a forger blame an honest peer)."""
    return "signer " + hashlib.blake2b(bytes(subkey), digest_size=6).hexdigest()


def signer_identity(subkey: bytes) -> bytes | None:
    """Who signed a record stored under `subkey`, spelled once per signer; None for any other spelling.

    hivemind's RSASignatureValidator accepts a record whose subkey merely *contains*
    "[owner:<key>]", so one key could sign records under many subkeys ("x[owner:K]", the key with a
    comment, the marker twice) and count as many peers. Modron's and hivemind's own writers use
    exactly "[owner:<OpenSSH key>]" (RSASignatureValidator.local_public_key): only that spelling
    counts. A subkey with no marker, or one that is no RSA key, cannot be stored in the swarm's DHT
    (the schemas require the marker; the validator parses the key): it is taken as it is (tests'
    short names)."""
    keys = _OWNER_RE.findall(subkey)
    if not keys:
        return subkey
    if len(keys) > 1:
        return None
    canonical = _canonical_owner(keys[0])
    if canonical is None:
        return subkey
    return subkey if canonical == subkey else None


class LruDict(OrderedDict):
    """A dict that keeps at most `cap` entries, dropping the least recently set or touched."""

    def __init__(self, cap: int):
        super().__init__()
        self.cap = cap

    def touch(self, key):
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.cap:
            self.popitem(last=False)


@dataclass
class _Signer:
    judged: tuple | None = None      # the last record judged: (epoch, samples, samples_per_s, time)
    problem: str | None = None       # what was wrong with its work (None: it passed)
    epoch: int = -1                  # the last record that passed
    samples: int = 0
    time: float = -math.inf


class RecordGate:
    """Judges each signer's records against the limits and the last record of it that passed.

    per_epoch=True: samples count from the start of the record's epoch (hivemind's progress
    records); False: since the signer joined (metrics records; a restart resets them to 0).
    Records carry the signer's own time, which must lie within skew of ours (timing). Their work
    (samples): at most rate_max * (time since that signer's last record that passed + slack) more
    than that record; per epoch also at most rate_max * (time since we saw the epoch begin +
    anchor slack) in all; a signer seen for the first time, at most rate_max * (time since
    `since`, or since this gate started, + anchor slack). A record's verdict is kept while it is
    read again unchanged: one that fails does not pass later merely because time went by. Memory:
    at most max_signers signers, the least recently seen evicted; an evicted one is a newcomer again.
    """

    def __init__(self, limits: RecordLimits, per_epoch: bool, started: float, max_signers: int = MAX_SIGNERS):
        self.limits, self.per_epoch, self.started = limits, per_epoch, started
        self.signers: LruDict = LruDict(max_signers)

    def timing(self, who: bytes, time: float, now: float) -> str | None:
        """None if the record's time can be placed: near now, and not before that signer's last
        record that passed (an old record again)."""
        lim = self.limits
        if not math.isfinite(time) or time > now + lim.skew_s:
            return f"its time is {time - now:.0f} s ahead of this clock"
        if time < now - lim.max_age_s:
            return f"it is {now - time:.0f} s old"
        signer = self.signers.get(who)
        if signer is not None and time < signer.time:
            return "it is older than a record the same signer sent before"
        return None

    def work(self, who: bytes, *, epoch: int, samples: int, samples_per_s: float, time: float,
             since: float | None = None) -> str | None:
        """None if the samples and samples/s claimed are within reach of one peer, else what is wrong."""
        rate = self.limits.rate_max
        if rate is not None and samples_per_s > rate:
            return f"it claims {samples_per_s:.3g} samples/s; one peer computes at most {rate:.3g}"
        record = (epoch, samples, samples_per_s, time)
        signer = self.signers.touch(who)
        if signer is not None and signer.judged == record:
            return signer.problem
        problem = self._samples_problem(signer, epoch, samples, time, since)
        if signer is None:
            signer = self.signers[who] = _Signer()
        signer.judged, signer.problem = record, problem
        if problem is None:
            signer.epoch, signer.samples, signer.time = epoch, samples, time
        return problem

    def _samples_problem(self, signer: _Signer | None, epoch: int, samples: int, time: float,
                         since: float | None) -> str | None:
        lim, rate = self.limits, self.limits.rate_max
        if rate is None:
            return None
        known = signer is not None and signer.time > -math.inf
        same_count = known and (epoch == signer.epoch or not self.per_epoch)
        if same_count and samples <= signer.samples:
            return None          # no more than before: the same count, or a reset (a pause, a restart)
        bounds = []              # (samples already accounted for, since when (the signer's clock))
        if self.per_epoch or not known:
            base = since if self.per_epoch and since is not None else self.started
            bounds.append((0, base - lim.anchor_slack_s))
        if known:
            bounds.append((signer.samples if same_count else 0, signer.time - lim.slack_s))
        for start, t0 in bounds:
            if samples > start + rate * max(0.0, time - t0) + lim.grace_samples:
                return (f"it claims {samples - start} samples in {max(0.0, time - t0):.0f} s; one peer "
                        f"computes at most {rate:.3g} samples/s")
        return None


@dataclass(frozen=True)
class Problem:
    who: bytes           # the signer (its subkey, for a second spelling of a key)
    epoch: int
    kind: str            # identity | admission | time | work | epoch
    text: str


@dataclass
class Sifted:
    kept: list[bytes]                 # subkeys of the records that count
    no_work: set[bytes]               # ... of which these count for their epoch but not their samples
    claims: list[EpochClaim]          # the kept records' epoch claims (sources: signer identities)
    problems: list[Problem]           # one per record dropped, or kept without its samples
    ceiling: int                      # the highest epoch believed


class ProgressRecords:
    """Sifts hivemind's progress records (LocalTrainingProgress: epoch, samples_accumulated,
    samples_per_second, time, client_mode) before they count:
    - one signer, one record: only the canonical spelling of its key (signer_identity);
    - only admitted signers (`admitted`: a private swarm's check; everyone by default);
    - its time within skew of now, not older than max_age_s, or the record does not count;
    - its samples and samples/s within the limits (RecordGate), or it counts without them: its
      epoch still does (the epoch filter judges that), so a newcomer that cannot yet tell a fast
      peer's samples from a forger's still catches up with it;
    - its epoch within the believed ceiling (believed_epoch_ceiling, with `witnesses`).
    Our own record (`own`) is ours: only the epoch filter applies to it. own_counts=False (the
    host): our epoch is no opinion against far claims (believed_epoch_ceiling).
    """

    def __init__(self, limits: RecordLimits | None = None, admitted: Admitted = everyone,
                 max_signers: int = MAX_SIGNERS, started: float | None = None, own_counts: bool = True):
        import time as _time
        self.limits = limits or RecordLimits()
        self.admitted = admitted
        self.own_counts = own_counts
        self.gate = RecordGate(self.limits, per_epoch=True,
                               started=_time.time() if started is None else started, max_signers=max_signers)
        self.epoch_began: LruDict = LruDict(MAX_EPOCHS_REMEMBERED)   # epoch -> when we saw it begin (our clock)

    def set_limits(self, limits: RecordLimits) -> None:
        self.limits = self.gate.limits = limits

    def _since(self, epoch: int, now: float) -> float | None:
        if epoch in self.epoch_began:
            return self.epoch_began[epoch]
        if self.epoch_began and epoch > max(self.epoch_began):
            return now          # an epoch no believed record had reached: it begins now, as far as we know
        return None             # older than we remember: since the gate started

    def _saw(self, epoch: int, now: float) -> None:
        known = max(self.epoch_began, default=None)
        first = epoch if known is None else known + 1
        for e in range(max(first, epoch - MAX_EPOCHS_REMEMBERED + 1), epoch + 1):
            self.epoch_began[e] = now

    def sift(self, records: Iterable[tuple[bytes, Any]], local_epoch: int, *, own: bytes | None = None,
             witnesses: Iterable[EpochClaim] = (), now: float | None = None, own_samples: int = 0) -> Sifted:
        import time as _time
        now = _time.time() if now is None else now
        self._saw(local_epoch, now)
        problems: list[Problem] = []
        claims: list[EpochClaim] = []
        subkeys: list[bytes] = []
        no_work: set[bytes] = set()
        for subkey, p in records:
            who = signer_identity(subkey)
            if who is None:
                problems.append(Problem(subkey, p.epoch, "identity",
                                        "it is signed under a second spelling of a signer's key"))
                continue
            if who != own:
                if not self.admitted(who):
                    problems.append(Problem(who, p.epoch, "admission", "its signer is not admitted to this swarm"))
                    continue
                text = self.gate.timing(who, p.time, now)
                if text is not None:
                    problems.append(Problem(who, p.epoch, "time", text))
                    continue
                text = self.gate.work(who, epoch=p.epoch, samples=p.samples_accumulated,
                                      samples_per_s=p.samples_per_second, time=p.time,
                                      since=self._since(p.epoch, now))
                if text is not None:
                    problems.append(Problem(who, p.epoch, "work", text))
                    no_work.add(subkey)
            claims.append(EpochClaim(who, p.epoch, counts=not p.client_mode))
            subkeys.append(subkey)
        witnesses = [EpochClaim(w, c.epoch, c.counts, witness=True) for c in witnesses
                     if (w := signer_identity(c.source)) is not None]
        ceiling = believed_epoch_ceiling(claims + witnesses, local_epoch, own=own, admitted=self.admitted,
                                         own_counts=self.own_counts, own_samples=own_samples)
        kept, kept_claims = [], []
        for subkey, c in zip(subkeys, claims):
            if c.epoch <= ceiling:
                kept.append(subkey)
                kept_claims.append(c)
            else:
                problems.append(Problem(c.source, c.epoch, "epoch", f"it claims epoch {c.epoch}"))
        self._saw(max([local_epoch] + [c.epoch for c in kept_claims if c.counts]), now)
        return Sifted(kept, no_work & set(kept), kept_claims, problems, ceiling)
