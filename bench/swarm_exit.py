"""How long swarm processes take to leave: a loopback DiLoCo swarm (a host and two peers, real
`modron-train swarm` subprocesses, 127.0.0.1 only) runs a few rounds, then each is stopped in turn (peer
a, peer b, the host) by its `stop` control or by Ctrl-C (SIGINT). Per process: seconds from the stop to
its `stopped` event, and from that event to the process's exit, and whether anything of it (DHT,
averagers, p2pd, the proc_guard sentinel, torch_shm_manager) was left 5 s later.

    .venv/bin/python bench/swarm_exit.py [--how stop|sigint] [--repeats 1]     # ~1 min per repeat on 2 cores

Peer b is stopped after a has left, so it may be in a round that can no longer complete: it waits for
that round (up to the manifest's averaging timeout) before leaving, by design (training_core/swarm/
diloco_strategy.py `leave`)."""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from swarm_helpers import Member, free_port, write_manifest  # noqa: E402

JOIN = ["swarm", "join", "--json", "--threads", "1", "--listen-ip", "127.0.0.1"]
PACE = {"MODRON_TEST_SLEEP_PER_STEP": "0.04"}   # two unpaced peers would fill both cores


def one(base: Path, how: str) -> dict[str, dict]:
    manifest = write_manifest(base / "swarm.toml", run_id="swarm-exit", algorithm="diloco",
                              compression="blockwise8bit", inner_steps=12, max_round_s=40.0)
    host = Member("host", ["swarm", "host", "--manifest", str(manifest), "--out", str(base / "hostout"), "--port",
                           str(free_port()), "--listen-ip", "127.0.0.1", "--json", "--minutes", "8",
                           "--checkpoint-minutes", "0.5"], base / "host")
    members = [host]
    try:
        host.wait_for(lambda e: e["type"] == "invite", timeout=120)
        invite = ["--invite-file", str(base / "hostout" / "invite.txt")]
        a = Member("a", JOIN + invite, base / "a", **PACE)
        b = Member("b", JOIN + invite, base / "b", **PACE)
        members += [a, b]
        a.wait_for(lambda e: e["type"] == "swarm" and (e.get("round") or 0) >= 3, timeout=240)
        out = {}
        for m in (a, b, host):
            family = [psutil.Process(m.proc.pid)] + psutil.Process(m.proc.pid).children(recursive=True)
            t0 = time.monotonic()
            if how == "sigint":
                m.proc.send_signal(signal.SIGINT)
            else:
                m.send("stop")
            t_stopped, _ = m.wait_for(lambda e: e["type"] == "stopped", since=t0, timeout=120)
            m.proc.wait(120)
            t_exit = time.monotonic()
            time.sleep(5)
            left = [p.name() for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
            out[m.name] = {"to_stopped_s": round(t_stopped - t0, 2), "stopped_to_exit_s": round(t_exit - t_stopped, 2),
                           "exit_code": m.proc.returncode, "left_after_5s": left}
        return out
    finally:
        for m in members:
            m.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--how", choices=("stop", "sigint"), default="stop")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    runs = []
    for i in range(args.repeats):
        base = Path(tempfile.mkdtemp(prefix="modron-swarm-exit-"))
        try:
            runs.append(one(base, args.how))
        finally:
            shutil.rmtree(base, ignore_errors=True)
        print(json.dumps({"repeat": i + 1, "how": args.how, **runs[-1]}), flush=True)
    summary = {name: {k: round(statistics.median(r[name][k] for r in runs), 2) for k in ("to_stopped_s", "stopped_to_exit_s")}
               for name in runs[0]}
    print(json.dumps({"summary": summary, "how": args.how, "repeats": args.repeats,
                      "anything_left": any(r[n]["left_after_5s"] for r in runs for n in r)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
