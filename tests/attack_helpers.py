"""Attacks on a loopback DiLoCo swarm (issue 10, point 5), shared by tests/test_swarm_attacks.py and
bench/swarm_attacks.py.

The swarm: two honest peers, each an in-process `DiLoCoRounds` on its own DHT (127.0.0.1 only), train
one small MLP on a fixed task (a random teacher network's classes of Gaussian inputs). Each peer walks
its own deterministic stream of batches, so a clean run and an attacked one see the same samples.
Inner steps are AdamW, paced to at least `step_s`; rounds are a real peer's (float16 pseudo-gradients,
robust all-reduce, outer Nesterov), without overlap. Records are judged with the limits a manifest for
scratch:small at seq_len 128 gives (guards.RecordLimits). A host-side reader reads the swarm's metrics
records the way the host does (metrics.MetricsReader, SwarmSummary) and the honest DHT's refusals
(admission.Refusals).

The attackers, each on its own DHT on 127.0.0.1:
- noise, x-100, 1e30, inf: a third peer that trains alike but whose averager replaces what it sends
  with noise (std 1, the size of the weights), -100x its pseudo-gradient, 1e30 or +inf (the float16
  codec clamps those two to 65504 on the way out, as hivemind's does);
- wrong-shape: a third peer that sends parts with more values than the group agreed on, and as a
  reducer returns averages of the wrong size;
- epoch-1key, epoch-2keys: one or two signers storing progress records for epoch 10**6;
- samples: one signer claiming 10**9 samples at the swarm's current epoch;
- metrics: one signer publishing metrics records with 10**12 samples, 10**9 samples/s, loss 0.001
  and epoch 10**6;
- wrong-token: a private swarm (admission credentials); the attacker holds a credential for this run
  id signed by another issuer, and runs a noise peer and forged epoch records through its own DHT.

run_attack(...) returns what the test asserts and the bench prints: the honest peers' final eval loss
and finiteness, their longest stall (the longest time in which a peer applied no outer step, from its
first step to its last), the warnings they and the host-side reader emitted, and the names the
attacker goes by (its peer id, or its signer name for records).
"""
from __future__ import annotations

import json
import math
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

GRADIENT_ATTACKS = ("noise", "x-100", "1e30", "inf", "wrong-shape")
RECORD_ATTACKS = ("epoch-1key", "epoch-2keys", "samples", "metrics")
ATTACKS = GRADIENT_ATTACKS + RECORD_ATTACKS + ("wrong-token",)
# The forgers each record attack starts (one signer each). "records" is epoch-2keys, samples and
# metrics at once (four signers): the suite runs it instead of the four forged-record attacks apart
# (three runs less, ~65 s; epoch-1key is the weaker half of epoch-2keys); the bench runs each alone.
FORGERS = {"epoch-1key": ("epoch",), "epoch-2keys": ("epoch", "epoch"), "samples": ("samples",),
           "metrics": ("metrics",), "records": ("epoch", "epoch", "samples", "metrics")}
# 1e30 is left out of the suite: under its float16 compression the attacker's codec clamps 1e30 and inf
# alike to 65504, so the two runs send the same bytes (the bench runs both, and `--compression none`;
# tests/test_swarm_robust.py sends 1e30 itself to the reducer).
SUITE_ATTACKS = tuple(a for a in GRADIENT_ATTACKS if a != "1e30") + ("records", "wrong-token")
FORGED_EPOCH = 10 ** 6
FORGED_SAMPLES = 10 ** 9
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]      # never any other address
ACCUSATIONS = ("peer_clipped", "peer_rejected", "peer_refused")   # the warnings that name a culprit
D_IN, HIDDEN, TEACHER_HIDDEN, CLASSES = 16, 32, 64, 4
EVAL_SAMPLES = 4096


@dataclass(frozen=True)
class Config:
    steps: int = 120              # inner steps per honest peer (the same samples in every run)
    inner_steps: int = 10
    micro_batch: int = 16
    step_s: float = 0.03          # an inner step takes at least this long
    compression: str = "float16"  # the manifest's default
    matchmaking_time: float = 1.0
    averaging_timeout: float = 6.0
    max_round_s: float = 30.0
    inner_lr: float = 3e-3
    skew: float = 0.8             # share of each honest peer's samples from its own two classes
    settle_s: float = 1.0         # after inner_steps in a round, wait up to this for the others
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    seed: int = 0


@dataclass
class Result:
    attack: str
    eval_loss: list[float]                    # per honest peer, its final weights
    finite: bool                              # every honest weight, local and outer
    rounds: list[int]                         # outer steps each honest peer applied
    longest_stall_s: float                    # the longest time an honest peer applied no outer step
    wall_s: float
    warnings: list[tuple[str, str, str]]      # (who: a | b | host, code, message)
    attacker: list[str] = field(default_factory=list)   # how the attacker(s) can be named
    honest_ids: list[str] = field(default_factory=list)  # the honest peers' ids and signer names
    summary: object = None                    # the host-side reader's last metrics.SwarmSummary
    honest_samples: int = 0                   # what the honest peers' metrics records claimed, last
    honest_losses: list[float] = field(default_factory=list)
    num_peers: list[int] = field(default_factory=list)   # the most peers each honest tracker counted

    @property
    def loss(self) -> float:
        return max(self.eval_loss)

    def accusations(self) -> list[str]:
        return [m for _, code, m in self.warnings if code in ACCUSATIONS]

    def named(self) -> dict[str, bool]:
        """Attacker name -> whether some honest warning accuses it."""
        return {n: any(n in m for m in self.accusations()) for n in self.attacker}

    def blamed_honest(self) -> list[str]:
        """Honest peers that some warning accuses (a failed round that names its reducer is no accusation)."""
        return [n for n in self.honest_ids if any(n in m for m in self.accusations())]


# ---- the task -------------------------------------------------------------------------------------
_TEACHER: list[torch.Tensor] = []


def _teacher() -> list[torch.Tensor]:
    if not _TEACHER:
        g = torch.Generator().manual_seed(1234)
        _TEACHER.extend([torch.randn(D_IN, TEACHER_HIDDEN, generator=g),
                         torch.randn(TEACHER_HIDDEN, CLASSES, generator=g)])
    return _TEACHER


def _labelled(gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    w1, w2 = _teacher()
    x = torch.randn(n, D_IN, generator=gen)
    return x, (torch.tanh(x @ w1) @ w2).argmax(dim=1)


def make_batch(gen: torch.Generator, n: int, favour: tuple[int, ...] = (), share: float = 0.0):
    """n samples; with `favour`, round(share * n) of them from those classes, the rest from the others
    (each peer sees mostly its own classes: training alone does worse on the whole task than the swarm)."""
    if not favour:
        return _labelled(gen, n)
    want = round(share * n)
    xs, ys, mine, other = [], [], 0, 0
    while mine < want or other < n - want:
        x, y = _labelled(gen, 4 * n)
        for xi, yi in zip(x, y):
            fav = int(yi) in favour
            if (fav and mine < want) or (not fav and other < n - want):
                xs.append(xi)
                ys.append(yi)
                mine, other = mine + fav, other + (not fav)
    return torch.stack(xs), torch.stack(ys)


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)      # every peer starts from the same weights, as swarm peers do
    return torch.nn.Sequential(torch.nn.Linear(D_IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, CLASSES))


_EVAL: list = []


def eval_loss(model: torch.nn.Module) -> float:
    if not _EVAL:
        _EVAL.append(make_batch(torch.Generator().manual_seed(999), EVAL_SAMPLES))
    x, y = _EVAL[0]
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(x), y))


def record_limits(cfg: Config):
    from training_core.swarm.guards import RecordLimits
    from training_core.swarm.manifest import SwarmManifest
    m = SwarmManifest(run_id="attacks", model="scratch:small", data={"source": "local"}, seq_len=128,
                      micro_batch=cfg.micro_batch)
    return RecordLimits.for_manifest(m)


# ---- attacker averagers -----------------------------------------------------------------------------
def _attack_averager(kind: str):
    """A DiLoCoAverager whose all-reduce sends hostile values (made in the averager's own process)."""
    from hivemind.compression import CompressionInfo
    from training_core.swarm.diloco import DiLoCoAverager, ExactAllReduceRunner

    def wrong(compression, numel: int):
        t = torch.randn(numel + 3)
        return compression.compress(t, CompressionInfo.from_tensor(t))

    class WrongShapeRunner(ExactAllReduceRunner):
        async def _generate_input_for_peer(self, peer_index: int):
            async for msg in super()._generate_input_for_peer(peer_index):
                msg.tensor_part.CopyFrom(wrong(self.compression, math.prod(msg.tensor_part.size)))
                yield msg

        def _reply_for(self, part_index: int, averaged: torch.Tensor):
            import asyncio
            future = asyncio.get_event_loop().create_future()
            future.set_result(wrong(self.compression, averaged.numel()))
            return future

    class AttackAverager(DiLoCoAverager):
        runner_class = WrongShapeRunner if kind == "wrong-shape" else ExactAllReduceRunner

        async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None, **kwargs):
            with torch.no_grad():
                for t in tensors:
                    if kind == "noise":
                        t.copy_(torch.randn_like(t))
                    elif kind == "x-100":
                        t.mul_(-100.0)
                    elif kind == "1e30":
                        t.fill_(1e30)
                    elif kind == "inf":
                        t.fill_(float("inf"))
            return await super()._run_allreduce_inplace_(tensors, group_info, group_id, **kwargs)
    AttackAverager.__name__ = AttackAverager.__qualname__ = "DiLoCoAverager"   # hivemind names RPCs by class
    return AttackAverager


# ---- peers ----------------------------------------------------------------------------------------
class Peer:
    """One in-process DiLoCo peer: a model, its AdamW, its batches, its rounds."""

    def __init__(self, name: str, dht, key, run_id: str, cfg: Config, limits, data_seed: int, attack: str | None = None,
                 favour: tuple[int, ...] = ()):
        from training_core.swarm.diloco import DiLoCoRounds
        self.name, self.dht, self.cfg = name, dht, cfg
        self.model = make_model()
        self.params = list(self.model.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=cfg.inner_lr)
        self.gen = torch.Generator().manual_seed(data_seed)
        self.favour = favour
        self.warnings: list[tuple[str, str]] = []
        self.samples, self.last_loss, self.max_peers = 0, None, 0
        self.round_times: list[float] = []
        self.started = self.ended = None
        cls = DiLoCoRounds
        if attack is not None:
            cls = type("AttackRounds", (DiLoCoRounds,), {"averager_class": _attack_averager(attack)})
        self.r = cls(dht, run_id, self.params, micro_batch=cfg.micro_batch, inner_steps=cfg.inner_steps,
                     outer_lr=cfg.outer_lr, outer_momentum=cfg.outer_momentum, compression=cfg.compression,
                     matchmaking_time=cfg.matchmaking_time, averaging_timeout=cfg.averaging_timeout,
                     max_round_s=cfg.max_round_s, overlap=False,
                     on_warning=lambda code, message: self.warnings.append((code, message)),
                     tracker_opts=dict(min_refresh_period=0.1, max_refresh_period=0.5, default_refresh_period=0.2,
                                       private_key=key, limits=limits))

    def _after(self, samples: int) -> None:
        before = self.r.round
        self.r.after_inner_step(samples)
        self.max_peers = max(self.max_peers, self.r.num_peers())
        if self.r.round != before:
            self.round_times.append(time.monotonic())

    def step(self) -> None:
        x, y = make_batch(self.gen, self.cfg.micro_batch, self.favour, self.cfg.skew)
        loss = torch.nn.functional.cross_entropy(self.model(x), y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.last_loss = float(loss.detach())
        self.samples += self.cfg.micro_batch
        self._after(self.cfg.micro_batch)

    def poll(self) -> None:
        self._after(0)

    def finite(self) -> bool:
        from training_core.swarm.guards import all_finite
        return all_finite(self.params) and all_finite(self.r.outer)

    def longest_stall(self) -> float:
        marks = [self.started] + [t for t in self.round_times if t <= self.ended] + [self.ended]
        return max(b - a for a, b in zip(marks, marks[1:]))


class Forger(threading.Thread):
    """Stores forged records through its own DHT (signed with its own key) every `period` seconds."""

    def __init__(self, dht, key, run_id: str, kind: str, period: float = 0.5):
        super().__init__(daemon=True, name=f"forger-{kind}")
        from hivemind.dht.crypto import RSASignatureValidator
        self.dht, self.run_id, self.kind, self.period = dht, run_id, kind, period
        self.public_key = RSASignatureValidator(key).local_public_key
        self.progress_key = f"{run_id}_diloco_progress"
        self.stop = threading.Event()

    def _swarm_epoch(self) -> int:
        found = self.dht.get(self.progress_key, latest=True)
        epochs = [0]
        for item in (found.value.values() if found is not None and isinstance(found.value, dict) else ()):
            epoch = item.value.get("epoch") if isinstance(getattr(item, "value", None), dict) else None
            if isinstance(epoch, int) and epoch < FORGED_EPOCH:
                epochs.append(epoch)
        return max(epochs)

    def run(self) -> None:
        from hivemind.optim.progress_tracker import LocalTrainingProgress
        from hivemind.utils import get_dht_time
        from training_core.swarm import metrics
        while not self.stop.wait(self.period):
            try:
                now = get_dht_time()
                if self.kind == "metrics":
                    metrics.publish(self.dht, self.run_id, self.public_key, metrics.MetricsRecord(
                        role="peer", epoch=FORGED_EPOCH, samples=10 ** 12, samples_per_s=1e9, loss=0.001, time=now))
                    continue
                epoch, samples = (FORGED_EPOCH, 16) if self.kind == "epoch" else (self._swarm_epoch(), FORGED_SAMPLES)
                record = LocalTrainingProgress(peer_id=self.dht.peer_id.to_bytes(), epoch=epoch,
                                               samples_accumulated=samples, samples_per_second=50.0, time=now,
                                               client_mode=False)
                self.dht.store(self.progress_key, subkey=self.public_key, value=record.dict(),
                               expiration_time=now + 10.0, return_future=True)
            except Exception:
                pass     # an attacker's hiccup is not the test's business


# ---- the swarm ------------------------------------------------------------------------------------
class _Nodes:
    """DHTs on 127.0.0.1, each with the swarm's metrics validators and its own signing key; all shut
    down by close()."""

    def __init__(self, run_id: str):
        self.run_id, self.made = run_id, []

    def new(self, initial=(), **kw):
        import hivemind
        from hivemind.utils.crypto import RSAPrivateKey
        from training_core.swarm import metrics
        key = RSAPrivateKey()
        dht = hivemind.DHT(start=True, host_maddrs=LOOPBACK, initial_peers=[str(m) for m in initial],
                           record_validators=metrics.make_validators(self.run_id, key), **kw)
        self.made.append(dht)
        return dht, key

    def close(self) -> None:
        for dht in reversed(self.made):
            try:
                dht.shutdown()
            except Exception:
                pass


def _private_nodes(nodes: _Nodes, workdir: Path, run_id: str):
    """Two admitted honest DHTs and an attacker DHT whose credential another issuer signed."""
    from training_core.swarm import admission as A
    issuer = A.load_issuer(workdir / "host", create=True)
    pub = A.parse_issuer(A.issuer_public(issuer))
    other = A.load_issuer(workdir / "other-swarm", create=True)
    made = []
    for name in ("a", "b", "z"):
        path = workdir / f"{name}.key"
        ident = A.load_identity(path)
        pid = A.peer_id_of_rsa(ident.get_public_key().to_bytes())
        if name == "z":
            auth = A.Admission(run_id, A.parse_issuer(A.issuer_public(other)), A.issue(other, run_id, pid, 1), ident)
        else:
            auth = A.Admission(run_id, pub, A.issue(issuer, run_id, pid, 1), ident)
        initial = made[0][0].get_visible_maddrs() if made else ()
        dht, key = nodes.new(initial, identity_path=str(path), authorizer=auth, ensure_bootstrap_success=name != "z")
        A.attach(dht, auth, period=0.5)
        made.append((dht, key))
    return made


def run_attack(attack: str | None, cfg: Config = Config(), workdir: Path | None = None) -> Result:
    """One run: the honest pair, plus the attack's peers (None: a clean run)."""
    from hivemind.dht.crypto import RSASignatureValidator
    from training_core.swarm import admission, metrics
    from training_core.swarm.guards import signer_name
    assert attack is None or attack in ATTACKS or attack in FORGERS, attack
    torch.set_num_threads(1)
    run_id = f"atk-{attack or 'clean'}-{int(time.time() * 1000) % 10 ** 8}"
    nodes = _Nodes(run_id)
    limits = record_limits(cfg)
    peers: list[Peer] = []
    forgers: list[Forger] = []
    host_warnings: list[tuple[str, str]] = []
    attacker_names: list[str] = []
    state: dict = dict(summary=None, honest=(0, []))
    tmp = None
    try:
        # -- the nodes; forgers start first (they are in the swarm before the honest peers' first round)
        if attack == "wrong-token":
            if workdir is None:
                tmp = tempfile.TemporaryDirectory(prefix="modron-attacks-")
                workdir = Path(tmp.name)
            a_node, b_node, z_node = _private_nodes(nodes, Path(workdir), run_id)
        else:
            a_node = nodes.new()
            b_node = nodes.new(a_node[0].get_visible_maddrs())
        bootstrap = a_node[0].get_visible_maddrs()
        if attack in FORGERS:
            for kind in FORGERS[attack]:
                forgers.append(Forger(*nodes.new(bootstrap), run_id, kind))
                attacker_names.append(signer_name(forgers[-1].public_key))
        elif attack == "wrong-token":
            forgers.append(Forger(*z_node, run_id, "epoch"))
            attacker_names.append(z_node[0].peer_id.to_base58())
        for f in forgers:
            f.start()

        # -- the peers
        honest = [Peer(n, dht, key, run_id, cfg, limits, data_seed=1000 * cfg.seed + i + 1, favour=fav)
                  for i, (n, (dht, key), fav) in enumerate((("a", a_node, (0, 1)), ("b", b_node, (2, 3))))]
        peers.extend(honest)
        if attack in GRADIENT_ATTACKS:
            dht, key = nodes.new(bootstrap)
            peers.append(Peer("z", dht, key, run_id, cfg, limits, data_seed=1000 * cfg.seed + 9, attack=attack))
            attacker_names.append(str(dht.peer_id))
        elif attack == "wrong-token":
            peers.append(Peer("z", *z_node, run_id, cfg, limits, data_seed=1000 * cfg.seed + 9, attack="noise"))
        honest_keys = [RSASignatureValidator(k).local_public_key for _, k in (a_node, b_node)]
        honest_ids = [str(p.dht.peer_id) for p in honest] + [signer_name(k) for k in honest_keys]

        # -- one step each (a tracker publishes its record once it has samples); then every honest peer
        # must count everyone it should (as after a real join) before the paced steps begin
        for p in peers:
            p.step()
        want = 3 if attack in GRADIENT_ATTACKS else 2
        deadline = time.monotonic() + 30
        while not all(p.r.num_peers() >= want for p in honest):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the peers never saw each other: {[p.r.num_peers() for p in honest]}")
            for p in peers:
                p.poll()
            time.sleep(0.1)

        done = threading.Event()
        left = [len(honest)]
        lock = threading.Lock()
        errors: list[BaseException] = []

        def train(p: Peer, is_honest: bool) -> None:
            """Paced steps; after inner_steps in a round, wait up to settle_s for the round to close
            (so that rounds hold about the same samples in every run, whatever the trackers' lag)."""
            try:
                p.started = time.monotonic()
                k, epoch, in_round = 1, p.r.epoch, 1      # the first step was taken before the start
                while (k < cfg.steps) if is_honest else not done.is_set():
                    t = time.monotonic()
                    p.step()
                    k += 1
                    in_round = 1 if p.r.epoch != epoch else in_round + 1
                    epoch = p.r.epoch
                    if in_round >= cfg.inner_steps:
                        settle = time.monotonic() + cfg.settle_s
                        quit_early = (lambda: False) if is_honest else done.is_set
                        while p.r.epoch == epoch and time.monotonic() < settle and not quit_early():
                            time.sleep(0.05)
                            p.poll()
                        if p.r.epoch != epoch:
                            epoch, in_round = p.r.epoch, 0
                    time.sleep(max(0.0, cfg.step_s - (time.monotonic() - t)))
                p.ended = time.monotonic()
                if is_honest:
                    with lock:
                        left[0] -= 1
                        if left[0] == 0:
                            done.set()
                while not done.is_set():      # meet the others' last rounds
                    p.poll()
                    time.sleep(0.05)
            except BaseException as e:
                errors.append(e)
                done.set()

        def host_side() -> None:
            """Publishes the honest peers' metrics records; reads the swarm's as the host does."""
            dht = a_node[0]
            reader = metrics.MetricsReader(limits, on_warning=lambda c, m: host_warnings.append((c, m)))
            refusals = admission.Refusals(lambda c, m: host_warnings.append((c, m)))
            t_start = time.time()
            while not done.wait(1.0):
                for p, pub in zip(honest, honest_keys):
                    sps = p.samples / max(1e-3, time.time() - t_start)
                    metrics.publish(p.dht, run_id, pub, metrics.MetricsRecord(
                        role="peer", epoch=p.r.epoch, samples=p.samples, samples_per_s=float(sps),
                        loss=p.last_loss, time=time.time()))
                try:
                    state["summary"] = metrics.SwarmSummary.of(reader.read(dht, run_id))
                    state["honest"] = (sum(p.samples for p in honest), [p.last_loss for p in honest])
                except Exception:
                    pass
                refusals.poll(dht)

        t0 = time.monotonic()
        threads = [threading.Thread(target=train, args=(p, p in honest), daemon=True) for p in peers]
        threads.append(threading.Thread(target=host_side, daemon=True))
        for t in threads:
            t.start()
        limit = t0 + cfg.steps * (cfg.step_s + cfg.settle_s) + 40 * (cfg.matchmaking_time + cfg.averaging_timeout)
        for t in threads:
            t.join(max(0.0, limit - time.monotonic()))
        done.set()
        if errors:
            raise errors[0]
        if any(t.is_alive() for t in threads):
            raise RuntimeError("a peer did not finish in time")
        warnings = [(p.name, c, m) for p in honest for c, m in p.warnings] + [("host", c, m) for c, m in host_warnings]
        samples, losses = state["honest"]
        return Result(attack=attack or "clean", eval_loss=[eval_loss(p.model) for p in honest],
                      finite=all(p.finite() for p in honest), rounds=[p.r.round for p in honest],
                      longest_stall_s=max(p.longest_stall() for p in honest), wall_s=time.monotonic() - t0,
                      warnings=warnings, attacker=attacker_names, honest_ids=honest_ids, summary=state["summary"],
                      honest_samples=samples, honest_losses=losses, num_peers=[p.max_peers for p in honest])
    finally:
        for f in forgers:
            f.stop.set()
        for p in peers:
            try:
                p.r.shutdown()
            except Exception:
                pass
        nodes.close()
        if tmp is not None:
            tmp.cleanup()


# ---- one run in its own process (the suite runs several at once: they mostly wait on rounds) ---------
def result_to_json(r: Result) -> str:
    return json.dumps(asdict(r))


def result_from_json(text: str) -> Result:
    from training_core.swarm.metrics import SwarmSummary
    d = json.loads(text)
    d["warnings"] = [tuple(w) for w in d["warnings"]]
    d["summary"] = SwarmSummary(**d["summary"]) if d["summary"] is not None else None
    return Result(**d)


def run_attack_in_process(name: str, workdir: Path, timeout: float = 300) -> Result:
    """run_attack(name; "clean" for None) in a child Python, its Result back as JSON (never pickled)."""
    import os
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    out = workdir / "result.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")])}
    proc = subprocess.run([sys.executable, __file__, name, str(workdir), str(out)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"the {name} run failed (exit {proc.returncode}): {proc.stderr[-3000:]}")
    return result_from_json(out.read_text(encoding="utf-8"))


if __name__ == "__main__":   # python tests/attack_helpers.py ATTACK|clean WORKDIR OUT.json
    import sys
    _name, _work, _out = sys.argv[1:4]
    _result = run_attack(None if _name == "clean" else _name, workdir=Path(_work))
    Path(_out).write_text(result_to_json(_result), encoding="utf-8")
