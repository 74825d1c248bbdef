"""How fast Modron hands the GPU back when the user returns: p50/p95 over N trials (target p95 <= 0.3 s).

Drives the app's real controller (app.contribution.Contributor, its 1 s tick included) with fake
idle sensors: the user walks away (contribution starts or resumes), then "comes back" at a random
moment within a tick; the latency is from that moment to the worker's `paused` event, which the
worker sends after freeing its accelerator memory (`vram_used` / `vram_reserved` are printed).
Also printed: pause sent -> paused (the worker's part alone, without waiting for the next tick).

The worker measured is the real swarm peer (`training_core.cli swarm join`, with a local host on
loopback and the demo manifest) when that CLI exists, else the local finetune worker
(`modron-train run`, tiny scratch job), which obeys the same `pause` (and also writes a
checkpoint on pause, which the swarm peer does not). The first line says which one ran.

    QT_QPA_PLATFORM=offscreen .venv/bin/python bench/yield_latency.py [--trials 20] [--worker auto|swarm|finetune]
        [--compare]   (alternate trials without the 100 ms watch for the user's return, the baseline, and with it)
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import queue
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_P95_S = 0.3
sys.path.insert(0, str(ROOT))
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtCore import QCoreApplication, QEventLoop  # noqa: E402

from app import settings  # noqa: E402
from app.contribution import WATCH_MS, Contributor, join_invite, load_rules, save_rules  # noqa: E402
from app.idle_policy import Sensors  # noqa: E402
from app.store import Store  # noqa: E402
from app.swarm_runner import LocalRunner  # noqa: E402
from training_core.swarm.manifest import bundled_path, load_manifest, make_invite  # noqa: E402


class Desk:
    """The fake user: away (idle for an hour) or back (idle 0)."""

    def __init__(self):
        self.away = False

    def __call__(self, exclude_pids=frozenset()):
        return Sensors(now=dt.datetime.now(), idle_seconds=3600.0 if self.away else 0.0), {"idle_source": "bench"}


class FinetuneRunner(LocalRunner):
    """Stands in for the swarm peer: the local training worker on a tiny endless job."""
    name = "finetune"

    def __init__(self, spec_path: Path):
        super().__init__()
        self.spec_path = spec_path

    def command(self, args):
        return self.python, ["-m", "training_core.cli", "run", "--spec", str(self.spec_path)]


def swarm_cli_exists() -> bool:
    out = subprocess.run([sys.executable, "-m", "training_core.cli", "swarm", "join", "--help"], cwd=ROOT,
                         capture_output=True, timeout=120)
    return out.returncode == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_host(folder: Path) -> tuple[subprocess.Popen, str]:
    """A swarm host on loopback with the demo manifest; returns it and its invite."""
    proc = subprocess.Popen([sys.executable, "-m", "training_core.cli", "swarm", "host", "--manifest",
                             str(bundled_path("swarms/demo.toml")), "--out", str(folder / "host"), "--json",
                             "--listen-ip", "127.0.0.1", "--port", str(free_port()), "--threads", "1"],
                            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=open(folder / "host.log", "wb"), text=True, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            ev = json.loads(lines.get(timeout=1))
        except (queue.Empty, ValueError):
            continue
        if ev.get("type") == "invite":
            return proc, ev["invite"]
    stop_host(proc)
    raise SystemExit(f"the swarm host did not print an invite (see {folder / 'host.log'})")


def stop_host(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)   # its own session: the host and its helpers
        proc.wait(10)


def wait_until(pred, timeout_s: float) -> bool:
    loop_deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > loop_deadline:
            return False
        QCoreApplication.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 20)
        time.sleep(0.002)
    return True


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--worker", choices=("auto", "swarm", "finetune"), default="auto")
    ap.add_argument("--tick-ms", type=int, default=1000, help="the controller's polling interval (the app: 1000)")
    ap.add_argument("--watch-ms", type=int, default=WATCH_MS,
                    help=f"while contributing, how often the user's return is looked for (the app: {WATCH_MS}; 0: off)")
    ap.add_argument("--compare", action="store_true",
                    help="alternate trials without the watch (the baseline: the tick alone) and with it")
    args = ap.parse_args()
    app = QCoreApplication.instance() or QCoreApplication([])   # noqa: F841  (the event loop's owner)

    kind = args.worker
    if kind == "auto":
        kind = "swarm" if swarm_cli_exists() else "finetune"
    home = Path(tempfile.mkdtemp(prefix="modron-yield-"))
    os.environ["MODRON_DATA_DIR"] = str(home / "data")
    os.environ["MODRON_CACHE_DIR"] = str(home / "cache")
    store = Store(home / "data" / "modron.sqlite3")
    host = None
    if kind == "swarm":
        host, invite = start_host(home)
        runner = LocalRunner()
        join_args = ["--device", "auto", "--threads", "1"]
    else:
        invite = make_invite(load_manifest(bundled_path("swarms/demo.toml")))   # recorded, not used by the runner
        spec = {"model": "scratch:tiny", "data": [str(ROOT / "resources" / "demo" / "stories")],
                "out": str(home / "run"), "steps": 1_000_000, "batch_size": 4, "seq_len": 32, "tokenizer": "bytes",
                "threads": 1, "checkpoint_every": 1_000_000, "eval_every": 1_000_000, "sample_prompts": []}
        spec_path = home / "spec.json"
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        runner, join_args = FinetuneRunner(spec_path), []
    print(f"data folder: {home}", flush=True)
    why = "" if kind == "swarm" or args.worker == "finetune" else " (the swarm join CLI is not there yet)"
    print("worker measured: " + ("swarm join peer (host + 1 peer on loopback, demo manifest, CPU)" if kind == "swarm"
                                 else "local finetune worker (modron-train run, scratch:tiny)" + why), flush=True)

    join_invite(store, invite)
    store.set_setting(settings.CONTRIBUTE.key, True)
    rules, _ = load_rules(store)
    rules.idle_minutes = 1
    save_rules(store, rules)
    desk = Desk()
    c = Contributor(store, None, sensors=desk, runner=runner, tick_ms=args.tick_ms, watch_ms=args.watch_ms,
                    notify_before_s=0, join_args=join_args)
    modes = [0, args.watch_ms] if args.compare else [args.watch_ms]
    seen: list[dict] = []
    c.swarm_event.connect(seen.append)

    def working_since(n: int) -> bool:
        return any(e["type"] in ("step", "swarm") for e in seen[n:])

    total, worker_part, vram, watch_of = [], [], [], []
    try:
        for trial in range(args.trials):
            c.watch_ms = modes[trial % len(modes)]
            watch_of.append(c.watch_ms)
            mark = len(seen)
            desk.away = True
            if not wait_until(lambda: c.state == "contributing" and working_since(mark), 300):
                raise SystemExit(f"trial {trial}: the worker did not start or resume ({c.state}: {c.reason} {c.message})")
            # Come back at a random moment of the tick, as a person would.
            end = time.monotonic() + random.uniform(0.5, 1.5)
            wait_until(lambda: time.monotonic() >= end, 5)
            mark = len(seen)
            desk.away = False
            t0 = time.perf_counter()
            if not wait_until(lambda: any(e["type"] == "paused" for e in seen[mark:]), 60):
                raise SystemExit(f"trial {trial}: no `paused` within 60 s ({c.state}; {c.message})")
            total.append(time.perf_counter() - t0)
            worker_part.append(c.last_latency())
            ev = next(e for e in seen[mark:] if e["type"] == "paused")
            vram.append((ev.get("vram_used"), ev.get("vram_reserved")))
            print(f"trial {trial + 1:2d} (watch {c.watch_ms} ms): user back -> paused {total[-1]:.3f} s (pause sent -> paused "
                  f"{worker_part[-1]:.3f} s), vram_used={vram[-1][0]} vram_reserved={vram[-1][1]}", flush=True)
    finally:
        c.shutdown(timeout_ms=30_000)
        if host is not None:
            stop_host(host)
        store.close()

    results = []
    for mode in modes:
        mine = [i for i, w in enumerate(watch_of[:len(total)]) if w == mode]
        t, wp = [total[i] for i in mine], [worker_part[i] for i in mine]
        result = {"worker": kind, "trials": len(t), "tick_ms": args.tick_ms, "watch_ms": mode,
                  "p50_s": round(statistics.median(t), 3), "p95_s": round(pct(t, 0.95), 3),
                  "max_s": round(max(t), 3), "worker_p50_s": round(statistics.median(wp), 3),
                  "worker_p95_s": round(pct(wp, 0.95), 3),
                  "vram_used_after_pause_max": max((vram[i][0] or 0) for i in mine)}
        results.append(result)
        print(json.dumps(result))
        print(f"watch {mode} ms: user returns -> paused: p50 {result['p50_s']:.2f} s, p95 {result['p95_s']:.2f} s "
              f"(target p95 <= {TARGET_P95_S} s: {'met' if result['p95_s'] <= TARGET_P95_S else 'NOT met'}); "
              f"the worker's own part p50 {result['worker_p50_s']:.2f} s, p95 {result['worker_p95_s']:.2f} s")
    if len(results) == 2 and results[1]["p95_s"] > 0:
        print(f"p95 without the watch / with it: {results[0]['p95_s'] / results[1]['p95_s']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
