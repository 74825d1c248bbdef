"""Robust aggregation for the swarm's all-reduce (issue 10): one hostile peer moves a round by a
bounded amount, whatever it sends or returns, and is named and left out once it keeps doing so.

The rule, applied by each reducer to one part at a time, to the values as decoded (`robust_combine`).
CenteredClip (Karimireddy et al. 2021; Gorbunov et al., "Secure Distributed Training at Scale", ICML
2022) after a norm bound, on y_i = x_i − ref (ref: zeros for gradients and pseudo-gradients; the
reducer's own values at the last round for parameters, so that norms measure movement):
1. Weights (the samples each sender declares) are capped at their median when there are 3 senders
   or more: a peer declaring 10**9 samples counts as the median peer. Cost: an honest peer faster
   than the median counts as the median (its larger Δ still counts in full, up to the bound of 2.).
2. Norm bound: y_i longer than NORM_CLIP × the median norm is scaled down to it. With two senders the
   median is the smaller norm and the bound PAIR_CLIP × it: nobody can tell which of two is right,
   so neither may count for more than twice the other's size: noise, ×(−100), 1e30 or a clamped
   ±65504 then moves the average by at most (1 + PAIR_CLIP) × the honest contribution × the
   attacker's weight share (1.5× at equal weights; weights are not capped here, since with two
   there is no median to cap at). A peer sending zeros can stall the round, but not move it.
3. CenteredClip (3 senders or more): from the coordinate-wise median m, iterate
   v ← v + Σ w_i·min(1, τ/‖y_i − v‖)·(y_i − v) / Σ w_i. τ = TAU × the median of ‖y_i − m‖: scale-free
   (it is the honest peers' own spread, whatever the layer, codec or learning rate), and at a fixed
   point a sender of weight share s moves v by at most s·τ however far it is. A typical honest peer
   sits within τ and counts in full; one that sits further counts as if it were at τ.
A sender whose contribution counts for less than FLAG of itself in a part (norm bound × clip, the
clip judged with a radius of at least FLAG_RADIUS × the median norm) is *clipped* there; in a round
it is clipped when that covers FLAG_MIN_VALUES of its values at least (or all, if fewer).
The constants are generous on purpose: a peer on different data, or twice as fast, must not be named.
Measured on 262144-value parts (honest peers: a shared direction plus their own noise of half its
size): with 2 honest peers an attacker moves the result by 0.23-0.27 of the honest mean's norm (an
honest third peer moves it 0.19; the plain mean moves 35× to 10**29×); with 4 honest, 0.12. Cost on
one loaded CPU thread, 1M values, 3 senders: ~70 ms for all parts, so ~23 ms per peer (each reduces
a third); the plain mean took 0.7 ms.

Results (`RobustRunnerMixin`): what a reducer returns for a part is compared with what this peer
sent for it: not finite, the wrong shape, or farther from our own values than RESULT_BOUND × the
size of our contribution to that part (scaled up when the median contributor at our own reducer is
larger than we are, so a slow peer does not take the others for liars) is a bad part, and a strike
against that reducer. The sync averagers then use their own values for the part; DiLoCo (where
every peer must end identical) fails the round instead: see diloco.py.

Malformed data (a part that does not decode to the agreed size and codec, or is not finite as
decoded) is a strike as well: hivemind bans such a sender from the round (its values count for
nothing) and a reducer's malformed reply fails the part, but neither used to name the peer, so one
sending wrong shapes round after round was never left out (`MalformedPart`, `_ban_sender`).

Naming (`ClipRecord`, in the averager's process): a peer clipped, or a reducer caught, in STRIKES of
its last WINDOW rounds here is named: a `peer_clipped` warning, its values count with weight 0 at
our reducer from then on, and no state is downloaded from it. DiLoCo also tells the group, which
then gives a peer named by most of the other members no part to reduce.
"""
from __future__ import annotations

import asyncio
import math
import sys
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Sequence

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllReduceRunner, AveragingMode
from hivemind.averaging.partition import AllreduceException, BannedException, TensorPartReducer
from hivemind.utils import get_logger
from hivemind.utils.asyncio import as_aiter, azip
from hivemind.utils.mpfuture import MPFuture
from hivemind.utils.timed_storage import ValueWithExpiration, get_dht_time

from .compression import CompressionError

logger = get_logger(__name__)

NORM_CLIP = 4.0          # 3+ senders: norms above 4× the median are cut to it
PAIR_CLIP = 2.0          # 2 senders: norms above 2× the smaller one are cut to it
TAU = 1.0                # clip radius, in medians of the distances to the coordinate-wise median
CC_ITERS, CC_TOL = 20, 1e-3
FLAG = 1 / 8             # counted for less than this share of itself: clipped
FLAG_RADIUS = 0.5        # ...judged with a clip radius of at least this × the median norm
FLAG_MIN_VALUES = 1024   # ...in parts holding at least this many of its values (or all of them)
STRIKES, WINDOW = 3, 5   # clipped in 3 of its last 5 rounds: named
RESULT_BOUND = 6.0       # a returned part farther than this × our contribution's size is bad
MAX_TRACKED = 4096       # peers remembered by a ClipRecord


class MalformedPart(AllreduceException):
    """A sender's part is not what the group agreed on (its shape)."""


def _malformed(exc: BaseException | None) -> bool:
    """Raised by a peer's data itself (not by a timeout or a dropped connection)."""
    return isinstance(exc, (CompressionError, MalformedPart))


def _lower_median(values: torch.Tensor) -> float:
    s = torch.sort(values).values
    return float(s[(s.numel() - 1) // 2])


def _norms(rows: torch.Tensor) -> torch.Tensor:
    """Row norms (float64 values). In float32 (a float64 cast of the rows costs 40×); rows whose
    squares overflow (1e30) are scaled by their largest |value| first."""
    out = torch.linalg.vector_norm(rows, dim=1).double()
    bad = ~torch.isfinite(out)
    if bool(bad.any()):
        big = rows[bad]
        scale = big.abs().amax(dim=1).clamp(min=1e-30)
        out[bad] = torch.linalg.vector_norm(big / scale[:, None], dim=1).double() * scale.double()
    return out


def _coordinate_median(rows: torch.Tensor) -> torch.Tensor:
    """The lower median of each column. Up to 16 rows by an odd-even transposition sort of whole rows
    (elementwise min/max: ~20× faster than torch.median along a short dimension)."""
    k = rows.shape[0]
    if k > 16:
        return rows.median(dim=0).values
    r = list(rows)
    for p in range(k):
        for i in range(p % 2, k - 1, 2):
            r[i], r[i + 1] = torch.minimum(r[i], r[i + 1]), torch.maximum(r[i], r[i + 1])
    return r[(k - 1) // 2]


@dataclass
class Combined:
    value: torch.Tensor                     # flat float32
    factors: list                           # per sender: share of it that counted, as judged (None: absent)
    median_norm: float = 0.0                # median ‖y_i‖ of the senders counted
    norms: list = field(default_factory=list)   # per sender ‖y_i‖ (None: absent)


def robust_combine(parts: Sequence[torch.Tensor | None], weights: Sequence[float],
                   reference: torch.Tensor | None = None) -> Combined:
    """The robust weighted average of `parts` (flat, one per sender, None if absent); see the module
    docstring. Senders with weight 0 are left out; a non-finite part is left out with factor 0."""
    n = len(parts)
    factors: list = [None] * n
    norms: list = [None] * n
    active = []
    for i, (p, w) in enumerate(zip(parts, weights)):
        if p is None or not w > 0:
            continue
        if not bool(torch.isfinite(p).all()):
            factors[i] = 0.0
            continue
        active.append(i)
    if not active:
        numel = next((p.numel() for p in parts if p is not None), 0)
        return Combined(torch.full((numel,), float("nan")), factors)   # 0/0, as hivemind's mean
    ys = torch.stack([parts[i].reshape(-1).float() for i in active])
    if reference is not None:
        ys = ys - reference.reshape(-1).float()
    w = torch.tensor([float(weights[i]) for i in active], dtype=torch.float64)
    k = len(active)
    if k >= 3:
        w = torch.clamp(w, max=_lower_median(w))
    norms_a = _norms(ys)
    med = _lower_median(norms_a)
    f_norm = torch.ones(k, dtype=torch.float64)
    if k >= 2:
        bound = (PAIR_CLIP if k == 2 else NORM_CLIP) * med
        over = norms_a > bound
        f_norm[over] = bound / norms_a[over]
        ys = ys * f_norm.to(ys.dtype)[:, None]
    f_cc = torch.ones(k, dtype=torch.float64)
    if k >= 3:
        v = _coordinate_median(ys)
        tau = TAU * _lower_median(_norms(ys - v))
        wf = (w / w.sum()).float()
        for _ in range(CC_ITERS):
            diff = ys - v
            dist = _norms(diff)
            c = torch.where(dist > tau, tau / dist.clamp(min=1e-300), torch.ones_like(dist))
            step = (wf * c.float()) @ diff
            v = v + step
            if float(torch.linalg.vector_norm(step)) <= CC_TOL * tau:
                break
        # Judged with a radius of at least FLAG_RADIUS × the median norm: honest peers that agree to
        # the bit (sync peers applying the same gradients) must not make a slightly different one a liar.
        dist = _norms(ys - v)
        radius = max(tau, FLAG_RADIUS * med)
        f_cc = torch.where(dist > radius, radius / dist.clamp(min=1e-300), torch.ones_like(dist))
    else:
        v = (w / w.sum()).float() @ ys
    if reference is not None:
        v = v + reference.reshape(-1).float()
    for j, i in enumerate(active):
        factors[i] = float(f_norm[j] * f_cc[j])
        norms[i] = float(norms_a[j])
    return Combined(v, factors, med, norms)


class RobustPartReducer(TensorPartReducer):
    """hivemind's TensorPartReducer, except that a part's contributions are collected and combined by
    `robust_combine` once every sender's is in (hivemind adds each into a running sum). Keeps, per
    sender, how many of its values were clipped, and the median and own norms for result checks."""

    def __init__(self, part_shapes, num_senders: int, *, sender_ids: Sequence[str] = (),
                 skip: frozenset = frozenset(), reference_parts: Sequence[torch.Tensor] | None = None,
                 own_index: int | None = None):
        self.sender_ids, self.skip = list(sender_ids), frozenset(skip)
        self.reference_parts, self.own_index = reference_parts, own_index
        self.contributions: dict[int, tuple[torch.Tensor, float]] = {}
        self.counted_values = [0] * num_senders
        self.clipped_values = [0] * num_senders
        self.median_sq = self.own_sq = 0.0      # Σ over our parts of median² and own² norms
        super().__init__(part_shapes, num_senders)

    def reset_accumulators(self):
        if self.current_part_index >= self.num_parts - 1:
            self.finalize()
            return
        self.current_part_index += 1
        self.current_part_accumulated_from = 0
        self.current_part_future = asyncio.Future()
        self.num_current_senders = sum(self.current_part_index < failed for failed in self.sender_failed_after)
        self.contributions = {}
        self.accumulator, self.denominator = None, 0.0

    async def accumulate_part(self, sender_index: int, part_index: int, tensor_part: torch.Tensor,
                              weight: float = 1.0) -> torch.Tensor:
        assert 0 <= sender_index < self.num_senders, "invalid sender index"
        assert 0 <= part_index < self.num_parts, "invalid part index"
        if tuple(tensor_part.shape) != tuple(self.part_shapes[part_index]):
            raise MalformedPart(f"sender {sender_index} sent part {part_index} of shape {tuple(tensor_part.shape)}")
        self.num_parts_received[sender_index] += 1
        while part_index > self.current_part_index:
            finished = asyncio.create_task(self.finished.wait())
            try:
                await asyncio.wait({self.current_part_future, finished}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                finished.cancel()
            if self.finished.is_set():
                raise AllreduceException(f"attempted to aggregate part in a finalized {type(self).__name__}")
        if self.sender_failed_after[sender_index] != float("inf"):
            raise BannedException(f"sender {sender_index} was banned in background")
        assert part_index == self.current_part_index
        future = self.current_part_future
        if part_index < self.sender_failed_after[sender_index]:
            self.contributions[sender_index] = (tensor_part, float(weight))
            self.current_part_accumulated_from += 1
            self.check_current_part_finished()
        return await future

    def check_current_part_finished(self):
        assert self.current_part_accumulated_from <= self.num_current_senders
        if self.current_part_accumulated_from == self.num_current_senders:
            self.current_part_future.set_result(self._combine())
            self.reset_accumulators()

    def _combine(self) -> torch.Tensor:
        index, shape = self.current_part_index, self.part_shapes[self.current_part_index]
        parts: list = [None] * self.num_senders
        weights = [0.0] * self.num_senders
        for s, (part, weight) in self.contributions.items():
            parts[s] = part.reshape(-1)
            named = s < len(self.sender_ids) and self.sender_ids[s] in self.skip
            weights[s] = 0.0 if named or not math.isfinite(weight) else weight
        if not any(p is not None for p in parts):
            return torch.full(shape, float("nan"))
        ref = self.reference_parts[index] if self.reference_parts is not None else None
        out = robust_combine(parts, weights, ref)
        numel = math.prod(shape)
        for s, f in enumerate(out.factors):
            if f is not None:
                self.counted_values[s] += numel
                if f < FLAG:
                    self.clipped_values[s] += numel
        own = self.own_index
        if own is not None and out.norms[own] is not None:
            self.median_sq += out.median_norm ** 2
            self.own_sq += out.norms[own] ** 2
        return out.value.reshape(shape)

    def verdicts(self) -> dict[str, bool]:
        """sender id -> clipped this round, for senders other than us whose values were counted."""
        out = {}
        for s, counted in enumerate(self.counted_values):
            if counted and s != self.own_index and s < len(self.sender_ids):
                out[self.sender_ids[s]] = self.clipped_values[s] >= min(FLAG_MIN_VALUES, counted)
        return out


class ClipRecord:
    """Per peer, the verdicts of its last WINDOW rounds here; STRIKES clipped ones name it for good."""

    def __init__(self, strikes: int | None = None, window: int | None = None):
        self.strikes, self.window = strikes or STRIKES, window or WINDOW
        self.recent: OrderedDict[str, deque] = OrderedDict()
        self.counts: dict[str, int] = {}
        self.named: set[str] = set()

    def judge(self, verdicts: dict[str, bool]) -> list[str]:
        """Record one round's verdicts; returns the peers named by it."""
        named_now = []
        for peer, clipped in verdicts.items():
            if peer in self.named:
                continue
            d = self.recent.pop(peer, None) or deque(maxlen=self.window)
            d.append(bool(clipped))
            self.recent[peer] = d
            if clipped:
                self.counts[peer] = self.counts.get(peer, 0) + 1
            if sum(d) >= self.strikes:
                self.named.add(peer)
                named_now.append(peer)
        while len(self.recent) > MAX_TRACKED:
            old, _ = self.recent.popitem(last=False)
            if old not in self.named:
                self.counts.pop(old, None)
        return named_now

    def snapshot(self) -> dict:
        return dict(counts=dict(self.counts), named=sorted(self.named))


def excluded_reducers(gathered: dict, members: Sequence) -> set:
    """Members named (gather field `named`) by more than half of the *other* members: every member
    computes this from the same gathered data, so all agree on who reduces. Never all of them."""
    ids = [str(m) for m in members]
    votes: dict[str, int] = {}
    for voter, data in gathered.items():
        named = data.get("named") if isinstance(data, dict) else None
        if not isinstance(named, (list, tuple)):
            continue
        for q in {x for x in named[:MAX_TRACKED] if isinstance(x, str)} & set(ids) - {str(voter)}:
            votes[q] = votes.get(q, 0) + 1
    out = {q for q, v in votes.items() if 2 * v > len(ids) - 1}
    return out if len(out) < len(ids) else set()


class RobustRunnerMixin:
    """For AllReduceRunner subclasses: swaps in RobustPartReducer and keeps what result checks need.
    Call `_setup_robust` at the end of __init__."""

    def _setup_robust(self, skip: set, reference: Sequence[torch.Tensor] | None) -> None:
        c = self.tensor_part_container
        stock = self.tensor_part_reducer
        stock.finished.set()   # never used: keeps its finalizer from logging "received 0%"
        numels = [[part.numel() for part, _ in parts] for parts in c._input_parts_by_peer]
        self._ref_parts = None
        if reference is not None:
            flat = torch.cat([r.detach().reshape(-1).float() for r in reference])
            # parts are consecutive slices of the flattened tensors, peer after peer (TensorPartContainer)
            chunks = iter(flat.split([n for peer in numels for n in peer]))
            self._ref_parts = [[next(chunks) for _ in peer] for peer in numels]
        me = self.ordered_peer_ids.index(self.peer_id)
        own_sender = self.sender_peer_ids.index(self.peer_id) if self.peer_id in self.sender_peer_ids else None
        self.tensor_part_reducer = RobustPartReducer(
            tuple(p.shape for p in self.parts_for_local_averaging), len(self.sender_peer_ids),
            sender_ids=[str(p) for p in self.sender_peer_ids], skip=frozenset(skip),
            reference_parts=self._ref_parts[me] if self._ref_parts is not None else None, own_index=own_sender)
        sq, n = 0.0, 0
        for peer, parts in enumerate(c._input_parts_by_peer):
            for i, (part, _) in enumerate(parts):
                sq += self._own_sq(peer, i)
                n += part.numel()
        self._own_rms = math.sqrt(sq / max(1, n))   # our contribution's size per value, all parts
        self.bad_reducers: dict[str, str] = {}
        self.malformed_senders: dict[str, str] = {}
        self._returned: list[tuple[int, int, float, float, int]] = []
        # A reply that does not decode fails its reducer's parts (in an except block, whose exception
        # says why): a strike when the data itself was bad.
        fail = c.register_failed_reducer

        def failed(peer_index: int) -> None:
            exc = sys.exc_info()[1]
            if _malformed(exc):
                self._note_bad(peer_index, c._outputs_registered_by_peer[peer_index],
                               f"its reply does not decode ({exc})"[:200])
            fail(peer_index)
        c.register_failed_reducer = failed

    async def _ban_sender(self, peer_id) -> None:
        """hivemind bans a sender whose stream failed, from its finally and its except blocks: when
        the exception being handled came from the sender's data, that is a strike against it."""
        exc = sys.exc_info()[1]
        if _malformed(exc):
            self.malformed_senders.setdefault(str(peer_id), str(exc)[:200])
        await super()._ban_sender(peer_id)

    def _own_part(self, peer_index: int, part_index: int) -> torch.Tensor:
        part = self.tensor_part_container._input_parts_by_peer[peer_index][part_index][0].reshape(-1).float()
        if self._ref_parts is not None:
            part = part - self._ref_parts[peer_index][part_index]
        return part

    def _own_sq(self, peer_index: int, part_index: int) -> float:
        return float(torch.linalg.vector_norm(self._own_part(peer_index, part_index))) ** 2

    def _result_problem(self, dev: float, own_norm: float, numel: int) -> str | None:
        """dev = ‖returned − what we sent‖ for a part; None if within the bound."""
        r = self.tensor_part_reducer
        rho = math.sqrt(r.median_sq / r.own_sq) if r.own_sq > 0 else 1.0
        size = max(own_norm, self._own_rms * math.sqrt(numel)) * max(1.0, rho)
        if size == 0.0 and r.median_sq > 0:
            size = math.sqrt(r.median_sq / max(1, sum(p.numel() for p in self.parts_for_local_averaging)) * numel)
        if size == 0.0:
            return None       # we sent nothing and saw nothing to compare with
        if not dev <= RESULT_BOUND * size:
            return f"{dev:.3g} from what this peer sent (bound {RESULT_BOUND * size:.3g})"
        return None

    def _note_bad(self, peer_index: int, part_index: int, problem: str) -> None:
        peer = str(self.ordered_peer_ids[peer_index])
        self.bad_reducers.setdefault(peer, f"part {part_index}: {problem}")

    def verdicts(self) -> dict[str, bool]:
        out = self.tensor_part_reducer.verdicts()
        for peer in list(self.bad_reducers) + list(self.malformed_senders):
            out[peer] = True
        out.pop(str(self.peer_id), None)
        return out


class RobustAllReduceRunner(RobustRunnerMixin, AllReduceRunner):
    """hivemind's all-reduce (each peer gets average − its part) with the robust reducer; a returned
    part that fails the check is replaced by this peer's own values (delta 0)."""

    def __init__(self, *, named: frozenset = frozenset(), reference=None, **kwargs):
        super().__init__(**kwargs)
        self._setup_robust({str(p) for p in self.sender_peer_ids if str(p) in named}, reference)
        c = self.tensor_part_container
        register, me = c.register_processed_part, self.ordered_peer_ids.index(self.peer_id)

        def checked(peer_index: int, part_index: int, delta: torch.Tensor):
            if peer_index != me:
                delta = self._checked_delta(peer_index, part_index, delta)
            register(peer_index, part_index, delta)
        c.register_processed_part = checked

    def _checked_delta(self, peer_index: int, part_index: int, delta) -> torch.Tensor:
        own = self.tensor_part_container._input_parts_by_peer[peer_index][part_index][0]
        problem = None
        if not torch.is_tensor(delta) or tuple(delta.shape) != tuple(own.shape):
            problem = "wrong shape"
        elif not bool(torch.isfinite(delta).all()):
            problem = "not finite"
        else:
            dev = float(torch.linalg.vector_norm(delta))
            own_norm = float(torch.linalg.vector_norm(self._own_part(peer_index, part_index)))
            problem = self._result_problem(dev, own_norm, own.numel())
        if problem is None:
            return delta.to(own.dtype)
        self._note_bad(peer_index, part_index, problem)
        self.tensor_part_container.failed_size += own.numel()
        return torch.zeros_like(own)


class _WithoutNamed:
    """The DHT as the averager sees it, except that named peers offer no state to download."""

    def __init__(self, dht, named: set):
        self._dht, self._named = dht, named

    def __getattr__(self, name):
        return getattr(self._dht, name)

    def get(self, key, *args, **kwargs):
        found = self._dht.get(key, *args, **kwargs)
        if not (isinstance(key, str) and key.endswith(".all_averagers") and isinstance(found, ValueWithExpiration)
                and isinstance(found.value, dict) and self._named):
            return found
        from hivemind.p2p import PeerID
        kept = {}
        for subkey, info in found.value.items():
            try:
                if str(PeerID(subkey)) in self._named:
                    continue
            except Exception:
                pass
            kept[subkey] = info
        return ValueWithExpiration(kept, found.expiration_time)


class RobustAveraging(DecentralizedAverager):
    """Mixin for hivemind averagers: all-reduce with the robust reducer and result checks; clip
    verdicts judged in the averager's process; no state downloads from named peers. `clip_report()`
    (any process) returns {counts: {peer: clipped rounds}, named: [peers]}.
    keep_reference: averages parameters (norms then measure movement since the last round)."""
    keep_reference = False
    runner_class = RobustAllReduceRunner

    def _clips(self) -> ClipRecord:
        record = self.__dict__.get("_clip_record")
        if record is None:
            record = self._clip_record = ClipRecord()
        return record

    def _judge(self, runner) -> list[str]:
        named_now = self._clips().judge(runner.verdicts())
        for peer in named_now:
            logger.warning(f"peer {peer} was clipped in {STRIKES} of its last {WINDOW} rounds: left out from now on")
        return named_now

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None, **kwargs):
        group_id = group_info.group_id if group_id is None else group_id
        reference = self.__dict__.get("_reference") if self.keep_reference else None
        if reference is not None and [r.shape for r in reference] != [t.shape for t in tensors]:
            reference = None
        runner = self.runner_class(p2p=self._p2p, servicer_type=type(self), prefix=self.prefix, tensors=tensors,
                                   group_id=group_id, ordered_peer_ids=group_info.peer_ids,
                                   named=frozenset(self._clips().named), reference=reference, **kwargs)
        assert group_id in self._running_groups, f"Group id {group_id} was not registered"
        self._running_groups[group_id].set_result(runner)
        try:
            if runner.modes[group_info.peer_ids.index(self.peer_id)] != AveragingMode.AUX:
                async for tensor, update in azip(as_aiter(*tensors), runner):
                    tensor.add_(update, alpha=self._averaging_alpha)
                    self.last_updated = get_dht_time()
                    self._state_updated.set()
            else:
                async for _ in runner:
                    raise ValueError("aux peers should not receive averaged tensors")
        finally:
            self._judge(runner)
        if self.keep_reference:
            self._reference = [t.detach().clone() for t in tensors]

    async def _load_state_from_peers(self, future, timeout=None):
        dht = self.dht
        self.dht = _WithoutNamed(dht, set(self._clips().named))
        try:
            return await super()._load_state_from_peers(future, timeout=timeout)
        finally:
            self.dht = dht

    def clip_report(self, timeout: float = 5.0) -> dict:
        future = MPFuture()
        self._outer_pipe.send(("_clip_report", [], dict(future=future)))
        return future.result(timeout=timeout)

    async def _clip_report(self, future) -> None:
        future.set_result(self._clips().snapshot())


# ---- state downloads ----------------------------------------------------------------------------
# A fresh joiner knows nothing but its own (initial) weights: a trained model's norm may be several
# times theirs, so the ratio only stops gross values (×100, 1e30, zeros).
STATE_NORM_RATIO = 32.0  # downloaded weights' norm within 1/32..32× ours
STATE_STEP_BOUND = 8.0   # ...and within 8 × (rounds ahead) × our largest recent outer step


def _norm(tensors) -> float:
    # float32 (a float64 cast costs 40×): a norm that overflows is inf, and fails every bound below
    return math.sqrt(sum(float(torch.linalg.vector_norm(t.detach().float())) ** 2 for t in tensors))


def state_problem(new: Sequence[torch.Tensor], own: Sequence[torch.Tensor], recent_step: float | None = None,
                  rounds_ahead: int = 1) -> str | None:
    """Downloaded weights `new` against ours: a norm ratio, and when we know how far recent rounds
    moved the weights (`recent_step`, the largest), a distance bound. None when believable."""
    own_norm, new_norm = _norm(own), _norm(new)
    if own_norm > 0 and not own_norm / STATE_NORM_RATIO <= new_norm <= own_norm * STATE_NORM_RATIO:
        return f"weights' norm {new_norm:.3g} is far from this peer's {own_norm:.3g}"
    if recent_step:
        dist = _norm([a.detach().float() - b.detach().float() for a, b in zip(new, own)])
        allowed = STATE_STEP_BOUND * max(1, rounds_ahead) * recent_step
        if not dist <= allowed:
            return f"weights are {dist:.3g} from this peer's, more than {allowed:.3g} (recent rounds moved them {recent_step:.3g})"
    return None
