"""Swarms over home internet: sync vs DiLoCo on shaped links between network namespaces.

Needs root (network namespaces, veths, tc, iptables) and Debian's iptables; it says so and exits 2
otherwise. Traffic stays inside namespaces this script makes, on 198.18.0.0/15 (RFC 2544's
benchmarking range); they are torn down at the end, on Ctrl-C and on errors
(`bench/_netlab.py cleanup` removes what a killed run left).

Topology: a core router namespace ("the internet") and one namespace per member, each on its own
access link (a veth pair): the host, the direct peers, and a home router namespace that
masquerades a LAN holding the NAT peer (inbound: replies only, no port forwarding; the core has no
route to the LAN). Every access link is shaped with tbf, upload in the member's namespace (or its
home router's) and download on the core's end; the core drops forwarded packets at random
(iptables `statistic`) and holds the rest for RTT/2 (NFQUEUE, see _netlab.py: this kernel has no
netem), so every member-to-member path has the reference RTT and loss.

Scaling: the CPU model is tiny, so the link is slowed until one full-precision (fp32) exchange of
the tiny model costs as many compute steps as one of the `base` preset on a gaming GPU over the
reference uplink:
    steps_per_exchange = (4 B x N_base x 8 / up_ref) / gpu_step_s
    up_model           = 4 B x N_tiny x 8 / (steps_per_exchange x cpu_step_s)
    down_model         = up_model x down_ref / up_ref
`gpu_step_s` is an assumption (--gpu-step-s, printed with its derivation); `cpu_step_s` is measured
by the probe below. RTT and loss are not scaled. Control traffic (hivemind stores a signed
progress record in the DHT after every local step, plus metrics records) costs the same per step
whatever the model's size, so on a link scaled to a 0.8 M-parameter model it would take a share
the real link never sees; the tc rates are up_model/down_model plus the control rate the probe
measured (--control-headroom-kbit overrides, 0 turns it off).

Runs, each with a fresh host and fresh peers (one torch thread each). Peers are launched paused
and all told to start at once when every one has joined; wall time counts from there.
0. probe: DiLoCo with one endless round, no shaping: the peers' step time (compute_s / steps)
   with everything running at once, and every member's control traffic per second.
1. sync-open: sync with no shaping at all, every peer bounded to K local steps. Sync's result per
   sample does not depend on the link when its rounds complete, so this is the equal-samples
   baseline, at its best, and the per-sample traffic baseline. (Skipped by --quick.)
2. diloco-<compression>, each on the shaped link, bounded to K = rounds x inner_steps steps:
   the equal-samples figures and the wall time T each took.
3. sync-shaped: sync on the shaped link, asked for a checkpoint at each diloco run's T, then
   stopped: the equal-time figures. A sync peer checkpoints at the first step boundary after T,
   which can only favour sync; the times they were written are printed.
Eval loss: each peer's final (or requested) checkpoint, loaded with transformers, on the held-out
blocks of the peers' own split (bundled stories, bytes tokenizer), mean over peers. A DiLoCo peer's
checkpoint is its own weights: with overlap, the last round's outer step is not in it yet.
Bytes: the kernel's counters of each member's interface from the start of training to the end
(joining not counted), and the peers' own count of what their rounds sent ("exchange"). Utilization: each peer's `compute_s` (forward, backward, inner optimizer)
over its `wall_s` (training time), from its last `swarm` event.

Peer discovery: libp2p counts 198.18.0.0/15 as unroutable and leaves such addresses out of what
its DHT tells others, so peers would find the host (named in the invite) but never each other.
Real home peers have routable addresses the DHT does pass on; as a stand-in every member gets its
identity before it starts, and each peer's invite lists the host and every directly reachable
peer. No list has the NAT peer's address: it can only be reached over connections it opened.

    sudo .venv/bin/python bench/swarm_wan.py --quick        # smoke run, ~3-5 min
    sudo .venv/bin/python bench/swarm_wan.py                # everything, ~15-20 min on 2 cores
    sudo .venv/bin/python bench/swarm_wan.py --algorithms diloco --compressions blockwise8bit
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _netlab import (LabError, NetLab, Shaping, leftover_namespaces, missing_requirements,  # noqa: E402
                     remove_namespace)

COMPRESSIONS = ("none", "float16", "scaled_float16", "uniform8bit", "blockwise8bit", "blockwise4bit")
EIGHT_BIT = "blockwise8bit"
HOST_SHARE_SMALL = 0.10      # the host's bytes, at most this share of all (at `base` scale)
HOST_PORT = 31337
PEER_PORT = 31338                      # every member has its own namespace, so ports never clash
# What --gpu-step-s stands for (the default, 0.6 s).
GPU_NOTE = ("one `base` step of micro-batch 8 x 1024 tokens on an RTX 3060-class GPU: 6 x N x 8192 tokens "
            "plus attention ~= 6.3 TFLOP, at ~10.5 TFLOP/s sustained bf16 (about 40 % of its 25.6 TFLOP/s "
            "dense tensor peak with fp32 accumulation)")


# ---- settings --------------------------------------------------------------------------------

@dataclass
class Settings:
    quick: bool
    algorithms: list[str]
    compressions: list[str]
    direct_peers: int
    nat_peers: int
    nat_client_mode: str
    micro_batch: int
    seq_len: int
    inner_steps: int
    rounds: int
    lr: float
    up_mbit: float
    down_mbit: float
    rtt_ms: float
    loss: float
    gpu_step_s: float
    cpu_step_s: float | None
    control_headroom_kbit: float | None
    sync_target_batch: int | None
    equal_time_s: float | None
    run_timeout_s: float
    keep: bool
    overlap_off_too: bool = False

    @property
    def peers(self) -> int:
        return self.direct_peers + self.nat_peers

    @property
    def steps(self) -> int:
        return self.inner_steps * self.rounds


def parse_args(argv: list[str] | None) -> Settings:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("--quick", action="store_true",
                    help="smoke run (~3-5 min): one direct peer + the NAT peer, diloco with 8-bit only, fewer steps, "
                         "and no rate-limit-lifted sync run (so no equal-samples figure)")
    ap.add_argument("--algorithms", default="sync,diloco", help="comma-separated: sync, diloco")
    ap.add_argument("--compressions", help=f"diloco's, comma-separated (default: all: {','.join(COMPRESSIONS)}; "
                                           f"--quick: {EIGHT_BIT})")
    ap.add_argument("--peers", type=int, help="direct peers (default 2; --quick 1)")
    ap.add_argument("--nat-peers", type=int, default=1, choices=(0, 1), help="peers behind a masquerading router")
    ap.add_argument("--nat-client-mode", choices=("auto", "on"), default="auto",
                    help="the NAT peer's --client-mode (auto: it must find out by itself that it is behind NAT)")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--inner-steps", type=int, help="diloco's local steps per round (default 150; --quick 60)")
    ap.add_argument("--rounds", type=int, help="diloco rounds; every run is K = rounds x inner-steps steps per "
                                               "peer (default 3; --quick 2)")
    ap.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (sync's, and diloco's inner)")
    ap.add_argument("--up-mbit", type=float, default=20.0, help="reference uplink, Mbit/s")
    ap.add_argument("--down-mbit", type=float, default=100.0, help="reference downlink, Mbit/s")
    ap.add_argument("--rtt-ms", type=float, default=40.0)
    ap.add_argument("--loss", type=float, default=0.001, help="packet loss per crossing of the core (0.001 = 0.1 %%)")
    ap.add_argument("--gpu-step-s", type=float, default=0.6, help="assumed `base` step time on a gaming GPU")
    ap.add_argument("--cpu-step-s", type=float, help="the tiny model's step time here (default: measured)")
    ap.add_argument("--control-headroom-kbit", type=float,
                    help="extra rate each way for control traffic (default: the most any member sent while the "
                         "probe swarm trained; 0: none)")
    ap.add_argument("--sync-target-batch", type=int,
                    help="sync's samples per global step (default: peers x micro-batch, i.e. data-parallel "
                         "training with one micro-batch per peer per step)")
    ap.add_argument("--equal-time-s", type=float, help="without diloco runs: how long the shaped sync run trains")
    ap.add_argument("--run-timeout", type=float, default=900.0, help="seconds before one run is given up")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs, checkpoints)")
    ap.add_argument("--no-overlap-run", choices=("on", "off"), default=None,
                    help=f"also run diloco-{EIGHT_BIT} with overlap off, for what overlap costs in loss "
                         "(default: on, --quick: off)")
    a = ap.parse_args(argv)
    algorithms = [x for x in a.algorithms.split(",") if x]
    if not algorithms or any(x not in ("sync", "diloco") for x in algorithms):
        ap.error("--algorithms takes sync, diloco or both")
    compressions = (a.compressions.split(",") if a.compressions else
                    [EIGHT_BIT] if a.quick else list(COMPRESSIONS))
    bad = [c for c in compressions if c not in COMPRESSIONS]
    if bad:
        ap.error(f"unknown compression(s) {', '.join(bad)}; use {', '.join(COMPRESSIONS)}")
    s = Settings(quick=a.quick, algorithms=algorithms, compressions=compressions,
                 direct_peers=a.peers if a.peers is not None else (1 if a.quick else 2), nat_peers=a.nat_peers, nat_client_mode=a.nat_client_mode,
                 micro_batch=a.micro_batch, seq_len=a.seq_len,
                 inner_steps=a.inner_steps or (40 if a.quick else 100), rounds=a.rounds or (4 if a.quick else 3),
                 lr=a.lr, up_mbit=a.up_mbit, down_mbit=a.down_mbit, rtt_ms=a.rtt_ms, loss=a.loss,
                 gpu_step_s=a.gpu_step_s, cpu_step_s=a.cpu_step_s,
                 control_headroom_kbit=a.control_headroom_kbit, sync_target_batch=a.sync_target_batch,
                 equal_time_s=a.equal_time_s, run_timeout_s=a.run_timeout, keep=a.keep,
                 overlap_off_too=(a.no_overlap_run or ("off" if a.quick else "on")) == "on"
                 and "diloco" in algorithms and EIGHT_BIT in compressions)
    if s.peers < 2:
        ap.error("a swarm needs at least two peers (--peers plus --nat-peers)")
    return s


# ---- scaling ---------------------------------------------------------------------------------

def param_counts() -> tuple[int, int]:
    from training_core.models.presets import count_params, preset_config
    from training_core.models.tokenizer import bytes_tokenizer
    return (count_params(preset_config("base")),
            count_params(preset_config("tiny", vocab_size=len(bytes_tokenizer()))))


@dataclass
class Scaling:
    base_params: int
    tiny_params: int
    gpu_step_s: float
    cpu_step_s: float
    cpu_step_measured: bool
    up_ref_bps: float
    down_ref_bps: float
    control_bps: float = 0.0        # headroom for control traffic, on top of the scaled rates

    @property
    def base_exchange_s(self) -> float:
        return 4 * self.base_params * 8 / self.up_ref_bps

    @property
    def steps_per_exchange(self) -> float:
        return self.base_exchange_s / self.gpu_step_s

    @property
    def exchange_up_bps(self) -> float:
        """The uplink that makes a fp32 exchange of the tiny model cost `steps_per_exchange` steps."""
        return 4 * self.tiny_params * 8 / (self.steps_per_exchange * self.cpu_step_s)

    @property
    def exchange_down_bps(self) -> float:
        return self.exchange_up_bps * self.down_ref_bps / self.up_ref_bps

    @property
    def up_bps(self) -> float:
        return self.exchange_up_bps + self.control_bps

    @property
    def down_bps(self) -> float:
        return self.exchange_down_bps + self.control_bps

    @property
    def control_factor(self) -> float:
        """How many times control traffic outweighs the model's bytes here compared with `base` on the
        reference link."""
        return self.up_ref_bps / self.exchange_up_bps

    @property
    def exchange_s(self) -> float:
        return self.steps_per_exchange * self.cpu_step_s

    def lines(self) -> list[str]:
        return [
            f"scaling: `base` has {self.base_params / 1e6:.1f} M parameters; one fp32 exchange "
            f"({4 * self.base_params / 1e6:.0f} MB) takes {self.base_exchange_s:.0f} s over "
            f"{self.up_ref_bps / 1e6:g} Mbit/s = {self.steps_per_exchange:.0f} steps of {self.gpu_step_s:g} s",
            f"  (assumed: {GPU_NOTE})",
            f"  scratch:tiny has {self.tiny_params / 1e6:.3f} M parameters; its fp32 exchange "
            f"({4 * self.tiny_params / 1e6:.2f} MB) must take {self.steps_per_exchange:.0f} steps of "
            f"{self.cpu_step_s * 1000:.0f} ms ({'measured here' if self.cpu_step_measured else 'given'})"
            f" = {self.steps_per_exchange * self.cpu_step_s:.1f} s",
            f"  -> uplink {self.exchange_up_bps / 1e6:.3f} Mbit/s, downlink {self.exchange_down_bps / 1e6:.3f} Mbit/s "
            f"for the model (x{self.exchange_up_bps / self.up_ref_bps:.4f} of the reference link, same 1:"
            f"{self.down_ref_bps / self.up_ref_bps:g} ratio); RTT and loss unscaled",
            f"  + {self.control_bps / 1e6:.3f} Mbit/s each way for control traffic (DHT progress records, metrics: "
            f"they come with steps and seconds, not with model bytes, so on the scaled link their share would be "
            f"{self.control_factor:.0f}x the real one) -> tc rates: up {self.up_bps / 1e6:.3f} "
            f"Mbit/s, down {self.down_bps / 1e6:.3f} Mbit/s",
        ]

    def to_dict(self) -> dict:
        return {"base_params": self.base_params, "tiny_params": self.tiny_params, "gpu_step_s": self.gpu_step_s,
                "cpu_step_s": self.cpu_step_s, "cpu_step_measured": self.cpu_step_measured,
                "base_exchange_s": self.base_exchange_s, "steps_per_exchange": self.steps_per_exchange,
                "exchange_up_bps": self.exchange_up_bps, "exchange_down_bps": self.exchange_down_bps,
                "control_bps": self.control_bps, "up_bps": self.up_bps, "down_bps": self.down_bps}


# ---- one swarm run ---------------------------------------------------------------------------

@dataclass
class PeerResult:
    role: str
    nat: bool
    steps: int = 0
    samples: int = 0
    tx: int = 0
    rx: int = 0
    client_mode: bool | None = None
    utilization: float | None = None
    round_peers: int | None = None
    exchange_up: int | None = None  # what its rounds sent, by its own count (the `swarm` event's bytes_up)
    rounds: int = 0                 # diloco: outer steps applied; sync: global epochs
    failed_rounds: int = 0          # `round_failed` warnings (diloco)
    final_ckpt: str | None = None
    requested: list = field(default_factory=list)   # copies of the requested checkpoints, in order
    eval_loss: float | None = None
    eval_at: dict = field(default_factory=dict)     # label -> eval loss of a requested checkpoint
    ckpt_at: dict = field(default_factory=dict)     # label -> seconds since the run's start it was written
    error: str | None = None


@dataclass
class RunResult:
    name: str
    algorithm: str
    compression: str
    shaped: bool
    wall_s: float = 0.0                 # all peers told to start -> the last peer done
    peers: list[PeerResult] = field(default_factory=list)
    traffic: dict = field(default_factory=dict)   # role -> [tx, rx] bytes over the training window
    host: dict = field(default_factory=dict)      # the host's last epoch / state it holds, its warnings
    error: str | None = None

    @property
    def samples(self) -> int:
        return sum(p.samples for p in self.peers)

    def _per_1k(self, key) -> float | None:
        vals = [key(p) / p.samples * 1000 for p in self.peers if p.samples and key(p) is not None]
        return statistics.mean(vals) if vals else None

    @property
    def bytes_per_1k(self) -> float | None:
        """Bytes each peer sent per 1,000 samples it trained on (mean over peers), as the kernel counted."""
        return self._per_1k(lambda p: p.tx)

    @property
    def exchange_per_1k(self) -> float | None:
        """The same from the peers' own count of what their rounds sent (diloco: measured from the
        serialized messages; sync: hivemind's, estimated from tensor sizes): no control traffic, no
        state served to others."""
        return self._per_1k(lambda p: p.exchange_up)

    @property
    def utilization(self) -> float | None:
        vals = [p.utilization for p in self.peers if p.utilization is not None]
        return statistics.mean(vals) if vals else None

    @property
    def eval_loss(self) -> float | None:
        vals = [p.eval_loss for p in self.peers if p.eval_loss is not None]
        return statistics.mean(vals) if vals else None

    def eval_at(self, label: str) -> float | None:
        vals = [p.eval_at[label] for p in self.peers if label in p.eval_at]
        return statistics.mean(vals) if vals else None

    @property
    def host_share(self) -> float | None:
        """The host's bytes (sent + received) over all bytes every member sent."""
        total = sum(tx for tx, _ in self.traffic.values())
        return sum(self.traffic["host"]) / total if total and "host" in self.traffic else None

    def host_share_at_scale(self, control_factor: float) -> float | None:
        """host_share with the control traffic (everything but the rounds' own bytes and the state
        the host downloaded) divided by `control_factor`: the scaled link carries the tiny model's
        bytes as `base`'s would be carried, but control traffic comes with steps and seconds, so here
        it weighs control_factor times what it would with `base` (Scaling.lines says so). A
        projection from measured parts, not a measurement."""
        if "host" not in self.traffic or control_factor <= 0:
            return None
        host_model = float((self.host or {}).get("bytes_down") or 0)
        peers_model = sum(float(p.exchange_up or 0) for p in self.peers) + host_model
        host_all = float(sum(self.traffic["host"]))
        sent_all = float(sum(tx for tx, _ in self.traffic.values()))
        host_ctrl, sent_ctrl = max(0.0, host_all - host_model), max(0.0, sent_all - peers_model)
        total = sent_ctrl / control_factor + peers_model
        return (host_ctrl / control_factor + host_model) / total if total else None

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "peers"}
        d.update(peers=[p.__dict__ for p in self.peers], samples=self.samples, bytes_per_1k_samples=self.bytes_per_1k,
                 exchange_bytes_per_1k_samples=self.exchange_per_1k, utilization=self.utilization,
                 eval_loss=self.eval_loss, host_share=self.host_share)
        return d


class Swarm:
    """One run: the manifest, a host and the peers in their namespaces, their events and counters.

    libp2p treats 198.18.0.0/15 as unroutable and drops such addresses from what its DHT tells
    others, so peers could find the host (named in the invite) but not each other. Real home
    peers have routable addresses that the DHT does pass on; to stand in for that, every member
    gets its identity before it starts, and each peer's invite lists the host and every other
    directly reachable peer. A NAT peer's address is in no one's list: it cannot be dialed."""

    def __init__(self, lab: NetLab, s: Settings, work: Path, name: str, manifest):
        from tests.swarm_helpers import Member
        self.lab, self.s, self.name = lab, s, name
        self.dir = work / name
        self.dir.mkdir(parents=True)
        self.manifest = manifest
        (self.dir / "manifest.toml").write_text(manifest.to_toml(), encoding="utf-8")
        self.Member = Member
        self.host = None
        self.peers: dict[str, object] = {}
        self.copied: dict[tuple[str, str], Path] = {}
        self.t0: float | None = None          # when every peer was told to start training

    def cli(self, role: str, *args: str) -> list[str]:
        return self.lab.exec_argv(self.lab.nodes[role].ns) + [sys.executable, "-m", "training_core.cli", *args]

    def start_host(self) -> None:
        node = self.lab.nodes["host"]
        out = self.dir / "host-out"
        host_id = make_identity(out / "identity.key")
        self.host_maddr = f"/ip4/{node.ip}/tcp/{HOST_PORT}/p2p/{host_id}"
        self.host = self.Member("host", self.cli("host", "swarm", "host", "--manifest", str(self.dir / "manifest.toml"),
                                                 "--out", str(out), "--port", str(HOST_PORT),
                                                 "--listen-ip", node.ip, "--json"),
                                self.dir / "host", module=False)
        self.host.wait_for(lambda e: e.get("type") == "invite", timeout=240)

    def start_peers(self, bound: list[str]) -> None:
        """Launch every peer paused (a `pause` waits in its inbox before its first step), so that
        they all start training together once all have joined: `resume_all`."""
        from training_core.swarm.manifest import make_invite
        roles = peer_roles(self.s)
        maddrs = {}
        for role in roles:
            home = self.dir / role
            peer_id = make_identity(home / "data" / "swarm" / "identity.key")
            if not role.startswith("nat"):
                maddrs[role] = f"/ip4/{self.lab.nodes[role].ip}/tcp/{PEER_PORT}/p2p/{peer_id}"
        for role in roles:
            node = self.lab.nodes[role]
            invite = self.dir / f"{role}-invite.txt"
            others = [m for r, m in maddrs.items() if r != role]
            invite.write_text(make_invite(self.manifest, [self.host_maddr, *others]) + "\n", encoding="utf-8")
            mode = self.s.nat_client_mode if role.startswith("nat") else "auto"
            m = self.Member(role, self.cli(role, "swarm", "join", "--json", "--threads", "1", "--listen-ip", node.ip,
                                           "--port", str(PEER_PORT), "--invite-file", str(invite),
                                           "--client-mode", mode, *bound),
                            self.dir / role, module=False)
            m.send("pause")
            self.peers[role] = m

    def wait_all_paused(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for role, m in self.peers.items():
            m.wait_for(lambda e: e.get("type") in ("paused", "failed", "finished"),
                       timeout=max(1.0, deadline - time.monotonic()))
            failed = [e for e in m.of("failed")]
            if failed:
                raise RuntimeError(f"{role} failed while joining: {failed[-1].get('message')}")

    def resume_all(self) -> None:
        self.t0 = time.monotonic()
        for m in self.peers.values():
            m.send("resume")

    def counters(self) -> dict[str, tuple[int, int]]:
        return {role: self.lab.counters(role) for role in ["host", *peer_roles(self.s)]}

    def done(self, member) -> bool:
        return member.proc.poll() is not None or any(e.get("type") in ("finished", "stopped", "failed")
                                                     for _, e in member.events)

    def copy_checkpoints(self) -> None:
        """Copy each requested checkpoint's model as soon as it appears (the run keeps only two)."""
        for role, m in self.peers.items():
            for i, (t, e) in enumerate(list(m.events)):
                if e.get("type") == "checkpoint" and e.get("reason") == "requested":
                    key = (role, str(i))     # two requests may land on one step, so one path: copy each
                    if key not in self.copied and Path(e["path"], "model").is_dir():
                        dest = self.dir / "ckpts" / f"{role}-{len(self.requested(role)):02d}"
                        shutil.copytree(Path(e["path"], "model"), dest, dirs_exist_ok=True)
                        self.copied[key] = dest
                        self._times.setdefault(role, []).append(t - (self.t0 or t))

    _times: dict = {}

    def requested(self, role: str) -> list[Path]:
        return [d for (r, _), d in self.copied.items() if r == role]

    def save_logs(self) -> None:
        for m in [*self.peers.values(), self.host]:
            if m is not None:
                (m.home / "events.jsonl").write_text("".join(m.lines), encoding="utf-8")

    def kill_all(self) -> None:
        for m in [*self.peers.values(), self.host]:
            if m is not None:
                m.kill()

    def stop_all(self) -> None:
        for m in [*self.peers.values(), self.host]:
            if m is not None and m.proc.poll() is None:
                try:
                    m.send("stop")
                except (BrokenPipeError, OSError, ValueError):
                    pass
        for m in [*self.peers.values(), self.host]:
            if m is None:
                continue
            try:
                m.finish(timeout=30)
            except subprocess.TimeoutExpired:
                m.kill()


def make_identity(path: Path) -> str:
    """A libp2p identity at `path` (made if missing, as hivemind makes one); its peer id."""
    from hivemind.p2p import P2P, PeerID
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        P2P.generate_identity(str(path))
    return PeerID.from_identity(path.read_bytes()).to_base58()


def peer_roles(s: Settings) -> list[str]:
    return [f"peer{i + 1}" for i in range(s.direct_peers)] + [f"nat{i + 1}" for i in range(s.nat_peers)]


def make_manifest(s: Settings, name: str, algorithm: str, compression: str, exchange_s: float, shaped: bool,
                  overlap: bool = True):
    from training_core.swarm.manifest import SwarmManifest
    target = s.sync_target_batch or s.peers * s.micro_batch
    # On the shaped link an all-reduce moves about two fp32 exchanges' worth (uncompressed), and the
    # host's state downloads compete for the same uplinks: time-outs well above that, so that slow
    # rounds finish instead of being abandoned.
    timeout = max(30.0, 4 * exchange_s) if shaped else 10.0
    kwargs = dict(run_id=f"wan-{name}", model="scratch:tiny", data={"source": "bundled", "path": "demo/stories"},
                  algorithm=algorithm, tokenizer="bytes", seq_len=s.seq_len, micro_batch=s.micro_batch,
                  target_batch_size=target, compression=compression,
                  optimizer={"name": "adamw", "lr": s.lr, "betas": [0.9, 0.95], "weight_decay": 0.0},
                  schedule={"name": "constant", "warmup_epochs": 0, "total_epochs": 100000},
                  matchmaking_time=0.5 if algorithm == "sync" else 2.0, averaging_timeout=timeout)
    if algorithm == "diloco":
        kwargs["diloco"] = {"inner_steps": s.inner_steps, "outer_lr": 0.7, "outer_momentum": 0.9,
                            "max_round_s": max(600.0, 10 * exchange_s), "overlap": overlap}
    return SwarmManifest(**kwargs)


def set_link(lab: NetLab, s: Settings, scaling: Scaling | None) -> None:
    """The shaped home link (rates, RTT, loss), or with None no impairment at all."""
    profile = Shaping(scaling.up_bps, scaling.down_bps) if scaling else Shaping()
    for role in ["host", *peer_roles(s)]:
        lab.reshape(role, profile)
    if scaling:
        lab.impair(s.rtt_ms / 2, s.loss)
    else:
        lab.impair(0, 0)


def probe(lab: NetLab, s: Settings, work: Path, log=print) -> dict:
    """A swarm that trains without ever exchanging (DiLoCo, one endless round), the rate limit
    lifted: the step time of the peers as they run in every other run (all at once, beside the
    host and their network daemons), and the control traffic every member sends meanwhile."""
    from dataclasses import replace
    manifest = make_manifest(replace(s, inner_steps=100_000), "probe", "diloco", EIGHT_BIT, 30.0, False)
    manifest.diloco["max_round_s"] = 86400.0
    sw = Swarm(lab, s, work, "probe", manifest)
    set_link(lab, s, None)
    try:
        sw.start_host()
        sw.start_peers([])
        sw.wait_all_paused(timeout=300)
        sw.resume_all()
        time.sleep(8.0)        # first steps, first DHT records
        c0, t0 = sw.counters(), time.monotonic()
        mark = time.monotonic()
        time.sleep(8.0 if s.quick else 15.0)
        c1, t1 = sw.counters(), time.monotonic()
        time.sleep(2.5)        # a `swarm` event after the window
        steps_s, rate = [], {}
        for role, m in sw.peers.items():
            ev = [(t, e) for t, e in m.events if e.get("type") == "swarm" and e.get("compute_s") is not None]
            a = [e for t, e in ev if t <= mark]
            b = [e for t, e in ev if t >= t1]
            if a and b and b[0]["samples_contributed"] > a[-1]["samples_contributed"]:
                steps = (b[0]["samples_contributed"] - a[-1]["samples_contributed"]) / s.micro_batch
                steps_s.append((b[0]["compute_s"] - a[-1]["compute_s"]) / steps)
                rate[role] = steps / (b[0]["wall_s"] - a[-1]["wall_s"])
        if len(rate) < len(sw.peers):
            raise RuntimeError("the probe swarm did not train; see its logs (--keep)")
        rates = {r: [(c1[r][i] - c0[r][i]) / (t1 - t0) for i in (0, 1)] for r in c1}   # bytes/s
        # Control traffic comes with steps (a progress record per step): bytes per step, a peer's per
        # step of its own, the host's per step of any peer.
        per_step = {r: [v / (rate[r] if r in rate else sum(rate.values())) for v in rates[r]] for r in rates}
        return {"cpu_step_s": statistics.median(steps_s), "peer_step_s": steps_s, "control_Bps": rates,
                "control_B_per_step": per_step, "steps_per_s": rate}
    except BaseException:
        sw.kill_all()
        raise
    finally:
        sw.stop_all()
        sw.save_logs()


def checkpoint_times(at: dict[str, float] | None) -> list[float]:
    """The distinct times (0.1 s apart or more) at which to ask for a checkpoint, in order."""
    return sorted({round(v, 1) for v in (at or {}).values()})


def run_swarm(lab: NetLab, s: Settings, work: Path, name: str, algorithm: str, compression: str, shaped: bool,
              scaling: Scaling, checkpoint_at: dict[str, float] | None = None, log=print,
              overlap: bool = True) -> RunResult:
    """A host and the peers, all peers starting to train at once; bounded by K steps per peer, or
    (with `checkpoint_at`: label -> seconds after the start) checkpointed at those times, then stopped."""
    result = RunResult(name, algorithm, compression, shaped)
    exchange_s = scaling.exchange_s
    sw = Swarm(lab, s, work, name, make_manifest(s, name, algorithm, compression, exchange_s, shaped, overlap))
    sw._times = {}
    set_link(lab, s, scaling if shaped else None)
    try:
        sw.start_host()
        sw.start_peers([] if checkpoint_at else ["--steps", str(s.steps)])
        sw.wait_all_paused(timeout=300)
        before = sw.counters()    # the window starts with training: joining is not counted
        sw.resume_all()
        pending = checkpoint_times(checkpoint_at)
        grace = max(30.0, exchange_s)      # for a sync step in flight on the shaped link to end
        deadline = time.monotonic() + s.run_timeout_s
        last_note = time.monotonic()
        while True:
            time.sleep(0.25)
            if not lab.delayer_alive():
                raise RuntimeError("the delaying router died")
            sw.copy_checkpoints()
            now = time.monotonic()
            if pending and now - sw.t0 >= pending[0]:
                pending.pop(0)
                for m in sw.peers.values():
                    if not sw.done(m):
                        m.send("checkpoint")
            if checkpoint_at and not pending and (all(
                    len(sw.requested(role)) >= len(checkpoint_times(checkpoint_at)) or sw.done(m)
                    for role, m in sw.peers.items())
                    or now - sw.t0 > max(checkpoint_at.values()) + grace):
                break   # a peer stuck in a round past the grace has no figure for the last time
            if all(sw.done(m) for m in sw.peers.values()):
                break
            if now > deadline:
                result.error = f"timed out after {s.run_timeout_s:.0f} s"
                break
            if now - last_note > 30:
                last_note = now
                steps = {r: max([e.get("step", 0) for e in m.of("step")] or [0]) for r, m in sw.peers.items()}
                log(f"    {name}: {now - sw.t0:5.0f} s, steps {steps}")
        t_end = time.monotonic()
        for m in sw.peers.values():
            if not sw.done(m):
                m.send("stop")
        for m in sw.peers.values():
            try:
                m.wait_for(lambda e: e.get("type") in ("finished", "stopped", "failed"), timeout=60)
            except AssertionError:
                pass
        sw.copy_checkpoints()
        ends = [t for m in sw.peers.values() for t, e in m.events if e.get("type") in ("finished", "stopped")]
        if not checkpoint_at and ends:
            t_end = max(ends)
        after = sw.counters()
        result.wall_s = t_end - sw.t0
        for role, m in sw.peers.items():
            result.peers.append(peer_result(role, m, sw, before, after, s))
        result.traffic = {r: [after[r][0] - before[r][0], after[r][1] - before[r][1]] for r in after}
    except Exception as exc:   # one broken run must not lose the others' figures
        result.error = f"{type(exc).__name__}: {exc}"
    except BaseException:      # Ctrl-C, SIGTERM: no graceful stops, the network goes down next
        sw.kill_all()
        raise
    finally:
        sw.stop_all()
        sw.save_logs()
        if sw.host is not None:
            last = ([e for e in sw.host.of("swarm")] or [{}])[-1]
            warnings: dict[str, int] = {}
            for e in sw.host.of("warning"):
                warnings[e.get("code")] = warnings.get(e.get("code"), 0) + 1
            result.host = {"host_epoch": last.get("host_epoch"), "swarm_epoch": last.get("epoch"),
                           "bytes_down": last.get("bytes_down"),
                           "warnings": warnings,
                           "last_warning": ([e.get("message") for e in sw.host.of("warning")] or [None])[-1]}
        if result.error:
            for role, m in [("host", sw.host), *sw.peers.items()]:
                if m is not None:
                    log(f"    {role} stderr tail: {m.stderr_tail(600)}")
    return result


def peer_result(role: str, m, sw: Swarm, before: dict, after: dict, s: Settings) -> PeerResult:
    r = PeerResult(role, nat=role.startswith("nat"))
    ends = [e for _, e in m.events if e.get("type") in ("finished", "stopped")]
    r.steps = max([e.get("step", 0) for _, e in m.events if e.get("type") in ("step", "finished", "stopped")] or [0])
    swarm = [e for _, e in m.events if e.get("type") == "swarm"]
    contributed = max([e.get("samples_contributed", 0) for e in swarm] or [0])
    r.samples = max(r.steps * s.micro_batch, contributed)
    r.tx = after[role][0] - before[role][0]
    r.rx = after[role][1] - before[role][1]
    modes = [e.get("client_mode") for e in swarm if e.get("client_mode") is not None]
    r.client_mode = modes[-1] if modes else None
    r.round_peers = max([e.get("round_peers") or 0 for e in swarm] or [0]) or None
    r.exchange_up = max([e.get("bytes_up") or 0 for e in swarm] or [0])
    r.failed_rounds = len([1 for _, e in m.events if e.get("type") == "warning" and e.get("code") == "round_failed"])
    r.rounds = max([e.get("round") if e.get("round") is not None else e.get("epoch") or 0 for e in swarm] or [0])
    failed = [e for _, e in m.events if e.get("type") == "failed"]
    if failed:
        r.error = f"{failed[-1].get('code')}: {failed[-1].get('message')}"
    elif not ends:
        r.error = f"no finished/stopped event (exit {m.proc.poll()}): {m.stderr_tail(300)}"
    # Utilization: compute_s (forward, backward, inner optimizer) over wall_s (training time, pauses
    # excluded), both the peer's own totals in its last `swarm` event.
    last = next((e for e in reversed(swarm) if e.get("compute_s") is not None and e.get("wall_s")), None)
    if last is not None:
        r.utilization = last["compute_s"] / last["wall_s"]
    final = [e.get("checkpoint") for e in ends if e.get("checkpoint")]
    r.final_ckpt = final[-1] if final else None
    r.ckpt_at = {i: t for i, t in enumerate(sw._times.get(role, []))}
    r.requested = [str(d) for d in sw.requested(role)]
    return r


# ---- eval ------------------------------------------------------------------------------------

class Evaluator:
    """Eval loss of a saved model on the held-out blocks of the peers' own split."""

    def __init__(self, s: Settings, cache: Path):
        import torch
        from training_core.data import build_dataset
        from training_core.models.tokenizer import bytes_tokenizer
        from training_core.swarm.manifest import bundled_path
        torch.set_num_threads(1)
        self.torch = torch
        self.data = build_dataset([str(bundled_path("demo/stories"))], bytes_tokenizer(), s.seq_len,
                                  eval_fraction=0.02, seed=0, cache_dir=cache)
        self.batch = s.micro_batch

    def __call__(self, model_dir: Path) -> float:
        import numpy as np
        from transformers import AutoModelForCausalLM
        torch = self.torch
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
        model.eval()
        n, total = self.data.num_eval, 0.0
        with torch.no_grad():
            for start in range(0, n, self.batch):
                idx = range(start, min(n, start + self.batch))
                batch = torch.from_numpy(np.stack([self.data.eval_block(i) for i in idx]))
                total += model(input_ids=batch, labels=batch).loss.float().item() * len(idx)
        return total / n


def evaluate_run(run: RunResult, evaluate: Evaluator, at: dict[str, float] | None = None) -> None:
    """Each peer's final checkpoint, and for each label of `at` the checkpoint requested at its time."""
    times = checkpoint_times(at)
    for p in run.peers:
        if p.final_ckpt and Path(p.final_ckpt, "model").is_dir():
            p.eval_loss = evaluate(Path(p.final_ckpt, "model"))
        written = dict(p.ckpt_at)
        p.ckpt_at = {}
        for label, when in (at or {}).items():
            i = times.index(round(when, 1))
            if i < len(p.requested):
                p.eval_at[label] = evaluate(Path(p.requested[i]))
                p.ckpt_at[label] = written.get(i)


# ---- the benchmark ---------------------------------------------------------------------------

def fmt_bytes(b: float | None) -> str:
    if b is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if abs(b) < 1000 or unit == "GB":
            return f"{b:.1f} {unit}" if unit != "B" else f"{b:.0f} B"
        b /= 1000
    return "-"


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def main(argv: list[str] | None = None) -> int:
    s = parse_args(argv)
    problems = missing_requirements()
    if problems:
        print("swarm_wan.py cannot run here:", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 2

    from bench.engine_throughput import OtherCPU
    others = OtherCPU()
    t_start = time.monotonic()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    for name in leftover_namespaces():   # left by a run of this script that was killed
        log(f"removing {name}, left by an earlier run that was killed")
        remove_namespace(name)
    work = Path(tempfile.mkdtemp(prefix="modron-swarm-wan-"))
    lab = None
    runs: list[RunResult] = []
    try:
        base_params, tiny_params = param_counts()
        lab = NetLab()
        lab.add_leaf("host", Shaping())
        for role in peer_roles(s):
            if role.startswith("nat"):
                lab.add_nat_leaf(role, Shaping())
            else:
                lab.add_leaf(role, Shaping())
        log(f"network: {len(lab.namespaces)} namespaces ({', '.join(n.role + ' ' + n.ip for n in lab.nodes.values())}); "
            f"RTT {s.rtt_ms:g} ms, loss {s.loss:.2%}")
        log("probe: the swarm trains without exchanging, rate limit lifted: step time and control traffic ...")
        found = probe(lab, s, work, log=log)
        control = max(tx for tx, _ in found["control_Bps"].values()) * 8
        if s.control_headroom_kbit is not None:
            control = s.control_headroom_kbit * 1e3
        measured = s.cpu_step_s is None
        scaling = Scaling(base_params, tiny_params, s.gpu_step_s, found["cpu_step_s"] if measured else s.cpu_step_s,
                          measured, s.up_mbit * 1e6, s.down_mbit * 1e6, control)
        log(f"  peers' step time {', '.join(f'{x * 1000:.0f}' for x in found['peer_step_s'])} ms; control traffic "
            + ", ".join(f"{r} {v[0] * 8 / 1e3:.0f}" for r, v in found["control_Bps"].items())
            + " kbit/s sent (a peer's per step: "
            + ", ".join(f"{found['control_B_per_step'][r][0] / 1e3:.1f}" for r in peer_roles(s)) + " kB)")
        for line in scaling.lines():
            log(line)
        first = peer_roles(s)[0]
        set_link(lab, s, scaling)
        net = {"rtt_s": lab.probe_rtt(first, "host"), "rtt_nat_s": lab.probe_rtt(peer_roles(s)[-1], "host"),
               "up_bps": lab.probe_rate(first, "host", 3.0), "probe": found}
        log(f"  link check: RTT {net['rtt_s'] * 1000:.1f} ms (NAT peer {net['rtt_nat_s'] * 1000:.1f} ms), one TCP "
            f"stream up {net['up_bps'] / 1e6:.3f} Mbit/s (tbf rate {scaling.up_bps / 1e6:.3f}, payload only)")

        evaluate = Evaluator(s, work / "eval-cache")
        sync_open = sync_shaped = None
        if "sync" in s.algorithms and not s.quick:
            log(f"run sync-open: sync, rate limit lifted, {s.steps} steps per peer ...")
            sync_open = run_swarm(lab, s, work, "sync-open", "sync", "float16", False, scaling,
                                 log=log)
            evaluate_run(sync_open, evaluate)
            runs.append(sync_open)
            log(f"    done in {sync_open.wall_s:.0f} s" + (f"; error: {sync_open.error}" if sync_open.error else ""))
        diloco_runs = []
        if "diloco" in s.algorithms:
            for comp in s.compressions:
                name = f"diloco-{comp}"
                log(f"run {name}: shaped link, {s.rounds} rounds of {s.inner_steps} steps per peer ...")
                r = run_swarm(lab, s, work, name, "diloco", comp, True, scaling, log=log)
                evaluate_run(r, evaluate)
                runs.append(r)
                diloco_runs.append(r)
                log(f"    done in {r.wall_s:.0f} s" + (f"; error: {r.error}" if r.error else ""))
        serial = None
        if s.overlap_off_too:
            name = f"diloco-{EIGHT_BIT}-no-overlap"
            log(f"run {name}: as diloco-{EIGHT_BIT}, each exchange waited for ...")
            serial = run_swarm(lab, s, work, name, "diloco", EIGHT_BIT, True, scaling, log=log, overlap=False)
            evaluate_run(serial, evaluate)
            runs.append(serial)
            log(f"    done in {serial.wall_s:.0f} s" + (f"; error: {serial.error}" if serial.error else ""))
        if "sync" in s.algorithms:
            at = {r.name: r.wall_s for r in diloco_runs if not r.error and r.wall_s > 0}
            if not at:
                at = {"equal-time": s.equal_time_s or (60.0 if s.quick else 120.0)}
            log(f"run sync-shaped: sync on the shaped link, checkpoints at "
                f"{', '.join(f'{v:.0f} s' for v in at.values())} ...")
            sync_shaped = run_swarm(lab, s, work, "sync-shaped", "sync", "float16", True, scaling,
                                    checkpoint_at=at, log=log)
            evaluate_run(sync_shaped, evaluate, at)
            runs.append(sync_shaped)
        report = build_report(s, scaling, net, runs, sync_open, sync_shaped, diloco_runs)
        r8 = next((r for r in diloco_runs if r.compression == EIGHT_BIT), None)
        if serial is not None and r8 is not None and serial.eval_loss and r8.eval_loss:
            # Same samples, same link: what the delayed outer step costs (or saves) in loss, and in time.
            report["overlap"] = {"eval_loss_overlap_over_serial": r8.eval_loss / serial.eval_loss,
                                 "wall_s_overlap": r8.wall_s, "wall_s_serial": serial.wall_s,
                                 "utilization_overlap": r8.utilization, "utilization_serial": serial.utilization}
        report["other_processes_cpus"] = others.read()
        report["wall_s"] = round(time.monotonic() - t_start, 1)
        print(json.dumps(report))
        print_report(report, s, scaling, runs, sync_open, sync_shaped, diloco_runs)
        return 0 if not any(r.error for r in runs) else 1
    except KeyboardInterrupt:
        log("interrupted; tearing the network down")
        return 130
    except LabError as exc:
        log(f"network set-up failed: {exc}")
        return 2
    finally:
        if lab is not None:
            lab.close()
        if s.keep:
            log(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def build_report(s, scaling, net, runs, sync_open, sync_shaped, diloco_runs) -> dict:
    ratios = {}
    sync_ref = sync_open or sync_shaped     # --quick has no sync-open run: sync's traffic from the shaped one
    for r in diloco_runs:
        d = {}
        if sync_ref and sync_ref.bytes_per_1k and r.bytes_per_1k:
            d["sync_bytes_over_diloco"] = sync_ref.bytes_per_1k / r.bytes_per_1k
        if sync_ref and sync_ref.exchange_per_1k and r.exchange_per_1k:
            d["sync_exchange_bytes_over_diloco"] = sync_ref.exchange_per_1k / r.exchange_per_1k
        if sync_open and sync_open.eval_loss and r.eval_loss:
            d["eval_loss_equal_samples_vs_sync"] = r.eval_loss / sync_open.eval_loss
        if sync_shaped and sync_shaped.eval_at(r.name) and r.eval_loss:
            d["eval_loss_equal_time_vs_sync"] = r.eval_loss / sync_shaped.eval_at(r.name)
        ratios[r.name] = d
    nat = {}
    for r in runs:
        direct = [p for p in r.peers if not p.nat]
        for p in r.peers:
            if p.nat:
                nat[r.name] = {"peer": p.role, "client_mode": p.client_mode, "samples": p.samples,
                               "error": p.error, "own_largest_group": p.round_peers,
                               "others_largest_group": max([q.round_peers or 0 for q in direct] or [0]),
                               "peers": len(r.peers)}
    eight = ratios.get(f"diloco-{EIGHT_BIT}", {})
    r8 = next((r for r in diloco_runs if r.compression == EIGHT_BIT), None)
    checks = {}
    if r8 is not None:
        checks = {
            "bytes_100x": (eight.get("sync_bytes_over_diloco") or 0) >= 100,
            "exchange_bytes_100x": (eight.get("sync_exchange_bytes_over_diloco") or 0) >= 100,
            "utilization_90": (r8.utilization or 0) >= 0.9,
            "equal_samples_within_5pct": (eight.get("eval_loss_equal_samples_vs_sync") or 9) <= 1.05,
            "equal_time_lower": (eight.get("eval_loss_equal_time_vs_sync") or 9) < 1.0,
            "host_share_small_at_scale": (r8.host_share_at_scale(scaling.control_factor) or 1) <= HOST_SHARE_SMALL,
            "nat_client_and_contributes": bool(nat.get(r8.name, {}).get("client_mode")) and
                                          nat.get(r8.name, {}).get("samples", 0) > 0 and
                                          nat.get(r8.name, {}).get("others_largest_group", 0) >= len(r8.peers),
        }
    return {"bench": "swarm_wan", "settings": dict(s.__dict__), "scaling": scaling.to_dict(),
            "network": net, "runs": [dict(r.to_dict(), host_share_at_scale=r.host_share_at_scale(scaling.control_factor))
                                       for r in runs], "ratios": ratios, "nat": nat, "checks": checks,
            "targets": {"sync_bytes_over_diloco_8bit": 100, "utilization": 0.9,
                        "eval_loss_equal_samples_vs_sync": 1.05, "eval_loss_equal_time_vs_sync": 1.0,
                        "host_share_at_scale": HOST_SHARE_SMALL},
            "cpus": os.cpu_count()}


def print_report(report, s, scaling, runs, sync_open, sync_shaped, diloco_runs) -> None:
    print(f"swarm_wan: scratch:tiny, micro-batch {s.micro_batch} x {s.seq_len}, {s.direct_peers} direct peer(s) + "
          f"{s.nat_peers} behind NAT (client mode {s.nat_client_mode}) + host, one torch thread each, "
          f"{os.cpu_count()} CPUs; K = {s.steps} steps per peer; diloco {s.rounds} rounds x {s.inner_steps} inner "
          f"steps; sync target batch {s.sync_target_batch or s.peers * s.micro_batch} (one micro-batch per peer "
          f"per step)")
    for line in scaling.lines():
        print(line)
    n = report["network"]
    print(f"  link check: RTT {n['rtt_s'] * 1000:.1f} ms, one TCP stream up {n['up_bps'] / 1e6:.3f} Mbit/s")
    print(f"  {'run':22s} {'wall':>6s} {'samples':>7s} {'rounds':>6s} {'sent/peer/1k samples':>21s} {'util':>5s} "
          f"{'eval loss':>9s} {'host share':>13s}")
    print(f"  {'':22s} {'s':>6s} {'':>7s} {'':>6s} {'all':>10s} {'exchange':>10s} {'':>5s} {'':>9s} "
          f"{'here':>6s} {'base':>6s}")
    for r in runs:
        rounds = [p.rounds for p in r.peers]
        print(f"  {r.name:22s} {r.wall_s:6.0f} {r.samples:7d} {max(rounds or [0]):6d} {fmt_bytes(r.bytes_per_1k):>10s} "
              f"{fmt_bytes(r.exchange_per_1k):>10s} {fmt(r.utilization, '.0%'):>5s} {fmt(r.eval_loss):>9s} "
              f"{fmt(r.host_share, '.0%'):>6s} {fmt(r.host_share_at_scale(scaling.control_factor), '.1%'):>6s}"
              + (f"  ERROR {r.error}" if r.error else ""))
    print("  (sync-open: rate limit lifted, the equal-samples baseline; others on the shaped link; eval loss of each "
          "peer's final checkpoint, mean over peers; rounds: diloco outer steps applied, sync global epochs (most "
          "any peer reached); sent 'all': kernel counters, 'exchange': the peers' own count of their rounds' bytes; "
          "host share: the host's bytes sent and received over all bytes sent, 'here' as measured, 'base' with the "
          f"control traffic divided by {scaling.control_factor:.0f} (its weight on this scaled link), a projection)")
    if sync_shaped:
        for r in diloco_runs:
            v = sync_shaped.eval_at(r.name)
            when = [p.ckpt_at.get(r.name) for p in sync_shaped.peers if p.ckpt_at.get(r.name) is not None]
            if v is not None:
                print(f"  sync-shaped at {r.wall_s:.0f} s ({r.name}'s wall time; checkpoints written at "
                      f"{', '.join(f'{t:.0f}' for t in when)} s): eval loss {v:.3f}")
    for name, d in report["ratios"].items():
        print(f"  {name}: sync's bytes per sample / its: {fmt(d.get('sync_bytes_over_diloco'), '.0f')}x all, "
              f"{fmt(d.get('sync_exchange_bytes_over_diloco'), '.0f')}x exchange; eval loss / sync's at equal samples "
              f"{fmt(d.get('eval_loss_equal_samples_vs_sync'))}, at equal wall-clock "
              f"{fmt(d.get('eval_loss_equal_time_vs_sync'))}")
    o = report.get("overlap")
    if o:
        print(f"  overlap (diloco-{EIGHT_BIT} vs -no-overlap, same samples): eval loss x{o['eval_loss_overlap_over_serial']:.3f}, "
              f"wall {o['wall_s_overlap']:.0f} s vs {o['wall_s_serial']:.0f} s, utilization "
              f"{fmt(o['utilization_overlap'], '.0%')} vs {fmt(o['utilization_serial'], '.0%')}")
    for name, d in report["nat"].items():
        print(f"  {name}: NAT peer {d['peer']}: client mode {d['client_mode']}, {d['samples']} samples, largest "
              f"group it saw {d['own_largest_group']}, the others saw {d['others_largest_group']} of {d['peers']}"
              + (f"; error: {d['error']}" if d["error"] else ""))
    for r in runs:
        if r.algorithm == "diloco":
            print(f"  {r.name}: outer steps applied per peer " + ", ".join(f"{p.role} {p.rounds}" for p in r.peers)
                  + "; failed rounds " + ", ".join(f"{p.role} {p.failed_rounds}" for p in r.peers))
        if r.host:
            print(f"  {r.name}: host holds the state of epoch {r.host.get('host_epoch')} (swarm at "
                  f"{r.host.get('swarm_epoch')}); host warnings {r.host.get('warnings') or 'none'}"
                  + (f"; last: {r.host['last_warning'][:160]}" if r.host.get("last_warning") else ""))
    if report["checks"]:
        print("  targets (diloco with 8-bit): " + ", ".join(f"{k} {'PASS' if v else 'FAIL'}"
                                                           for k, v in report["checks"].items()))
    print(f"  other processes kept {report['other_processes_cpus']:.2f} of {os.cpu_count()} CPUs busy on average; "
          f"total {report['wall_s']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
