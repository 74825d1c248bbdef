"""hivemind's Optimizer with Modron's guards wired into the places where peers' data arrives.

- FilteredProgressTracker: drops progress records whose epoch is far ahead of ours unless more
  signers agree than training peers stand below it, or it is our one fellow peer's (hivemind
  would otherwise make everyone jump to, and load state for, the highest epoch any single record
  claims); counts one record per signer, and samples only within what one peer can compute.
- GuardedOptimizer: averaged gradients that come back with the wrong shapes or non-finite are
  not applied (local gradients instead; if those are bad too, a zero update). Its gradient
  averager keeps the local gradients through the round, so that there are some to fall back on.
- GuardedStateAverager: state downloaded from a peer is checked (shapes, finiteness, a believable
  epoch, a parameter norm within robust.STATE_NORM_RATIO of ours) before it replaces ours.
- Both averagers all-reduce robustly (robust.RobustAveraging): each reducer combines its part with
  CenteredClip after a norm bound (parameters: on their movement since the last round), a part a
  reducer returns that is not believable is replaced by our own values, and peers clipped round
  after round are named (`peer_clipped`, polled after each epoch), left out and not downloaded from.
Every rejection reaches the engine through `on_warning(code, message)`.
"""
from __future__ import annotations

import concurrent.futures
import threading
import time
from typing import Callable

import hivemind
import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.progress_tracker import LocalTrainingProgress, ProgressTracker
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.utils import ValueWithExpiration, get_dht_time

from .admission import AdmissionMixin
from .sigint import KeepsSigint
from .guards import MAX_EPOCH_LEAD, EpochClaim, all_finite, filter_epoch_claims, tensors_match
from .guards import (Admitted, LruDict, Problem, ProgressRecords, RecordLimits,  # FilteredProgressTracker
                     everyone, signer_name)
from .robust import RobustAveraging, state_problem

Warn = Callable[[str, str], None]


def _no_warning(code: str, message: str) -> None:
    pass


class FilteredProgressTracker(ProgressTracker):
    """hivemind's ProgressTracker, reading only the progress records that count (guards.ProgressRecords):
    one record per signer, admitted signers only (`admitted`, everyone by default), times near now,
    samples and samples/s within what one peer can compute (`limits`: guards.RecordLimits.for_manifest;
    without them samples go unchecked), and epochs the swarm believes. A record whose samples are out
    of reach counts for its epoch but with no samples (and not at all at our epoch or below): a forged
    10**9 neither closes a DiLoCo round, nor makes it wait for a peer that is not there, nor shrinks
    sync's batch. Engines replace `witnesses` (signed metrics records) as they read them;
    `limits` and `admitted` may be set after construction too."""
    MAX_WARNED = 256              # remembered warnings (bounded under a flood of keys)
    MAX_WARNINGS_PER_MIN = 10

    def __init__(self, *args, on_warning: Warn = _no_warning, limits: RecordLimits | None = None,
                 admitted: Admitted = everyone, report_interval_s: float = 0.0, **kwargs):
        self.on_warning = on_warning
        self.report_interval_s = report_interval_s
        self._next_report = 0.0
        self.witnesses: list[EpochClaim] = []   # signed metrics records, replaced by the engine
        self.records = ProgressRecords(limits, admitted)
        self._warned = LruDict(self.MAX_WARNED)     # (signer, epoch, kind): said once
        self._warn_times: list[float] = []
        super().__init__(*args, **kwargs)

    @property
    def limits(self) -> RecordLimits:
        return self.records.limits

    @limits.setter
    def limits(self, limits: RecordLimits) -> None:
        self.records.set_limits(limits)

    @property
    def admitted(self) -> Admitted:
        return self.records.admitted

    @admitted.setter
    def admitted(self, admitted: Admitted) -> None:
        self.records.admitted = admitted

    def report_local_progress(self, local_epoch: int, samples_accumulated: int, update_global_samples: bool = True):
        """hivemind stores a signed record in the DHT on every call, i.e. after every local step: with
        DiLoCo that control traffic outweighed the rounds' own (~16 kB per step). Here a record goes
        out at most every `report_interval_s`, at once when the epoch changes or the count goes back;
        in between, hivemind's own reporter timer and the others' samples/s extrapolation cover it."""
        now = time.monotonic()
        prev = self.local_progress
        due = (now >= self._next_report or local_epoch != prev.epoch
               or samples_accumulated < prev.samples_accumulated)
        pending = self.should_report_progress.is_set()     # a due report not stored yet stays due
        super().report_local_progress(local_epoch, samples_accumulated, update_global_samples)
        if due:
            self._next_report = now + self.report_interval_s
        elif not pending:
            self.should_report_progress.clear()

    def _parse_swarm_progress_data(self, metadata):
        if isinstance(metadata, dict) and metadata:
            metadata = self.filter_metadata(metadata)
        return super()._parse_swarm_progress_data(metadata)

    def filter_metadata(self, metadata: dict) -> dict:
        parsed, original = [], {}
        for subkey, item in metadata.items():
            value = getattr(item, "value", None)
            if value is None or not isinstance(subkey, bytes):
                continue
            try:
                progress = LocalTrainingProgress.parse_obj(value)
            except Exception:
                continue
            parsed.append((subkey, progress))
            original[subkey] = item
        # Our own record is no voice in the majority rule: a newcomer's epoch 0 would outvote the
        # one peer it came to catch up with.
        sifted = self.records.sift(parsed, self.local_progress.epoch, own=getattr(self, "_local_public_key", None),
                                   witnesses=self.witnesses, now=get_dht_time(),
                                   own_samples=self.local_progress.samples_accumulated)
        for problem in sifted.problems:
            self._warn(problem)
        kept = {}
        local = self.local_progress.epoch
        for subkey in sifted.kept:
            item = original[subkey]
            if subkey in sifted.no_work:
                # Its epoch matters only when it is ahead of ours (a peer to catch up with). At ours or
                # below it is no peer at all: counted as one, a signer claiming 10**9 samples made every
                # DiLoCo round wait for a third peer's worth of samples (tests/test_swarm_attacks.py).
                if item.value.get("epoch", 0) <= local:
                    continue
                item = ValueWithExpiration(dict(item.value, samples_accumulated=0, samples_per_second=0.0),
                                           item.expiration_time)
            kept[subkey] = item
        return kept

    def _warn(self, problem: Problem) -> None:
        key = (problem.who, problem.epoch, problem.kind)
        if key in self._warned:
            return
        self._warned[key] = True
        now = get_dht_time()      # a flood of forged records says so a few times a minute, not per record
        self._warn_times = [t for t in self._warn_times if t > now - 60.0][-self.MAX_WARNINGS_PER_MIN:]
        if len(self._warn_times) >= self.MAX_WARNINGS_PER_MIN:
            return
        self._warn_times.append(now)
        local, who = self.local_progress.epoch, signer_name(problem.who)   # name the signer: whom to blame
        if problem.kind == "epoch":
            message = (f"ignored {who} claiming epoch {problem.epoch} while this peer is at {local}: "
                       "not enough other peers agree")
        elif problem.kind == "work":
            message = f"the progress record of {who} counts without its samples: {problem.text}"
        else:
            message = f"ignored the progress record of {who}: {problem.text}"
        self.on_warning("peer_rejected", message)


class CancellableDownload(DecentralizedAverager):
    """hivemind waits for a state download in one blocking call: on a home uplink a download
    (weights and Adam's moments, float32) takes minutes, and a peer asked to stop or pause sat in
    it. Here the wait is in short slices, and `download_cancel` gives up on it (None: nothing
    loaded, which hivemind's Optimizer takes as a finished attempt)."""
    download_cancel: threading.Event | None = None   # set from the control reader: pause or stop

    def load_state_from_peers(self, wait: bool = True, timeout: float | None = None, **kwargs):
        future = super().load_state_from_peers(wait=False, timeout=timeout, **kwargs)
        if not wait:
            return future
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.download_cancel is not None and self.download_cancel.is_set():
                future.cancel()
                return None
            slice_s = 0.25 if deadline is None else max(0.0, min(0.25, deadline - time.monotonic()))
            try:
                return future.result(timeout=slice_s)
            except concurrent.futures.TimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    future.cancel()
                    raise


class _CheckedStateLoad(CancellableDownload, RobustAveraging):
    """Sits between TrainingStateAverager and DecentralizedAverager in the MRO, so the state a
    peer sends is checked before TrainingStateAverager copies it into our parameters. Averages
    parameters robustly, measuring contributions from our values at the last round."""
    on_warning: Warn = staticmethod(_no_warning)
    max_epoch: Callable[[], int] | None = None
    keep_reference = True

    def load_state_from_peers(self, **kwargs):
        loaded = super().load_state_from_peers(**kwargs)
        if loaded is None:
            return None
        metadata, tensors = loaded
        expected = [p.shape for p in self.main_parameters] + [t.shape for t in self.extra_tensors]
        problem = tensors_match(list(tensors[:len(expected)]), expected)
        if problem is None and not all_finite(tensors[len(expected):]):
            problem = "non-finite optimizer state"
        epoch = metadata.get("epoch") if isinstance(metadata, dict) else None
        if problem is None and self.max_epoch is not None and isinstance(epoch, int) and epoch > self.max_epoch():
            problem = f"epoch {epoch} is far ahead of the swarm's"
        if problem is None:
            problem = state_problem(list(tensors[:len(expected)]), list(self.main_parameters) + list(self.extra_tensors))
        if problem is not None:
            self.on_warning("peer_rejected", f"state from a peer was not loaded: {problem}")
            return None
        return loaded


class GuardedStateAverager(KeepsSigint, AdmissionMixin, TrainingStateAverager, _CheckedStateLoad):
    pass


class LocalGradsKeptAverager(KeepsSigint, AdmissionMixin, GradientAverager, CancellableDownload, RobustAveraging):
    """hivemind's GradientAverager, except that starting a round leaves the local gradient
    accumulators as they are. hivemind zeroes them there, and its Optimizer falls back on them
    ("local gradients") when the round fails, as ours does when the averaged gradients are
    rejected: it applied zeros, so while one peer sent NaN nobody learned anything. The Optimizer
    resets the accumulators itself once the epoch's update is done."""

    def step(self, weight=None, reset_accumulators: bool = True, control=None, timeout=None, wait: bool = True,
             **kwargs):
        return super().step(weight=weight, reset_accumulators=False, control=control, timeout=timeout, wait=wait,
                            **kwargs)


class GuardedOptimizer(hivemind.Optimizer):
    def __init__(self, *, on_warning: Warn = _no_warning, **kwargs):
        self.on_warning = on_warning
        self._loading_local = False
        self._clip_counts: dict[str, int] = {}
        self._named: set[str] = set()
        super().__init__(**kwargs)
        self.state_averager.on_warning = on_warning
        self.state_averager.max_epoch = lambda: max(self.local_epoch, self.tracker.global_epoch) + MAX_EPOCH_LEAD

    def _make_progress_tracker(self, target_batch_size: int, **kwargs) -> ProgressTracker:
        return FilteredProgressTracker(dht=self.dht, prefix=self.run_id, target_batch_size=target_batch_size,
                                       client_mode=self.client_mode, status_loglevel=self.status_loglevel,
                                       start=True, on_warning=self.on_warning, **kwargs)

    def _make_gradient_averager(self, factory, **kwargs) -> GradientAverager:
        return super()._make_gradient_averager(factory or LocalGradsKeptAverager, **kwargs)

    def _make_state_averager(self, **kwargs) -> TrainingStateAverager:
        return GuardedStateAverager(
            dht=self.dht, prefix=f"{self.run_id}_state_averager", min_matchmaking_time=self.matchmaking_time,
            allreduce_timeout=self.allreduce_timeout, shutdown_timeout=self.shutdown_timeout,
            offload_optimizer=self.offload_optimizer, custom_gradients=self.offload_optimizer,
            status_loglevel=self.status_loglevel, next_chunk_timeout=self.next_chunk_timeout,
            client_mode=self.client_mode, auxiliary=self.auxiliary, start=True, **kwargs)

    def step(self, *args, **kwargs):
        epoch = self.local_epoch
        try:
            return super().step(*args, **kwargs)
        finally:
            if self.local_epoch != epoch:
                self._poll_clips()

    def _poll_clips(self) -> None:
        """The averagers judge peers in their own processes: read their records once an epoch."""
        counts: dict[str, int] = {}
        for averager in (self.grad_averager, self.state_averager):
            try:
                report = averager.clip_report(timeout=2.0)
            except Exception:
                continue
            for peer, n in report["counts"].items():
                counts[peer] = counts.get(peer, 0) + n
            for peer in sorted(set(report["named"]) - self._named):
                self._named.add(peer)
                self.on_warning("peer_clipped", f"peer {peer} sent values that had to be clipped (or returned an "
                                                "unbelievable average) round after round; it is left out from now on")
        self._clip_counts = counts

    def clipped_peers(self) -> dict[str, int]:
        """Peer id -> rounds (gradient and parameter rounds together) its values were clipped here."""
        return dict(self._clip_counts)

    def _optimized_params(self) -> list[torch.Tensor]:
        return [p for g in self.state_averager.optimizer.param_groups for p in g["params"]]

    def _load_averaged_gradients_into_optimizer_(self):
        params = self._optimized_params()
        with torch.no_grad(), self.grad_averager.get_tensors() as averaged:
            problem = tensors_match(list(averaged), [p.shape for p in params])
        if problem is None:
            return hivemind.Optimizer._load_averaged_gradients_into_optimizer_(self)
        if not self._loading_local:
            self.on_warning("peer_rejected", f"averaged gradients from peers were not applied ({problem}); "
                                             "using this peer's own gradients for this epoch")
            self._loading_local = True
            try:
                self._load_local_gradients_into_optimizer()   # comes back here with local accumulators
            finally:
                self._loading_local = False
            return
        # Our own accumulated gradients are bad as well: apply no gradient this epoch.
        for p in params:
            p.grad = torch.zeros_like(p)
        self.grad_averager.notify_used_averaged_gradients()
