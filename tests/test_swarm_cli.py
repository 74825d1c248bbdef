"""`modron-train swarm ...` input errors (in-process, no network): one line, exit 2."""
from __future__ import annotations

import stat

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
