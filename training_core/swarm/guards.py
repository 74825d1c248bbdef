"""Defences against hostile or broken peers, as plain functions the tests call directly.

Peers are strangers: what they report (epochs, metrics) and what they send (averaged
gradients, parameters) is checked before it changes anything here. Imports torch, not hivemind.
"""
from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

# An epoch more than this far ahead of ours is believed only when other signers vouch for it (below).
MAX_EPOCH_LEAD = 2


@dataclass(frozen=True)
class EpochClaim:
    source: bytes         # who claims it: the signer's public key (one key = one voice)
    epoch: int
    counts: bool = True   # False for client-mode peers: hivemind ignores their epoch too
    witness: bool = False  # a signed metrics record (peers' and the host's): it can vouch for an
                           # epoch, but it is not a training peer's progress record (no vote below)


def _epochs_by_source(claims: Iterable[EpochClaim], exclude: bytes | None = None) -> dict[bytes, int]:
    out: dict[bytes, int] = {}
    for c in claims:
        if c.counts and c.source != exclude:
            out[c.source] = max(c.epoch, out.get(c.source, -1))
    return out


def believed_epoch_ceiling(claims: Iterable[EpochClaim], local_epoch: int, max_lead: int = MAX_EPOCH_LEAD,
                           own: bytes | None = None) -> int:
    """The highest epoch we accept: max_lead past the highest of
    - our own epoch;
    - the highest epoch that two distinct signers (progress or metrics records) both claim, or exceed;
    - the lower median of the epochs in the *other* training peers' progress records (`own`, our
      signer, left out): an epoch that more than half of them claim, or exceed.

    With two or more other training peers the median adds nothing (more than half of them is two
    signers or more). It matters with exactly one: then that peer's word is the swarm's epoch. A
    newcomer (epoch 0) or a peer that fell far behind must be able to catch up with a swarm of one
    other peer, and waiting for a second signer fails there: the host's metrics record trails the
    swarm (it downloads state every few seconds), a peer reads metrics records only every 2 s, and
    a swarm need not have a host at all. Our own record cannot be a voice, or a newcomer would
    outvote that peer with its epoch 0. What stays: one signer claiming epoch 10**6 moves no one
    who has another training peer beside it (the lower median of two is the lower one), and a
    swarm of many honest peers needs two signers to move. The price: a peer whose only fellow
    training peer lies follows it; with one other voice there is nobody to tell them apart.
    Metrics records vouch but do not vote: the host's trails the swarm, and a newcomer publishes
    one at epoch 0 before it has loaded anything.
    """
    claims = list(claims)
    ceiling = local_epoch + max_lead
    ahead = sorted((e for e in _epochs_by_source(claims).values() if e > ceiling), reverse=True)
    # ahead[1] is the highest epoch that at least two distinct sources claim (or exceed); peers a
    # little past it are the same swarm seen a moment later, as they are for our own epoch.
    if len(ahead) >= 2:
        ceiling = ahead[1] + max_lead
    voices = sorted(_epochs_by_source((c for c in claims if not c.witness), exclude=own).values())
    if voices:
        ceiling = max(ceiling, voices[(len(voices) - 1) // 2] + max_lead)
    return ceiling


def filter_epoch_claims(claims: Sequence[EpochClaim], local_epoch: int, witnesses: Iterable[EpochClaim] = (),
                        max_lead: int = MAX_EPOCH_LEAD,
                        own: bytes | None = None) -> tuple[list[EpochClaim], list[EpochClaim]]:
    """Split progress claims into (kept, rejected). Witnesses (e.g. signed metrics) can corroborate
    an epoch but are never kept themselves, and never vote (see believed_epoch_ceiling); `own` is
    the signer of our own progress record."""
    witnesses = [EpochClaim(w.source, w.epoch, w.counts, witness=True) for w in witnesses]
    ceiling = believed_epoch_ceiling(list(claims) + witnesses, local_epoch, max_lead, own)
    kept = [c for c in claims if c.epoch <= ceiling]
    rejected = [c for c in claims if c.epoch > ceiling]
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
