"""The swarm host: a bootstrap peer with a stable address that watches the swarm and keeps its state.

It computes no gradients. It downloads the swarm's state from peers when a checkpoint is due
(through the same checked loaders the peers use), serves that copy to late joiners (at a lower
priority than live peers), writes it as ordinary checkpoints, and reports the swarm from the signed
metrics records.

Crash-proof: a host killed in any way restarts from its latest checkpoint (weights, optimizer state,
round) with the same identity and address; it dials the peers it last knew (OUT/known_peers.json),
and if they moved on meanwhile it syncs from them once several agree (the epoch filter), so the
swarm's progress is never lost while any peer holds it.
"""
from __future__ import annotations

import json
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import checkpoint as ckpt_io
from ..controls import Controls
from ..engine import Emit
from ..errors import ConfigError
from ..fsutil import atomic_write_text
from ..protocol import make_event
from . import metrics
from .guards import ProgressRecords, RecordLimits, Sifted
from .manifest import SwarmManifest, make_invite
from .network import compression_for, dht_call, quiet_hivemind, reap_children, start_dht, visible_maddrs
from .peer import METRICS_INTERVAL_S, PeerOptions, optimizer_factories, swarm_spec

REPORT_INTERVAL_S = 2.0
MIN_LOAD_INTERVAL_S = 3.0
MAX_KNOWN_PEERS = 32
FIRST_RETRY_S = 30.0          # after a failed state download (at most the checkpoint interval); doubled up to it
# The host is in no hurry and a peer's home uplink may be slow: a state download is given the time
# it takes at 1 Mbit/s. A limit that assumed 10 MB/s cut every download on the bench's shaped link
# short ("45 tensors instead of 76") and the host tried again at once, for nothing, all run long.
HOST_MIN_RATE = 125_000       # bytes/s
# The host's state downloads stay at most this share of what the swarm's rounds send: a download is
# the whole state (8-12 bytes per parameter) from one peer, more than an 8-bit round sends, so every
# 10 minutes in a 3-peer `base` swarm it would be as much as all of its rounds. In a small swarm the host's copy
# then lags longer (its peers hold the progress). A --checkpoint-minutes given is kept as it is.
HOST_SHARE = 0.10
DEFAULT_CHECKPOINT_MINUTES = 10.0
RATE_WINDOW_S = 3600.0


def next_download_gap(interval_s: float, state_bytes: float, swarm_bytes_per_s: float | None) -> float:
    """Seconds from one successful download to the next."""
    gap = max(interval_s, MIN_LOAD_INTERVAL_S)
    if swarm_bytes_per_s and swarm_bytes_per_s > 0:
        gap = max(gap, state_bytes / (HOST_SHARE * swarm_bytes_per_s))
    return gap


class SwarmTraffic:
    """The swarm's round traffic as the host sees it: epochs per second over the last hour times what
    one epoch's rounds send (network.round_bytes for each peer; an estimate, as the peers' own is)."""

    def __init__(self, numel: int, compression: str, exchanges_per_epoch: int):
        from collections import deque
        self.numel, self.compression, self.exchanges_per_epoch = numel, compression, exchanges_per_epoch
        self.seen: deque[tuple[float, int]] = deque()
        self.peers = 0

    def observe(self, now: float, epoch: int, peers: int) -> None:
        if not self.seen or epoch != self.seen[-1][1]:
            self.seen.append((now, epoch))
        while len(self.seen) > 2 and now - self.seen[1][0] > RATE_WINDOW_S:
            self.seen.popleft()
        self.peers = peers

    def bytes_per_s(self, now: float) -> float | None:
        if len(self.seen) < 2 or self.peers < 2:
            return None
        (t0, e0), (_, e1) = self.seen[0], self.seen[-1]
        if e1 <= e0 or now <= t0:
            return None
        from .network import round_bytes
        per_epoch = self.peers * self.exchanges_per_epoch * round_bytes(self.numel, self.peers, self.compression)
        return per_epoch * (e1 - e0) / (now - t0)


def state_load_timeout(nbytes: int, floor: float) -> float:
    return max(floor, 60.0 + nbytes / HOST_MIN_RATE)


class _Downloader:
    """When the keeper downloads the swarm's state, and what came of it; backs off after a failure.

    The download runs in the host's loop, which waits for it. (On a thread beside the loop's own DHT
    calls, the host's loop once stopped for good in the diloco e2e test, cause not found; inline is
    what every earlier run had.)"""

    def __init__(self, keeper, interval_s: float, warn, traffic: SwarmTraffic | None = None):
        self.keeper, self.interval_s, self.warn, self.traffic = keeper, interval_s, warn, traffic
        self.next_at = 0.0            # due at once: the host has no state yet
        self.first_retry_s = max(MIN_LOAD_INTERVAL_S, min(FIRST_RETRY_S, interval_s))
        self.retry_s = self.first_retry_s
        self.synced_once = False
        self.bytes_down = 0
        self.finished_at = 0.0        # when the last download ended, loaded or not

    def behind(self, swarm_epoch: int) -> bool:
        return swarm_epoch > self.keeper.epoch

    def maybe_start(self, swarm_epoch: int, asked: bool) -> None:
        if not self.behind(swarm_epoch) or not (asked or time.monotonic() >= self.next_at):
            return
        before = self.keeper.epoch
        try:
            got = self.keeper.sync(swarm_epoch)
        except Exception as exc:      # RuntimeError from the keeper; anything else is a failed download too
            self.warn("state_load", str(exc) or type(exc).__name__)
            got = 0
        now = self.finished_at = time.monotonic()
        if self.keeper.epoch > before:
            self.bytes_down += got
            self.synced_once = True
            self.retry_s = self.first_retry_s
            rate = self.traffic.bytes_per_s(now) if self.traffic is not None else None
            self.next_at = now + next_download_gap(self.interval_s, self.keeper.state_bytes, rate)
        else:
            self.next_at = now + self.retry_s
            self.retry_s = min(2 * self.retry_s, max(self.interval_s, self.first_retry_s))



@dataclass
class HostOptions:
    out: Path
    port: int = 31337
    listen_ip: str = "0.0.0.0"
    announce_ip: str | None = None
    minutes: float | None = None
    token: str | None = None
    checkpoint_minutes: float | None = None    # None: DEFAULT_CHECKPOINT_MINUTES, stretched by HOST_SHARE
    threads: int | None = 1


def host_token(manifest: SwarmManifest, opts: HostOptions) -> str | None:
    """Private swarms: the token given, or the one kept in OUT/token.txt, or a new one written there."""
    if not manifest.auth.get("required"):
        return None
    token = opts.token or os.environ.get("MODRON_SWARM_TOKEN")
    path = opts.out / "token.txt"
    if not token and path.is_file():
        token = path.read_text(encoding="utf-8").strip()
    if not token:
        token = secrets.token_urlsafe(24)
        atomic_write_text(path, token + "\n")
        os.chmod(path, 0o600)
    return token


def progress_epochs(dht, key: str, records: ProgressRecords, local_epoch: int, own: bytes | None = None,
                    witnesses=()) -> Sifted:
    """The progress records under `key` (hivemind's ProgressTracker: f"{prefix}_progress") that count
    (records.sift: one per signer, times and samples within the limits, epochs believed)."""
    from hivemind.optim.progress_tracker import LocalTrainingProgress
    found = dht.get(key, latest=True)
    raw = found.value if found is not None else None
    parsed = []
    if isinstance(raw, dict):
        for subkey, item in raw.items():
            value = getattr(item, "value", None)
            if value is None or not isinstance(subkey, bytes):
                continue
            try:
                parsed.append((subkey, LocalTrainingProgress.parse_obj(value)))
            except Exception:
                continue
    return records.sift(parsed, local_epoch, own=own, witnesses=witnesses)


class _SyncState:
    """`sync`: hivemind's state averager holding parameters and the peers' Adam state, by epoch."""

    def __init__(self, manifest: SwarmManifest, dht, params, warn):
        from .collab import GuardedStateAverager
        make_opt, make_sched = optimizer_factories(manifest)
        self.averager = GuardedStateAverager(
            dht=dht, prefix=f"{manifest.run_id}_state_averager", optimizer=make_opt, params=params,
            scheduler=make_sched, initialize_optimizer=True, offload_optimizer=False,
            compression=compression_for(manifest.compression), state_compression=compression_for("none"),
            min_matchmaking_time=manifest.matchmaking_time, client_mode=False, start=True)
        self.averager.on_warning = warn
        self.ceiling = 0
        self.averager.max_epoch = lambda: self.ceiling
        self.numel = sum(p.numel() for p in params)
        self.state_bytes = 3 * self.numel * 4           # parameters and Adam's two moments, float32
        self.exchanges_per_epoch = 2                    # a gradient round and a parameter round
        self.progress_key = f"{manifest.run_id}_progress"
        self.timeout = state_load_timeout(self.state_bytes, max(10.0, manifest.averaging_timeout))

    @property
    def epoch(self) -> int:
        return self.averager.local_epoch

    round = epoch
    digest = None

    @property
    def optimizer(self):
        return self.averager.optimizer

    def restore(self, epoch: int, extra: dict) -> None:
        self.averager.local_epoch = epoch
        self.serve_behind_peers()

    def serve_behind_peers(self) -> None:
        self.averager.state_sharing_priority = max(0.0, self.epoch - 0.5)   # live peers serve first

    def sync(self, swarm_epoch: int) -> int:
        """Download the swarm's state; bytes that came down."""
        before = self.epoch
        try:
            self.averager.load_state_from_peers(timeout=self.timeout)
        except Exception as exc:
            raise RuntimeError(f"could not download the swarm's state: {exc}") from None
        if self.epoch > before:
            self.serve_behind_peers()
            return self.state_bytes
        return 0

    def write_params(self) -> None:
        pass   # the averager loads into the model's parameters directly

    def trainer_state(self) -> dict:
        return {}

    def witnesses(self, views) -> None:
        pass

    def cancel_downloads_on(self, event) -> None:
        self.averager.download_cancel = event

    def shutdown(self) -> None:
        self.averager.shutdown()


class _DiLoCoState:
    """`diloco`: the outer weights, the outer Nesterov momentum and the round, as a follower of the
    rounds (it takes no part in them)."""

    def __init__(self, manifest: SwarmManifest, dht, params, warn):
        from .diloco import DiLoCoRounds
        d = manifest.diloco
        self.params = params
        self.rounds = DiLoCoRounds(
            dht, manifest.run_id, params, micro_batch=manifest.micro_batch, inner_steps=d["inner_steps"],
            outer_lr=d["outer_lr"], outer_momentum=d["outer_momentum"], compression=manifest.compression,
            matchmaking_time=manifest.matchmaking_time, averaging_timeout=manifest.averaging_timeout,
            max_round_s=d["max_round_s"], overlap=d["overlap"], on_warning=warn, follower=True,
            sharing_priority=-0.5)   # live peers serve first
        n = self.numel = sum(p.numel() for p in params)
        self.state_bytes = 2 * n * 4                    # outer weights and momentum, float32
        self.exchanges_per_epoch = 1
        self.rounds.load_timeout = state_load_timeout(self.state_bytes, self.rounds.load_timeout)
        self.progress_key = f"{manifest.run_id}_diloco_progress"
        self.ceiling = 0
        self.optimizer = torch.optim.SGD(params, lr=d["outer_lr"], momentum=d["outer_momentum"], nesterov=True)

    @property
    def epoch(self) -> int:
        return self.rounds.epoch

    @property
    def round(self) -> int:
        return self.rounds.round

    @property
    def digest(self) -> str:
        return self.rounds.identity()[2]

    def restore(self, epoch: int, extra: dict) -> None:
        momentum = [self.optimizer.state.get(p, {}).get("momentum_buffer") for p in self.params]
        state = self.rounds.state_dict()
        if all(m is not None for m in momentum):
            state["momentum"] = [m.detach().float().cpu() for m in momentum]
        state["round"] = int(extra.get("diloco_round", epoch))
        state["epoch"] = max(epoch, state["round"])
        self.rounds.load_state_dict(state)

    def sync(self, swarm_epoch: int) -> int:
        before = self.rounds.bytes_down
        self.rounds.poll()   # a follower behind the swarm downloads the state (checked) here
        return self.rounds.bytes_down - before

    def write_params(self) -> None:
        """The outer weights and momentum into the model and the SGD whose state a checkpoint holds."""
        state = self.rounds.state_dict()
        with torch.no_grad():
            for p, w, m in zip(self.params, state["outer"], state["momentum"]):
                p.copy_(w)
                self.optimizer.state[p]["momentum_buffer"] = m

    def trainer_state(self) -> dict:
        return {"diloco_round": self.rounds.round, "outer_hash": self.rounds.digest}

    def witnesses(self, views) -> None:
        self.rounds.tracker.witnesses = metrics.witnesses(views)

    def cancel_downloads_on(self, event) -> None:
        self.rounds.download_cancel = self.rounds.averager.download_cancel = event

    def shutdown(self) -> None:
        self.rounds.shutdown()


def run_host(manifest: SwarmManifest, opts: HostOptions, emit: Emit, controls: Controls,
             stopping: threading.Event | None = None) -> None:
    """`stopping`: set from the control reader or a signal handler on stop, so that a state download
    in flight (the loop waits for it; minutes on a home uplink) is given up."""
    from ..licence import read_licence, scratch_licence
    from ..models import load_base

    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    from .admission import host_manifest     # a private swarm's invite carries the host's issuer key
    manifest = host_manifest(manifest, out)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    token = host_token(manifest, opts)
    quiet_hivemind()
    warn = lambda code, message: emit(make_event("warning", code=code, message=message))  # noqa: E731

    # The same model and optimizer layout as the peers, so their state loads here.
    spec = swarm_spec(manifest, PeerOptions(device="cpu", threads=opts.threads), out)
    loaded = load_base(spec)
    model, tokenizer = loaded.model, loaded.tokenizer
    licence = scratch_licence(manifest.model.split(":", 1)[1]) if manifest.is_scratch else \
        read_licence(loaded.model_dir, manifest.model)
    kind = "full"
    if not manifest.is_scratch:
        from ..models import apply_method
        model = apply_method(model, spec, spec.resolved_method, False)
        kind = "lora" if spec.resolved_method in ("lora", "qlora") else "full"
    params = [p for p in model.parameters() if p.requires_grad]
    resume = _latest_own_checkpoint(out, manifest, warn)
    if resume is not None:
        ckpt_io.load_weights(model, resume, kind)

    require_port_free(opts.listen_ip, opts.port)
    announce = [f"/ip4/{opts.announce_ip}/tcp/{opts.port}"] if opts.announce_ip else None
    handle = _start_host_dht(manifest, out, opts, announce)
    dht = handle.dht
    public_key = metrics.local_public_key()
    keeper = (_SyncState if manifest.algorithm == "sync" else _DiLoCoState)(manifest, dht, params, warn)
    if stopping is not None:
        keeper.cancel_downloads_on(stopping)

    if resume is not None:
        state = ckpt_io.read_json(resume, "trainer_state.json")
        try:
            ckpt_io.load_optimizer(keeper.optimizer, resume)
        except Exception as exc:   # a checkpoint of another algorithm: the weights still count
            warn("host_restore", f"{resume}: optimizer state not restored ({type(exc).__name__})")
        keeper.restore(int(state.get("swarm_epoch", 0)), state)
        emit(make_event("checkpoint", step=keeper.epoch, path=str(resume), reason="restored"))

    maddrs = visible_maddrs(dht)
    invite = make_invite(manifest, maddrs)
    atomic_write_text(out / "invite.txt", invite + "\n")
    emit(make_event("invite", run_id=manifest.run_id, invite=invite, maddrs=maddrs))
    if token and not (opts.token or os.environ.get("MODRON_SWARM_TOKEN")):
        warn("token", f"private swarm: give peers the token in {out / 'token.txt'}")

    checkpoint_s = (opts.checkpoint_minutes or DEFAULT_CHECKPOINT_MINUTES) * 60
    downloads = _Downloader(keeper, checkpoint_s, warn, None if opts.checkpoint_minutes else
                            SwarmTraffic(keeper.numel, manifest.compression, keeper.exchanges_per_epoch))
    downloads.synced_once = resume is not None
    if resume is None:
        # A fresh host holds the initial weights and has nothing to lose yet; the peers hold the
        # progress. Its first download waits for the first checkpoint, like all the others.
        downloads.next_at = time.monotonic() + checkpoint_s
    last_ckpt_epoch, last_ckpt_time = keeper.epoch, time.monotonic()
    asked: float | None = None      # when a `checkpoint` control not answered yet came
    views, views_at = [], -float("inf")
    deadline = time.monotonic() + opts.minutes * 60 if opts.minutes else None
    # What the swarm's records may claim (the manifest's model and seq_len): reports and the epoch
    # the host believes come only from records within these.
    limits = RecordLimits.for_manifest(manifest, model)
    reader, progress = metrics.MetricsReader(limits, on_warning=warn), ProgressRecords(limits, own_counts=False)
    from .admission import Refusals
    refusals = Refusals(warn)      # private swarms: name the peers the DHT refused

    def checkpoint(reason: str) -> None:
        nonlocal last_ckpt_epoch, last_ckpt_time
        keeper.write_params()
        epoch = keeper.epoch
        state = {"step": epoch, "swarm_epoch": epoch, "run_id": manifest.run_id, "algorithm": manifest.algorithm,
                 "total_steps": manifest.schedule["total_epochs"], "micro_batch": manifest.micro_batch,
                 "tokens_seen": 0, "elapsed_s": 0.0, "last_loss": None, "precision": "fp32",
                 "method": spec.resolved_method, "data_fingerprint": None, "scheduler": {"swarm_epoch": epoch},
                 "grad_scaler": None, "manifest": manifest.to_dict(), **keeper.trainer_state()}
        path = ckpt_io.save(out, epoch, model=model, tokenizer=tokenizer, optimizer=keeper.optimizer, kind=kind,
                            trainer_state=state, job=spec.to_dict(), licence=licence.to_dict(), eval_result=None,
                            samples=None, keep=3)
        last_ckpt_epoch, last_ckpt_time = epoch, time.monotonic()
        emit(make_event("checkpoint", step=epoch, path=str(path), reason=reason))

    try:
        while True:
            msg = controls.wait(REPORT_INTERVAL_S)
            if msg == "stop" or (deadline is not None and time.monotonic() >= deadline):
                break
            if time.monotonic() - views_at >= METRICS_INTERVAL_S:     # as often as peers publish them
                views_at = time.monotonic()
                views = reader.read(dht, manifest.run_id, token, require_auth=bool(manifest.auth.get("required")))
                keeper.witnesses(views)
                metrics.publish(dht, manifest.run_id, public_key,
                                metrics.MetricsRecord(role="host", epoch=keeper.epoch, samples=0, samples_per_s=0.0,
                                                      time=time.time()), token)
            # Our own progress record (a DiLoCo follower's, signed with the same key) is no voice.
            sifted = progress_epochs(dht, keeper.progress_key, progress, keeper.epoch, own=public_key,
                                     witnesses=metrics.witnesses(views))
            ceiling = sifted.ceiling
            swarm_epoch = max([c.epoch for c in sifted.claims if c.counts] + [keeper.epoch])
            keeper.ceiling = ceiling
            # The host's traffic stays small: it downloads the state when a checkpoint is due (or was
            # asked for), not every round; peers serve late joiners first anyway.
            # First the checkpoint a finished download made due, then (maybe) the next download.
            if msg == "checkpoint" and asked is None:
                asked = time.monotonic()    # answered once the download it starts has ended
            if downloads.synced_once and (
                    (asked is not None and (not downloads.behind(swarm_epoch) or downloads.finished_at > asked)) or (
                    keeper.epoch != last_ckpt_epoch and
                    time.monotonic() - last_ckpt_time >= checkpoint_s)):
                checkpoint("requested" if asked is not None else "periodic")
                asked = None
            summary = metrics.SwarmSummary.of(views)
            if downloads.traffic is not None:
                downloads.traffic.observe(time.monotonic(), swarm_epoch, summary.peers)
            downloads.maybe_start(swarm_epoch, asked=msg == "checkpoint")
            _remember_peers(dht, out)
            refusals.poll(dht)
            emit(make_event("swarm", role="host", run_id=manifest.run_id, algorithm=manifest.algorithm,
                            peers=summary.peers, epoch=swarm_epoch, round=keeper.round, phase="watching",
                            samples_contributed=summary.samples, bytes_up=0, bytes_down=downloads.bytes_down,
                            global_samples_per_s=summary.samples_per_s, loss=summary.loss, client_mode=False,
                            host_epoch=keeper.epoch, outer_hash=keeper.digest))
        if downloads.synced_once and keeper.epoch != last_ckpt_epoch:
            checkpoint("final")
        emit(make_event("stopped", step=keeper.epoch, checkpoint=None))
    finally:
        try:
            keeper.shutdown()
        except Exception:
            pass
        dht.shutdown()
        reap_children()


def _latest_own_checkpoint(out: Path, manifest: SwarmManifest, warn) -> Path | None:
    """OUT's newest checkpoint, if it is this swarm's (a folder reused for another swarm starts fresh)."""
    ckpt = ckpt_io.latest(out)
    if ckpt is None:
        return None
    try:
        state = ckpt_io.read_json(ckpt, "trainer_state.json")
    except (OSError, ValueError):
        state = None
    if not isinstance(state, dict) or state.get("run_id") != manifest.run_id:
        warn("host_restore", f"{ckpt} is not a checkpoint of swarm {manifest.run_id!r}; starting from the "
                             "manifest's initial weights")
        return None
    return ckpt


def _start_host_dht(manifest: SwarmManifest, out: Path, opts: HostOptions, announce):
    """The host's DHT on its fixed address; after a restart it dials the peers it last knew, so the
    swarm finds it again without anyone re-joining."""
    import dataclasses
    kwargs = dict(identity_path=out / "identity.key", client_mode="off",
                  host_maddrs=[f"/ip4/{opts.listen_ip}/tcp/{opts.port}"], announce_maddrs=announce,
                  validators=metrics.make_validators(manifest.run_id))
    from .admission import for_host     # private swarms: the host admits itself with its issuer key
    kwargs["authorizer"] = for_host(manifest, out, out / "identity.key")
    known = _known_peers(out)
    if known:
        try:
            return start_dht(dataclasses.replace(manifest, initial_peers=known), **kwargs)
        except ConfigError:
            pass   # none of them answered: bootstrap alone, they find us through the invite
    return start_dht(dataclasses.replace(manifest, initial_peers=[]), **kwargs)


def _known_peers(out: Path) -> list[str]:
    from .manifest import manifest_from_dict
    try:
        raw = json.loads((out / "known_peers.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(raw, list):
        return []
    good = []
    for addr in raw[:MAX_KNOWN_PEERS]:
        try:   # the manifest's own multiaddr check
            good += manifest_from_dict({"run_id": "chk", "model": "scratch:tiny", "data": {"source": "local"},
                                        "initial_peers": [addr]}, "known_peers.json").initial_peers
        except Exception:
            continue
    return good


async def _connected_peers(_dht, node) -> list[str]:
    """Runs in the DHT's process (so it is a module-level function: hivemind pickles it by name)."""
    return [f"{a}/p2p/{info.peer_id}" for info in await node.p2p.list_peers() for a in info.addrs]


REMEMBER_TIMEOUT_S = 5.0   # a DHT call that never answers must not hold the host's loop


def _remember_peers(dht, out: Path) -> None:
    """The addresses of the peers connected now, for a restart (the file is ours, written atomically).
    With a timeout: a coroutine that dies in the DHT's process (hivemind logs a GeneratorExit) leaves its
    future unanswered, and a plain run_coroutine() then blocked the host for good (seen in CI: the host
    went silent while its peers went on)."""
    try:
        addrs = dht_call(dht, _connected_peers, REMEMBER_TIMEOUT_S)
    except Exception:      # a timeout included: the file keeps the last list
        return
    addrs = [a for a in addrs if "/p2p-circuit" not in a][:MAX_KNOWN_PEERS]
    if addrs:
        atomic_write_text(out / "known_peers.json", json.dumps(addrs) + "\n")


def require_port_free(ip: str, port: int) -> None:
    import socket
    with socket.socket() as s:
        # SO_REUSEADDR: a port left in TIME_WAIT by a killed host is free for us (Linux still refuses
        # it while a live listener holds it).
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((ip, port))
        except OSError:
            raise ConfigError("--port", f"{ip}:{port} is in use; pick another with --port") from None
