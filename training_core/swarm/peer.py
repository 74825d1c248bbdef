"""A contributing peer: the local Engine with a swarm strategy.

`swarm_engine(manifest, options, emit, controls).run()` trains with the swarm until a --steps or
--minutes bound (or `stop`), emitting the worker events plus `swarm` events about every 2 s. The
strategy is the manifest's algorithm: `DiLoCoStrategy` (rounds of local steps, then compressed
pseudo-gradients; diloco_strategy.py) or `SyncStrategy` (hivemind.Optimizer, per-step gradients;
sync_strategy.py). `SwarmStrategy` below is what both share: the DHT, metrics, reporting, the
deadline and each peer's own place in the data.
"""
from __future__ import annotations

import json
import math
import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import MAX_STEPS, JobSpec
from ..controls import Controls
from ..engine import Emit, Engine
from ..errors import ConfigError
from ..paths import data_dir
from ..strategy import LocalStrategy
from . import metrics, sources
from .manifest import SwarmManifest, bundled_path, hub_downloads
from .network import DHTHandle, identity_path_for, quiet_hivemind, reap_children, start_dht

SWARM_EVENT_INTERVAL_S = 2.0
# Our signed metrics record goes out, and the swarm's are read, this often (records live 30 s); the
# `swarm` events in between reuse the last reading. Every 2 s, they were a good part of a peer's
# traffic (each reading returns every peer's signed record) and most of the host's.
METRICS_INTERVAL_S = 10.0
UNBOUNDED_STEPS = MAX_STEPS   # "until stopped": the job spec's own bound


@dataclass
class PeerOptions:
    steps: int | None = None
    minutes: float | None = None
    device: str = "auto"
    threads: int | None = None
    data_dir: str | None = None          # the peer's own data (manifest data.source = "local"/"url")
    client_mode: str = "auto"            # on | off | auto
    token: str | None = None
    identity_path: Path | None = None    # default <data_dir>/swarm/identity.key (per install and device)
    run_dir: Path | None = None          # default <data_dir>/swarm/<run_id>/ (per device: peer_run_dir)
    host_maddrs: list[str] | None = None
    test_send_nan: bool = False          # test hook: send NaN gradients, our own guard disabled
    test_sleep_per_step: float = 0.0     # test hook: pace the steps (a loopback swarm on 2 cores leaves CPU to the rest)
    vram_fraction: float | None = None   # the share of the GPU this peer may use (--vram-fraction)
    model_source: str | None = None      # where the model is read here: an invite's hub model, downloaded
    tokenizer_source: str | None = None  # likewise an invite's hub tokenizer (default: from the manifest)


def swarm_dir() -> Path:
    p = data_dir() / "swarm"
    p.mkdir(parents=True, exist_ok=True)
    return p


def peer_run_dir(run_id: str, device: str) -> Path:
    """<data dir>/swarm/<run_id>/, or <run_id>-cuda1/ for a second GPU's peer: a run folder belongs to
    one peer, as its identity does (network.identity_path_for)."""
    key = identity_path_for(swarm_dir(), device).stem        # identity, identity-cuda1, ...
    suffix = key[len("identity"):]
    return swarm_dir() / f"{run_id}{suffix}"


def check_token(manifest: SwarmManifest, token: str | None) -> str | None:
    token = token or os.environ.get("MODRON_SWARM_TOKEN") or None
    if manifest.auth.get("required") and not token:
        raise ConfigError("--token", f"swarm {manifest.run_id!r} is private: pass the token its host gave you "
                                     "(--token TOKEN or MODRON_SWARM_TOKEN)")
    return token


def peer_data(manifest: SwarmManifest, data_dir_arg: str | None) -> list[str]:
    source = manifest.data["source"]
    if data_dir_arg:
        if not Path(data_dir_arg).exists():
            raise ConfigError(data_dir_arg, "no such file or folder (--data-dir)")
        return [str(data_dir_arg)]
    if source == "bundled":
        path = bundled_path(manifest.data["path"])
        if not path.exists():
            raise ConfigError("data.path", f"{manifest.data['path']!r} is not bundled with this Modron")
        return [str(path)]
    what = "its own data" if source == "local" else f"the data at {manifest.data['url']}"
    raise ConfigError("--data-dir", f"this swarm trains on {what}; give the folder holding it with --data-dir")


def peer_tokenizer(manifest: SwarmManifest) -> str:
    tok = manifest.tokenizer
    if tok.startswith("bundled:"):
        return str(bundled_path(tok[len("bundled:"):]))
    return tok


def swarm_spec(manifest: SwarmManifest, opts: PeerOptions, out: Path) -> JobSpec:
    device = opts.device
    precision = "fp32"
    if device != "cpu" and torch.cuda.is_available():
        # fp16 needs hivemind's own GradScaler; bf16 needs none.
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return JobSpec(model=opts.model_source or manifest.model, data=peer_data(manifest, opts.data_dir), out=str(out),
                   method="full" if manifest.is_scratch else None, steps=opts.steps or UNBOUNDED_STEPS,
                   batch_size=manifest.micro_batch, micro_batch_size=manifest.micro_batch, seq_len=manifest.seq_len,
                   lr=manifest.optimizer["lr"], weight_decay=manifest.optimizer["weight_decay"],
                   checkpoint_minutes=1e9, keep_checkpoints=2, eval_fraction=0.02, seed=0,  # seed 0: same init
                   precision=precision, tokenizer=opts.tokenizer_source or peer_tokenizer(manifest),
                   device=device, threads=opts.threads,
                   job_id=manifest.run_id, sample_max_tokens=20, test_sleep_per_step=opts.test_sleep_per_step)


def device_memory(opts: PeerOptions) -> tuple[int, str, str, str] | None:
    """The device the engine will train on (picked as Engine._pick_device does) and all the memory this
    peer may use there: (bytes, its name, device, precision); None when the engine will refuse the
    device itself. Reads properties only: nothing is allocated."""
    device = opts.device
    if device != "cpu" and torch.cuda.is_available():
        idx = int(device.split(":", 1)[1]) if device.startswith("cuda:") else torch.cuda.current_device()
        if idx >= torch.cuda.device_count():
            return None
        props = torch.cuda.get_device_properties(idx)
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        fraction = opts.vram_fraction or 1.0
        share = f" that --vram-fraction {fraction:g} leaves" if fraction < 1 else ""
        return int(props.total_memory * fraction), f"the memory of the {props.name}{share}", f"cuda:{idx}", precision
    if device.startswith("cuda"):
        return None
    import psutil
    return psutil.virtual_memory().total, "this computer's RAM", "cpu", "fp32"


def _local_config(model: str) -> dict[str, Any] | None:
    """config.json of a manifest file's local model folder (the operator's own), for the memory check."""
    path = Path(model).expanduser() / "config.json"
    try:
        if path.is_file() and path.stat().st_size <= 1024 * 1024:
            config = json.loads(path.read_text(encoding="utf-8"))
            return config if isinstance(config, dict) else None
    except (OSError, ValueError):
        pass
    return None    # the loader reports a missing or broken config in its own words


def prepare_sources(manifest: SwarmManifest, opts: PeerOptions, where: str, from_invite: bool) -> None:
    """The pre-flight before the DHT starts and before any weight is allocated: the memory this swarm's
    training needs on the device the engine will use (refused in one line when it cannot fit), then,
    for an invite, the hub downloads the user agreed to (commands.cmd_join checked the consent):
    config.json alone first, so a model that cannot fit is refused before its weights come. An
    invite's hub id is always read from the hub download, never from a folder of that name here."""
    config = None
    if not manifest.is_scratch:
        config = sources.fetch_config(manifest.model) if from_invite else _local_config(manifest.model)
    mem = device_memory(opts)
    if mem is not None:
        limit, where_memory, device, precision = mem
        sources.check_fits(manifest, where, limit=limit, where_memory=where_memory, device=device,
                           precision=precision, config=config)
    if not from_invite:
        return
    for what, repo in hub_downloads(manifest):
        if what == "model":
            opts.model_source = str(sources.fetch_model(repo))
        else:
            opts.tokenizer_source = str(sources.fetch_tokenizer(repo))


def epoch_schedule(schedule: dict[str, Any]):
    """The manifest's LR schedule as a multiplier per global epoch."""
    name, warmup, total = schedule["name"], schedule["warmup_epochs"], schedule["total_epochs"]

    def factor(epoch: int) -> float:
        if epoch < warmup:
            return (epoch + 1) / (warmup + 1)
        if name == "constant":
            return 1.0
        progress = min(1.0, (epoch - warmup) / max(1, total - warmup))
        if name == "linear":
            return max(0.0, 1.0 - progress)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def optimizer_factories(manifest: SwarmManifest):
    """(optimizer factory, scheduler factory) from the manifest. Peers and the host must build the
    same optimizer, or the state they share would not line up."""
    cfg = manifest.optimizer
    kwargs = dict(lr=cfg["lr"], betas=tuple(cfg["betas"]), weight_decay=cfg["weight_decay"])
    if "eps" in cfg:
        kwargs["eps"] = cfg["eps"]
    cls = torch.optim.AdamW if cfg["name"] == "adamw" else torch.optim.Adam
    factor = epoch_schedule(manifest.schedule)
    return (lambda params: cls(params, **kwargs)), (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor))


class SwarmStrategy(LocalStrategy):
    """What every swarm algorithm shares. Subclasses add the optimizer step and `report_fields`."""
    name = "swarm"
    checkpoint_on_pause = False   # the swarm holds the state
    bounded_by_steps = False

    def __init__(self, manifest: SwarmManifest, opts: PeerOptions, token: str | None):
        self.manifest, self.opts, self.token = manifest, opts, token
        self.handle: DHTHandle | None = None
        self.samples_contributed = 0
        self.waited_s = 0.0            # training thread blocked by the network (rounds, state loads)
        self._closing = threading.Event()
        self._deadline = time.monotonic() + opts.minutes * 60 if opts.minutes else None
        self._offset = random.randrange(1 << 30)   # each peer walks the data from its own place
        self._token_warned = False
        self._views: list = []
        self._views_at = -float("inf")
        self.engine: Engine | None = None

    # ---- set-up ---------------------------------------------------------------------------
    def connect(self, engine: Engine) -> DHTHandle:
        """Join the swarm's DHT (called from make_optimizer: the optimizer needs it)."""
        quiet_hivemind()
        self.engine = engine
        m = self.manifest
        from .admission import for_peer     # private swarms: our credential, checked by every peer
        credential = getattr(self.opts, "credential", None) or os.environ.get("MODRON_SWARM_CREDENTIAL")
        authorizer = for_peer(m, Path(credential) if credential else None, self.identity_path())
        self.handle = start_dht(m, identity_path=self.identity_path(), client_mode=self.opts.client_mode,
                                host_maddrs=self.opts.host_maddrs, validators=metrics.make_validators(m.run_id),
                                authorizer=authorizer)
        if self.handle.client_mode:
            engine.warn("client_mode", f"joined as a client (no incoming connections): {self.handle.reason}")
        self.public_key = metrics.local_public_key()
        return self.handle

    def record_limits(self, engine: Engine):
        """What one peer can plausibly report (samples/s, loss), from the manifest and the model."""
        from .guards import RecordLimits
        if getattr(self, "_limits", None) is None:
            self._limits = RecordLimits.for_manifest(self.manifest, engine.model)
        return self._limits

    def _metrics_reader(self, engine: Engine):
        if getattr(self, "_reader", None) is None:
            self._reader = metrics.MetricsReader(self.record_limits(engine), on_warning=engine.warn)
            from .admission import Refusals
            self._refusals = Refusals(engine.warn)   # private swarms: the peers our DHT refused, named
        return self._reader

    def identity_path(self) -> Path:
        """Per install and device: two GPUs of one install are two peers with two identities."""
        return self.opts.identity_path or identity_path_for(swarm_dir(), self.opts.device)

    def started(self, engine: Engine) -> None:
        threading.Thread(target=self._report_loop, name="swarm-report", daemon=True).start()

    def data_offset(self, engine: Engine) -> int:
        return self._offset

    def after_step(self, engine: Engine) -> None:
        if self._deadline is not None and time.monotonic() >= self._deadline:
            engine.total_steps = engine.step        # the engine's loop ends here and checkpoints

    def stop_checkpoint(self, engine: Engine) -> None:
        return None

    def event_fields(self, type_: str, fields: dict[str, Any]) -> None:
        if type_ in ("stopped", "finished"):
            self._closing.set()      # no `swarm` events after the last word
        if type_ in ("started", "step"):
            fields["total_steps"] = self.opts.steps or 0
            if type_ == "step" and not self.opts.steps:
                fields["eta_s"] = None

    def interrupt(self) -> None:
        """From the control reader, on pause or stop: leave a round in flight now, not at its end."""

    # ---- reporting ------------------------------------------------------------------------
    def _report_loop(self) -> None:
        while not self._closing.wait(SWARM_EVENT_INTERVAL_S):
            try:
                self.report_swarm()
            except Exception as exc:   # a DHT hiccup must not kill training
                self.engine.warn("swarm_report", f"could not read or publish swarm metrics: {exc}")

    def local_epoch(self) -> int:
        raise NotImplementedError

    def read_views(self) -> list:
        """Publish our metrics record, then read the swarm's (only authorized ones in a private swarm);
        within METRICS_INTERVAL_S of the last time, the views read then."""
        if time.monotonic() - self._views_at < METRICS_INTERVAL_S:
            return self._views
        self._views_at = time.monotonic()
        self._views = self._read_views()
        return self._views

    def _read_views(self) -> list:
        engine, m = self.engine, self.manifest
        if not engine.paused:
            sps = self.samples_contributed / self.compute_s() if self.compute_s() > 0 else 0.0
            loss = engine.last_loss if engine.last_loss is not None and math.isfinite(engine.last_loss) else None
            record = metrics.MetricsRecord(role="peer", epoch=self.local_epoch(), samples=self.samples_contributed,
                                           samples_per_s=float(sps), loss=loss, time=time.time())
            metrics.publish(self.handle.dht, m.run_id, self.public_key, record, self.token)
        views = self._metrics_reader(engine).read(self.handle.dht, m.run_id, self.token)
        self._refusals.poll(self.handle.dht)
        if m.auth.get("required"):
            hosts = [v for v in views if v.record.role == "host"]
            if hosts and not any(v.authorized for v in hosts) and not self._token_warned:
                self._token_warned = True
                engine.warn("token_rejected", "the swarm's host does not accept this token: this peer's metrics "
                                              "will not count; ask the host for the current token")
            views = [v for v in views if v.authorized]
        return views

    def compute_s(self) -> float:
        """Seconds this peer spent computing (forward, backward, local optimizer), network waits excluded."""
        engine = self.engine
        return max(0.0, engine.compute_s - self.waited_s) if engine is not None else 0.0

    def report_swarm(self) -> None:
        if self.handle is None or self.engine is None or getattr(self.engine, "optimizer", None) is None:
            return
        views = self.read_views()
        summary = metrics.SwarmSummary.of(views)
        fields = dict(role="peer", run_id=self.manifest.run_id, algorithm=self.manifest.algorithm,
                      samples_contributed=self.samples_contributed, global_samples_per_s=summary.samples_per_s,
                      loss=summary.loss, client_mode=self.handle.client_mode, contributed_s=self.compute_s(),
                      compute_s=self.compute_s(), wall_s=self.engine.elapsed(), paused=self.engine.paused)
        fields.update(self.report_fields(views))
        self.engine.emit("swarm", **fields)

    def report_fields(self, views: list) -> dict[str, Any]:
        raise NotImplementedError

    def close(self, engine: Engine) -> None:
        self._closing.set()
        self.leave()
        if self.handle is not None:
            try:
                self.handle.dht.shutdown()
            except Exception:
                pass
        reap_children()

    def leave(self) -> None:
        """Shut the algorithm's averagers down (before the DHT goes); set `leave_abandoned` when
        that was given up on past its time limit."""

    leave_abandoned = False


def swarm_engine(manifest: SwarmManifest, opts: PeerOptions, emit: Emit, controls: Controls | None = None) -> Engine:
    """The engine of a contributing peer, with the strategy the manifest's algorithm names."""
    token = check_token(manifest, opts.token)
    if manifest.algorithm == "sync":
        from .sync_strategy import SyncStrategy as cls
    else:
        from .diloco_strategy import DiLoCoStrategy as cls
    strategy = cls(manifest, opts, token)
    run_dir = opts.run_dir or peer_run_dir(manifest.run_id, opts.device)
    return Engine(swarm_spec(manifest, opts, run_dir), emit, controls, strategy=strategy)
