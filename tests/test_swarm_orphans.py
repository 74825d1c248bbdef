"""No orphans: `kill -9` of a swarm peer's or host's main process takes its DHT, averagers, p2pd and
torch_shm_manager with it (training_core.proc_guard), and the host restarts on the same port.

Only the main pid is killed, as an operator's `kill -9 PID` would (Member.kill would kill the whole
process group). "Theirs" is any process that carries the member's MODRON_DATA_DIR in its environment
(every child inherits it, p2pd and torch_shm_manager included) or descends from its main pid."""
from __future__ import annotations

import os
import signal
import socket
import time

import psutil
import pytest

from swarm_helpers import Member, free_port, write_manifest

pytestmark = pytest.mark.slow

GRACE_S = 5.0
JOIN = ["swarm", "join", "--json", "--threads", "1", "--listen-ip", "127.0.0.1"]


def _theirs(member: Member) -> list[psutil.Process]:
    data_dir = str(member.home / "data")
    found = {}
    try:
        for p in psutil.Process(member.proc.pid).children(recursive=True):
            found[p.pid] = p
    except psutil.NoSuchProcess:
        pass
    for p in psutil.process_iter():
        try:
            if p.pid not in found and p.environ().get("MODRON_DATA_DIR") == data_dir:
                found[p.pid] = p
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return list(found.values())


def _alive(procs) -> dict[int, psutil.Process]:
    out = {}
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out[p.pid] = p
        except psutil.NoSuchProcess:
            pass
    return out


def _describe(procs) -> list[str]:
    out = []
    for p in procs:
        try:
            out.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.Error:
            out.append(str(p.pid))
    return out


def _kill9(member: Member) -> dict:
    """SIGKILL the main pid only: its processes then, those left after GRACE_S, and when the last went."""
    before = [p for p in _alive(_theirs(member)).values() if p.pid != member.proc.pid]
    names = sorted(p.name() for p in before)
    t0 = time.monotonic()
    os.kill(member.proc.pid, signal.SIGKILL)
    member.proc.wait(10)
    left = _alive(before + _theirs(member))
    while left and time.monotonic() - t0 < GRACE_S:
        time.sleep(0.05)
        left = _alive(list(left.values()) + _theirs(member))
    return {"children": names, "left": _describe(left.values()), "seconds": round(time.monotonic() - t0, 2)}


def _seconds_until_bindable(port: int, t0: float) -> float | None:
    """As host.require_port_free binds (no SO_REUSEADDR): when the port could be bound, None if not in 5 s."""
    while True:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return round(time.monotonic() - t0, 2)
            except OSError:
                pass
        if time.monotonic() - t0 > GRACE_S:
            return None
        time.sleep(0.05)


def _clean_up(member: Member) -> None:
    member.kill()
    for p in _alive(_theirs(member)).values():
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    base = tmp_path_factory.mktemp("orphans")
    manifest = write_manifest(base / "swarm.toml", algorithm="sync")
    port = free_port()
    host_args = ["swarm", "host", "--manifest", str(manifest), "--out", str(base / "hostout"), "--port", str(port),
                 "--listen-ip", "127.0.0.1", "--json", "--minutes", "5"]
    members: list[Member] = []
    facts: dict = {}
    try:
        host = Member("host", host_args, base / "host")
        members.append(host)
        host.wait_for(lambda e: e["type"] == "invite", timeout=120)
        peer = Member("peer", JOIN + ["--invite-file", str(base / "hostout" / "invite.txt")], base / "peer")
        members.append(peer)
        peer.wait_for(lambda e: e["type"] == "step", timeout=120)   # its DHT, p2pd and averagers run

        facts["peer"] = _kill9(peer)
        t_host = time.monotonic()
        facts["host"] = _kill9(host)
        facts["port_free_s"] = _seconds_until_bindable(port, t_host)

        again = Member("host-again", host_args, base / "host-again")
        members.append(again)
        t0 = time.monotonic()
        again.wait_for(lambda e: e["type"] in ("invite", "failed"), timeout=120)
        facts["restart"] = {"events": [e for _, e in again.events], "seconds": time.monotonic() - t0}
        yield facts
    finally:
        for m in members:
            _clean_up(m)


def test_peer_children_die_with_it(scenario):
    peer = scenario["peer"]
    assert "p2pd" in peer["children"] and len(peer["children"]) >= 4, peer   # DHT, 2 averagers, p2pd, ...
    assert peer["left"] == [], peer


def test_host_children_die_with_it(scenario):
    host = scenario["host"]
    assert "p2pd" in host["children"] and len(host["children"]) >= 3, host
    assert host["left"] == [], host


def test_host_restarts_on_the_same_port(scenario):
    assert scenario["port_free_s"] is not None, "the port stayed taken for 5 s after the host was killed"
    events = scenario["restart"]["events"]
    assert [e["type"] for e in events if e["type"] in ("invite", "failed")][:1] == ["invite"], events


def test_identity_path_per_device(tmp_path):
    from training_core.errors import ConfigError
    from training_core.swarm.network import identity_path_for
    for device in ("auto", "cpu", "cuda", "cuda:0", "CUDA:0", "cuda:00", "mps", None, ""):
        assert identity_path_for(tmp_path, device) == tmp_path / "identity.key"
    assert identity_path_for(tmp_path, "cuda:1") == tmp_path / "identity-cuda1.key"
    assert identity_path_for(tmp_path, "cuda:12") == tmp_path / "identity-cuda12.key"
    assert identity_path_for(tmp_path, "xpu:1") == tmp_path / "identity-xpu1.key"
    assert len({identity_path_for(tmp_path, f"cuda:{i}") for i in range(4)}) == 4
    with pytest.raises(ConfigError):
        identity_path_for(tmp_path, "cuda:../x")


REAP_SCRIPT = """
import subprocess, sys, time
from training_core.proc_guard import own_children
from training_core.swarm.network import reap_children
own_children()
quick = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
stuck = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"]) if sys.argv[1] == "stuck" else None
t = time.monotonic()
reap_children(grace_s=2.0)
print(round(time.monotonic() - t, 2), quick.poll() is not None, stuck is None or stuck.poll() is not None)
"""


@pytest.mark.parametrize("case", ["done", "stuck"])
def test_reaping_at_exit_waits_for_helpers_only(case):
    """At exit a swarm process waits (up to a grace) for the helpers hivemind forked, and kills those
    still there after it; never for its own sentinel, which leaves with it (waiting for it made every
    swarm process spend the whole grace before exiting)."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", REAP_SCRIPT, case], cwd=root, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    waited, quick_gone, stuck_gone = out.stdout.split()
    assert quick_gone == "True" and stuck_gone == "True", out.stdout
    if case == "done":
        assert float(waited) < 1.5, waited          # the quick child's 0.3 s, not the 2 s grace
    else:
        assert 2.0 <= float(waited) < 4.0, waited   # the grace, then a kill
