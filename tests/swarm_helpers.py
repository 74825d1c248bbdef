"""Subprocess swarm members for the swarm tests: each in its own process group (p2pd included),
killed with the group when the test ends."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MANIFEST = """\
run_id = "{run_id}"
algorithm = "{algorithm}"
model = "scratch:tiny"
tokenizer = "bytes"
seq_len = 32
micro_batch = 4
target_batch_size = {target}
compression = "{compression}"
matchmaking_time = 1.0
averaging_timeout = 6.0
initial_peers = {peers}

[data]
source = "bundled"
path = "demo/stories"

[optimizer]
name = "adamw"
lr = 3e-3

[schedule]
name = "constant"
warmup_epochs = 0
total_epochs = 1000

[diloco]
inner_steps = {inner_steps}
max_round_s = {max_round_s}
overlap = {overlap}
{auth}"""


def write_manifest(path: Path, run_id: str = "test-swarm", target: int = 48, peers: list[str] | None = None,
                   auth: bool = False, algorithm: str = "sync", compression: str = "float16",
                   inner_steps: int = 10, max_round_s: float = 60.0, overlap: bool = True) -> Path:
    auth_text = '\n[auth]\nrequired = true\nissuer = "the test"\n' if auth else ""
    path.write_text(MANIFEST.format(run_id=run_id, target=target, peers=json.dumps(peers or []), auth=auth_text,
                                    algorithm=algorithm, compression=compression, inner_steps=inner_steps,
                                    max_round_s=max_round_s, overlap="true" if overlap else "false"),
                    encoding="utf-8")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(home: Path, **extra: str) -> dict:
    env = dict(os.environ)
    env.update(MODRON_DATA_DIR=str(home / "data"), MODRON_CACHE_DIR=str(home / "cache"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("MODRON_TEST_SEND_NAN", None)
    env.update(extra)
    return env


class Member:
    """One `modron-train swarm ...` (or other) process; its JSON events collected with arrival times."""

    def __init__(self, name: str, args: list[str], home: Path, module: bool = True, **env: str):
        home.mkdir(parents=True, exist_ok=True)
        self.name, self.home = name, home
        self.events: list[tuple[float, dict]] = []
        self.lines: list[str] = []
        self.stderr_path = home / f"{name}.stderr"
        cmd = [sys.executable, "-m", "training_core.cli", *args] if module else args
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env_for(home, **env), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=open(self.stderr_path, "wb"),
                                     text=True, start_new_session=True)
        self._cond = threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line)
                try:
                    self.events.append((time.monotonic(), json.loads(line)))
                except ValueError:
                    pass
                self._cond.notify_all()

    def send(self, kind: str) -> float:
        """Send a control; returns the time just before it went out. Taken after the write, an answer
        could carry an earlier time: the pump thread can stamp the reply while this thread waits for
        the GIL after the flush (a `resumed` was missed that way with `since=`)."""
        sent_at = time.monotonic()
        self.proc.stdin.write(json.dumps({"v": 1, "type": kind}) + "\n")
        self.proc.stdin.flush()
        return sent_at

    def of(self, type_: str, since: float = 0.0) -> list[dict]:
        with self._cond:
            return [e for t, e in self.events if e.get("type") == type_ and t >= since]

    def wait_for(self, pred, timeout: float = 90.0, since: float = 0.0) -> tuple[float, dict]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for t, e in self.events:
                    if t >= since and pred(e):
                        return t, e
                if self.proc.poll() is not None and not any(pred(e) for _, e in self.events):
                    raise AssertionError(f"{self.name} exited ({self.proc.returncode}) first: {self.stderr_tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{self.name}: timed out; last events "
                                         f"{[e.get('type') for _, e in self.events[-8:]]}; {self.stderr_tail()}")
                self._cond.wait(min(left, 0.5))

    def stderr_tail(self, n: int = 1500) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL the whole process group: the python process and its p2pd daemons."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def finish(self, timeout: float = 60.0) -> int:
        rc = self.proc.wait(timeout)
        # Leftover daemons of a process that exited cleanly go too.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return rc


def latest_checkpoint(run_dir: Path) -> Path:
    ckpts = sorted((run_dir / "checkpoints").glob("ckpt-*"))
    assert ckpts, f"no checkpoint in {run_dir}"
    return ckpts[-1]


def load_params(ckpt: Path):
    from safetensors.torch import load_file
    tensors = load_file(str(ckpt / "model" / "model.safetensors"))
    return {k: v.float() for k, v in tensors.items()}


def distance(a: dict, b: dict) -> float:
    import torch
    return float(torch.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a)))
