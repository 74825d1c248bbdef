"""`modron-train swarm ...` input errors (in-process, no network): one line, exit 2."""
from __future__ import annotations

import stat
import time

import pytest

from swarm_helpers import write_manifest
from training_core.cli import main
from training_core.swarm.manifest import load_manifest, read_invite


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("modron-train: error: ")
    return err[0]


@pytest.mark.parametrize("invite", ["modron-invite:1:AAAA", "hello there", "modron-invite:7:abc"])
def test_bad_invite_is_one_line_and_exit_2(invite, capsys):
    assert main(["swarm", "join", "--invite", invite]) == 2
    assert "invite" in one_line_error(capsys)


def test_missing_invite_file_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["swarm", "join", "--invite-file", str(tmp_path / "nope.txt")]) == 2
    assert "no such file" in one_line_error(capsys)


def test_private_swarm_needs_a_token(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MODRON_SWARM_TOKEN", raising=False)
    manifest = write_manifest(tmp_path / "m.toml", auth=True)
    assert main(["swarm", "join", "--manifest", str(manifest)]) == 2
    line = one_line_error(capsys)
    assert "--token" in line and "private" in line


def test_local_data_needs_a_data_dir(tmp_path, capsys):
    manifest = write_manifest(tmp_path / "m.toml")
    text = manifest.read_text().replace('source = "bundled"\npath = "demo/stories"', 'source = "local"')
    manifest.write_text(text)
    assert main(["swarm", "join", "--manifest", str(manifest)]) == 2
    assert "--data-dir" in one_line_error(capsys)


def test_join_needs_exactly_one_source(capsys):
    assert main(["swarm", "join"]) == 2
    assert "--invite" in one_line_error(capsys)


def test_invite_command_round_trips_and_checks_peers(tmp_path, capsys):
    manifest = write_manifest(tmp_path / "m.toml")
    peer = "/ip4/127.0.0.1/tcp/31337/p2p/QmaLyVLZEmNPspWpCU5PVz7F4QGCw9yLt82bjzD7SMqCAz"
    assert main(["swarm", "invite", "--manifest", str(manifest), "--peer", peer]) == 0
    invite = capsys.readouterr().out.strip()
    got = read_invite(invite)
    assert got.initial_peers == [peer] and got.run_id == load_manifest(manifest).run_id
    assert main(["swarm", "invite", "--manifest", str(manifest), "--peer", "/ip4/1.2.3.4/tcp/1"]) == 2
    assert "p2p" in one_line_error(capsys)


def test_host_makes_a_private_token_once(tmp_path, monkeypatch):
    from training_core.swarm.host import HostOptions, host_token
    monkeypatch.delenv("MODRON_SWARM_TOKEN", raising=False)
    manifest = load_manifest(write_manifest(tmp_path / "m.toml", auth=True))
    opts = HostOptions(out=tmp_path / "out")
    opts.out.mkdir()
    token = host_token(manifest, opts)
    assert token and len(token) >= 24
    path = opts.out / "token.txt"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert host_token(manifest, opts) == token                  # kept across restarts
    assert host_token(load_manifest(write_manifest(tmp_path / "p.toml")), opts) is None   # public swarm


# --- invites from strangers: consent, local paths, the memory pre-flight ------------------------

def hub_invite(model: str = "org/base-model", **changes) -> str:
    import dataclasses
    from training_core.swarm.manifest import bundled_path, make_invite
    m = dataclasses.replace(load_manifest(bundled_path("swarms/demo.toml")), model=model, tokenizer="auto", **changes)
    return make_invite(m)


def test_a_hub_model_in_an_invite_needs_consent(capsys):
    assert main(["swarm", "join", "--invite", hub_invite()]) == 2
    line = one_line_error(capsys)
    assert line == ("modron-train: error: invite: this swarm trains with the model 'org/base-model', which would be "
                    "downloaded from the Hugging Face hub (licence: unknown until downloaded: check it on "
                    "https://huggingface.co/org/base-model); to agree, join again with --accept-download org/base-model")
    assert main(["swarm", "join", "--invite", hub_invite(), "--accept-download", "org/other"]) == 2
    assert "--accept-download org/base-model" in one_line_error(capsys)


def test_consent_passes_the_check_and_the_download_stops_at_the_offline_hub(capsys, monkeypatch, tmp_path):
    # A folder named like the hub id in the current folder is never read instead of the hub.
    from helpers import make_local_model
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "base-model").mkdir(parents=True)
    make_local_model(tmp_path / "org" / "base-model")
    capsys.readouterr()                      # the model writer's progress bar
    assert main(["swarm", "join", "--invite", hub_invite(), "--accept-download", "org/base-model",
                 "--device", "cpu"]) == 2
    line = one_line_error(capsys)
    assert line.startswith("modron-train: error: org/base-model: could not download its config.json from the "
                           "Hugging Face hub")


def test_join_arguments_are_checked(capsys, tmp_path):
    manifest = str(write_manifest(tmp_path / "m.toml"))
    for flags, words in ((["--vram-fraction", "1e300"], "--vram-fraction: must be more than 0 and at most 1"),
                         (["--vram-fraction", "0"], "--vram-fraction"), (["--device", "gpu0"], "is not a device"),
                         (["--minutes", "nan"], "--minutes"), (["--steps", "0"], "--steps: must be at least 1"),
                         (["--port", "70000"], "--port: must be from 0 to 65535")):
        assert main(["swarm", "join", "--manifest", manifest, *flags]) == 2
        assert words in one_line_error(capsys)


def test_a_manifest_naming_a_local_model_makes_no_invite(tmp_path, capsys):
    manifest = write_manifest(tmp_path / "m.toml")
    manifest.write_text(manifest.read_text().replace('model = "scratch:tiny"', f'model = "{tmp_path / "model"}"'))
    assert main(["swarm", "invite", "--manifest", str(manifest)]) == 2
    line = one_line_error(capsys)
    assert f"{manifest}: model '{tmp_path / 'model'}' is not allowed in an invite" in line


def test_the_pre_flight_with_torch_checks_the_device_the_engine_will_use(tmp_path, monkeypatch):
    from training_core.errors import WontFitError
    from training_core.swarm import peer
    opts = peer.PeerOptions(device="cpu")
    limit, words, device, precision = peer.device_memory(opts)
    assert limit > 0 and words == "this computer's RAM" and (device, precision) == ("cpu", "fp32")
    m = load_manifest(write_manifest(tmp_path / "m.toml"))
    peer.prepare_sources(m, opts, "m.toml", from_invite=True)     # the test swarm fits; nothing to download
    assert opts.model_source is None and opts.tokenizer_source is None
    monkeypatch.setattr(peer, "device_memory", lambda o: (64 * 1024 ** 2, "the memory of the Tiny GPU", "cuda:0",
                                                          "bf16"))
    import dataclasses
    with pytest.raises(WontFitError, match=r"m.toml: this swarm needs about .* more than all of the memory of the "
                                           r"Tiny GPU \(64.0 MB\); this computer cannot join it"):
        peer.prepare_sources(dataclasses.replace(m, micro_batch=512, seq_len=2048), opts, "m.toml", from_invite=True)


def test_a_peer_whose_leave_was_given_up_still_exits_with_its_code():
    """hivemind leaves a non-daemon executor thread waiting out a round (averaging_timeout: minutes
    on a slow link) when its shutdown is given up on; Python would join it at exit, and a peer that
    had said `stopped` lived on (seen on the bench). The stand-in thread here never ends."""
    import subprocess
    import sys
    import time
    from pathlib import Path
    code = (
        "import concurrent.futures, threading, types, sys\n"
        "from training_core.swarm.commands import _exit_if_leave_abandoned\n"
        "pool = concurrent.futures.ThreadPoolExecutor(1)\n"
        "pool.submit(threading.Event().wait)\n"
        "print('said stopped', flush=False)\n"
        "engine = types.SimpleNamespace(strategy=types.SimpleNamespace(leave_abandoned=sys.argv[1] == '1'))\n"
        "_exit_if_leave_abandoned(engine, 3)\n"
        "sys.exit(4)\n")
    root = Path(__file__).resolve().parents[1]
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code, "1"], cwd=root, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (3, "said stopped\n") and time.monotonic() - t0 < 30
    with pytest.raises(subprocess.TimeoutExpired):    # without it: stuck in the interpreter's exit
        subprocess.run([sys.executable, "-c", code, "0"], cwd=root, capture_output=True, text=True, timeout=5)


def test_a_peer_held_in_a_round_after_stop_says_stopped_and_exits():
    """StopWatchdog: a sync peer stuck inside hivemind's step (a state-averaging round of its own,
    minutes on a slow link) answers `stop` within the grace time; one not in a step is left alone."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    code = (
        "import sys, threading, time, types\n"
        "from training_core.swarm import commands\n"
        "commands.STOP_GRACE_S = 1.0\n"
        "out = commands.Output(True)\n"
        "stuck = sys.argv[1] == '1'\n"
        "strategy = types.SimpleNamespace(stepping_since=time.monotonic() if stuck else None)\n"
        "dog = commands.StopWatchdog(types.SimpleNamespace(strategy=strategy, step=7), out)\n"
        "dog.start()\n"
        "time.sleep(4)\n"
        "out({'v': 1, 'type': 'stopped', 'step': 8, 'checkpoint': None})\n"
        "out({'v': 1, 'type': 'stopped', 'step': 9, 'checkpoint': None})\n"
        "sys.exit(5)\n")
    root = Path(__file__).resolve().parents[1]
    for stuck, rc, step in (("1", 0, 7), ("0", 5, 8)):
        done = subprocess.run([sys.executable, "-c", code, stuck], cwd=root, capture_output=True, text=True,
                              timeout=60)
        events = [json.loads(line) for line in done.stdout.splitlines()]
        assert done.returncode == rc, done.stderr[-2000:]
        assert [e["step"] for e in events if e["type"] == "stopped"] == [step]     # said once
        assert any(e.get("code") == "stop_forced" for e in events) == (stuck == "1")


def test_a_stop_signal_never_waits_for_the_inbox_lock():
    """The handler runs in the main thread, which may hold the inbox's lock (inside poll/wait) when the
    signal comes: queuing the stop must not take that lock in the handler (it deadlocked in principle)."""
    from training_core.controls import Controls
    from training_core.swarm.commands import _post_stop
    controls = Controls()
    with controls._q.mutex:          # the main thread inside Queue.get when SIGTERM lands
        t0 = time.monotonic()
        _post_stop(controls)
        assert time.monotonic() - t0 < 0.5
    assert controls.wait(5) == "stop"
