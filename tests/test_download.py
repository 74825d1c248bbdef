"""`modron-train download`: against a fake hub on 127.0.0.1 (the API calls huggingface_hub makes, and
resolve URLs with Range support), never the real one. Progress, resume after a kill, stop, disk, offline."""
from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.hub_helpers import REPO, ROOT, SHA, FakeHub, env_for, tiny_repo


@pytest.fixture
def hub():
    h = FakeHub(tiny_repo())
    yield h
    h.close()


def start(endpoint: str, out: Path, *extra: str, json_mode: bool = True) -> subprocess.Popen:
    args = [sys.executable, "-m", "training_core.cli", "download", REPO, "--out", str(out), *extra]
    return subprocess.Popen(args + (["--json"] if json_mode else []), env=env_for(endpoint), cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def events_of(stdout: str) -> list[dict]:
    from training_core.protocol import decode_event
    return [decode_event(line) for line in stdout.splitlines() if line.strip()]


def part_file(out: Path) -> Path:
    return out / REPO.replace("/", "--") / SHA[:12] / ".partial" / "model.safetensors.part"


def wait_for(predicate, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_download_streams_progress_and_fetches_only_weights_config_and_tokenizer(hub, tmp_path):
    hub.delay = 0.005
    proc = start(hub.url, tmp_path)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    events = events_of(out)
    progress = [e for e in events if e["type"] == "progress"]
    assert progress and all(e["task"] == "download" and e["unit"] == "bytes" for e in progress)
    total = sum(len(tiny_repo()[n]) for n in ("config.json", "tokenizer.json", "README.md", "LICENSE"))
    total += len(hub.files["model.safetensors"])
    assert all(e["total"] == total for e in progress)
    assert [e["done"] for e in progress] == sorted(e["done"] for e in progress)
    assert progress[-1]["done"] == total and any("eta_s" in e and "rate" in e for e in progress)
    (result,) = [e for e in events if e["type"] == "result"]
    assert events[-1] is result and result["task"] == "download"
    folder = Path(result["answer"]["folder"])
    assert folder == tmp_path / "tiny-org--tiny-llama" / SHA[:12] and result["answer"]["commit"] == SHA
    assert sorted(p.name for p in folder.iterdir()) == [".modron-download.json", "LICENSE", "README.md",
                                                         "config.json", "model.safetensors", "tokenizer.json"]
    assert (folder / "model.safetensors").read_bytes() == hub.files["model.safetensors"]
    asked = {r["path"].rsplit("/", 1)[-1] for r in hub.requests if "/resolve/" in r["path"]}
    assert asked == {"config.json", "tokenizer.json", "README.md", "LICENSE", "model.safetensors"}
    # A second run finds everything in place and transfers nothing.
    before = len(hub.requests)
    again = subprocess.run([sys.executable, "-m", "training_core.cli", "download", REPO, "--out", str(tmp_path)],
                           env=env_for(hub.url), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == str(folder)
    assert [r for r in hub.requests[before:] if "/resolve/" in r["path"]] == []


def test_a_killed_download_continues_where_it_stopped(hub, tmp_path):
    size = len(hub.files["model.safetensors"])
    hub.delay = 0.02   # ~1.6 MB/s: the 2 MB file takes over a second
    proc = start(hub.url, tmp_path)
    part = part_file(tmp_path)
    wait_for(lambda: part.exists() and part.stat().st_size >= 256 << 10)
    proc.kill()
    proc.communicate(timeout=10)
    kept = part.stat().st_size
    assert 0 < kept < size
    first = len(hub.sent("model.safetensors"))
    hub.delay = 0.0
    proc = start(hub.url, tmp_path)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    (second,) = hub.sent("model.safetensors")[first:]
    assert second["range"] == f"bytes={kept}-" and second["sent"] == size - kept   # only the rest
    (result,) = [e for e in events_of(out) if e["type"] == "result"]
    assert result["answer"]["transferred"] == size - kept
    folder = Path(result["answer"]["folder"])
    assert (folder / "model.safetensors").read_bytes() == hub.files["model.safetensors"]
    assert not (folder / ".partial").exists()


@pytest.mark.parametrize("how", ["stop", "sigterm"])
def test_stop_or_sigterm_ends_the_download_at_once_and_keeps_the_partial_file(hub, tmp_path, how):
    hub.delay = 0.05   # ~650 KB/s: about three seconds for the weights
    proc = start(hub.url, tmp_path)
    for line in proc.stdout:
        ev = json.loads(line)
        if ev["type"] == "progress" and ev["done"] > 300:   # the weights are on their way
            break
    wait_for(lambda: part_file(tmp_path).exists())
    asked = time.monotonic()
    if how == "stop":
        proc.stdin.write('{"v":1,"type":"stop"}\n')
        proc.stdin.flush()
    else:
        proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=10)
    took = time.monotonic() - asked
    assert proc.returncode == 0, err
    assert took < 2.0, took
    stopped = [e for e in events_of(out) if e["type"] == "stopped"]
    assert stopped and stopped[-1]["task"] == "download" and "download again" in stopped[-1]["message"]
    assert part_file(tmp_path).is_file()
    assert not [e for e in events_of(out) if e["type"] == "result"]


def test_offline_is_one_line_and_exit_2(tmp_path):
    import socket
    with socket.socket() as s:   # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    proc = start(closed, tmp_path, json_mode=False)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "cannot reach the Hugging Face hub" in lines[0] and "Traceback" not in err
    proc = start(closed, tmp_path)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    (failed,) = events_of(out)
    assert failed["type"] == "failed" and "cannot reach" in failed["message"]


def run_here(monkeypatch, endpoint: str, *args: str) -> int:
    """The command in this process (so shutil can be patched); the hub settings as a subprocess has them."""
    from huggingface_hub import constants

    from training_core.cli import main
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "is_offline_mode", lambda: False)
    return main(["download", *args])


def test_not_enough_disk_is_refused_before_any_byte(hub, tmp_path, monkeypatch, capsys):
    import collections
    import shutil
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 30, 10 << 30, 100 << 20))
    assert run_here(monkeypatch, hub.url, REPO, "--out", str(tmp_path / "models")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not enough free disk space" in err and "only 100 MB is free" in err
    assert not [r for r in hub.requests if "/resolve/" in r["path"]]


def test_what_the_hub_says_is_not_trusted(hub, tmp_path, monkeypatch, capsys):
    hub.sizes["model.safetensors"] = 1 << 50      # a petabyte: refused, not believed
    assert run_here(monkeypatch, hub.url, REPO, "--out", str(tmp_path)) == 2
    assert "size that is not believable" in capsys.readouterr().err
    hub.sizes.clear()
    del hub.files["model.safetensors"]             # pickles only: refused, never fetched
    assert run_here(monkeypatch, hub.url, REPO, "--out", str(tmp_path)) == 2
    assert "no safetensors weights" in capsys.readouterr().err
    assert run_here(monkeypatch, hub.url, "other-org/missing", "--out", str(tmp_path)) == 2
    assert "no such model on the Hugging Face hub" in capsys.readouterr().err
    assert run_here(monkeypatch, hub.url, "../../etc", "--out", str(tmp_path)) == 2
    assert "is not a hub model id" in capsys.readouterr().err
    assert not [r for r in hub.requests if "/resolve/" in r["path"]]


def test_a_damaged_file_is_not_kept(hub, tmp_path, monkeypatch, capsys):
    hub.digests["model.safetensors"] = hashlib.sha256(b"other bytes").hexdigest()   # damaged on the way
    assert run_here(monkeypatch, hub.url, REPO, "--out", str(tmp_path)) == 2
    assert "does not match its checksum" in capsys.readouterr().err
    folder = tmp_path / "tiny-org--tiny-llama" / SHA[:12]
    assert not (folder / "model.safetensors").exists() and not part_file(tmp_path).exists()


def test_a_dropped_connection_is_continued_in_the_same_run(hub, tmp_path, monkeypatch, capsys):
    hub.cut["model.safetensors"] = 300 << 10   # the server hangs up after 300 KB of 2 MB
    assert run_here(monkeypatch, hub.url, REPO, "--out", str(tmp_path)) == 0
    first, second = hub.sent("model.safetensors")
    assert first["range"] is None and second["range"] == f"bytes={first['sent']}-"
    assert first["sent"] + second["sent"] == len(hub.files["model.safetensors"])
    folder = Path(capsys.readouterr().out.strip())
    assert (folder / "model.safetensors").read_bytes() == hub.files["model.safetensors"]
