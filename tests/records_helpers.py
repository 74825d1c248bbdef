"""Hivemind-shaped progress records and a FilteredProgressTracker without a network (no DHT, no
thread): the record and epoch-filter tests feed it records and read what hivemind computes."""
from __future__ import annotations

import time
from types import SimpleNamespace


class FakeDHT:
    """What hivemind's ProgressTracker touches in its constructor; it never fetches from here."""
    client_mode = False
    peer_id = SimpleNamespace(to_bytes=lambda: b"fake-peer-id")

    def add_validators(self, validators) -> None:
        pass

    def get(self, *args, **kwargs):
        return None


def progress(epoch: int, samples: int = 4, samples_per_second: float = 1.0, t: float | None = None,
             client: bool = False, expiration: float | None = None):
    """One LocalTrainingProgress record as a DHT read returns it."""
    from hivemind.utils import ValueWithExpiration
    now = time.time()
    return ValueWithExpiration(dict(peer_id=b"x", epoch=epoch, samples_accumulated=samples,
                                    samples_per_second=samples_per_second, time=now if t is None else t,
                                    client_mode=client), now + 30 if expiration is None else expiration)


def make_tracker(local_epoch: int = 0, own: bytes = b"[owner:me]", witnesses=(), target: int = 4096,
                 limits=None, local_samples: int = 0, report_interval_s: float = 0.0):
    """A FilteredProgressTracker at `local_epoch` whose own signer is `own`; (tracker, warnings)."""
    from training_core.swarm.collab import FilteredProgressTracker
    warnings: list[str] = []
    tracker = FilteredProgressTracker(dht=FakeDHT(), prefix="run-x", target_batch_size=target, start=False,
                                      on_warning=lambda code, msg: warnings.append(msg), limits=limits,
                                      report_interval_s=report_interval_s)
    tracker._local_public_key = own
    tracker.local_progress = tracker._get_local_progress(local_epoch, local_samples)
    tracker.witnesses = list(witnesses)
    return tracker, warnings


def parsed(epoch: int, **kw):
    """The same record as hivemind's LocalTrainingProgress (what guards.ProgressRecords.sift takes)."""
    from hivemind.optim.progress_tracker import LocalTrainingProgress
    return LocalTrainingProgress.parse_obj(progress(epoch, **kw).value)
