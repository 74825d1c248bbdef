"""Swarms on loopback: a host and peers as real `modron-train swarm` subprocesses (one torch
thread each). One module-scoped scenario is run once and several tests check what it recorded."""
from __future__ import annotations

import math
import re
import signal
import time
from pathlib import Path

import pytest

from swarm_helpers import (Member, distance, free_port, latest_checkpoint, load_params, write_manifest)

pytestmark = pytest.mark.slow

JOIN = ["swarm", "join", "--json", "--threads", "1", "--listen-ip", "127.0.0.1"]


def _epoch(member: Member) -> int:
    return max((e["epoch"] for e in member.of("swarm")), default=0)


def _init_params(manifest_path):
    from training_core.models import load_base
    from training_core.swarm.manifest import load_manifest
    from training_core.swarm.peer import PeerOptions, swarm_spec
    spec = swarm_spec(load_manifest(manifest_path), PeerOptions(device="cpu"), manifest_path.parent / "init")
    model = load_base(spec).model
    return {k: v.detach().float().clone() for k, v in model.state_dict().items()}


def _epochs(member: Member) -> list[int]:
    return [e["epoch"] for e in member.of("swarm")]


def _checkpoint_epoch(ckpt: str | None, default: int) -> int:
    """The swarm epoch a peer's checkpoint was written at."""
    import json
    from pathlib import Path
    try:
        return int(json.loads((Path(ckpt) / "trainer_state.json").read_text())["scheduler"]["swarm_epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return default


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    base = tmp_path_factory.mktemp("swarm")
    manifest = write_manifest(base / "swarm.toml", target=48)
    members: list[Member] = []
    facts: dict = {"manifest": manifest}

    def start(name, args, **env):
        m = Member(name, args, base / name, **env)
        members.append(m)
        return m
    try:
        host = start("host", ["swarm", "host", "--manifest", str(manifest), "--out", str(base / "hostout"),
                              "--port", str(free_port()), "--listen-ip", "127.0.0.1", "--json", "--minutes", "6",
                              "--checkpoint-minutes", "0.05"])
        host.wait_for(lambda e: e["type"] == "invite", timeout=90)
        invite = base / "hostout" / "invite.txt"
        a = start("a", JOIN + ["--invite-file", str(invite)])
        b = start("b", JOIN + ["--invite-file", str(invite)])
        # X sends NaN gradients (its own guard off) and is later SIGKILLed mid-training.
        x = start("x", JOIN + ["--invite-file", str(invite)], MODRON_TEST_SEND_NAN="1")
        a.wait_for(lambda e: e["type"] == "swarm" and e["epoch"] >= 3, timeout=150)

        # A late joiner must load the swarm's state rather than start from the initial weights; it
        # joins as a client (outgoing connections only), as a peer behind NAT does.
        facts["epoch_at_late_join"] = _epoch(a)
        late = start("late", JOIN + ["--invite-file", str(invite), "--steps", "6", "--client-mode", "on"])

        # Meanwhile: pause and resume B.
        t_pause = b.send("pause")
        t_paused, _ = b.wait_for(lambda e: e["type"] == "paused", since=t_pause, timeout=30)
        facts["pause_latency"] = t_paused - t_pause
        time.sleep(3)
        facts["steps_while_paused"] = len([e for e in b.of("step", since=t_paused + 0.5)])
        facts["b_alive_while_paused"] = b.proc.poll() is None
        t_resume = b.send("resume")
        t_resumed, _ = b.wait_for(lambda e: e["type"] == "resumed", since=t_resume, timeout=60)
        b.wait_for(lambda e: e["type"] == "step", since=t_resumed, timeout=60)
        facts["steps_after_resume"] = True

        # SIGKILL X once the others have named its NaN gradients (a peer is named after 3 clipped
        # rounds of its last 5: two rounds, the rule here before, were sometimes too few on a loaded
        # machine) or after two minutes; the others must keep advancing epochs. Not there in time:
        # the NaN test below says what is missing.
        try:
            x.wait_for(lambda e: e["type"] == "step", timeout=120)
        except AssertionError:
            pass
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and x.proc.poll() is None and not _noticed_nan(a, b):
            time.sleep(0.5)
        facts["epoch_at_kill"] = _epoch(a)
        x.kill()
        t_kill = time.monotonic()
        a.wait_for(lambda e: e["type"] == "swarm" and e["epoch"] >= facts["epoch_at_kill"] + 2, timeout=90,
                   since=t_kill)
        facts["epoch_after_kill"] = _epoch(a)
        _, finished = late.wait_for(lambda e: e["type"] == "finished", timeout=150)
        # The swarm's state at the late joiner's last epoch, from the copies taken as the host wrote them.
        facts["late_epoch"] = _checkpoint_epoch(finished.get("checkpoint"), max(_epochs(late), default=0))
        # The swarm's state then: A's parameters, checkpointed on request at once (a sync peer's parameters
        # change only when an epoch's average lands, so they are the swarm's state at A's epoch). Not the
        # host's checkpoints: it writes one after downloading the state, which took long enough on a loaded
        # machine (a dial to the killed X timing out) that it wrote epochs 9 and 15 around a joiner's 12.
        t_ask = a.send("checkpoint")
        _, ckpt = a.wait_for(lambda e: e["type"] == "checkpoint" and e["reason"] == "requested", since=t_ask,
                             timeout=60)
        facts["swarm_at_late_epoch"] = (_checkpoint_epoch(ckpt["path"], -1), load_params(Path(ckpt["path"])))
        facts["late_rc"] = late.finish()
        facts["late_epochs"] = _epochs(late)

        # test_the_swarm_loss_falls compares A's first and last five step losses: let A train until it has
        # 20, however the swarm's epochs split between A and B (A's steps may each wait ~2 s for an
        # all-reduce: in one CI run A made 13 steps while B made 79, and had 8 step events at this point).
        deadline = time.monotonic() + 120
        while len([e for e in a.of("step") if e["loss"] is not None]) < 20 and time.monotonic() < deadline:
            time.sleep(0.5)

        # A and B checkpoint at the same moment, then stop.
        asked = {m.name: m.send("checkpoint") for m in (a, b)}
        for m in (a, b):
            m.wait_for(lambda e: e["type"] == "checkpoint" and e["reason"] == "requested", timeout=60,
                       since=asked[m.name])
        # A stops on its `stop` control; B and the host on Ctrl-C (SIGINT), as in a terminal: hivemind's
        # averagers once left the process ignoring it (training_core/swarm/sigint.py).
        a.send("stop")
        b.proc.send_signal(signal.SIGINT)
        for m in (a, b):
            m.wait_for(lambda e: e["type"] == "stopped", timeout=60)
            facts[f"{m.name}_rc"] = m.finish(60)
        host.proc.send_signal(signal.SIGINT)
        host.wait_for(lambda e: e["type"] == "stopped", timeout=60)
        facts["host_rc"] = host.finish(60)
        facts.update(host=host, a=a, b=b, x=x, late=late, base=base)
        facts["init"] = _init_params(manifest)
        yield facts
    finally:
        for m in members:
            m.kill()
            with open(base / f"{m.name}.events.jsonl", "w", encoding="utf-8") as fh:   # for a failure's post-mortem
                fh.writelines(m.lines)


def test_peers_average_their_parameters(scenario):
    a = load_params(latest_checkpoint(scenario["base"] / "a" / "data" / "swarm" / "test-swarm"))
    b = load_params(latest_checkpoint(scenario["base"] / "b" / "data" / "swarm" / "test-swarm"))
    init = {k: v for k, v in scenario["init"].items() if k in a}
    moved = distance(a, init)
    assert moved > 0.5, "training did not move the parameters"
    assert distance(a, b) < 0.25 * moved, (distance(a, b), moved)


def test_the_swarm_loss_falls(scenario):
    losses = [e["loss"] for e in scenario["a"].of("step") if e["loss"] is not None]
    assert len(losses) >= 20
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, (losses[:5], losses[-5:])
    swarm_losses = [e["loss"] for e in scenario["host"].of("swarm") if e.get("loss") is not None]
    assert swarm_losses and swarm_losses[-1] < swarm_losses[0]


def test_a_late_joiner_loads_state_from_peers(scenario):
    assert scenario["late_rc"] == 0
    assert max(scenario["late_epochs"]) >= scenario["epoch_at_late_join"] >= 3
    late = load_params(latest_checkpoint(scenario["base"] / "late" / "data" / "swarm" / "test-swarm"))
    init = {k: v for k, v in scenario["init"].items() if k in late}
    # Measured against the swarm's state at the late joiner's own last epoch (A's checkpoint asked for
    # then), not against A's last checkpoint: A trains on for many epochs after the late joiner stops,
    # and a joiner that synced early then sits about as far from A's final state as from the initial
    # weights (the path is nearly straight), which made this test fail now and then.
    epoch, swarm = scenario["swarm_at_late_epoch"]
    assert abs(epoch - scenario["late_epoch"]) <= 2, (epoch, scenario["late_epoch"])
    assert distance(late, swarm) < 0.5 * distance(late, init), \
        (distance(late, swarm), distance(late, init), epoch, scenario["late_epoch"])


def test_a_killed_peer_leaves_the_others_going(scenario):
    assert scenario["epoch_after_kill"] >= scenario["epoch_at_kill"] + 2
    assert scenario["a_rc"] == 0 and scenario["b_rc"] == 0


def _noticed_nan(*members: Member) -> list[dict]:
    """The warnings by which peers said they left a peer's gradients out or rejected an average."""
    return [w for m in members for w in m.of("warning") if w["code"] in ("peer_rejected", "peer_clipped")]


def test_a_peer_sending_nan_gradients_does_not_poison_the_rest(scenario):
    nan = scenario["x"]
    assert nan.of("step"), "the NaN peer never trained"
    assert not [w for w in nan.of("warning") if w["code"] == "nonfinite_grad"]   # its guard was off
    # The robust reducer leaves a non-finite part out (a clip to nothing) and names a peer clipped round
    # after round; a returned average that is not finite is rejected.
    assert _noticed_nan(scenario["a"], scenario["b"]), "nobody saw the NaN gradients"
    for m in ("a", "b"):
        params = load_params(latest_checkpoint(scenario["base"] / m / "data" / "swarm" / "test-swarm"))
        assert all(bool(v.isfinite().all()) for v in params.values())
        tail = [e["loss"] for e in scenario[m].of("step")][-5:]
        assert tail and all(x is not None and math.isfinite(x) for x in tail)


def test_pause_resume_stop(scenario):
    assert scenario["pause_latency"] < 5.0
    assert scenario["steps_while_paused"] == 0
    assert scenario["b_alive_while_paused"] and scenario["steps_after_resume"]
    paused = scenario["b"].of("paused")[0]
    assert paused["checkpoint"] is None and paused["vram_used"] == 0
    assert scenario["b"].of("stopped") and scenario["b_rc"] == 0


def test_the_host_reports_and_keeps_checkpoints(scenario):
    host = scenario["host"]
    assert scenario["host_rc"] == 0
    invite = (scenario["base"] / "hostout" / "invite.txt").read_text().strip()
    assert invite == host.of("invite")[0]["invite"]
    assert max(e["peers"] for e in host.of("swarm")) >= 3
    assert any(e["global_samples_per_s"] > 0 for e in host.of("swarm"))
    ckpt = latest_checkpoint(scenario["base"] / "hostout")
    assert (ckpt / "modron_checkpoint.json").is_file() and int(ckpt.name.split("-")[1]) >= 3
    assert all(bool(v.isfinite().all()) for v in load_params(ckpt).values())


def test_a_stock_hivemind_dht_bootstraps_a_modron_swarm(tmp_path):
    port = free_port()
    boot = Member("boot", [str(__import__("pathlib").Path(__import__("sys").executable).parent / "hivemind-dht"),
                           "--host_maddrs", f"/ip4/127.0.0.1/tcp/{port}",
                           "--identity_path", str(tmp_path / "boot.key")], tmp_path / "boot", module=False)
    members = [boot]
    try:
        deadline = time.monotonic() + 60
        maddr = None
        while maddr is None and time.monotonic() < deadline:
            found = re.search(rf"(/ip4/127\.0\.0\.1/tcp/{port}/p2p/\w+)", boot.stderr_tail(20000))
            maddr = found.group(1) if found else None
            time.sleep(0.5)
        assert maddr, boot.stderr_tail()
        manifest = write_manifest(tmp_path / "m.toml", run_id="stock-boot", target=32, peers=[maddr])
        # Unbounded peers, stopped once both have seen each other and a global epoch: a --steps
        # bound let a peer that started first finish before the second one had joined.
        peers = [Member(n, JOIN + ["--manifest", str(manifest)], tmp_path / n) for n in ("p", "q")]
        members += peers
        for p in peers:
            p.wait_for(lambda e: e["type"] == "swarm" and e["peers"] == 2 and e["epoch"] >= 1, timeout=150)
        for p in peers:
            p.send("stop")
        for p in peers:
            assert p.finish() == 0
            assert p.of("stopped")
            assert not p.of("warning") or all(w["code"] != "client_mode" for w in p.of("warning"))
    finally:
        for m in members:
            m.kill()


def test_bad_invite_in_json_mode_is_one_line_and_a_failed_event(tmp_path):
    m = Member("bad", ["swarm", "join", "--json", "--invite", "modron-invite:1:AAAA"], tmp_path / "bad")
    assert m.finish(60) == 2
    err = m.stderr_path.read_text().strip().splitlines()
    assert len(err) == 1 and "invite" in err[0]
    failed = m.of("failed")
    assert failed and failed[0]["code"] and "invite" in failed[0]["message"]
