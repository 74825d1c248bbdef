"""End to end: the app's Contributor runs the real `swarm join` peer against a host on loopback,
hands the GPU back on "user returns" and leaves the swarm cleanly."""
import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import datetime as dt
import json
import queue
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from app import settings
from app.contribution import Contributor, load_rules, save_rules
from app.idle_policy import Sensors
from app.store import Store
from app.swarm_runner import LocalRunner
from training_core.swarm.manifest import bundled_path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_real_swarm_peer_starts_pauses_and_leaves(tmp_path, qtbot):
    host = subprocess.Popen([sys.executable, "-m", "training_core.cli", "swarm", "host", "--manifest",
                             str(bundled_path("swarms/demo.toml")), "--out", str(tmp_path / "host"), "--json",
                             "--listen-ip", "127.0.0.1", "--port", str(_free_port()), "--threads", "1"],
                            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=open(tmp_path / "host.log", "wb"), text=True, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in host.stdout], daemon=True).start()
    store = Store(tmp_path / "data" / "modron.sqlite3")
    c = None
    try:
        invite = None
        while invite is None:
            ev = json.loads(lines.get(timeout=180))
            invite = ev["invite"] if ev.get("type") == "invite" else None

        away = {"idle": 3600.0}
        store.set_setting(settings.CONTRIBUTE.key, True)
        rules, _ = load_rules(store)
        rules.idle_minutes = 1
        save_rules(store, rules)
        c = Contributor(store, None, sensors=lambda pids=frozenset(): (
            Sensors(dt.datetime.now(), away["idle"]), {"idle_source": "test"}),
            runner=LocalRunner(), tick_ms=200, notify_before_s=0, join_args=["--device", "cpu", "--threads", "1"])
        events = []
        c.swarm_event.connect(events.append)
        c.join(invite)
        qtbot.waitUntil(lambda: c.state == "contributing", timeout=180_000)
        qtbot.waitUntil(lambda: any(e["type"] == "swarm" for e in events), timeout=120_000)
        swarm = next(e for e in events if e["type"] == "swarm")
        assert swarm["role"] == "peer" and swarm["run_id"] == "modron-demo"

        away["idle"] = 0.0      # the user is back
        qtbot.waitUntil(lambda: c.state == "paused", timeout=30_000)
        paused = next(e for e in events if e["type"] == "paused")
        assert paused["vram_used"] == 0 and c.kills == 0
        assert 0 < c.last_latency() < 10       # the figure itself is bench/yield_latency.py's job
        assert store.swarm_stats("modron-demo")["updated"] is not None

        c.leave()
        qtbot.waitUntil(lambda: c.worker_pid is None, timeout=60_000)
        assert any(e["type"] == "stopped" for e in events) and c.kills == 0
    finally:
        if c is not None:
            c.shutdown(timeout_ms=20_000)
        host.terminate()
        try:
            host.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(host.pid, 9)
            host.wait(10)
        store.close()
