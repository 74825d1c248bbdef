"""Swarm scaling on one machine: one peer alone vs two peers (plus a host), one torch thread each.

Starts `modron-train swarm host` and N `modron-train swarm join --json --threads 1` processes on
loopback, lets them warm up (first global epochs, state sync), then measures over a window:

- aggregate samples/s: the sum over peers of samples contributed in the window / window length;
- averaging share: per peer, the time its optimizer steps spent ending epochs (waiting for the
  gradient all-reduce, loading state) / window length, averaged over peers (`averaging_s` in the
  peers' `swarm` events).

Targets: two peers >= 1.7x one peer's samples/s, averaging share <= 10 %. On a 2-core machine
the two peers plus the host and their p2p daemons share the cores, so the speed-up is bounded by
the cores as much as by hivemind.

    .venv/bin/python bench/swarm_scaling.py
    .venv/bin/python bench/swarm_scaling.py --warmup 20 --window 40 --target-batch 256
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MANIFEST = """\
run_id = "bench-scaling"
model = "scratch:tiny"
tokenizer = "bytes"
seq_len = {seq_len}
micro_batch = {micro_batch}
target_batch_size = {target}
compression = "float16"
matchmaking_time = 2.0
averaging_timeout = 15.0

[data]
source = "bundled"
path = "demo/stories"

[schedule]
name = "constant"
warmup_epochs = 0
total_epochs = 100000
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    def __init__(self, args: list[str], home: Path):
        home.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, MODRON_DATA_DIR=str(home / "data"), MODRON_CACHE_DIR=str(home / "cache"),
                   OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        self.events: list[tuple[float, dict]] = []
        self.proc = subprocess.Popen([sys.executable, "-m", "training_core.cli", *args], cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(home / "stderr.log", "wb"), text=True, start_new_session=True)
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            try:
                self.events.append((time.monotonic(), json.loads(line)))
            except ValueError:
                pass

    def swarm_at(self, t: float) -> dict | None:
        """The last `swarm` event at or before monotonic time t."""
        found = [e for ts, e in self.events if ts <= t and e.get("type") == "swarm"]
        return found[-1] if found else None

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def run(n_peers: int, args, work: Path) -> dict:
    manifest = work / f"swarm{n_peers}.toml"
    manifest.write_text(MANIFEST.format(seq_len=args.seq_len, micro_batch=args.micro_batch, target=args.target_batch),
                        encoding="utf-8")
    procs = []
    try:
        host = Proc(["swarm", "host", "--manifest", str(manifest), "--out", str(work / f"host{n_peers}"),
                     "--port", str(free_port()), "--listen-ip", "127.0.0.1", "--json"], work / f"h{n_peers}")
        procs.append(host)
        deadline = time.monotonic() + 120
        while not any(e["type"] == "invite" for _, e in host.events):
            if time.monotonic() > deadline or host.proc.poll() is not None:
                raise SystemExit("the host did not start; see its stderr.log")
            time.sleep(0.2)
        invite = work / f"host{n_peers}" / "invite.txt"
        peers = [Proc(["swarm", "join", "--json", "--threads", "1", "--listen-ip", "127.0.0.1",
                       "--invite-file", str(invite)], work / f"p{n_peers}-{i}") for i in range(n_peers)]
        procs += peers
        # Warm-up starts once every peer has finished a global epoch.
        deadline = time.monotonic() + 240
        while not all((p.swarm_at(time.monotonic()) or {}).get("epoch", 0) >= 1 for p in peers):
            if time.monotonic() > deadline:
                raise SystemExit("peers did not reach epoch 1; see their stderr.log")
            time.sleep(0.5)
        time.sleep(args.warmup)
        t0 = time.monotonic()
        time.sleep(args.window)
        t1 = time.monotonic()
        samples, averaging, epochs = 0, [], []
        for p in peers:
            a, b = p.swarm_at(t0), p.swarm_at(t1)
            samples += b["samples_contributed"] - a["samples_contributed"]
            averaging.append((b["averaging_s"] - a["averaging_s"]) / (t1 - t0))
            epochs.append(b["epoch"] - a["epoch"])
        return {"peers": n_peers, "samples_per_s": samples / (t1 - t0),
                "averaging_share": sum(averaging) / len(averaging), "epochs_in_window": epochs}
    finally:
        for p in procs:
            p.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds after every peer reached epoch 1")
    ap.add_argument("--window", type=float, default=60.0, help="measured seconds")
    ap.add_argument("--target-batch", type=int, default=1024, help="samples per global epoch")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="modron-swarm-bench-") as tmp:
        one = run(1, args, Path(tmp))
        two = run(2, args, Path(tmp))
    speedup = two["samples_per_s"] / one["samples_per_s"] if one["samples_per_s"] else float("nan")
    report = {"bench": "swarm_scaling", "one": one, "two": two, "speedup": speedup,
              "averaging_share_two": two["averaging_share"], "targets": {"speedup": 1.7, "averaging_share": 0.10},
              "cpus": os.cpu_count(), "loadavg_1m_before": load_before, **vars(args)}
    print(json.dumps(report))
    print(f"scratch:tiny, micro-batch {args.micro_batch} x {args.seq_len} tokens, target batch {args.target_batch}, "
          f"one torch thread per peer, {os.cpu_count()} CPUs (load {load_before:.1f} before)")
    print(f"  one peer : {one['samples_per_s']:7.1f} samples/s, averaging {one['averaging_share']:.1%} of wall time")
    print(f"  two peers: {two['samples_per_s']:7.1f} samples/s, averaging {two['averaging_share']:.1%} of wall time")
    print(f"  speed-up {speedup:.2f}x (target >= 1.7x); averaging share {two['averaging_share']:.1%} (target <= 10 %)")


if __name__ == "__main__":
    main()
