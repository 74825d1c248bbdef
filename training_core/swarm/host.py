"""The swarm host: a bootstrap peer with a stable address that watches the swarm and keeps its state.

It computes no gradients. It downloads the averaged state from peers whenever the swarm's epoch
moves on (through the same checked state loader the peers use), serves that copy to late joiners
(at a lower priority than live peers), writes it as ordinary checkpoints, and reports the swarm
from the signed metrics records.
"""
from __future__ import annotations

import os
import secrets
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
from .guards import EpochClaim, believed_epoch_ceiling
from .manifest import SwarmManifest, make_invite
from .network import compression_for, quiet_hivemind, reap_children, start_dht, visible_maddrs
from .peer import PeerOptions, optimizer_factories, swarm_spec

REPORT_INTERVAL_S = 2.0
MIN_LOAD_INTERVAL_S = 3.0


@dataclass
class HostOptions:
    out: Path
    port: int = 31337
    listen_ip: str = "0.0.0.0"
    announce_ip: str | None = None
    minutes: float | None = None
    token: str | None = None
    checkpoint_minutes: float = 10.0
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


def progress_epochs(dht, run_id: str) -> list[EpochClaim]:
    from hivemind.optim.progress_tracker import LocalTrainingProgress
    found = dht.get(f"{run_id}_progress", latest=True)
    raw = found.value if found is not None else None
    claims = []
    if isinstance(raw, dict):
        for subkey, item in raw.items():
            value = getattr(item, "value", None)
            if value is None:
                continue
            try:
                p = LocalTrainingProgress.parse_obj(value)
            except Exception:
                continue
            claims.append(EpochClaim(bytes(subkey), p.epoch, counts=not p.client_mode))
    return claims


def run_host(manifest: SwarmManifest, opts: HostOptions, emit: Emit, controls: Controls) -> None:
    from ..licence import scratch_licence, read_licence
    from ..models import load_base
    from .collab import GuardedStateAverager

    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    token = host_token(manifest, opts)
    quiet_hivemind()

    # The same model and optimizer layout as the peers, so their state loads here.
    spec = swarm_spec(manifest, PeerOptions(device="cpu", threads=opts.threads), out)
    loaded = load_base(spec)
    model, tokenizer = loaded.model, loaded.tokenizer
    licence = scratch_licence(manifest.model.split(":", 1)[1]) if manifest.is_scratch else \
        read_licence(loaded.model_dir, manifest.model)
    if not manifest.is_scratch:
        from ..models import apply_method
        model = apply_method(model, spec, spec.resolved_method, False)
    params = [p for p in model.parameters() if p.requires_grad]

    require_port_free(opts.listen_ip, opts.port)
    announce = [f"/ip4/{opts.announce_ip}/tcp/{opts.port}"] if opts.announce_ip else None
    handle = start_dht(manifest, identity_path=out / "identity.key", client_mode="off",
                       host_maddrs=[f"/ip4/{opts.listen_ip}/tcp/{opts.port}"], announce_maddrs=announce,
                       validators=metrics.make_validators(manifest.run_id))
    dht = handle.dht
    public_key = metrics.local_public_key()
    make_opt, make_sched = optimizer_factories(manifest)
    compression = compression_for(manifest.compression)
    averager = GuardedStateAverager(
        dht=dht, prefix=f"{manifest.run_id}_state_averager", optimizer=make_opt, params=params,
        scheduler=make_sched, initialize_optimizer=True,
        offload_optimizer=False, compression=compression, state_compression=compression_for("none"),
        min_matchmaking_time=manifest.matchmaking_time, client_mode=False, start=True)
    warn = lambda code, message: emit(make_event("warning", code=code, message=message))  # noqa: E731
    averager.on_warning = warn
    believed = {"epoch": 0}
    averager.max_epoch = lambda: believed["epoch"]

    maddrs = visible_maddrs(dht)
    invite = make_invite(manifest, maddrs)
    atomic_write_text(out / "invite.txt", invite + "\n")
    emit(make_event("invite", run_id=manifest.run_id, invite=invite, maddrs=maddrs))
    if token and not (opts.token or os.environ.get("MODRON_SWARM_TOKEN")):
        warn("token", f"private swarm: give peers the token in {out / 'token.txt'}")

    host_epoch, loaded_once, last_load = 0, False, 0.0
    last_ckpt_epoch, last_ckpt_time = -1, time.monotonic()
    deadline = time.monotonic() + opts.minutes * 60 if opts.minutes else None
    bytes_down = 0
    numel = sum(p.numel() for p in params)

    def checkpoint(reason: str) -> None:
        nonlocal last_ckpt_epoch, last_ckpt_time
        state = {"step": host_epoch, "swarm_epoch": host_epoch, "run_id": manifest.run_id,
                 "total_steps": manifest.schedule["total_epochs"], "micro_batch": manifest.micro_batch,
                 "tokens_seen": 0, "elapsed_s": 0.0, "last_loss": None, "precision": "fp32",
                 "method": spec.resolved_method, "data_fingerprint": None, "scheduler": {"swarm_epoch": host_epoch},
                 "grad_scaler": None, "manifest": manifest.to_dict()}
        path = ckpt_io.save(out, host_epoch, model=model, tokenizer=tokenizer, optimizer=averager.optimizer,
                            kind="lora" if spec.resolved_method in ("lora", "qlora") else "full",
                            trainer_state=state, job=spec.to_dict(), licence=licence.to_dict(), eval_result=None,
                            samples=None, keep=3)
        last_ckpt_epoch, last_ckpt_time = host_epoch, time.monotonic()
        emit(make_event("checkpoint", step=host_epoch, path=str(path), reason=reason))

    try:
        while True:
            msg = controls.wait(REPORT_INTERVAL_S)
            if msg == "stop" or (deadline is not None and time.monotonic() >= deadline):
                break
            if msg == "checkpoint" and loaded_once:
                checkpoint("requested")
            views = metrics.read(dht, manifest.run_id, token, require_auth=bool(manifest.auth.get("required")))
            claims = progress_epochs(dht, manifest.run_id)
            ceiling = believed_epoch_ceiling(claims + metrics.witnesses(views), host_epoch)
            swarm_epoch = max([c.epoch for c in claims if c.counts and c.epoch <= ceiling] + [host_epoch])
            believed["epoch"] = ceiling
            if swarm_epoch > host_epoch and time.monotonic() - last_load >= MIN_LOAD_INTERVAL_S:
                last_load = time.monotonic()
                try:
                    averager.load_state_from_peers(timeout=max(10.0, manifest.averaging_timeout))
                except Exception as exc:
                    warn("state_load", f"could not download the swarm's state: {exc}")
                if averager.local_epoch > host_epoch:
                    host_epoch, loaded_once = averager.local_epoch, True
                    bytes_down += 3 * numel * 4
                    averager.state_sharing_priority = max(0.0, host_epoch - 0.5)   # live peers serve first
            if loaded_once and host_epoch != last_ckpt_epoch and \
                    time.monotonic() - last_ckpt_time >= opts.checkpoint_minutes * 60:
                checkpoint("periodic")
            summary = metrics.SwarmSummary.of(views)
            metrics.publish(dht, manifest.run_id, public_key,
                            metrics.MetricsRecord(role="host", epoch=host_epoch, samples=0, samples_per_s=0.0,
                                                  time=time.time()), token)
            emit(make_event("swarm", role="host", run_id=manifest.run_id, peers=summary.peers, epoch=swarm_epoch,
                            samples_contributed=summary.samples, bytes_up=0, bytes_down=bytes_down,
                            global_samples_per_s=summary.samples_per_s, loss=summary.loss, client_mode=False,
                            host_epoch=host_epoch))
        if loaded_once and host_epoch != last_ckpt_epoch:
            checkpoint("final")
        emit(make_event("stopped", step=host_epoch, checkpoint=None))
    finally:
        try:
            averager.shutdown()
        except Exception:
            pass
        dht.shutdown()
        reap_children()


def require_port_free(ip: str, port: int) -> None:
    import socket
    with socket.socket() as s:
        try:
            s.bind((ip, port))
        except OSError:
            raise ConfigError("--port", f"{ip}:{port} is in use; pick another with --port") from None
