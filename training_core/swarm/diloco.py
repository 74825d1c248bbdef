"""DiLoCo rounds on hivemind (arXiv 2311.08105; OpenDiLoCo, arXiv 2407.07852).

Each peer takes local AdamW steps (the engine's); a round then all-reduces the peers' pseudo-gradients
Δ = θ_g − θ_local (θ_g: the outer weights every peer shares), weighted by the samples behind them, and
applies an outer Nesterov SGD step to θ_g. Every peer must end a round with the *same* θ_g:
- The all-reduce returns the same bytes to everyone: each reducer serializes its averaged part once
  and every peer, the reducer included, decodes those bytes (hivemind instead sends each peer
  `average − its own part`, which lossy codecs leave slightly different on every peer).
- The outer step is computed so that every CPU rounds it the same way (`outer_step_`).
- A round that did not get every part fails as a whole on that peer; nothing is half applied.
- Each exchange gathers every member's (round, digest of θ_g): members on another lineage (missed a
  round, late, or diverged) are averaged with weight 0 by every reducer alike, then download the state.
Robust rounds (robust.py; issue 10): each reducer combines its part with CenteredClip after a norm
bound, so one hostile sender moves a round by a bounded amount; what comes back from each reducer is
checked against what this peer sent. A bad part cannot fall back to our own values here, since every
peer must end with the same θ_g; instead the round fails on every peer that sees it, whose progress
folds into the next round as after any failed round. A reducer serializes its part once, so one that
sends the same bad bytes to all fails the round for all of them alike. One that sends bad bytes to
some peers only splits the group: those that saw them stay at round r, the others apply r+1; the
next exchange's lineage check (the most common (round, digest), then the highest round) gives the
stale ones weight 0 and they download the state, so no peer keeps a θ_g that differs silently.
Peers clipped (or caught reducing) in STRIKES of WINDOW rounds are named (`peer_clipped`), count with
weight 0 at our reducer, serve us no state, and are named in our gather: a member named by more
than half of the others gets no part to reduce (all members compute that from the same gathered
data). State downloads are checked against a norm ratio and the size of our recent rounds.
Clocks: `epoch` counts closed rounds (the progress tracker's epoch: it tells every peer when to meet);
`round` counts outer steps applied to θ_g. They part after a failed round, which closes without a step.
Nothing is lost: a failed or skipped round leaves θ_local alone, so its drift from θ_g (and the samples
behind it) goes into the next Δ; a state download rebases θ_local onto the new θ_g keeping that drift.
"""
from __future__ import annotations

import asyncio
import hashlib
import math
import os
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from hivemind.averaging.allreduce import AllreduceException, AllReduceRunner, AveragingMode
from hivemind.averaging.load_balancing import load_balance_peers
from hivemind.averaging.matchmaking import MatchmakingException
from hivemind.averaging.partition import BannedException
from hivemind.compression import CompressionInfo, NoCompression
from hivemind.proto import averaging_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.asyncio import aiter_with_timeout, as_aiter, attach_event_on_finished, azip, enter_asynchronously

from .admission import AdmissionMixin
from .sigint import KeepsSigint
from .collab import FilteredProgressTracker, CancellableDownload
from .compression import compression_for, decompress
from .guards import MAX_EPOCH_LEAD, all_finite
from .network import sender_gap_s
from .robust import (STATE_STEP_BOUND, MalformedPart, RobustAveraging, RobustRunnerMixin, excluded_reducers,
                     state_problem)

Warn = Callable[[str, str], None]
STATE_KIND = "modron-diloco-1"
_CHUNK = 1 << 22     # values per float64 slice in the outer step (bounds its temporary memory)


def outer_step_(weights, momentum, grads, lr: float, momentum_coef: float) -> None:
    """torch.optim.SGD(nesterov=True, dampening=0) in place: buf = m·buf + g; w −= lr·(g + m·buf).
    Computed in float64 from float32 values with lr and m rounded to float32: a product of two float32
    numbers is exact in float64, so each result is one correctly rounded sum, then rounded to float32.
    Every CPU gets the same bits, fused multiply-add or not (torch's float32 kernels may fuse)."""
    lr, m = float(np.float32(lr)), float(np.float32(momentum_coef))
    for w, b, g in zip(weights, momentum, grads):
        wf, bf, gf = w.view(-1), b.view(-1), g.reshape(-1)
        for s in range(0, wf.numel(), _CHUNK):
            sl = slice(s, s + _CHUNK)
            g64 = gf[sl].double()
            bf[sl] = (bf[sl].double() * m + g64).float()
            d = (bf[sl].double() * m + g64).float()
            wf[sl] = (wf[sl].double() - d.double() * lr).float()


def _trace(*what) -> None:
    if os.environ.get("MODRON_DILOCO_TRACE"):
        print("diloco-trace", time.time(), *what, file=sys.stderr, flush=True)


def digest(tensors) -> str:
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        h.update(memoryview(t.detach().contiguous().numpy()).cast("B"))
    return h.hexdigest()


def choose_lineage(gathered: dict) -> tuple[tuple[int, str] | None, set]:
    """The (round, digest) this group averages on, from what every member sent (the same for all, so
    every member decides alike): the most common, then the highest round, then the larger digest."""
    keys = {}
    for peer, data in gathered.items():
        if isinstance(data, dict) and data.get("v") == 1 and type(data.get("round")) is int \
                and isinstance(data.get("digest"), str):
            keys[peer] = (data["round"], data["digest"])
    if not keys:
        return None, set()
    count = Counter(keys.values())
    best = max(count, key=lambda k: (count[k], k[0], k[1]))
    return best, {peer for peer, k in keys.items() if k == best}


class ExactAllReduceRunner(RobustRunnerMixin, AllReduceRunner):
    """Butterfly all-reduce whose every peer gets bit-identical averages; counts the bytes it moves.
    `failure` is set if any part did not come back (hivemind would quietly use the local part).
    Reduces with robust.RobustPartReducer; `check_results()` judges what the other reducers returned."""

    def __init__(self, *, accepted_senders=None, named: frozenset = frozenset(), **kwargs):
        super().__init__(**kwargs)
        c = self.tensor_part_container
        c.return_deltas = False
        self.compression = c.compression
        self.accepted = accepted_senders
        self.bytes_up = self.bytes_down = 0
        self.failure: str | None = None
        self._numels = [[part.numel() for part, _ in parts] for parts in c._input_parts_by_peer]
        self._replies: dict[int, asyncio.Future] = {}
        # Weight 0 at our reducer: members off the group's lineage, and peers we named.
        skip = {str(p) for p in self.sender_peer_ids
                if (accepted_senders is not None and p not in accepted_senders) or str(p) in named}
        self._setup_robust(skip, reference=None)
        self._me = self.ordered_peer_ids.index(self.peer_id)

    def combine_part(self, sender_index: int, part_index: int, part: torch.Tensor, weight: float):
        """The reduce step: robust.robust_combine once every sender's part is in."""
        return self.tensor_part_reducer.accumulate_part(sender_index, part_index, part, weight=weight)

    def accept_result(self, peer_index: int, part_index: int, part) -> torch.Tensor:
        """What came back from a reducer, decoded under checks (codec, size, length, finite); how far
        it is from what we sent is kept for check_results (the bound needs our reducer's figures)."""
        values = decompress(part, self.compression, self._numels[peer_index][part_index])
        if peer_index != self._me:
            own = self._own_part(peer_index, part_index)
            dev = float(torch.linalg.vector_norm(values - own))
            own_norm = float(torch.linalg.vector_norm(own))
            self._returned.append((peer_index, part_index, dev, own_norm, own.numel()))
        return values

    def check_results(self) -> dict[str, str]:
        """Reducers whose parts came back farther from ours than robust.RESULT_BOUND allows."""
        for peer_index, part_index, dev, own_norm, numel in self._returned:
            problem = self._result_problem(dev, own_norm, numel)
            if problem is not None:
                self._note_bad(peer_index, part_index, problem)
        return dict(self.bad_reducers)

    def _reply_for(self, part_index: int, averaged: torch.Tensor) -> asyncio.Future:
        """The averaged part, serialized once; every peer decodes these same bytes."""
        if part_index not in self._replies:
            self._replies[part_index] = asyncio.get_event_loop().run_in_executor(
                None, self.compression.compress, averaged, CompressionInfo.from_tensor(averaged))
        return self._replies[part_index]

    async def _generate_input_for_peer(self, peer_index: int):
        async for msg in super()._generate_input_for_peer(peer_index):
            self.bytes_up += len(msg.tensor_part.buffer)
            yield msg

    async def _communicate_with_peer(self, peer_id):
        peer_index = self.ordered_peer_ids.index(peer_id)
        c = self.tensor_part_container
        try:
            if peer_id == self.peer_id:
                sender_index = self.sender_peer_ids.index(peer_id)
                for part_index, part in enumerate(self.parts_for_local_averaging):
                    averaged = await self.combine_part(sender_index, part_index, part, self.weight)
                    reply = await self._reply_for(part_index, averaged)
                    c.register_processed_part(peer_index, part_index, self.accept_result(peer_index, part_index, reply))
                return
            done_sending = asyncio.Event()
            inputs = attach_event_on_finished(self._generate_input_for_peer(peer_index), done_sending)
            stream = await self._get_peer_stub(peer_id).rpc_aggregate_part(inputs)
            if self.should_delay_results(self.peer_id):
                await done_sending.wait()
            expected, part_index = len(self._numels[peer_index]), 0
            loop = asyncio.get_event_loop()
            async for msg in aiter_with_timeout(stream, self.reducer_timeout):
                if msg.code != averaging_pb2.AVERAGED_PART or part_index >= expected:
                    raise AllreduceException(f"unexpected message (code {int(msg.code)}, part {part_index})")
                self.bytes_down += len(msg.tensor_part.buffer)
                part = await loop.run_in_executor(None, self.accept_result, peer_index, part_index, msg.tensor_part)
                c.register_processed_part(peer_index, part_index, part)
                part_index += 1
            if part_index != expected:
                raise AllreduceException(f"got {part_index} parts of {expected}")
        except BaseException as e:
            if c._outputs_registered_by_peer[peer_index] < c.num_parts_by_peer[peer_index]:
                self.failure = self.failure or f"parts reduced by {peer_id} did not come back: {e!r}"[:300]
                c.register_failed_reducer(peer_index)
            raise

    async def _accumulate_parts_streaming(self, stream, sender_index: int):
        shapes, loop, part_index = self.tensor_part_reducer.part_shapes, asyncio.get_event_loop(), 0
        try:
            async for msg in stream:
                weight = float(msg.weight)
                if part_index >= len(shapes) or not (math.isfinite(weight) and weight >= 0):
                    # The sender's own data: a strike against it, like a part that does not decode.
                    raise MalformedPart(f"sender {sender_index}: extra part or bad weight {weight}")
                self.bytes_down += len(msg.tensor_part.buffer)
                part = await loop.run_in_executor(None, decompress, msg.tensor_part, self.compression,
                                                  shapes[part_index].numel())
                try:
                    averaged = await self.combine_part(sender_index, part_index, part, weight)
                except BannedException:
                    break
                reply = await self._reply_for(part_index, averaged)
                part_index += 1
                self.bytes_up += len(reply.buffer)
                yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=reply)
        finally:
            if part_index != self.tensor_part_reducer.num_parts:
                await self._ban_sender(self.sender_peer_ids[sender_index])


class DiLoCoAverager(KeepsSigint, AdmissionMixin, CancellableDownload, RobustAveraging):
    """Averages pseudo-gradients with ExactAllReduceRunner and *copies* the result into its tensors;
    a step's result is a report dict (failure, bytes, chosen lineage, clip verdicts). Serves
    `state_source()`."""
    state_source: Callable | None = None
    runner_class = ExactAllReduceRunner

    async def _aggregate_with_group(self, group_info, min_vector_size: int, **kwargs):
        try:
            bandwidths, mode_ids, user_bytes = zip(*map(self.serializer.loads, group_info.gathered))
            gathered = dict(zip(group_info.peer_ids, map(self.serializer.loads, user_bytes)))
            chosen, accepted = choose_lineage(gathered)
            modes = tuple(map(AveragingMode, mode_ids))
            bandwidths = [b if m != AveragingMode.CLIENT else 0.0 for b, m in zip(bandwidths, modes)]
            excluded = excluded_reducers(gathered, group_info.peer_ids)   # no part for peers most others named
            kept = [0.0 if str(p) in excluded else b for p, b in zip(group_info.peer_ids, bandwidths)]
            if any(b is None or b > 0 for b in kept):   # None: "not measured", load_balance_peers takes the mean
                bandwidths = kept
            fractions = await asyncio.get_event_loop().run_in_executor(
                None, load_balance_peers, self.total_size, bandwidths, min_vector_size)
            async with enter_asynchronously(self.get_tensors()) as tensors:
                report = await self._run_allreduce_inplace_(tensors, group_info, peer_fractions=fractions,
                                                            accepted_senders=accepted, **kwargs)
            return dict(report, chosen=chosen, peers=len(group_info.peer_ids))
        except BaseException as e:
            raise MatchmakingException(f"Unable to run All-Reduce: {e!r}")

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None, **kwargs):
        group_id = group_info.group_id if group_id is None else group_id
        runner = self.runner_class(p2p=self._p2p, servicer_type=type(self), prefix=self.prefix, tensors=tensors,
                                   group_id=group_id, ordered_peer_ids=group_info.peer_ids,
                                   named=frozenset(self._clips().named), **kwargs)
        self._running_groups[group_id].set_result(runner)
        failure = None
        try:
            # Safe to overwrite tensor i now: all its parts were sent before its average could exist.
            async for tensor, averaged in azip(as_aiter(*tensors), runner):
                tensor.copy_(averaged)
        except Exception as e:
            failure = f"all-reduce failed: {e!r}"[:300]
        failure = runner.failure or failure
        if failure is None and runner.tensor_part_container.failed_size:
            failure = f"{runner.tensor_part_container.failed_size} values were not averaged"
        if failure is None and not all_finite(tensors):
            failure = "the average is not finite"
        # Only a member of the chosen lineage applies the result, so only it judges the reducers.
        accepted = kwargs.get("accepted_senders")
        bad = runner.check_results() if failure is None and (accepted is None or self.peer_id in accepted) else {}
        if bad:
            peer, why = next(iter(bad.items()))
            failure = f"the part reduced by {peer} is not believable ({why})"[:300]
        named_now = self._judge(runner)
        return dict(failure=failure, bytes_up=runner.bytes_up, bytes_down=runner.bytes_down,
                    clips=self._clips().snapshot(), named_now=named_now)

    def get_current_state(self):
        meta, tensors = self.state_source() if self.state_source else (dict(kind=None), [])
        return meta, tensors, None

    # ---- shutdown, in the averager's process ---------------------------------------------------
    # Every DHT request this process sends (matchmaking declares and un-declares, state declarations)
    # carries an MPFuture whose reply pipe reaches the DHT process as a file descriptor that the DHT
    # fetches from *this* process (multiprocessing's resource sharer) only when it reads the request.
    # If this process exits first, that read fails: FileNotFoundError or a reset costs the DHT a
    # 3 s pause per request (its shutdown then overruns and it is killed), and EOFError, which
    # hivemind's DHT loop does not catch, kills the DHT's request loop: every later call on that
    # DHT (add_validators in the next tracker, a store, a get) then waits forever. Shutting down
    # right after cancelling a step (un-declaring is a DHT store) did exactly that. So before this
    # process exits: stop its own tasks, then make one round trip through the DHT, which reads its
    # requests in order; once it answers, it holds every request this process sent.
    def _shutdown(self, timeout: float | None):
        # hivemind's command loop calls this in its own task, then awaits the coroutine: that task
        # (the loop) is the one not to cancel.
        return self._shutdown_draining_dht(timeout, asyncio.current_task())

    async def _shutdown_draining_dht(self, timeout: float | None, command_loop) -> None:
        budget = 2.0 if timeout is None else timeout
        try:
            await super()._shutdown(budget / 2)     # groups still averaging get half the time
        except Exception as e:
            _trace("shutdown: groups did not finish", repr(e))
        loop = asyncio.get_event_loop()
        deadline = loop.time() + budget / 3
        me = asyncio.current_task()
        while loop.time() < deadline:     # cancelled tasks may leave new ones behind (their finally)
            others = [t for t in asyncio.all_tasks() if t is not me and t is not command_loop and not t.done()]
            if not others:
                break
            for t in others:
                t.cancel()
            await asyncio.wait(others, timeout=max(0.0, deadline - loop.time()))
        try:
            await asyncio.wait_for(self.dht.run_coroutine(_dht_barrier, return_future=True),
                                   timeout=max(0.1, deadline + budget / 8 - loop.time()))
        except Exception as e:   # the DHT is gone or stuck: nothing left to protect
            _trace("shutdown: no DHT round trip", repr(e))


async def _dht_barrier(_dht, _node) -> None:
    """Runs in the DHT process: a request that answers once every earlier one has been read."""
    return None


@dataclass
class _Exchange:
    control: object                       # hivemind StepControl
    snapshot: list[torch.Tensor] | None   # θ_local when Δ was taken (overlap only)
    weight: int                           # samples behind Δ
    started: float


class DiLoCoRounds:
    """The rounds of one peer, or of a host following the swarm (follower=True: no samples, no exchanges;
    it downloads each round's state and serves it). Training-thread API: after_inner_step, poll,
    catch_up, pause, resume, flush, reset_to_outer, load_state_from_peers, state_dict, load_state_dict,
    shutdown. Any thread: interrupt and the figures (phase: inner | exchanging, training goes on |
    waiting, training blocked | syncing, downloading state)."""
    averager_class = DiLoCoAverager

    def __init__(self, dht, run_id: str, params: list[torch.nn.Parameter], *, micro_batch: int, inner_steps: int,
                 outer_lr: float = 0.7, outer_momentum: float = 0.9, compression: str = "float16",
                 matchmaking_time: float = 5.0, averaging_timeout: float = 30.0, max_round_s: float = 1800.0,
                 overlap: bool = True, client_mode: bool = False, on_warning: Warn | None = None,
                 tracker_opts: dict | None = None, follower: bool = False, sharing_priority: float = 0.0):
        self.params = list(params)
        self.micro_batch, self.inner_steps = micro_batch, inner_steps
        self.outer_lr, self.outer_momentum, self.max_round_s = outer_lr, outer_momentum, max_round_s
        # hivemind refuses a step whose matchmaking would end after its deadline
        self.matchmaking_time, self.averaging_timeout = matchmaking_time, max(averaging_timeout, matchmaking_time + 1)
        self.overlap, self.follower, self.client_mode = overlap, follower, client_mode
        self.on_warning = on_warning or (lambda code, message: None)
        with torch.no_grad():
            self.outer = [p.detach().to("cpu", torch.float32, copy=True) for p in self.params]
        self.momentum = [torch.zeros_like(w) for w in self.outer]
        self.round = self.epoch = 0
        self.digest = digest(self.outer)
        self.phase = "inner"
        self.bytes_up = self.bytes_down = 0
        self.last_round_bytes_up = self.last_round_bytes_down = self.last_round_peers = 0
        self.compute_s = self.exchange_wait_s = 0.0
        self._blocked_s = 0.0
        self._state_lock = threading.RLock()      # θ_g, momentum, round, epoch: read by the state server
        self._pending: _Exchange | None = None
        self._samples_epoch = self._samples_drift = 0
        self._fresh, self._need_sync, self._interrupted = True, False, False
        self._sync_target: tuple[int, str] | None = None   # the lineage a group chose over ours
        self._sync_retry_at = 0.0
        self._round_began = self._t_last = time.monotonic()
        self._sharing_offset = sharing_priority
        self._clip_counts: dict[str, int] = {}     # peer -> rounds its values were clipped (averager's record)
        self._named: set[str] = set()              # peers left out for good
        self._recent_steps: deque[float] = deque(maxlen=8)   # ‖θ_g' − θ_g‖ of our last outer steps
        # A state download may take a while (weights + momentum, float32): allow 10 MB/s at least.
        self.load_timeout = max(self.averaging_timeout, 60.0 + 8 * sum(w.numel() for w in self.outer) / 10e6)
        prefix = f"{run_id}_diloco"
        opts = dict(min_refresh_period=0.5, max_refresh_period=3.0, default_refresh_period=1.0)
        opts.update(tracker_opts or {})
        self.tracker = FilteredProgressTracker(dht=dht, prefix=prefix, target_batch_size=self._target(1),
                                               client_mode=client_mode, start=True, on_warning=self.on_warning, **opts)
        # A follower (the host) trains no epoch of its own: its epoch is no voice against peers far ahead.
        # Counted, a host restarted from an older checkpoint stood with a stale record against the two
        # peers it must catch up with, and refused their state until that record expired (~40 s).
        self.tracker.records.own_counts = not follower
        try:
            # shutdown_timeout: half for groups still averaging, then the DHT drain (DiLoCoAverager._shutdown)
            self.averager = self.averager_class(
                [torch.zeros_like(w) for w in self.outer], dht, prefix=prefix, start=True, client_mode=client_mode,
                min_matchmaking_time=matchmaking_time, request_timeout=max(0.2, min(3.0, matchmaking_time / 2)),
                allreduce_timeout=self.averaging_timeout,
                next_chunk_timeout=sender_gap_s(matchmaking_time, self.averaging_timeout),
                compression=compression_for(compression), state_compression=NoCompression(), shutdown_timeout=4.0)
        except BaseException:
            self.tracker.shutdown(timeout=2.0)
            raise
        self.download_cancel = self.averager.download_cancel = threading.Event()
        self.averager.state_source = self._shared_state
        self._publish_priority()

    # ---- figures -------------------------------------------------------------------------------
    def _target(self, peers: int) -> int:
        return self.inner_steps * self.micro_batch * max(1, peers)

    def num_peers(self) -> int:
        return self.tracker.global_progress.num_peers

    def swarm_round(self) -> int:
        """Our round plus the rounds the swarm has closed beyond our epoch."""
        return self.round + max(0, self.tracker.global_epoch - self.epoch)

    def next_exchange_s(self) -> float:
        if self._pending is not None:
            return 0.0
        left = max(0.0, self.max_round_s - (time.monotonic() - self._round_began))
        return min(left, max(0.0, self.tracker.global_progress.eta_next_epoch - get_dht_time()))

    def identity(self) -> tuple[int, int, str]:
        """(epoch, round, digest of θ_g), read together (the reporter thread reads while rounds apply)."""
        with self._state_lock:
            return self.epoch, self.round, self.digest

    def clipped_peers(self) -> dict[str, int]:
        """Peer id -> rounds in which its values were clipped at our reducer (or its part came back
        unbelievable), for the Swarm view; the peers named (left out) are in `named_peers()`."""
        return dict(self._clip_counts)

    def named_peers(self) -> list[str]:
        return sorted(self._named)

    def take_blocked_s(self) -> float:
        blocked, self._blocked_s = self._blocked_s, 0.0
        return blocked

    # ---- the training thread -------------------------------------------------------------------
    def after_inner_step(self, samples: int) -> None:
        """After each local step: report progress, apply a finished exchange, maybe close the round."""
        t0 = time.monotonic()
        self.compute_s += t0 - self._t_last
        try:
            self._samples_epoch += samples
            self._samples_drift += samples
            g = self.tracker.global_progress
            self.tracker.target_batch_size = self._target(g.num_peers)   # its ETA then means ours
            self.tracker.report_local_progress(self.epoch, self._samples_epoch)
            if self._pending is not None:
                if not self._pending.control.done() and time.monotonic() < self._overdue_at(self._pending):
                    return
                self._finish(block=False)
            if self._need_sync or self._behind():
                if time.monotonic() >= self._sync_retry_at:
                    self._fresh, before = False, self.round
                    if not self.load_state_from_peers() or \
                            (self.follower and self.round == before):   # peers still exchanging: later
                        self._sync_retry_at = time.monotonic() + max(10.0, 2 * self.matchmaking_time)
            elif not self.follower and self._due():
                self._start_round()
        finally:
            self._t_last = time.monotonic()
            self.exchange_wait_s += self._t_last - t0
            self._blocked_s += self._t_last - t0

    def poll(self) -> None:
        """A step with no samples: for a host follower, or a peer waiting for the swarm."""
        self.after_inner_step(0)

    def catch_up(self, timeout: float | None = None) -> bool:
        """At start: a late joiner takes the swarm's outer state (keeping any local drift)."""
        self._fresh = False
        if self.tracker.global_epoch > self.epoch:
            return self.load_state_from_peers(timeout)
        return False

    def _behind(self) -> bool:
        g = self.tracker.global_epoch
        # One epoch ahead means a peer just closed our round: meet it (a follower has no Δ to bring).
        behind = g > self.epoch + 1 or ((self._fresh or self.follower) and g > self.epoch)
        if not behind:
            self._fresh = False
        return behind

    def _due(self) -> bool:
        g = self.tracker.global_progress
        return (g.epoch > self.epoch                            # a peer closed this round: meet it
                # num_peers >= 1: the tracker has read the swarm since our first report (a newcomer
                # must not close a round alone before it could see the others)
                or (g.num_peers >= 1 and g.samples_accumulated >= self._target(g.num_peers))
                or time.monotonic() - self._round_began >= self.max_round_s)

    def _overdue_at(self, ex: _Exchange) -> float:
        return ex.started + self.matchmaking_time + 2 * self.averaging_timeout + 5.0

    def _start_round(self) -> None:
        peers = self.num_peers()
        with torch.no_grad():
            local = [p.detach().to("cpu", torch.float32, copy=True) for p in self.params]
        delta = [w - x for w, x in zip(self.outer, local)]
        with self._state_lock:
            self.epoch += 1
        self._samples_epoch, self._round_began = 0, time.monotonic()
        # Others see the round close and meet us; update_epoch also resets the global count we hold
        # (else the last round's samples, still counted until the next fetch, close the next round at once).
        with self.tracker.pause_updates():
            self.tracker.update_epoch(self.epoch)
        self._announce_epoch()
        if not all_finite(delta):
            self.on_warning("round_failed", "local weights are not finite; this peer skips the exchange")
            return
        weight = self._samples_drift
        if peers <= 1:          # alone: the outer step needs no one
            self._apply(delta, local, weight, exact=True)
            self.last_round_peers, self.last_round_bytes_up, self.last_round_bytes_down = 1, 0, 0
            return
        with self.averager.get_tensors() as buffers:
            for b, d in zip(buffers, delta):
                b.copy_(d)
        control = self.averager.step(
            gather=dict(v=1, round=self.round, digest=self.digest, samples=weight, named=sorted(self._named)),
            weight=float(weight),
            scheduled_time=get_dht_time() + self.matchmaking_time, timeout=self.averaging_timeout,
            allow_retries=False, wait=False)   # a retry after a partial all-reduce could split the swarm
        self._pending = _Exchange(control, local if self.overlap else None, weight, time.monotonic())
        self._interrupted = False
        self.phase = "exchanging"
        if not self.overlap:
            self._finish(block=True)

    def _announce_epoch(self) -> None:
        """Store our progress record for the epoch this round close entered, now: it is what tells the
        others (`_due`: a peer closed this round) and newcomers that the round closed. hivemind's
        reporter thread stores a record only if, on one of its wake-ups, it saw samples reported in
        the epoch before ("aux peers" otherwise). When the step that reported the round's last
        samples also closed it, within the same call (one step per round, say), the thread could
        wake only after update_epoch, see (epoch + 1, 0 samples) and withhold it until our next step
        with samples: a late joiner saw the swarm a round behind, and peers waiting to meet us could
        not tell that the round had closed."""
        t = self.tracker
        try:
            t.dht.store(t.training_progress_key, subkey=t._local_public_key, value=t.local_progress.dict(),
                        expiration_time=get_dht_time() + t.metadata_expiration, return_future=True)
        except Exception as e:   # the reporter stores it too at our next step with samples
            _trace("announce failed", repr(e))

    def _finish(self, block: bool) -> None:
        """Apply (or give up) the exchange in flight; on any failure θ_g and the local drift stay."""
        ex, self._pending = self._pending, None
        self.phase = "waiting" if block else self.phase
        try:
            report = ex.control.result(timeout=max(0.0, self._overdue_at(ex) - time.monotonic()) if block else 0)
        except BaseException as e:   # timeout, cancelled, matchmaking or all-reduce failure
            try:
                ex.control.cancel()
            except Exception:
                pass
            report = dict(failure=f"{type(e).__name__}: {e}"[:300] or "no group")
        finally:
            self.phase = "inner"
        self.bytes_up += report.get("bytes_up", 0)
        self.bytes_down += report.get("bytes_down", 0)
        self._take_clips(report.get("clips"))
        if not report.get("failure"):   # "the last round" is the last one that happened
            self.last_round_bytes_up, self.last_round_bytes_down = report.get("bytes_up", 0), report.get("bytes_down", 0)
            self.last_round_peers = report.get("peers", 0)
        if report.get("failure"):
            if not self._interrupted:
                self.on_warning("round_failed", f"round {self.epoch} failed ({report['failure']}); "
                                                "local progress is kept and goes into the next round")
            return
        if report.get("chosen") != (self.round, self.digest):
            self._need_sync, self._sync_target = True, report.get("chosen")
            self.on_warning("round_stale", f"this peer's outer weights (round {self.round}) are not the swarm's; "
                                           "downloading them, local progress is kept")
            return
        with self.averager.get_tensors() as averaged:   # idle until our next step: read in place
            self._apply(averaged, ex.snapshot, ex.weight, exact=ex.snapshot is None)

    def _take_clips(self, clips) -> None:
        if not isinstance(clips, dict):
            return
        self._clip_counts = dict(clips.get("counts") or {})
        for peer in sorted(set(clips.get("named") or ()) - self._named):
            self._named.add(peer)
            self.on_warning("peer_clipped", f"peer {peer} sent values that had to be clipped (or returned an "
                                            f"unbelievable average) in {self._clip_counts.get(peer, 0)} rounds; "
                                            "it is left out from now on")

    def _apply(self, avg_delta, snapshot, weight: int, exact: bool) -> None:
        """θ_g' = outer_step(θ_g, Δ̄). exact: θ_local = θ_g' (nothing happened since Δ was taken);
        else θ_local += θ_g' − snapshot, keeping the inner progress made while the exchange ran."""
        with self._state_lock:
            outer_step_(self.outer, self.momentum, avg_delta, self.outer_lr, self.outer_momentum)
            # the step just taken: lr·(g + m·buf') (what a state download is later measured against)
            m, lr = float(np.float32(self.outer_momentum)), float(np.float32(self.outer_lr))
            self._recent_steps.append(lr * math.sqrt(sum(
                float(torch.linalg.vector_norm(g.reshape(b.shape) + m * b)) ** 2
                for g, b in zip(avg_delta, self.momentum))))
            self.round += 1
            self.digest = digest(self.outer)
            _trace("apply", self.epoch, self.round, self.digest, weight)
        with torch.no_grad():
            for p, w, s in zip(self.params, self.outer, snapshot or self.outer):
                if exact:
                    p.copy_(w)
                else:
                    p.add_((w - s).to(p.device, p.dtype))
        self._samples_drift = max(0, self._samples_drift - weight)
        self._publish_priority()

    # ---- state: sharing, downloading, checkpoints ---------------------------------------------
    def _shared_state(self):
        """Runs in hivemind's state-server thread: a consistent copy, full precision."""
        with self._state_lock:
            epoch = self.epoch - (1 if self._pending is not None else 0)   # the epoch θ_g belongs to
            meta = dict(kind=STATE_KIND, round=self.round, epoch=max(epoch, self.round), digest=self.digest)
            return meta, [t.clone() for t in self.outer + self.momentum]

    def set_sharing_priority(self, offset: float) -> None:
        """Peers download from the highest priority (epoch + offset): a host uses a negative offset."""
        self._sharing_offset = offset
        self._publish_priority()

    def _publish_priority(self) -> None:
        if not self.client_mode:
            self.averager.state_sharing_priority = float(self.epoch + self._sharing_offset)

    def _check_state(self, meta, tensors, from_peer: bool = True) -> str | None:
        if not isinstance(meta, dict) or meta.get("kind") != STATE_KIND:
            return "not a DiLoCo state"
        r, e = meta.get("round"), meta.get("epoch")
        if type(r) is not int or type(e) is not int or not 0 <= r <= e:
            return f"bad round/epoch {r!r}/{e!r}"
        if from_peer and e > max(self.epoch, self.tracker.global_epoch) + MAX_EPOCH_LEAD:
            return f"epoch {e} is far ahead of the swarm's"
        if from_peer and self._sync_target is None and r < self.round:
            return f"round {r} is older than this peer's {self.round}"
        shapes = [w.shape for w in self.outer] * 2
        if len(tensors) != len(shapes):
            return f"{len(tensors)} tensors instead of {len(shapes)}"
        for t, shape in zip(tensors, shapes):
            if t.dtype != torch.float32 or t.shape != shape:
                return f"a tensor is {t.dtype} {tuple(t.shape)}, expected float32 {tuple(shape)}"
        if not all_finite(tensors):
            return "non-finite values"
        if from_peer:
            # A group that left us out says our θ_g is not the swarm's: then only the norm ratio holds.
            n, ahead = len(self.outer), r - self.round
            step = max(self._recent_steps) if self._recent_steps and self._sync_target is None else None
            problem = state_problem(tensors[:n], self.outer, step, ahead)
            if problem is not None:
                return problem
            # The momentum drives the next outer step: no larger than steps like ours could have built.
            # (float32 norms: one that overflows is inf, and refused.)
            mom = math.sqrt(sum(float(torch.linalg.vector_norm(t)) ** 2 for t in tensors[n:]))
            own = math.sqrt(sum(float(torch.linalg.vector_norm(t)) ** 2 for t in self.momentum))
            limit = (own + STATE_STEP_BOUND * max(1, ahead) * step / max(self.outer_lr, 1e-12)) if step else \
                math.sqrt(sum(float(torch.linalg.vector_norm(t)) ** 2 for t in tensors[:n]))
            if not mom <= limit:
                return f"momentum norm {mom:.3g} is beyond {limit:.3g}"
        return None

    def load_state_from_peers(self, timeout: float | None = None) -> bool:
        """Download θ_g, momentum and round from a peer (checked), rebase the local weights onto it
        keeping their drift: θ_local = θ_g_new − (θ_g_old − θ_local)."""
        if self._pending is not None:
            self.interrupt()
            self._finish(block=False)
        self.phase = "syncing"
        try:
            loaded = self.averager.load_state_from_peers(wait=True, timeout=timeout or self.load_timeout)
        except Exception:
            loaded = None
        finally:
            self.phase = "inner"
        if loaded is None:
            return False
        meta, tensors = loaded
        n = len(self.outer)
        problem = self._check_state(meta, list(tensors))
        if problem is not None:
            self.on_warning("peer_rejected", f"state from a peer was not loaded: {problem}")
            return False
        if self._sync_target is not None and meta["round"] <= self._sync_target[0]:
            return False   # the group that left us out has not applied its round yet: try again later
        self.bytes_down += sum(t.numel() * 4 for t in tensors)
        with self._state_lock:
            old = self.outer
            # detach: a peer's tensors may say requires_grad, and in-place outer steps would then fail
            self.outer = [t.detach().contiguous() for t in tensors[:n]]
            self.momentum = [t.detach().contiguous() for t in tensors[n:]]
            self.round, self.epoch, self.digest = meta["round"], max(self.epoch, meta["epoch"]), digest(self.outer)
            _trace("loaded", self.epoch, self.round, self.digest, meta)
        with torch.no_grad():
            for p, new, was in zip(self.params, self.outer, old):
                if self._samples_drift == 0 or self.follower:
                    p.copy_(new)
                else:
                    p.add_((new - was).to(p.device, p.dtype))
        self._need_sync, self._sync_target = False, None
        self._samples_epoch, self._round_began = self._samples_drift, time.monotonic()
        self.tracker.report_local_progress(self.epoch, self._samples_epoch)
        self._publish_priority()
        return True

    def reset_to_outer(self) -> None:
        """Drop the local drift (e.g. it went non-finite): θ_local = θ_g."""
        with torch.no_grad():
            for p, w in zip(self.params, self.outer):
                p.copy_(w)
        if self._pending is not None and self._pending.snapshot is not None:
            self._pending.snapshot = [w.clone() for w in self.outer]
            self._pending.weight = 0
        self._samples_drift = 0

    def state_dict(self) -> dict:
        with self._state_lock:
            return dict(kind=STATE_KIND, outer=[w.clone() for w in self.outer],
                        momentum=[m.clone() for m in self.momentum], round=self.round, epoch=self.epoch,
                        samples_drift=self._samples_drift)

    def load_state_dict(self, state: dict) -> None:
        meta = dict(kind=state.get("kind"), round=state.get("round"), epoch=state.get("epoch"))
        tensors = list(state.get("outer", [])) + list(state.get("momentum", []))
        problem = self._check_state(meta, tensors, from_peer=False)
        if problem is not None:
            raise ValueError(f"DiLoCo state does not fit: {problem}")
        with self._state_lock:
            self.outer = [w.detach().clone() for w in state["outer"]]
            self.momentum = [m.detach().clone() for m in state["momentum"]]
            self.round, self.epoch = state["round"], state["epoch"]
            self.digest = digest(self.outer)
        self._samples_drift = int(state.get("samples_drift", 0))
        self._publish_priority()

    # ---- pause / stop --------------------------------------------------------------------------
    def interrupt(self) -> None:
        """Any thread: leave an exchange still looking for a group (one already averaging runs on)."""
        ex = self._pending
        if ex is not None and not ex.control.done() and not ex.control.began_allreduce:
            self._interrupted = True
            ex.control.cancel()

    def cancel_download(self) -> None:
        """Any thread (pause, stop): give up a state download in flight; `resume` allows them again."""
        self.download_cancel.set()

    def pause(self) -> None:
        self.interrupt()
        self._samples_epoch = 0
        self.tracker.report_local_progress(self.epoch, 0)   # our samples stop counting toward the round

    def resume(self) -> None:
        self.download_cancel.clear()
        self._fresh = True           # rounds may have closed meanwhile: check before joining one
        self._round_began = self._t_last = time.monotonic()

    def flush(self, timeout: float = 5.0) -> None:
        """At stop: apply an exchange in flight if it ends within `timeout`, else abandon it."""
        ex = self._pending
        if ex is None:
            return
        try:
            ex.control.result(timeout=timeout)
        except BaseException:
            self._interrupted = True
        self._finish(block=False)

    def shutdown(self) -> None:
        self.interrupt()
        for stop in (self.averager.shutdown, lambda: self.tracker.shutdown(timeout=2.0)):
            try:
                stop()
            except Exception:
                pass
